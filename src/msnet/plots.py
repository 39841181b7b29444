"""Figures written as PNG files (matplotlib without pyplot: no global backend state), atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from msnet.files import atomic_write


def figure(width: float, height: float):
    """A matplotlib Figure of this size (inches) at 110 dpi."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110)


def save_png(fig: Any, path: Path) -> None:
    """Lay out and write a figure as PNG, atomically."""
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = "reliability") -> None:
    """Reliability diagram: per confidence bin, the accuracy against the mean top-class probability, one
    line per model (``curves``: name -> (labels, probabilities)); the diagonal is perfect calibration."""
    from msnet.metrics import calibration

    fig = figure(4.6, 4.2 + 0.35 * len(curves))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="perfectly calibrated")
    for name, (y, probs) in curves.items():
        cal = calibration(y, probs)  # the bins of the `ece` in the metrics JSON
        xs = [b["confidence"] for b in cal["bins"]]
        ys = [b["accuracy"] for b in cal["bins"]]
        ax.plot(xs, ys, marker="o", ms=3, lw=1.3, label=f"{name}: ECE {cal['ece']:.3f} (a calibrated model's\non {len(y)} cases: "
                f"{cal['ece_if_calibrated']:.3f}, 95th percentile {cal['ece_if_calibrated_p95']:.3f})")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mean predicted probability of the predicted class")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    save_png(fig, path)
