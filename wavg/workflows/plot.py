"""Plot an evaluation: single checkpoints as dots, each average and the ensemble as a line.

Uses matplotlib's Agg backend, so it works without a display (CI, ssh, containers).
"""

from __future__ import annotations

import os
from pathlib import Path

from wavg.errors import OutputError
from wavg.workflows.evaluate import ENSEMBLE, SINGLE, EvaluationResult, higher_is_better


def check_plot_path(path: str | os.PathLike[str]) -> Path:
    """Fail before any work if the plot cannot be written: missing directory, a directory
    in the way, or a file that cannot be created. Leaves no file behind."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(path, "is a directory; give a file name such as evaluate.png")
    if not path.parent.is_dir():
        raise OutputError(path, f"directory {path.parent} does not exist")
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise OutputError(path, f"cannot write the plot ({exc.strerror or exc})") from None
    if not existed:
        path.unlink()
    return path


def plot_evaluation(
    result: EvaluationResult, path: str | os.PathLike[str], metric: str | None = None
) -> Path:
    """Draw `metric` (default: the primary one) against n; the suffix picks the image format."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = check_plot_path(path)
    metric = result.check_metric(metric)
    ns = list(range(1, len(result.scores) + 1))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    try:
        for column in result.columns:
            values = [row[column][metric] for row in result.scores]
            if column == SINGLE:
                ax.plot(ns, values, "o", color="black", label="single (n-th newest)", zorder=3)
            else:
                style = "--" if column == ENSEMBLE else "-"
                ax.plot(ns, values, style, marker=".", label=f"{column} (n newest)")
        better = "higher" if higher_is_better(metric) else "lower"
        ax.set_title(f"Test {metric} ({better} is better) on {Path(result.data).name}")
        ax.set_xlabel("n: the n-th newest checkpoint, or the average of the n newest")
        ax.set_ylabel(f"test {metric}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
        fig.tight_layout()
        try:
            fig.savefig(path)
        except (OSError, ValueError) as exc:
            raise OutputError(path, f"cannot write the plot ({exc})") from None
    finally:
        plt.close(fig)
    return path
