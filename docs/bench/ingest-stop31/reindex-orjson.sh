#!/usr/bin/env bash
# diana reindex on a kept bench.reindex stack (python -m bench.reindex --events 5904 --work /tmp/rx31 --keep-stack),
# the sink's document JSON by the standard library ("json", the tree before, saved as /tmp/os_before.py) or by
# orjson ("orjson", /tmp/os_after.py), alternating; wall time and the command's CPU (user+sys, from /usr/bin/time).
cd /work/main
CFG=/tmp/rx31/diana.toml
for i in 1 2 3 4 5 6; do
  for v in json orjson; do
    case $v in json) cp /tmp/os_before.py sinks/opensearch.py;; orjson) cp /tmp/os_after.py sinks/opensearch.py;; esac
    .venv/bin/python -c "from bench.pipeline_steps import compile_bytecode; compile_bytecode()"
    s=$(date +%s.%N)
    env -u DIANA_CONFIG PYTHONDONTWRITEBYTECODE=1 /usr/bin/time -o /tmp/reindex-cpu.txt -f "%U %S" \
      .venv/bin/python -m diana.cli --config $CFG reindex --kinds instances --no-progress --delete-old >/dev/null 2>&1 || echo FAIL
    cpu=$(tail -1 /tmp/reindex-cpu.txt)
    e=$(date +%s.%N)
    printf "%s %-6s wall %.2f s  cpu %s\n" $i $v $(echo "$e - $s" | bc) "$(echo $cpu | awk '{print $1+$2}')"
  done
done
cp /tmp/os_after.py sinks/opensearch.py
