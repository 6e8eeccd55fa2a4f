#!/usr/bin/env bash
# The static checks .ci/run runs before the tests: ruff (lint and format), the import contracts of
# the folder tree (import-linter, contracts in setup.cfg) and the type checker (mypy).
#   scripts/check.sh            (needs the test install: scripts/bootstrap.sh --test)
#
# The top-level folders are subpackages of `diana` through setup.cfg's package_dir, which neither
# import-linter nor mypy can follow in a checkout; both therefore read a non-editable install of the
# tree in var/check/site (what a wheel would ship), and mypy's paths are mapped back to the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin
echo "==> ruff check"; $py/ruff check .
echo "==> ruff format --check"; $py/ruff format --check .
echo "==> installing the tree into var/check/site"
rm -rf var/check && mkdir -p var/check
$py/pip install -q --disable-pip-version-check --no-deps --target var/check/site . >var/check/pip.log 2>&1 \
    || { cat var/check/pip.log; exit 1; }
# From var/check, so that the checkout's own diana/ folder is not on the import path.
echo "==> import contracts"; (cd var/check && PYTHONPATH=site ../../$py/lint-imports --no-cache ../../setup.cfg)
echo "==> mypy"
(cd var/check && MYPYPATH=site ../../$py/mypy --config-file ../../setup.cfg --cache-dir .mypy_cache -p diana) \
    | $py/python scripts/checkout_paths.py
