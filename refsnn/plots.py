"""Learning curves of run folders, as a PNG (optional extra `plot`: matplotlib).

    refsnn plot runs/tsslbp-fashion-mnist-... [more run folders] -o curves.png

Every run folder of `refsnn train`, `compare` and `sweep` holds metrics.jsonl, one JSON line per
epoch (refsnn/train.py). `draw_curves` is the one drawing routine: `refsnn plot` hands it each
folder's test (and train) accuracy, `refsnn sweep` the mean over each group's seeds with a band.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError


@dataclass
class Curve:
    """One line of the plot: y per epoch; ``lo``/``hi`` draw a band (e.g. min/max over seeds)."""
    label: str
    y: list
    lo: list | None = None
    hi: list | None = None
    dashed: bool = False
    color_of: int | None = None    # index of an earlier curve whose colour this one shares


def read_history(run_dir) -> list[dict]:
    """The epochs of a run folder's metrics.jsonl, in order; DataError when there are none."""
    from .train import METRICS
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise DataError(f"{run_dir}: no {METRICS} here; give the folder of a refsnn run "
                        f"(the --out of `refsnn train`, or runs/<name> of a sweep)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as err:
            raise DataError(f"{path}, line {i}: not JSON ({err}); the file is damaged") from None
    if not rows:
        raise DataError(f"{path} has no epoch yet; plot it once the first epoch has finished")
    return rows


def draw_curves(curves, path, *, ylabel="test accuracy (%)", title=None):
    """Draw ``curves`` (epochs 1, 2, ... on x) to the PNG ``path`` atomically; returns the path,
    or None when matplotlib is missing (pip install 'refsnn[plot]')."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = []
    for c in curves:
        epochs = list(range(1, len(c.y) + 1))
        color = colors[c.color_of] if c.color_of is not None else None
        line, = ax.plot(epochs, c.y, marker="o", ms=3, label=c.label, color=color,
                        linestyle="--" if c.dashed else "-")
        colors.append(line.get_color())
        if c.lo is not None and c.hi is not None:
            ax.fill_between(epochs, c.lo, c.hi, color=line.get_color(), alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return Path(path)


def run_curves(run_dirs, train: bool = True) -> list[Curve]:
    """Test accuracy per epoch of each run folder (label: the folder's name), and its train
    accuracy dashed in the same colour when ``train``."""
    curves = []
    for d in run_dirs:
        rows = read_history(d)
        name = Path(d).resolve().name
        curves.append(Curve(f"{name} test", [100 * r["test_acc"] for r in rows]))
        if train:
            curves.append(Curve(f"{name} train", [100 * r["train_acc"] for r in rows],
                                dashed=True, color_of=len(curves) - 1))
    return curves
