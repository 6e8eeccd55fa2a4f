#!/usr/bin/env bash
# diana reindex as committed vs. with aiohttp and rich imported first (what the command paid before).
cd /work/main
CFG=/tmp/rx29/diana.toml
for i in 1 2 3 4 5; do
  for v in before now; do
    case $v in
      before) pre="import aiohttp, rich;";;
      now) pre="";;
    esac
    for kind in instances dose-alerts; do
      s=$(date +%s.%N)
      env -u DIANA_CONFIG .venv/bin/python -c "import sys; $pre from diana.cli import main; sys.exit(main(sys.argv[1:]))" --config $CFG reindex --kinds $kind --no-progress --delete-old >/dev/null 2>&1 || echo FAIL
      e=$(date +%s.%N)
      printf "%s %s %s %.2f\n" $i $v $kind $(echo "$e - $s" | bc)
    done
  done
done
