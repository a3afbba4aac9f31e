"""Pictures of turn-taking: who speaks when (timeline.png) and FTO per latency (fto.png).

matplotlib is imported inside each function with the Agg backend, so importing
this module starts nothing and needs no display.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.turntaking import Analysis

SPEAKER_COLORS = ("tab:blue", "tab:orange")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def timeline_png(path: Path, analysis: Analysis, title: str = "") -> None:
    """One lane per speaker with its IPUs; overlaps (red), gaps (green) and deadlocks (grey) marked."""
    plt = _pyplot()
    duration = analysis.duration_s
    fig, ax = plt.subplots(figsize=(min(40.0, max(10.0, duration / 4)), 3.0))
    speakers = list(analysis.ipus)
    for lane, speaker in enumerate(speakers):
        y = len(speakers) - 1 - lane
        bars = [(u.start, u.duration) for u in analysis.ipus[speaker]]
        ax.broken_barh(bars, (y - 0.3, 0.6), color=SPEAKER_COLORS[lane % 2], label=f"{speaker} speaks")
    for segments, color, label in [(analysis.overlaps, "tab:red", "overlap"), (analysis.gaps, "tab:green", "gap")]:
        for i, s in enumerate(segments):
            ax.axvspan(s.start, s.end, color=color, alpha=0.25, lw=0, label=label if i == 0 else None)
    for i, d in enumerate(analysis.deadlocks):  # a bar under the lanes: both silent for over 3 s
        ax.plot([d.start, d.end], [-0.5, -0.5], color="0.3", lw=4, solid_capstyle="butt",
                label="deadlock (both silent > 3 s)" if i == 0 else None)
    for t in analysis.transfers:  # between the lanes, at the new speaker's start
        ax.annotate(f"{t.fto * 1000:+.0f}", (t.t, (len(speakers) - 1) / 2), fontsize=7, ha="center",
                    va="center", color="0.15")
    ax.set_yticks(range(len(speakers)), list(reversed(speakers)))
    ax.set_ylim(-0.7, len(speakers) - 0.4)
    ax.set_xlim(0, duration)
    ax.set_xlabel("time, s (numbers: floor-transfer offset, ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.08), fontsize=7, ncols=5, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fto_png(path: Path, ftos: dict[str, list[float]], title: str = "") -> None:
    """FTO distribution per condition (label -> offsets in s): a box with every transfer as a dot."""
    plt = _pyplot()
    labels = list(ftos)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(labels)), 4))
    data = [ftos[k] or [np.nan] for k in labels]
    ax.boxplot(data, positions=range(len(labels)), widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for i, xs in enumerate(data):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(xs)), xs, s=10, alpha=0.6, color="tab:blue")
    ax.axhline(0, color="0.5", lw=0.8, ls="--")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("floor-transfer offset, s (< 0: overlap)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
