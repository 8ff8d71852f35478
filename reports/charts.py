"""Charts as PNG bytes (matplotlib, Agg canvas, no pyplot and no global backend state).

Images go into the HTML as base64 data URIs (the report file is self-contained); the mail
module turns them into inline `cid:` parts, which email clients display.
"""

from __future__ import annotations

import base64
import io
from datetime import datetime

import matplotlib.dates as mdates
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

# Palette shared with the HTML templates (see templates/base.html.j2).
GREEN = "#1e8e3e"
AMBER = "#c77700"
RED = "#c5221f"
BLUE = "#1a73e8"
GREY = "#80868b"
INK = "#202124"
GRID = "#e8eaed"

RESULT_COLOURS = {"ok": GREEN, "failed": RED, "skipped": GREY, "running": BLUE}

WIDTH_PX = 960
DPI = 144


def _figure(height_px: int) -> tuple[Figure, object]:
    fig = Figure(figsize=(WIDTH_PX / 96, height_px / 96), dpi=96)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color(GREY)
    ax.tick_params(colors=INK, labelsize=9)
    ax.grid(True, color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    return fig, ax


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _time_unit(max_seconds: float) -> tuple[float, str]:
    if max_seconds >= 2 * 3600:
        return 3600.0, "hours"
    if max_seconds >= 120:
        return 60.0, "minutes"
    return 1.0, "seconds"


MAX_POINTS = 2000


def _thin(df: pd.DataFrame, since: datetime, until: datetime) -> pd.DataFrame:
    """At most ~MAX_POINTS points: the worst RPO of each time bucket (spikes stay visible)."""
    if len(df) <= MAX_POINTS:
        return df
    width = (pd.Timestamp(until) - pd.Timestamp(since)) / (MAX_POINTS // 2)
    g = df.set_index("at")[["rpo_seconds", "rpo_target_seconds"]].resample(width)
    out = g.max().dropna(how="all").reset_index()
    return out


def rpo_chart(
    samples: pd.DataFrame, vpg: str, since: datetime, until: datetime
) -> bytes:
    """RPO over time for one VPG against its target (a step line: the target may change)."""
    fig, ax = _figure(230)
    df = _thin(samples.sort_values("at"), since, until)
    rpo = df["rpo_seconds"].astype("float64")
    target = df["rpo_target_seconds"].astype("float64")
    top = np.nanmax([rpo.max(skipna=True), target.max(skipna=True), 1.0])
    scale, unit = _time_unit(float(top))
    x = df["at"].dt.tz_convert("UTC").dt.tz_localize(None)
    if len(df):
        y = rpo / scale
        t = target / scale
        ax.fill_between(x, y, t, where=(y > t), step=None, color=RED, alpha=0.15, linewidth=0,
                        interpolate=True)
        ax.plot(x, y, color=BLUE, linewidth=1.4, label="RPO",
                    marker="o" if len(x) < 40 else None, markersize=3)  # a few samples must still show
        ax.step(x, t, where="post", color=RED, linewidth=1.2, linestyle="--", label="RPO target")
        missing = df["rpo_seconds"].isna()
        if missing.any():
            ax.plot(x[missing], np.zeros(int(missing.sum())), "x", color=AMBER, markersize=4,
                    label="no checkpoint")
        ax.legend(loc="lower right", fontsize=8, frameon=False, ncol=3, bbox_to_anchor=(1.0, 1.0))
    else:
        ax.text(0.5, 0.5, "no samples in the period", transform=ax.transAxes, ha="center",
                va="center", color=GREY)
    start = pd.Timestamp(since).tz_convert("UTC").tz_localize(None) if pd.Timestamp(since).tzinfo else pd.Timestamp(since)
    end = pd.Timestamp(until).tz_convert("UTC").tz_localize(None) if pd.Timestamp(until).tzinfo else pd.Timestamp(until)
    ax.set_xlim(start, end)
    ax.set_ylim(bottom=0, top=float(top) / scale * 1.08)
    ax.set_ylabel(f"RPO ({unit})", fontsize=9, color=INK)
    locator = mdates.AutoDateLocator(minticks=4, maxticks=9)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, show_offset=False))
    ax.set_title(f"{vpg}: RPO over time (UTC)", fontsize=10, color=INK, loc="left", parse_math=False)
    return _png(fig)


def step_timeline(
    steps: pd.DataFrame,
    start: datetime,
    rto_seconds: float | None,
    rto_target_seconds: float | None,
    now: datetime | None = None,
) -> bytes:
    """A Gantt chart of an operation's steps, one row per VM, with the RTO and its target.

    `steps` has vm_label, step, started_at, ended_at, result; a running step (no end)
    is drawn up to `now`.
    """
    rows = list(dict.fromkeys(steps["vm_label"].tolist())) if len(steps) else []
    t0 = pd.Timestamp(start)
    end_default = pd.Timestamp(now) if now is not None else None
    bars = []  # (row, start s, duration s, result, step)
    for i, label in enumerate(rows):
        for _, s in steps[steps["vm_label"] == label].iterrows():
            if pd.isna(s["started_at"]):
                continue
            e = s["ended_at"] if not pd.isna(s["ended_at"]) else end_default
            s0 = (s["started_at"] - t0).total_seconds()
            dur = max((e - s["started_at"]).total_seconds(), 0.0) if e is not None else 0.0
            bars.append((i, s0, dur, str(s["result"]), str(s["step"])))
    rto = None if rto_seconds is None or pd.isna(rto_seconds) else float(rto_seconds)
    target = None if rto_target_seconds is None or pd.isna(rto_target_seconds) else float(rto_target_seconds)
    span = max([b[1] + b[2] for b in bars] + [rto or 0.0, target or 0.0, 1.0])
    scale, unit = _time_unit(span)
    span /= scale

    fig, ax = _figure(max(150, 70 + 30 * len(rows)))
    for i, s0, dur, result, step in bars:
        x, w = s0 / scale, dur / scale
        ax.broken_barh([(x, w)], (i - 0.36, 0.72), facecolors=RESULT_COLOURS.get(result, GREY),
                       edgecolors="white", linewidth=0.8)
        if w / span > 0.016 * max(len(step), 4):  # label the bars wide enough for it
            ax.text(x + w / 2, i, step, ha="center", va="center", fontsize=7, color="white", clip_on=True,
                    parse_math=False)
    if rto is not None:
        ax.axvline(rto / scale, color=INK, linewidth=1.3, label="RTO measured")
    if target is not None:
        ax.axvline(target / scale, color=RED, linewidth=1.3, linestyle="--", label="RTO target")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_short(r) for r in rows], fontsize=8, parse_math=False)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, span * 1.04)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, steps=[1, 2, 2.5, 5, 10]))
    ax.set_xlabel(f"{unit} since the start of the operation", fontsize=9, color=INK)
    present = set(b[3] for b in bars)
    handles = [Patch(color=c, label=k) for k, c in RESULT_COLOURS.items() if k in present]
    line_handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + line_handles, loc="lower right", fontsize=8, frameon=False,
              ncol=6, bbox_to_anchor=(1.0, 1.0))
    ax.grid(True, axis="x", color=GRID)
    ax.grid(False, axis="y")
    return _png(fig)


def _short(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
