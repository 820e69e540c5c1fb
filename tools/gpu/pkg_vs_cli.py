"""The package against the CLI, point by point, from `torch_baselines.py --json` and `flashattn bench --json` files
of the same grid (any number of rounds of each, in the same call): the CLI-time over package-time ratio per round,
the ratio of the means, and how many points from seqlen 1k are within 5%. With an `fa2` backend in the peers'
files, the package's speed against it too. (`compare_python.py` tables one call's single round beside FA2 and
cuDNN; this one averages rounds, for the package issue's 5% criterion.)

    python3 tools/gpu/pkg_vs_cli.py --peers p1.json p2.json --cli c1.json c2.json [--markdown]
"""

import argparse

from compare_python import load


def peers(path):
    out = {}
    for r in load(path):
        out.setdefault((r["d"], bool(r["causal"]), r["sk"], r["mode"]), {})[r["backend"]] = r["ms"]
    return out


def cli(path):
    return {(r["d"], bool(r["causal"]), r["sk"], r["mode"]): r["ms"] for r in load(path)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", nargs="+", required=True)
    ap.add_argument("--cli", nargs="+", required=True)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    ps, cs = [peers(p) for p in args.peers], [cli(c) for c in args.cli]
    keys = sorted(k for k in ps[0] if "flashattn" in ps[0][k] and all(k in c for c in cs))
    within, total = 0, 0
    if args.markdown:
        cols = ["d", "causal", "seqlen", "mode", "package ms", "CLI ms", "pkg/CLI per round", "pkg/CLI means"]
        print("| " + " | ".join(cols + ["pkg/FA2 means"]) + " |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for k in keys:
        pk = [p[k]["flashattn"] for p in ps]
        cl = [c[k] for c in cs]
        fa = [p[k]["fa2"] for p in ps if "fa2" in p[k]]
        mean = (sum(cl) / len(cl)) / (sum(pk) / len(pk))
        per = [c / p for c, p in zip(cl, pk)]
        if k[2] >= 1024:
            total += 1
            within += abs(mean - 1) <= 0.05
        fa2 = f"{(sum(fa) / len(fa)) / (sum(pk) / len(pk)):.2f}" if fa else "-"
        if args.markdown:
            print(
                f"| {k[0]} | {int(k[1])} | {k[2]} | {k[3]} | {' / '.join(f'{x:.3f}' for x in pk)} | "
                f"{' / '.join(f'{x:.3f}' for x in cl)} | {' / '.join(f'{x:.2f}' for x in per)} | {mean:.2f} | {fa2} |"
            )
    print(f"points from 1k within 5% of the CLI (ratio of the means): {within} of {total}")


if __name__ == "__main__":
    main()
