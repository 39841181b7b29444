"""Stage 1's reports: what fine-tuning, ``--cv`` and ``--test`` found, in a few lines for a person
(:func:`summary`), the folder each test set's results go to, the accuracy per file format and the
reliability diagram.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from msnet.config import Config
from msnet.data.slices import SliceSet
from msnet.plots import plot_reliability


def by_format(data: SliceSet, probs: np.ndarray, classes: list[str]) -> dict:
    """Accuracy per encoded image format and class counts (the file-format shortcut check)."""
    fmt = np.array(data.formats)
    y, pred = data.labels.numpy(), probs.argmax(1)
    return {
        f: {
            "n": int((fmt == f).sum()),
            "accuracy": float((pred[fmt == f] == y[fmt == f]).mean()),
            "per_class_n": {c: int(((fmt == f) & (y == k)).sum()) for k, c in enumerate(classes)},
        }
        for f in sorted(set(data.formats))
    }


def summary(result: dict, stage: Path) -> str:
    """What :func:`finetune` (with ``cv`` and ``test`` added by ``--cv`` / ``--test``) found, in a few
    lines for a person; the metrics files beside the model hold everything."""

    def num(d: dict, *keys: str) -> str:  # the first key present; a {mean, sd} as mean ± sd
        v = next((d[k] for k in keys if d.get(k) is not None), None)
        if isinstance(v, dict):
            return "n/a" if v.get("mean") is None else f"{v['mean']:.3f} ± {v.get('sd') or 0.0:.3f}"
        return "n/a" if v is None else f"{v:.3f}"

    def scores(d: dict) -> str:  # binary figures of the positive class, else the macro averages
        return (f"accuracy {num(d, 'accuracy')}, F1 {num(d, 'f1', 'macro_f1')}, AUC {num(d, 'auc', 'macro_auc')}, "
                f"ECE {num(d, 'ece')}")

    def flipped(flips: dict) -> str:
        return f"answers flipped by JPEG coding {num(flips, 'jpeg')}, by half resolution {num(flips, 'half')}"

    def infection(d: dict) -> list[str]:  # a CT cohort's infection AUCs, each beside the lung-area baseline
        out = []
        for part, what in (("all_slices", "all slices"), ("lung_slices", "slices that show lung")):
            p = d.get(part) or {}
            out.append(f"  {what}: infected vs normal patients {num(p, 'auc_vs_normal')} (lung area alone "
                       f"{num(p, 'lung_area_baseline_vs_normal')}), vs clean slices of the same patients "
                       f"{num(p, 'auc_within_patients')} (lung area alone {num(p, 'lung_area_baseline_within_patients')})")
        return out

    lines = [f"model: {stage / 'backbone.pt'} (temperature {result.get('temperature', 1.0):.2f})"]
    if result.get("n_val") is not None:
        lines.append(f"  validation ({result.get('n_val', '?')} images, unseen in training): {scores(result)}")
    else:
        lines.append(f"  trained on {result.get('n_train', '?')} slices of {result.get('n_patients', '?')} patients")
    if result.get("probe_refit_on"):
        lines.append(f"  the probe then refitted on all {result['probe_refit_on']} training images")
    cv = result.get("cv")
    if cv and "all_slices" in cv:
        lines.append(f"{cv.get('protocol', 'cross-validation')}, {cv.get('k', '?')} folds ({stage / 'cv' / 'cv_metrics.json'}), "
                     "infection score AUC:")
        lines += infection(cv)
    elif cv:
        lines.append(f"cross-validation, {cv.get('k', '?')} grouped folds ({stage / 'cv' / 'cv_metrics.json'}):")
        lines.append(f"  {scores(cv)}")
        if cv.get("shortcut"):
            lines.append(f"  {flipped(cv['shortcut'])}")
    t = result.get("test")
    if t:
        where = f" ({t['results_dir']})" if t.get("results_dir") else ""
        if "infection_auc_vs_normal" in t:
            lines.append(f"test {t.get('test_dir', '')}{where}:")
            lines.append(f"  infection score AUC, the {t.get('n_infected_slices', '?')} labelled infected slices against "
                         f"the normal patients' {t.get('n_normal_patient_slices', '?')}: "
                         f"{num(t, 'infection_auc_vs_normal')}, against the same patients' "
                         f"{t.get('n_unlabelled_slices', '?')} other slices: {num(t, 'infection_auc_within_patients')}")
            if "all_slices" in t:
                lines += infection(t)
        else:
            lines.append(f"test {t.get('test_dir', '')}, {t.get('n', '?')} images{where}:")
            lines.append(f"  {scores(t)} (a calibrated model by chance: {num(t, 'ece_if_calibrated')}, "
                         f"95th percentile {num(t, 'ece_if_calibrated_p95')}), Brier {num(t, 'brier')}")
            if t.get("by_format"):
                lines.append("  accuracy by file format: " + ", ".join(
                    f"{k} {num(v, 'accuracy')} ({v.get('n', '?')} images)" for k, v in sorted(t["by_format"].items())))
            if t.get("shortcut"):
                lines.append(f"  {flipped({k: v.get('flip_rate') for k, v in t['shortcut'].items()})}")
    return "\n".join(lines)


def results_folder(cfg: Config, test_dir: Path) -> Path:
    """``finetune/test/<name of test_dir>/``, made if missing; where that name holds the results of
    another folder, the name with a short hash of this folder's path."""
    here = Path(test_dir).resolve()
    out = cfg.run_path / "finetune" / "test" / (here.name or "test")
    try:
        other = json.loads((out / "metrics.json").read_text()).get("test_dir")
    except (OSError, ValueError):
        other = None
    if other not in (None, str(here)):
        out = out.with_name(f"{out.name}-{hashlib.blake2b(str(here).encode(), digest_size=3).hexdigest()}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def reliability_plot(y: np.ndarray, probs: np.ndarray, path: Path) -> None:
    """The reliability diagram of the test predictions, next to their metrics.json."""
    plot_reliability({"slice classifier": (y, probs)}, path, "slice level, test set (calibrated probabilities)")
