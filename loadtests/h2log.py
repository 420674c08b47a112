#!/usr/bin/env python3
"""Summarises one h2load run as JSON: requests/s from its report, latency percentiles from its
--log-file (one line per request: start time, status, duration in microseconds)."""
import json
import re
import sys

report, log = open(sys.argv[1]).read(), sys.argv[2]
m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", report)
secs = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", report)
lat = []
non2xx = 0
with open(log) as f:
    for line in f:
        parts = line.split()
        if len(parts) < 3:
            continue
        status, us = int(parts[1]), int(parts[2])
        if not 200 <= status < 300:
            non2xx += 1
        lat.append(us)
lat.sort()


def pct(q):
    return lat[min(len(lat) - 1, max(0, int(len(lat) * q + 0.5) - 1))] if lat else 0


print(json.dumps({
    "requests": int(done.group(4)) if done else len(lat),
    "failed": int(done.group(5)) + int(done.group(6)) if done else 0,
    "non2xx": non2xx,
    "duration_us": int(secs * 1e6),
    "p50_us": pct(0.50), "p99_us": pct(0.99), "p999_us": pct(0.999), "max_us": lat[-1] if lat else 0,
}))
