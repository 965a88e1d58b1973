"""bench.png: wall time and peak RSS against N and against model size, tools side by side.

Log-log axes: a streaming tool shows up as a flat memory line and a time line parallel to
the dd floor; a whole-model tool's memory line climbs with N and size.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
from results import OK, TOOL_LABELS, Row  # noqa: E402

STYLE = {
    "wavg": dict(color="tab:blue", marker="o", lw=2),
    "tutorial": dict(color="tab:red", marker="s"),
    "inmemory": dict(color="tab:orange", marker="^"),
    "dd-read": dict(color="gray", marker="", ls="--"),
}
PANELS = (
    ("wall_s", "n", "wall time (s)"),
    ("peak_rss_mb", "n", "peak RSS (MB)"),
    ("wall_s", "file_mb", "wall time (s)"),
    ("peak_rss_mb", "file_mb", "peak RSS (MB)"),
)


def _series(rows: list[Row], tool: str, x: str, fixed: dict[str, object]) -> list[tuple]:
    picked = [
        r
        for r in rows
        if r.tool == tool
        and r.status == OK
        and "scale" in r.groups.split()
        and all(getattr(r, k) == v for k, v in fixed.items())
    ]
    return sorted((getattr(r, x), r) for r in picked)


def _model_for_n_panels(rows: list[Row]) -> float | None:
    """The model size (MB/file) whose N-sweep has the most wavg points, preferring ~270 MB."""
    sizes = [r.file_mb for r in rows if r.tool == "wavg" and "scale" in r.groups.split()]
    if not sizes:
        return None
    counts = {s: sizes.count(s) for s in sizes}
    return max(counts, key=lambda s: (counts[s], -abs(s - 270)))


def draw(rows: list[Row], path: Path) -> None:
    """Draw the four panels; panels with no data say so instead of failing."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    size = _model_for_n_panels(rows)
    ns = sorted({r.n for r in rows if r.tool == "wavg" and "scale" in r.groups.split()})
    fixed_n = 8 if 8 in ns else (ns[-1] if ns else None)
    for ax, (metric, x, label) in zip(axes.flat, PANELS, strict=True):
        fixed = {"file_mb": size} if x == "n" else {"n": fixed_n}
        for tool, style in STYLE.items():
            if tool == "dd-read" and metric != "wall_s":
                continue
            points = _series(rows, tool, x, fixed)
            if points:
                xs = [p[0] for p in points]
                ys = [getattr(p[1], metric) for p in points]
                ax.plot(xs, ys, label=TOOL_LABELS[tool], **style)
        title_fixed = f"{size or 0:.0f} MB/file" if x == "n" else f"N = {fixed_n}"
        ax.set_title(f"{label} vs {'N' if x == 'n' else 'MB per file'} ({title_fixed}, .h5)")
        ax.set_xlabel("checkpoints N" if x == "n" else "MB per checkpoint")
        ax.set_ylabel(label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({x for line in ax.get_lines() for x in line.get_xdata()})
        ax.set_xticks(ticks, [f"{t:.0f}" for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_lines():
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data in this run", ha="center", transform=ax.transAxes)
    fig.suptitle("wavg combine vs baselines (skipped baselines = would exceed RAM)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
