#!/usr/bin/env python3
"""Renders the main panels of dashboards/enlight.json from real data, for the README.

Input: the snapshot cli/tests/prometheus.rs saves when run with
ENLIGHT_DASHBOARD_SNAPSHOT=snapshot.json (range queries of every panel against the test's real
Prometheus scraping a live enlightd). Output: one PNG. Needs matplotlib (PyPI):

    ENLIGHT_DASHBOARD_SNAPSHOT=/tmp/snapshot.json ENLIGHT_DASHBOARD_SNAPSHOT_SECS=75 \\
        cargo test -p enlight --test prometheus every
    python3 -m venv /tmp/plot && /tmp/plot/bin/pip install matplotlib
    /tmp/plot/bin/python dashboards/render.py /tmp/snapshot.json dashboards/enlight-panels.png
"""
import json
import math
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

PANELS = [
    "Latency heatmap",
    "Latency percentiles (p50, p99, p999)",
    "Operations per second",
    "Bytes per second",
    "Interrupts per operation",
    "Interrupt moderation and polling budget",
    "p99 latency by kind",
    "Exits per operation by kind",
    "Collector",
]


def legend(fmt, metric):
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt or "")


def values(series, t0):
    xs, ys = [], []
    for t, v in series["values"]:
        v = float(v)
        if math.isfinite(v):
            xs.append(float(t) - t0)
            ys.append(v)
    return xs, ys


def heatmap(ax, panel, t0):
    rows = {}
    for target in panel["targets"]:
        for s in target["result"]:
            le = s["metric"]["le"]
            rows[float("inf") if le == "+Inf" else float(le)] = dict(
                (float(t) - t0, float(v)) for t, v in s["values"]
            )
    bounds = sorted(b for b in rows if math.isfinite(b))
    times = sorted({t for r in rows.values() for t in r})
    # Rates per bucket from the cumulative `le` rates.
    grid, prev = [], None
    for b in bounds:
        col = [rows[b].get(t, 0.0) for t in times]
        grid.append([c - (p if prev else 0.0) for c, p in zip(col, prev or col)])
        prev = col
    keep = [i for i, r in enumerate(grid) if max(r, default=0) > 0]
    lo, hi = (max(0, keep[0] - 1), min(len(bounds), keep[-1] + 2)) if keep else (0, len(bounds))
    grid, bounds = grid[lo:hi], bounds[lo:hi]
    data = [[max(v, 1e-3) for v in r] for r in grid]
    ax.pcolormesh(
        times,
        range(len(bounds) + 1),
        [r[:-1] for r in data] if len(times) > 1 else data,
        shading="flat",
        cmap="Oranges",
        norm=LogNorm(vmin=0.1, vmax=max(max(r) for r in data)),
    )
    ax.set_yticks([i + 1 for i in range(len(bounds))])
    ax.set_yticklabels([fmt_seconds(b) for b in bounds], fontsize=6)
    ax.set_ylabel("latency <= le")


def fmt_seconds(s):
    if s < 1e-3:
        return f"{s * 1e6:g}us"
    if s < 1:
        return f"{s * 1e3:g}ms"
    return f"{s:g}s"


def main(src, out):
    snap = json.load(open(src))
    t0 = snap["start"]
    by_title = {p["title"]: p for p in snap["panels"]}
    changes = sorted({float(t) - t0 for s in snap["settings_changes"] for t, _ in s["values"]})
    fig, axes = plt.subplots(3, 3, figsize=(15, 10), constrained_layout=True)
    for ax, title in zip(axes.flat, PANELS):
        panel = by_title[title]
        ax.set_title(title, fontsize=10)
        if panel["type"] == "heatmap":
            heatmap(ax, panel, t0)
        else:
            for target in panel["targets"]:
                for s in target["result"]:
                    xs, ys = values(s, t0)
                    ax.plot(xs, ys, linewidth=1, label=legend(target["legend"], s["metric"]))
            unit = panel.get("unit")
            if unit == "s":
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: fmt_seconds(v)))
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            elif unit in ("ops", "Bps"):
                # Log: an emulated disk runs hundreds of times slower than a synthetic one.
                ax.set_yscale("log")
                ax.set_ylabel("ops/s" if unit == "ops" else "bytes/s")
            ax.legend(fontsize=6, loc="upper left")
        for t in changes:
            ax.axvline(t, color="purple", linestyle=":", linewidth=0.8)
        ax.set_xlabel("seconds", fontsize=7)
        ax.tick_params(labelsize=7)
    fig.suptitle(
        "enlight dashboard panels, real data: enlightd + Prometheus, a synthetic and an emulated"
        " disk (dotted: settings changes)",
        fontsize=11,
    )
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
