#!/usr/bin/env bash
# usage: reindex-trees.sh ROUNDS TREE_A TREE_B   alternates `diana reindex --kinds instances` (as bench.ingest runs it:
# no --delete-old) from two checkouts, each with its own venv, on a kept bench.reindex stack (/tmp/rx36); prints each
# run's wall time, the command's CPU and OpenSearch's CPU over the run.
CFG=/tmp/rx36/diana.toml
R=$1; A=$2; B=$3
mkdir -p /tmp/ab36
for t in "$A" "$B"; do (cd "$t" && .venv/bin/python -c "from bench.pipeline_steps import compile_bytecode; compile_bytecode()"); done
OSPID=$(pgrep -f 'org.opensearch.bootstrap.OpenSearch' | head -1)
cpu() { awk '{print $14+$15}' /proc/$OSPID/stat; }
for i in $(seq 1 $R); do
  for t in "$A" "$B"; do
    o0=$(cpu); s=$(date +%s.%N)
    (cd "$t" && /usr/bin/time -f "%U %S" -o /tmp/ab36/t env -u DIANA_CONFIG PYTHONDONTWRITEBYTECODE=1 .venv/bin/python -m diana.cli --config $CFG reindex --kinds instances --no-progress >/dev/null 2>/tmp/ab36/err) || { echo FAIL; tail -3 /tmp/ab36/err; }
    e=$(date +%s.%N); o1=$(cpu)
    printf "%s %-14s %.3f s  rx_cpu %s  os_cpu %.2f\n" $i "$t" $(echo "$e - $s" | bc) "$(awk '{print $1+$2}' /tmp/ab36/t)" $(echo "($o1 - $o0)/100" | bc -l)
  done
done
