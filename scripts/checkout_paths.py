"""Rewrites paths of the installed tree (site/diana/producers/x.py) to the checkout's (producers/x.py),
reading the mapping from setup.cfg's package_dir; keeps the exit status of mypy via PIPESTATUS-free
logic: exits 1 if any line reports an error."""

import configparser
import sys

config = configparser.ConfigParser()
config.read("setup.cfg")
mapping = {}
for line in config["options"]["package_dir"].strip().splitlines():
    package, _, folder = (part.strip() for part in line.partition("="))
    mapping["site/" + package.replace(".", "/") + "/"] = folder + "/"
# Longest package first, so diana.stream_apps.dose wins over diana.stream_apps.
ordered = sorted(mapping.items(), key=lambda item: -len(item[0]))
failed = False
for line in sys.stdin:
    for installed, folder in ordered:
        if line.startswith(installed):
            line = folder + line[len(installed) :]
            break
    failed = failed or ": error:" in line
    sys.stdout.write(line)
sys.exit(1 if failed else 0)
