#!/usr/bin/env bash
# diana reindex on a kept bench.reindex stack (python -m bench.reindex --events 5904 --work /tmp/rx29 --keep-stack):
# "before": tqdm imported first and no bytecode of the tree (what the command paid before, with
# PYTHONDONTWRITEBYTECODE=1 as on these machines); "now": neither (bytecode written as bench.ingest now does).
cd /work/main
CFG=/tmp/rx29/diana.toml
FOLDERS="diana producers schemas stream_apps sinks access operations compose"
for i in 1 2 3 4 5; do
  for v in before now; do
    case $v in
      before) pre="import tqdm;"; find $FOLDERS -name __pycache__ -type d -prune -exec rm -rf {} +;;
      now) pre=""; .venv/bin/python -c "from bench.pipeline_steps import compile_bytecode; compile_bytecode()";;
    esac
    for kind in instances dose-alerts; do
      s=$(date +%s.%N)
      env -u DIANA_CONFIG PYTHONDONTWRITEBYTECODE=1 .venv/bin/python -c "import sys; $pre from diana.cli import main; sys.exit(main(sys.argv[1:]))" --config $CFG reindex --kinds $kind --no-progress --delete-old >/dev/null 2>&1 || echo FAIL
      e=$(date +%s.%N)
      printf "%s %s %s %.2f\n" $i $v $kind $(echo "$e - $s" | bc)
    done
  done
done
