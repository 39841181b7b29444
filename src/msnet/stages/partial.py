"""Partial scans: every trained aggregator re-evaluated on random contiguous sub-volumes.

The method's claim is that MS-Net learns from and copes with partial scans. Here each test
study's cached slice features (``RUN/features/<set>/``) are cut to a random contiguous run
that keeps 100, 75, 50 or 25 % of its slices (seeded; several draws; every aggregator sees
the same runs), and each aggregator's checkpoint(s) from ``RUN/train/<name>/`` (the fold
model that held the patient out) classifies them. Writes ``RUN/evaluate/partial.json``,
``partial.md`` and ``partial.png`` (accuracy against the fraction kept, one line per model).

e.g. result = partial_scans(Path("runs/demo"))
e.g. result["by_aggregator"]["msnet"]["accuracy"]
[0.97, 0.95, 0.91, 0.8]
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msnet.errors import MsnetError
from msnet.files import atomic_write, atomic_write_text, read_csv_rows
from msnet.inference.bundle import load_aggregator
from msnet.metrics import classification_metrics

logger = logging.getLogger(__name__)

FRACTIONS = (1.0, 0.75, 0.5, 0.25)
DRAWS = 5


def sub_volume(n: int, fraction: float, rng: np.random.Generator) -> slice:
    """A random contiguous run of ``round(fraction * n)`` slices (at least one).

    >>> s = sub_volume(10, 0.5, np.random.default_rng(0)); s.stop - s.start
    5
    """
    k = min(n, max(1, int(round(fraction * n))))
    start = int(rng.integers(0, n - k + 1))
    return slice(start, start + k)


def _checkpoints(folder: Path) -> dict[int, Path]:
    """Fold index -> checkpoint of one aggregator folder (``model.pt`` is fold 0)."""
    found = {int(p.stem.removeprefix("model_fold")): p for p in folder.glob("model_fold*.pt")
             if p.stem.removeprefix("model_fold").isdigit()}
    if (folder / "model.pt").is_file():
        found.setdefault(0, folder / "model.pt")
    return found


def _load_aggregator(path: Path) -> tuple[torch.nn.Module, dict]:
    try:
        return load_aggregator(path)
    except MsnetError:
        raise
    except Exception as exc:
        raise MsnetError(f"cannot load the aggregator checkpoint ({type(exc).__name__}: {exc})", path=path,
                         fix="re-run `msnet train CONFIG --overwrite`") from exc


def _test_patients(pred_path: Path) -> dict[str, tuple[str, list[int]]]:
    """patient_id -> (label, folds that held it out) from a model's predictions.csv."""
    import csv

    with pred_path.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if (r.get("split") or "").strip().lower() == "test"]
    out: dict[str, tuple[str, list[int]]] = {}
    for r in rows:
        _, folds = out.setdefault(r["patient_id"], (r["label"], []))
        folds.append(int(r.get("fold") or 0))
    return out


def _features(run_dir: Path, set_id: str, cache: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """patient_id -> (l, d) features of one cached feature set (stage 2's manifest.csv and .npy files)."""
    if set_id not in cache:

        fdir = run_dir / "features" / set_id
        rows = [r for r in read_csv_rows(fdir / "manifest.csv") if r.get("status") == "ok"]
        if not rows:
            raise MsnetError(f"no cached features of set {set_id}", path=fdir / "manifest.csv",
                             fix="run `msnet extract CONFIG` (the run's config) first")
        cache[set_id] = {r["patient_id"]: torch.from_numpy(np.load(fdir / r["file"])) for r in rows}
    return cache[set_id]


@torch.inference_mode()
def _probs(models: dict[int, torch.nn.Module], folds: list[list[int]], seqs: list[torch.Tensor],
           n_classes: int) -> np.ndarray:
    """Class probabilities per sequence: the mean over the fold models that held its patient out.

    Sequences of one length go through a model as one batch (no padding needed)."""
    total = np.zeros((len(seqs), n_classes))
    count = np.zeros(len(seqs))
    for k, model in models.items():
        by_length: dict[int, list[int]] = {}
        for i, f in enumerate(folds):
            if k in f:
                by_length.setdefault(int(seqs[i].shape[0]), []).append(i)
        for idx in by_length.values():
            x = torch.stack([seqs[i] for i in idx]).float()
            total[idx] += torch.softmax(model(x).float(), dim=1).numpy()
            count[idx] += 1
    return total / count[:, None]


def partial_scans(run_dir: Path, fractions: Sequence[float] = FRACTIONS, draws: int = DRAWS,
                  seed: int = 0) -> dict[str, Any]:
    """Accuracy (and macro AUC) of every trained aggregator on sub-volumes keeping each fraction of slices.

    For every test patient, fraction and draw one run of slices is drawn (``seed``, the patient's
    rank, the fraction and the draw fix it) and shared by all aggregators; the 100 % row uses the
    whole study once. Returns (and writes to ``RUN/evaluate/partial.json``) ``{"fractions",
    "draws", "seed", "n_patients", "by_aggregator": {name: {"accuracy": [...], "accuracy_sd": [...],
    "macro_auc": [...], "n": N}}}``, lists in the order of ``fractions``.
    """
    run_dir = Path(run_dir)
    fractions = [float(f) for f in fractions]
    if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
        raise MsnetError(f"fractions must lie in (0, 1], got {fractions}", fix="pass fractions such as 1,0.75,0.5,0.25")
    if draws < 1:
        raise MsnetError(f"draws must be at least 1, got {draws}", fix="pass --draws 1 or more")
    train = run_dir / "train"
    folders = sorted(p for p in train.iterdir() if p.is_dir() and _checkpoints(p)
                     and (p / "predictions.csv").is_file()) if train.is_dir() else []
    if not folders:
        raise MsnetError("no trained aggregator checkpoints (train/<aggregator>/model*.pt) in this run folder",
                         path=train, fix="run `msnet train CONFIG` first (with this folder as the config's run_dir)")
    cache: dict[str, dict[str, torch.Tensor]] = {}
    by_agg: dict[str, dict[str, Any]] = {}
    n_patients = 0
    for folder in folders:
        ckpts = {k: _load_aggregator(p) for k, p in _checkpoints(folder).items()}
        meta = next(iter(ckpts.values()))[1]
        classes = list(meta["classes"])
        feats = _features(run_dir, str(meta["feature_set"]), cache)
        patients = _test_patients(folder / "predictions.csv")
        missing = sorted(p for p in patients if p not in feats)
        if missing:
            logger.warning("%s: %d test patients have no cached features (%s…); left out", folder.name,
                           len(missing), ", ".join(missing[:3]))
        pids = sorted(p for p in patients if p in feats and patients[p][0] in classes)
        if not pids:
            raise MsnetError("no test patient with cached features", path=folder / "predictions.csv",
                             fix="run `msnet extract CONFIG` and `msnet train CONFIG` again")
        y = np.array([classes.index(patients[p][0]) for p in pids])
        models = {k: model for k, (model, _) in ckpts.items()}
        folds = [[k for k in patients[p][1] if k in models] or [min(models)] for p in pids]
        acc, sd, auc = [], [], []
        for fi, f in enumerate(fractions):
            per_draw_acc, per_draw_auc = [], []
            for d in range(1 if f >= 1.0 else draws):
                seqs = [feats[p][sub_volume(feats[p].shape[0], f, np.random.default_rng([seed, i, fi, d]))]
                        for i, p in enumerate(pids)]
                pr = _probs(models, folds, seqs, len(classes))
                m = classification_metrics(y, pr.argmax(axis=1), pr, classes)
                per_draw_acc.append(m["accuracy"])
                per_draw_auc.append(m["macro_auc"])
            acc.append(float(np.mean(per_draw_acc)))
            sd.append(float(np.std(per_draw_acc)))
            aucs = [a for a in per_draw_auc if a is not None]
            auc.append(float(np.mean(aucs)) if aucs else None)
        by_agg[folder.name] = {"accuracy": acc, "accuracy_sd": sd, "macro_auc": auc, "n": len(pids)}
        n_patients = max(n_patients, len(pids))
        logger.info("%s on partial scans: %s", folder.name,
                    ", ".join(f"{100 * f:.0f}% -> {a:.3f}" for f, a in zip(fractions, acc)))
    result = {"fractions": fractions, "draws": int(draws), "seed": int(seed), "n_patients": n_patients,
              "by_aggregator": by_agg}
    out = run_dir / "evaluate"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "partial.json", json.dumps(result, indent=2, allow_nan=False))
    atomic_write_text(out / "partial.md", partial_table(result) + "\n")
    _plot(result, out / "partial.png")
    return result


def partial_table(result: dict[str, Any]) -> str:
    """Markdown: one row per aggregator, accuracy (%) per fraction kept, mean ± sd over draws.

    >>> print(partial_table({"fractions": [1.0, 0.5], "draws": 3, "by_aggregator": {
    ...     "msnet": {"accuracy": [0.9, 0.8], "accuracy_sd": [0.0, 0.05]}}}).splitlines()[2])
    | msnet | 90.0 | 80.0 ± 5.0 |
    """
    fr = result["fractions"]
    lines = ["| model | " + " | ".join(f"{100 * f:.0f}% of slices" for f in fr) + " |", "|---|" + "---|" * len(fr)]
    for name, m in result["by_aggregator"].items():
        cells = [f"{100 * a:.1f}" if f >= 1.0 else f"{100 * a:.1f} ± {100 * s:.1f}"
                 for f, a, s in zip(fr, m["accuracy"], m["accuracy_sd"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def partial_section(result: dict[str, Any]) -> str:
    """The report.md section: what was done, the table, the plot."""
    return (
        "## Partial scans\n\n"
        f"Patient-level accuracy (%) on random contiguous sub-volumes that keep a fraction of each test "
        f"study's slices ({result['n_patients']} test patients; mean ± sd over {result['draws']} seeded draws, "
        "the same sub-volumes for every model; the 100% column is the whole study).\n\n"
        + partial_table(result) + "\n\n![accuracy against the fraction of slices kept](partial.png)"
    )


def _plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.8), dpi=110)
    ax = fig.add_subplot()
    x = 100 * np.array(result["fractions"])
    for i, (name, m) in enumerate(result["by_aggregator"].items()):
        ax.errorbar(x, 100 * np.array(m["accuracy"]), yerr=100 * np.array(m["accuracy_sd"]), marker="o",
                    capsize=3, lw=1.8 if name == "msnet" else 1.0, color=f"C{i % 10}", label=name)
    ax.set_xlabel("slices kept (%, one contiguous run)")
    ax.set_ylabel("patient-level accuracy (%)")
    ax.set_xticks(sorted(set(x)))
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("partial scans")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
