#!/usr/bin/env bash
# The main job on a fresh machine: install what is needed, start Kafka and OpenSearch,
# start the receiver, the Faust worker and both sinks. Ctrl-C stops everything.
#   ./run.sh [--config FILE]
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh
config=()
if [[ "${1:-}" == "--config" ]]; then config=(--config "$2"); shift 2; fi
exec .venv/bin/diana "${config[@]}" run "$@"
