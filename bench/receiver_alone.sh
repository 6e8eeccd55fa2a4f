#!/usr/bin/env bash
# The receiver alone (no Faust worker, no sinks): N CT instances of 0.5 MB over one association
# from dcmtk storescu, then the mean publish wait from the receiver's metrics. Uses the test
# config (Kafka 19092, receiver 11190, metrics 19464); extra settings by environment, e.g.
#   DIANA_RECEIVER_MAX_PDU_BYTES=16384 bench/receiver_alone.sh 200
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-200}"
export DIANA_CONFIG="$PWD/var/test/diana-test.toml"
[[ -f "$DIANA_CONFIG" ]] || { echo "run ./test.sh once first (it writes $DIANA_CONFIG)" >&2; exit 2; }
.venv/bin/diana stack start >/dev/null
.venv/bin/python -m diana.cli receive >/dev/null 2>&1 &
receiver=$!
trap 'kill $receiver 2>/dev/null; wait $receiver 2>/dev/null || true' EXIT
corpus=$(mktemp -d)
.venv/bin/python -c "
from pathlib import Path
from tests.support.dicomgen import SeriesSpec, make_study
make_study(Path('$corpus'), [SeriesSpec('CT', 'ALONE', $n)], rows=512)"
for _ in $(seq 50); do echoscu -aec DIANATEST 127.0.0.1 11190 2>/dev/null && break; sleep 0.2; done
/usr/bin/time -f "wall %e s for $n instances" env TCP_NODELAY=1 /usr/bin/storescu -aec DIANATEST 127.0.0.1 11190 "$corpus"/*.dcm
curl -s 127.0.0.1:19464/metrics | grep -E "^diana_publish_latency_seconds_(sum|count)"
rm -rf "$corpus"
