#!/bin/bash
# A = no watcher, B = watcher at nice 10; alternating
cd /work/main
for i in 1 2; do
  for v in A B; do
    if [ $v = B ]; then python3 /tmp/nice/watch.py 10 & W=$!; fi
    .venv/bin/python -m bench.ingest --opensearch-warm-up 100000 --out /tmp/nice/$v$i > /tmp/nice/$v$i.log 2>&1
    if [ $v = B ]; then kill $W; fi
  done
done
echo done > /tmp/nice/finished
