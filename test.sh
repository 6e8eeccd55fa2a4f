#!/usr/bin/env bash
# The tests on a fresh machine: install what is needed, then run the whole pytest suite.
# Integration tests start their own Kafka and OpenSearch on test ports (19092, 19200)
# and fail, never skip, if a service cannot run.   ./test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh --test
exec .venv/bin/python -m pytest -p no:cacheprovider -ra --durations=30 "$@"
