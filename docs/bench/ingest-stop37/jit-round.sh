#!/bin/bash
# usage: round.sh LABEL OPTS  -- restart the kept stack's OpenSearch with OPTS, then 8 reindexes
cd /work/main
# OPTS reach OpenSearch through RX_OS_OPTS: a temporary edit of compose/local/stack.py (not committed)
# appended os.environ.get("RX_OS_OPTS", "") to OPENSEARCH_JAVA_OPTS; bench.reindex starts it again.
pkill -f 'org.opensearch.bootstrap.OpenSearch'; sleep 6
RX_OS_OPTS="$2" .venv/bin/python -m bench.reindex --events 5904 --runs 1 --processes 1 --work /tmp/rx37 --keep-stack --no-fill 2>&1 | grep "events in"
OSPID=$(pgrep -f 'org.opensearch.bootstrap.OpenSearch' | head -1)
tr '\0' ' ' < /proc/$OSPID/cmdline | grep -o "TieredStopAtLevel=[0-9]\|CICompilerCount=[0-9]" 
for i in 1 2 3 4 5 6 7 8; do echo -n "$1 $i "; .venv/bin/python docs/bench/ingest-stop37/os-threads.py $OSPID -- env -u DIANA_CONFIG .venv/bin/python -m diana.cli --config /tmp/rx37/diana.toml reindex --kinds instances --no-progress --delete-old; done
