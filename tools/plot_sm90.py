#!/usr/bin/env python3
"""Plots `flashattn bench --json` results that carry peer figures (--baselines) as an SVG: one panel per head
dim, TFLOP/s against sequence length, ours (solid) against cuDNN (dashed) and FA2 (dotted), causal and not.
Also prints the markdown table of ours / fa2 / cudnn and the ratios. No dependencies.

  tools/plot_sm90.py docs/results/X-bf16.json docs/results/X-fp16.json -o docs/bench-h100-sm90.svg --title "..."
"""
import argparse
import json

ap = argparse.ArgumentParser()
ap.add_argument("json", nargs="+")
ap.add_argument("-o", "--output", required=True)
ap.add_argument("--title", default="")
args = ap.parse_args()

runs = []
for path in args.json:
    rows = [r for r in json.load(open(path))["rows"] if r.get("tflops") and r.get("peers")]
    runs.append((rows[0]["dtype"], rows))

dims = sorted({r["d"] for _, rows in runs for r in rows})
seqs = sorted({r["sq"] for _, rows in runs for r in rows})
PW, PH, L, T, GAP = 300, 260, 60, 50, 40
W = L + len(dims) * (PW + GAP) + 10
H = T + len(runs) * (PH + 70) + 40
ymax = 800.0
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
       'font-family="sans-serif" font-size="11">', f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W / 2}" y="22" font-size="15" text-anchor="middle">{args.title}</text>']
colors = {False: "#1f77b4", True: "#d62728"}
styles = {"ours": "", "cudnn": ' stroke-dasharray="7 3"', "fa2": ' stroke-dasharray="2 3"'}


def label(s):
    return f"{s // 1024}k" if s >= 1024 else str(s)


for ri, (dtype, rows) in enumerate(runs):
    y0 = T + ri * (PH + 70)
    for di, d in enumerate(dims):
        x0 = L + di * (PW + GAP)
        out.append(f'<rect x="{x0}" y="{y0}" width="{PW}" height="{PH}" fill="none" stroke="black"/>')
        out.append(f'<text x="{x0 + PW / 2}" y="{y0 - 6}" text-anchor="middle">{dtype}, d={d}</text>')
        for v in range(0, int(ymax) + 1, 200):
            y = y0 + PH - v / ymax * PH
            out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + PW}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end">{v}</text>')
        for si, s in enumerate(seqs):
            x = x0 + 10 + si * (PW - 20) / (len(seqs) - 1)
            out.append(f'<text x="{x:.1f}" y="{y0 + PH + 14}" text-anchor="middle">{label(s)}</text>')
        for causal in (False, True):
            pts = sorted((r for r in rows if r["d"] == d and r["causal"] == causal), key=lambda r: r["sq"])
            for who in ("ours", "cudnn", "fa2"):
                xy = []
                for r in pts:
                    v = r["tflops"] if who == "ours" else r["peers"].get(who)
                    if v is None:
                        continue
                    x = x0 + 10 + seqs.index(r["sq"]) * (PW - 20) / (len(seqs) - 1)
                    xy.append(f"{x:.1f},{y0 + PH - v / ymax * PH:.1f}")
                out.append(f'<polyline points="{" ".join(xy)}" fill="none" stroke="{colors[causal]}" '
                           f'stroke-width="{2 if who == "ours" else 1.3}"{styles[who]}/>')
    if ri == 0:
        lx = L
        for text, col, sty in [("ours (sm90 path)", "#333", ""), ("cuDNN", "#333", styles["cudnn"]),
                               ("FA2 (PyTorch)", "#333", styles["fa2"]), ("not causal", colors[False], ""),
                               ("causal", colors[True], "")]:
            out.append(f'<line x1="{lx}" y1="{H - 18}" x2="{lx + 24}" y2="{H - 18}" stroke="{col}" stroke-width="2"{sty}/>')
            out.append(f'<text x="{lx + 28}" y="{H - 14}">{text}</text>')
            lx += 150
out.append(f'<text x="14" y="{T + PH / 2}" transform="rotate(-90 14 {T + PH / 2})" text-anchor="middle">TFLOP/s</text>')
out.append("</svg>")
open(args.output, "w").write("\n".join(out) + "\n")

for dtype, rows in runs:
    print(f"\n{dtype}:\n")
    print("| d | causal | seqlen | ours TFLOP/s | fa2 | cudnn | ours/fa2 | ours/cudnn |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: (r["d"], r["causal"], r["sq"])):
        fa2, cu = r["peers"]["fa2"], r["peers"]["cudnn"]
        print(f"| {r['d']} | {int(r['causal'])} | {label(r['sq'])} | {r['tflops']:.1f} | {fa2:.1f} | {cu:.1f} | "
              f"{r['tflops'] / fa2:.2f} | {r['tflops'] / cu:.2f} |")
