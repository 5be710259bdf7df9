#!/usr/bin/env python3
"""Print the router benchmark results as a markdown table.

Reads criterion's estimates from target/criterion after
`cargo bench -p poolgate-benches --bench router` and pairs each poolgate case
with its naive baseline. Usage: python3 benches/router_table.py [TARGET_DIR]
"""

import json
import pathlib
import sys

GROUPS = ["pick", "acquire_drop", "churn_2_threads"]


def estimate(path):
    """Criterion's headline estimate (slope when sampled linearly) in ns."""
    data = json.loads(path.read_text())
    est = data.get("slope") or data["mean"]
    return est["point_estimate"], est["confidence_interval"]


def fmt(ns):
    if ns >= 1000:
        return f"{ns / 1000:.2f} µs"
    return f"{ns:.0f} ns"


def main():
    target = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target")
    root = target / "criterion"
    print("| case | poolgate | naive baseline | naive / poolgate |")
    print("|---|---:|---:|---:|")
    for group in GROUPS:
        ours = root / group / "poolgate"
        if not ours.is_dir():
            continue
        cases = sorted(
            (p.name for p in ours.iterdir() if (p / "new/estimates.json").exists()),
            key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else n),
        )
        for case in cases:
            a, _ = estimate(ours / case / "new/estimates.json")
            naive = root / group / "naive" / case / "new/estimates.json"
            if not naive.exists():
                continue
            b, _ = estimate(naive)
            label = f"{group} / {int(case):,} VMs" if case.isdigit() else f"{group} / {case}"
            print(f"| {label} | {fmt(a)} | {fmt(b)} | {b / a:.1f}× |")


if __name__ == "__main__":
    main()
