#!/usr/bin/env python3
"""Medians (and per-run ratios against plain) from bench/front.sh's runs.jsonl.

    python3 bench/front_table.py bench/results/STAMP-front/runs.jsonl
"""
import json, sys, statistics as st
rows = [r for r in map(json.loads, open(sys.argv[1])) if "test" in r]
def med(front, test, key, **match):
    v = [r[key] for r in rows if r.get("front") == front and r["test"] == test and r.get(key) is not None
         and all(r.get(k) == x for k, x in match.items())]
    return st.median(v) if v else float("nan")
def ratio(front, test, key, **match):
    # per run, against plain in the same run, then the median
    out = []
    for run in sorted({r["run"] for r in rows}):
        a = [r[key] for r in rows if r["run"] == run and r.get("front") == "plain" and r["test"] == test and all(r.get(k) == x for k, x in match.items())]
        b = [r[key] for r in rows if r["run"] == run and r.get("front") == front and r["test"] == test and all(r.get(k) == x for k, x in match.items())]
        if a and b and a[0]:
            out.append(b[0] / a[0])
    return st.median(out) if out else float("nan")
print("| median of runs | plain | tls | h2 | tls / plain | h2 / plain |")
print("|---|---|---|---|---|---|")
conns = sorted({r["conns"] for r in rows if r["test"] == "front-throughput"}, reverse=True)
for d in ("up", "down"):
    for c in conns:
        for key, name in (("mbyte_per_s", "MB/s"), ("proxy_cpu_s_per_gb", "proxy CPU-s/GB")):
            m = dict(dir=d, conns=c)
            vals = [med(f, "front-throughput", key, **m) for f in ("plain", "tls", "h2")]
            rs = [ratio(f, "front-throughput", key, **m) for f in ("tls", "h2")]
            print(f"| {d}, {c} tunnel(s): {name} | " + " | ".join(f"{v:.2f}" for v in vals) + " | " + " | ".join(f"{x:.2f}" for x in rs) + " |")
for key, name in (("tunnels_per_s", "tunnels/s"), ("p50_us", "setup p50 µs"), ("p99_us", "setup p99 µs"), ("proxy_cpu_us_per_tunnel", "proxy CPU µs/tunnel")):
    vals = [med(f, "front-connrate", key) for f in ("plain", "tls", "h2")]
    rs = [ratio(f, "front-connrate", key) for f in ("tls", "h2")]
    print(f"| connrate: {name} | " + " | ".join(f"{v:.0f}" for v in vals) + " | " + " | ".join(f"{x:.2f}" for x in rs) + " |")
k = "kib_per_idle_tunnel"
if any(k in r for r in rows):
    vals = [med(f, "front-idle", k) for f in ("plain", "tls", "h2")]
    rs = [ratio(f, "front-idle", k) for f in ("tls", "h2")]
    print(f"| idle: proxy KiB per tunnel | " + " | ".join(f"{v:.1f}" for v in vals) + " | " + " | ".join(f"{x:.2f}" for x in rs) + " |")
