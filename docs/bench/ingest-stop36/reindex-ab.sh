#!/usr/bin/env bash
# usage: reindex-ab.sh ROUNDS VARIANT_ENV...   alternates the baseline and each variant (an env assignment like
# RX_PAR=1) of `diana reindex --kinds instances` on a kept bench.reindex stack (/tmp/rx36); prints each run's
# wall time, the command's CPU and OpenSearch's CPU over the run.
cd "$(dirname "$0")/../../.."
CFG=/tmp/rx36/diana.toml
R=$1; shift
mkdir -p /tmp/ab36
.venv/bin/python -c "from bench.pipeline_steps import compile_bytecode; compile_bytecode()"
OSPID=$(pgrep -f 'org.opensearch.bootstrap.OpenSearch' | head -1)
cpu() { awk '{print $14+$15}' /proc/$OSPID/stat; }
for i in $(seq 1 $R); do
  for v in base "$@"; do
    o0=$(cpu); s=$(date +%s.%N)
    if [ $v = base ]; then envs=""; else envs="$v"; fi
    /usr/bin/time -f "%U %S" -o /tmp/ab36/t env -u DIANA_CONFIG $envs PYTHONDONTWRITEBYTECODE=1 .venv/bin/python -m diana.cli --config $CFG reindex --kinds instances --no-progress --delete-old >/dev/null 2>/tmp/ab36/err || { echo FAIL; tail -3 /tmp/ab36/err; }
    e=$(date +%s.%N); o1=$(cpu)
    printf "%s %-12s %.3f s  rx_cpu %s  os_cpu %.2f\n" $i $v $(echo "$e - $s" | bc) "$(awk '{print $1+$2}' /tmp/ab36/t)" $(echo "($o1 - $o0)/100" | bc -l)
  done
done
