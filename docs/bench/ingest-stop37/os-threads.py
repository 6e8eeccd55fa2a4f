"""OpenSearch's CPU per thread group (names from jstack) over one command: python os-threads.py PID -- CMD..."""

import collections
import os
import re
import subprocess
import sys
import time

pid = sys.argv[1]
cmd = sys.argv[3:]


def proc_cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


def snap():
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            s = open(f"/proc/{pid}/task/{tid}/stat").read()
        except OSError:
            continue
        f = s[s.rindex(")") + 2 :].split()
        out[tid] = int(f[11]) + int(f[12])
    return out


def names():
    out = subprocess.run(
        ["su", "diana-star", "-s", "/bin/bash", "-c", f"/usr/lib/jvm/java-17-openjdk-amd64/bin/jstack {pid}"],
        capture_output=True,
        text=True,
    ).stdout
    m = {}
    for line in out.splitlines():
        g = re.match(r'"([^"]+)".*nid=0x([0-9a-f]+)', line)
        if g:
            m[str(int(g.group(2), 16))] = g.group(1)
    return m


p0 = proc_cpu()
a = snap()
t = time.time()
subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
w = time.time() - t
b = snap()
p1 = proc_cpu()
nm = names()
groups = collections.Counter()
for tid, ticks in b.items():
    name = nm.get(tid, "?")
    name = re.sub(r"^opensearch\[[^\]]*\]", "", name)
    name = re.sub(r"\d+", "N", name)
    groups[name] += ticks - a.get(tid, 0)
tot = sum(groups.values())
print(
    f"wall {w:.3f}s opensearch {(p1 - p0) / 100:.2f} cpu-s (live threads {tot / 100:.2f}): "
    + ", ".join(f"{k} {v / 100:.2f}" for k, v in groups.most_common(9) if v),
    flush=True,
)
