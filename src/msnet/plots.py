"""Figures written as PNG files (matplotlib without pyplot: no global backend state), atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from msnet.files import atomic_write
from msnet.metrics import calibration


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


def plot_slice_scores(rows: list[dict], path: Path, title: str = "infection score per slice",
                      max_patients: int = 12) -> None:
    """Each patient's per-slice infection scores along the body axis (``rows``: patient_id, label,
    slice_index, slice_label ("" where unlabelled), infection_score), the slices labelled infected
    shaded: where a model's score rises should be where the lesions are. The first ``max_patients``."""
    patients: dict[str, list[dict]] = {}
    for r in rows:
        patients.setdefault(str(r["patient_id"]), []).append(r)
    shown = list(patients)[:max_patients]
    fig = figure(7.0, 0.4 + 1.25 * max(1, len(shown)))
    axes = fig.subplots(max(1, len(shown)), 1, squeeze=False)[:, 0]
    for ax, pid in zip(axes, shown):
        rs = sorted(patients[pid], key=lambda r: int(r["slice_index"]))
        z = np.array([int(r["slice_index"]) for r in rs])
        score = np.array([float(r["infection_score"]) for r in rs])
        infected = np.array([str(r["slice_label"]) == "1" for r in rs])
        ax.fill_between(z, 0, 1, where=infected, step="mid", color="tab:red", alpha=0.18, lw=0,
                        label="labelled infected")
        ax.plot(z, score, lw=1.0, color="tab:blue", label="infection score")
        ax.set_ylim(0, 1)
        ax.set_xlim(z.min() - 0.5, z.max() + 0.5)
        ax.set_ylabel(f"{pid}\n{rs[0]['label']}", fontsize=7, rotation=0, ha="right", va="center")
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False)
    axes[-1].set_xlabel("slice index along the body axis")
    more = f" (first {len(shown)} of {len(patients)} patients)" if len(patients) > len(shown) else ""
    axes[0].set_title(title + more, fontsize=9, loc="left")
    save_png(fig, path)
