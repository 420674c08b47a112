#!/usr/bin/env python3
"""Turns loadtests/run.sh's raw JSON lines into <out>.json, <out>.md (tables) and <out>.svg
(requests/s and p50/p99/p99.9 latency per proxy and protocol, a hand-written SVG).

usage: report.py RAW.jsonl OUT_PREFIX MACHINE_JSON COMMAND"""
import json
import statistics
import sys

CLK_TCK = 100  # /proc/PID/stat ticks per second on Linux
raw_path, out, machine, command = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
rows = [json.loads(l) for l in open(raw_path) if l.strip()]
TARGETS = ["direct", "reveille", "nginx", "haproxy"]
PROTOS = ["http1", "h2c", "https"]
TITLES = {
    "http1": "HTTP/1.1 keep-alive (wrk)",
    "h2c": "HTTP/2 h2c prior knowledge (h2load)",
    "https": "HTTP/1.1 over TLS 1.3, keep-alive (wrk)",
}

warm = {}
for proto in PROTOS:
    for t in TARGETS:
        runs = []
        for r in rows:
            if r.get("target") != t or r.get("proto") != proto:
                continue
            m = r.get("wrk") or r.get("h2load")
            secs = m["duration_us"] / 1e6
            runs.append({
                "round": r["round"],
                "rps": m["requests"] / secs,
                "requests": m["requests"],
                "errors": m.get("errors", 0) + m.get("failed", 0) + m.get("non2xx", 0),
                "p50_ms": m["p50_us"] / 1e3,
                "p99_ms": m["p99_us"] / 1e3,
                "p999_ms": m["p999_us"] / 1e3,
                "cpu_s_per_100k": r["cpu_ticks"] / CLK_TCK / m["requests"] * 1e5 if m["requests"] else None,
                "load": r["load"],
            })
        if not runs:
            continue
        # The median round by throughput stands for the target; every round is kept in the JSON.
        runs.sort(key=lambda x: x["rps"])
        med = runs[len(runs) // 2]
        warm.setdefault(proto, {})[t] = {"median": med, "rounds": runs}

cold = {r["cold"]: dict(r["result"], load=r["load"]) for r in rows if "cold" in r}
doc = {"machine": machine, "command": command, "warm": warm, "cold": cold}
json.dump(doc, open(out + ".json", "w"), indent=2)

md = [f"# Load test results\n",
      f"- machine: {machine['nproc']} CPUs, {machine['cpu']}",
      f"- load average at the end: {' '.join(machine['load_avg'])}",
      f"- command: `{command}`\n"]
for proto in PROTOS:
    if proto not in warm:
        continue
    w = warm[proto]
    ng = w.get("nginx", {}).get("median")
    md.append(f"## Warm path, {TITLES[proto]}\n")
    md.append("| target | req/s | vs nginx | p50 ms | p99 ms | p99.9 ms | proxy CPU s / 100k req | CPU vs nginx | errors | load avg |")
    md.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for t in TARGETS:
        if t not in w:
            continue
        m = w[t]["median"]
        vs = f"{m['rps'] / ng['rps']:.2f}×" if ng else "-"
        cpu = m["cpu_s_per_100k"]
        cvs = f"{cpu / ng['cpu_s_per_100k']:.2f}×" if ng and t != "direct" and ng["cpu_s_per_100k"] else "-"
        label = "direct (origin CPU)" if t == "direct" else t
        md.append(f"| {label} | {m['rps']:.0f} | {vs} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | {m['p999_ms']:.3f} "
                  f"| {cpu:.3f} | {cvs} | {m['errors']} | {m['load']} |")
    md.append("")
if cold:
    md.append("## Cold path\n")
    if "wake" in cold:
        o = cold["wake"]["overhead_listen_to_first_request"]
        md.append(f"- wake-up overhead, process backend, TCP probe: p50 {o['p50_us'] / 1e3:.3f} ms, "
                  f"p99 {o['p99_us'] / 1e3:.3f} ms, max {o['max_us'] / 1e3:.3f} ms over {o['n']} wake-ups "
                  f"(load {cold['wake']['load']})")
    if "watch" in cold:
        o = cold["watch"]["overhead_listen_to_first_request"]
        md.append(f"- wake-up overhead, readiness as an event: p50 {o['p50_us'] / 1e3:.3f} ms, "
                  f"p99 {o['p99_us'] / 1e3:.3f} ms, max {o['max_us'] / 1e3:.3f} ms over {o['n']} wake-ups "
                  f"(load {cold['watch']['load']})")
    if "burst" in cold:
        b = cold["burst"]
        md.append(f"- burst: {b['connections']} connections held during one cold start: {b['answered_200']} answered 200, "
                  f"{b['failed_or_lost']} failed or lost; max held {b['max_held']:.0f}; RSS {b['rss_before_kib'] / 1024:.1f} MiB "
                  f"before, {b['rss_while_held_kib'] / 1024:.1f} MiB while held, peak (VmHWM) {b['peak_rss_vmhwm_kib'] / 1024:.1f} MiB; "
                  f"**{b['rss_per_held_request_kib']:.1f} KiB per held request** (load {b['load']})")
        if b.get("failure_reasons"):
            md.append(f"  - why they failed: {'; '.join(f'{n} × {r}' for r, n in b['failure_reasons'].items())}")
        k = b.get("kernel_tcp_counters_during_burst")
        if k:
            md.append(f"  - kernel, machine-wide, during the burst: {k.get('TcpExt:ListenOverflows', 0)} listen overflows, "
                      f"{k.get('TcpExt:TCPSynRetrans', 0)} SYN retries, {k.get('Tcp:EstabResets', 0)} established connections reset")
    if "services" in cold:
        s = cold["services"]
        md.append(f"- {s['services']} services: RSS {s['rss_kib'] / 1024:.1f} MiB (one service: {s['rss_one_service_kib'] / 1024:.1f} MiB; "
                  f"{s['per_service_kib']:.2f} KiB per service), ready {s['start_to_ready_s']:.2f} s after start (load {s['load']})")
    md.append("")
open(out + ".md", "w").write("\n".join(md))

# ---- SVG: one panel per protocol; bars for req/s, dots for p50/p99/p99.9 on a log scale ----
W, PH, PAD = 860, 300, 60
colors = {"direct": "#888888", "reveille": "#d9480f", "nginx": "#2b8a3e", "haproxy": "#1c7ed6"}
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{PH * len(warm) + 40}" font-family="sans-serif" font-size="12">',
       '<rect width="100%" height="100%" fill="white"/>']
import math
y0 = 20
for proto in PROTOS:
    if proto not in warm:
        continue
    w = warm[proto]
    ts = [t for t in TARGETS if t in w]
    svg.append(f'<text x="{PAD}" y="{y0 + 12}" font-weight="bold">{TITLES[proto]}: '
               f'throughput (bars, left) and latency p50 ○ / p99 ● / p99.9 ◆ (right, log ms)</text>')
    top, bottom = y0 + 30, y0 + PH - 50
    left_w = (W - 2 * PAD) / 2
    maxrps = max(w[t]["median"]["rps"] for t in ts) * 1.15
    bw = left_w / len(ts) * 0.6
    for i, t in enumerate(ts):
        m = w[t]["median"]
        x = PAD + i * left_w / len(ts) + bw * 0.3
        h = (bottom - top) * m["rps"] / maxrps
        svg.append(f'<rect x="{x:.1f}" y="{bottom - h:.1f}" width="{bw:.1f}" height="{h:.1f}" fill="{colors[t]}"/>')
        svg.append(f'<text x="{x + bw / 2:.1f}" y="{bottom - h - 4:.1f}" text-anchor="middle">{m["rps"] / 1000:.1f}k</text>')
        svg.append(f'<text x="{x + bw / 2:.1f}" y="{bottom + 15:.1f}" text-anchor="middle">{t}</text>')
    svg.append(f'<text x="{PAD}" y="{bottom + 32}">requests/s</text>')
    # latency panel
    lx0 = PAD + left_w + 40
    lat = [w[t]["median"][k] for t in ts for k in ("p50_ms", "p99_ms", "p999_ms")]
    lo = 10 ** math.floor(math.log10(max(min(lat), 1e-3)))
    hi = 10 ** math.ceil(math.log10(max(lat)))
    def ly(v):
        v = max(v, lo)
        return bottom - (bottom - top) * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    d = lo
    while d <= hi * 1.0001:
        svg.append(f'<line x1="{lx0}" x2="{W - PAD}" y1="{ly(d):.1f}" y2="{ly(d):.1f}" stroke="#ddd"/>')
        svg.append(f'<text x="{W - PAD + 4}" y="{ly(d) + 4:.1f}">{d:g} ms</text>')
        d *= 10
    step = (W - PAD - lx0) / len(ts)
    for i, t in enumerate(ts):
        m = w[t]["median"]
        cx = lx0 + step * (i + 0.5)
        svg.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{ly(m["p50_ms"]):.1f}" y2="{ly(m["p999_ms"]):.1f}" stroke="{colors[t]}" stroke-width="2"/>')
        svg.append(f'<circle cx="{cx:.1f}" cy="{ly(m["p50_ms"]):.1f}" r="5" fill="white" stroke="{colors[t]}" stroke-width="2"/>')
        svg.append(f'<circle cx="{cx:.1f}" cy="{ly(m["p99_ms"]):.1f}" r="5" fill="{colors[t]}"/>')
        y = ly(m["p999_ms"])
        svg.append(f'<path d="M{cx:.1f},{y - 6:.1f} l6,6 l-6,6 l-6,-6 z" fill="{colors[t]}"/>')
        svg.append(f'<text x="{cx:.1f}" y="{bottom + 15:.1f}" text-anchor="middle">{t}</text>')
    y0 += PH
svg.append(f'<text x="{PAD}" y="{y0 + 10}" fill="#555">{machine["nproc"]} CPUs, {machine["cpu"]}; load avg {" ".join(machine["load_avg"])}</text>')
svg.append("</svg>")
open(out + ".svg", "w").write("\n".join(svg))
