"""Markdown tables of one device call's results: the Python package (torch_baselines.py backend `flashattn`)
against the CLI's own figures (`flashattn bench --json`) and PyTorch's FA2 and cuDNN kernels.

    python3 tools/gpu/compare_python.py PEERS_STANDARD CLI_STANDARD PEERS_DECODE CLI_DECODE
"""

import json
import sys


def load(path):
    with open(path) as f:
        data = json.load(f)
    return data["rows"] if isinstance(data, dict) else data


def standard(peers_path, cli_path):
    peers = {(r["d"], int(r["causal"]), r["sq"], r["mode"], r["backend"]): r for r in load(peers_path)}
    cli = {(r["d"], int(r["causal"]), r["sq"], r["mode"]): r for r in load(cli_path)}
    print("| d | causal | seqlen | mode | package TFLOP/s | CLI | FA2 | cuDNN | pkg/CLI | pkg/FA2 | pkg/cuDNN |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    worst = {"cli": 9.0, "fa2": 9.0}
    for (d, c, s, mode, be), r in sorted(peers.items()):
        if be != "flashattn" or not r.get("tflops"):
            continue
        ours, fa2, cudnn = (
            r["tflops"],
            peers[(d, c, s, mode, "fa2")]["tflops"],
            peers[(d, c, s, mode, "cudnn")]["tflops"],
        )
        mine = cli[(d, c, s, mode)]["tflops"]
        if s >= 1024:
            worst["cli"] = min(worst["cli"], ours / mine)
        worst["fa2"] = min(worst["fa2"], ours / fa2)
        print(
            f"| {d} | {c} | {s} | {mode} | {ours:.1f} | {mine:.1f} | {fa2:.1f} | {cudnn:.1f} | "
            f"{ours / mine:.2f} | {ours / fa2:.2f} | {ours / cudnn:.2f} |"
        )
    print(f"\nworst package/CLI at seqlen >= 1k: {worst['cli']:.2f}; worst package/FA2: {worst['fa2']:.2f}\n")


def decode(peers_path, cli_path):
    peers = {(r["b"], r["sk"], r["backend"]): r for r in load(peers_path)}
    cli = {(r["b"], r["sk"]): r for r in load(cli_path) if not r.get("head_major") and not r.get("page_size")}
    print("| b | cache | package us | CLI us | FA2 us | cuDNN us | pkg/CLI (time) | pkg/FA2 | pkg/cuDNN |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (b, sk, be), r in sorted(peers.items()):
        if be != "flashattn" or not r.get("ms"):
            continue
        ours, fa2, cudnn = r["ms"] * 1e3, peers[(b, sk, "fa2")]["ms"] * 1e3, peers[(b, sk, "cudnn")]["ms"] * 1e3
        mine = cli[(b, sk)]["ms"] * 1e3
        print(
            f"| {b} | {sk} | {ours:.1f} | {mine:.1f} | {fa2:.1f} | {cudnn:.1f} | {mine / ours:.2f} | "
            f"{fa2 / ours:.2f} | {cudnn / ours:.2f} |"
        )


if __name__ == "__main__":
    standard(sys.argv[1], sys.argv[2])
    decode(sys.argv[3], sys.argv[4])
