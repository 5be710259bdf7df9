#!/usr/bin/env python3
"""Draws OUT/soak.png from a soak's samples.csv and events.csv: the gateway's RSS and open FDs
over time, with the deliberate VM kills (red bands, from kill to healthy again) and drains
(blue bands) marked. Needs matplotlib (Debian python3-matplotlib)."""

import csv
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out):
    with open(os.path.join(out, "samples.csv")) as f:
        samples = [r for r in csv.DictReader(f) if int(r["rss_kib"]) >= 0]
    with open(os.path.join(out, "events.csv")) as f:
        events = list(csv.DictReader(f))
    summary = {}
    try:
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
    except OSError:
        pass
    t = [float(s["t_s"]) / 60 for s in samples]
    rss = [int(s["rss_kib"]) / 1024 for s in samples]
    fds = [int(s["fds"]) for s in samples]
    ssh = [int(s["ssh_sessions"]) for s in samples]
    httpS = [int(s["http_sessions"]) for s in samples]
    load = [float(s["load1"]) for s in samples]
    end = t[-1] if t else 0

    def bands(start_ev, end_evs):
        open_, out_ = {}, []
        for e in events:
            ts = float(e["t_s"]) / 60
            if e["event"] == start_ev:
                open_[e["vm"]] = ts
            elif e["event"] in end_evs and e["vm"] in open_:
                out_.append((open_.pop(e["vm"]), ts, e["vm"]))
        out_ += [(s, end, vm) for vm, s in open_.items()]
        return out_

    kills = bands("kill", ("healthy",))
    drains = bands("drain", ("undrain",))

    fig, axes = plt.subplots(3, 1, figsize=(8, 6.2), sharex=True,
                             gridspec_kw={"height_ratios": [3, 3, 2]})
    for ax in axes:
        for s, e, _ in kills:
            ax.axvspan(s, e, color="tab:red", alpha=0.18, lw=0)
        for s, e, _ in drains:
            ax.axvspan(s, e, color="tab:blue", alpha=0.10, lw=0)
        ax.grid(alpha=0.3)
    axes[0].plot(t, rss, color="black", lw=1.2)
    axes[0].set_ylabel("gateway RSS (MiB)")
    r = summary.get("rss_kib", {})
    title = "poolgate soak"
    if r:
        title += (f": RSS slope (2nd half) {r['slope_second_half_kib_per_min']:+.1f} KiB/min, "
                  f"FD slope {summary['fds']['slope_second_half_per_min']:+.3f}/min, "
                  f"{summary['unexpected_failures']} unexpected / "
                  f"{summary['total_ops']} client ops")
    axes[0].set_title(title, fontsize=9)
    for s, _, vm in kills:
        axes[0].annotate(vm, (s, 1), xycoords=("data", "axes fraction"), fontsize=6,
                         color="tab:red", va="top", ha="left")
    axes[1].plot(t, fds, color="tab:green", lw=1.2, label="open FDs")
    axes[1].plot(t, ssh, color="tab:orange", lw=0.8, label="SSH sessions")
    axes[1].plot(t, httpS, color="tab:purple", lw=0.8, label="HTTP sessions")
    axes[1].set_ylabel("count")
    axes[1].legend(fontsize=7, loc="upper left", ncol=3)
    axes[2].plot(t, load, color="gray", lw=1)
    axes[2].set_ylabel("load avg 1m")
    axes[2].set_xlabel("minutes (red: VM killed until healthy again; blue: drained)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "soak.png"), dpi=80)


if __name__ == "__main__":
    main(sys.argv[1])
