"""Pure metric functions (numpy only): confusion matrix, per-class metrics, ROC/AUC,
patient-level bootstrap confidence intervals and the paper's table layouts.

Labels and predictions are integer class indices into ``classes``; ``probs`` is an
``(n, n_classes)`` array of class probabilities (or any scores, higher = more likely).

>>> m = classification_metrics([0, 1, 1], [0, 1, 0], None, ("A", "B"))
>>> m["accuracy"], m["sensitivity"]["B"]
(0.6666666666666666, 0.5)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "confusion_matrix",
    "classification_metrics",
    "roc_curve",
    "auc_score",
    "bootstrap_ci",
    "positive_class_index",
    "table1",
    "table3",
    "calibration",
    "fit_temperature",
]


# --------------------------------------------------------------------------- helpers


def _as_labels(y: Any, n_classes: int, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{name} must hold integer class indices")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise ValueError(f"{name} holds class indices outside 0..{n_classes - 1}")
    return arr


def _none_if_nan(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _nanmean(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over the finite entries (NaN where there are none), without warnings."""
    ok = np.isfinite(a)
    count = ok.sum(axis=axis)
    total = np.where(ok, a, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def positive_class_index(classes: Sequence[str]) -> int:
    """Index of the positive class for binary summaries: the one named like COVID, else 0.

    >>> positive_class_index(("NORMAL", "COVID"))
    1
    """
    for i, name in enumerate(classes):
        if "COVID" in str(name).upper():
            return i
    return 0


def _cm_batch_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class and summary metrics of a batch of confusion matrices ``(B, K, K)``.

    Undefined values are NaN: sensitivity without positives, specificity without
    negatives, precision without predictions, F1 of a class absent from both.
    """
    cm = cm.astype(np.float64)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)  # rows: true class
    predicted = cm.sum(axis=1)  # cols: predicted class
    total = cm.sum(axis=(1, 2))[:, None]
    fp = predicted - tp
    negatives = total - support
    tn = negatives - fp
    sens = _safe_div(tp, support)
    f1 = _safe_div(2 * tp, support + predicted)
    return {
        "sensitivity": sens,
        "specificity": _safe_div(tn, negatives),
        "precision": _safe_div(tp, predicted),
        "f1": f1,
        "accuracy": _safe_div(tp.sum(axis=1), total[:, 0]),
        "balanced_accuracy": _nanmean(sens, axis=1),
        "macro_f1": _nanmean(f1, axis=1),
    }


def _weighted_auc(y_binary: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One AUC per row of ``weights`` ``(B, n)`` (sample multiplicities); ties count 1/2.

    Used for bootstrap resamples: one sort of the scores serves every resample.
    """
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    w = weights[:, order].astype(np.float64)
    pos = y_binary[order].astype(bool)
    p = np.add.reduceat(np.where(pos, w, 0.0), starts, axis=1)  # (B, groups)
    q = np.add.reduceat(np.where(pos, 0.0, w), starts, axis=1)
    below = np.cumsum(q, axis=1) - q
    num = (p * (below + 0.5 * q)).sum(axis=1)
    den = p.sum(axis=1) * q.sum(axis=1)
    return _safe_div(num, den)


# --------------------------------------------------------------------------- public API


def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int) -> np.ndarray:
    """Counts ``(n_classes, n_classes)``: rows are the true class, columns the prediction.

    >>> confusion_matrix([0, 0, 1], [0, 1, 1], 2).tolist()
    [[1, 1], [0, 1]]
    """
    t = _as_labels(y_true, n_classes, "y_true")
    p = _as_labels(y_pred, n_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length ({t.size} vs {p.size})")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _binary(y_true_binary: Any, scores: Any, what: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(labels as bool, scores as float64, positives, negatives), checked for a ROC / AUC."""
    y = np.asarray(y_true_binary).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be equal-length vectors")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"{what} needs at least one positive and one negative sample")
    return y, s, n_pos, n_neg


def roc_curve(y_true_binary: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)``; thresholds descend from +inf over the distinct scores.

    >>> fpr, tpr, thr = roc_curve([0, 1], [0.2, 0.9])
    >>> fpr.tolist(), tpr.tolist()
    ([0.0, 0.0, 1.0], [0.0, 1.0, 1.0])
    """
    y, s, n_pos, n_neg = _binary(y_true_binary, scores, "ROC")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, s[last]]
    return fpr, tpr, thresholds


def auc_score(y_true_binary: Any, scores: Any) -> float:
    """Area under the ROC curve by the Mann-Whitney rank formula (ties get mid-ranks).

    >>> auc_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    y, s, n_pos, n_neg = _binary(y_true_binary, scores, "AUC")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    midrank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mid-rank of each distinct score
    ranks = midrank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(
    y_true: Any, y_pred: Any, probs: Any | None, classes: Sequence[str]
) -> dict[str, Any]:
    """Every metric the report shows, as a JSON-ready dict.

    Per class (dicts keyed by class name): ``sensitivity``, ``specificity``, ``precision``,
    ``f1_per_class``, ``auc_per_class`` (one-vs-rest), ``support``. Summaries: ``accuracy``,
    ``balanced_accuracy``, ``macro_f1``, ``macro_auc``, ``confusion_matrix`` (nested list),
    ``n``. ``f1``/``auc`` are those of the positive class (COVID) for two classes, else the
    macro values. Undefined values are None.

    >>> m = classification_metrics([0, 1], [0, 1], [[0.9, 0.1], [0.2, 0.8]], ("COVID-19", "NORMAL"))
    >>> m["accuracy"], m["auc"], m["positive_class"]
    (1.0, 1.0, 'COVID-19')
    """
    classes = [str(c) for c in classes]
    k = len(classes)
    t = _as_labels(y_true, k, "y_true")
    cm = confusion_matrix(t, y_pred, k)
    batch = _cm_batch_metrics(cm[None])

    auc_pc: list[float | None] = [None] * k
    if probs is not None:
        pr = np.asarray(probs, dtype=np.float64)
        if pr.shape != (t.size, k):
            raise ValueError(f"probs has shape {pr.shape}, expected {(t.size, k)}")
        for c in range(k):
            pos = t == c
            if 0 < pos.sum() < t.size:
                auc_pc[c] = auc_score(pos, pr[:, c])
    valid_auc = [a for a in auc_pc if a is not None]
    macro_auc = float(np.mean(valid_auc)) if valid_auc else None

    def per_class(key: str) -> dict[str, float | None]:
        return {c: _none_if_nan(v) for c, v in zip(classes, batch[key][0])}

    out: dict[str, Any] = {
        "n": int(t.size),
        "classes": classes,
        "accuracy": _none_if_nan(batch["accuracy"][0]),
        "balanced_accuracy": _none_if_nan(batch["balanced_accuracy"][0]),
        "macro_f1": _none_if_nan(batch["macro_f1"][0]),
        "macro_auc": macro_auc,
        "sensitivity": per_class("sensitivity"),
        "specificity": per_class("specificity"),
        "precision": per_class("precision"),
        "f1_per_class": per_class("f1"),
        "auc_per_class": dict(zip(classes, auc_pc)),
        "support": {c: int(v) for c, v in zip(classes, cm.sum(axis=1))},
        "confusion_matrix": cm.tolist(),
    }
    if probs is not None:
        cal = calibration(t, pr)
        out.update({key: cal[key] for key in ("ece", "brier", "ece_if_calibrated", "ece_if_calibrated_p95")})
    if k == 2:
        pos = positive_class_index(classes)
        out["positive_class"] = classes[pos]
        out["f1"] = out["f1_per_class"][classes[pos]]
        out["auc"] = auc_pc[pos]
    else:
        out["f1"] = out["macro_f1"]
        out["auc"] = macro_auc
    return out


def calibration(y_true: Any, probs: Any, n_bins: int = 15, draws: int = 200) -> dict[str, Any]:
    """How far the top-class probability is from the accuracy it promises.

    ``ece``: expected calibration error over ``n_bins`` equal-width confidence bins (Guo et al. 2017);
    ``brier``: multi-class Brier score (mean squared distance to the one-hot label, 0..2);
    ``bins``: per bin the mean confidence, the accuracy and the count (for reliability diagrams);
    ``ece_if_calibrated`` and ``ece_if_calibrated_p95``: the mean and the 95th percentile of the ECE
    that a perfectly calibrated model with the same confidences shows on as many cases (each answer
    right with the probability it states; ``draws`` seeded draws). On a few hundred cases the ECE
    is far from 0 by chance alone; an ECE below the 95th percentile is not evidence of miscalibration.

    >>> c = calibration([0, 1, 1, 0], [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]], n_bins=5)
    >>> round(c["ece"], 3), round(c["brier"], 3)
    (0.3, 0.25)
    """
    pr = np.asarray(probs, dtype=np.float64)
    t = _as_labels(y_true, pr.shape[1], "y_true")
    conf = pr.max(axis=1)
    correct = (pr.argmax(axis=1) == t).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    in_bin = np.eye(n_bins)[which]  # (n, n_bins)
    count, stated, hits = in_bin.sum(axis=0), conf @ in_bin, correct @ in_bin
    bins = [{"lo": float(edges[b]), "hi": float(edges[b + 1]), "confidence": float(stated[b] / count[b]),
             "accuracy": float(hits[b] / count[b]), "n": int(count[b])} for b in np.flatnonzero(count)]
    onehot = np.eye(pr.shape[1])[t]
    floor = _ece_if_calibrated(conf, in_bin, draws) if t.size else np.zeros(1)
    return {"ece": float(np.abs(hits - stated).sum() / max(1, t.size)),
            "brier": float(((pr - onehot) ** 2).sum(axis=1).mean()) if t.size else None,
            "bins": bins, "n_bins": n_bins, "ece_if_calibrated": float(floor.mean()),
            "ece_if_calibrated_p95": float(np.quantile(floor, 0.95))}


def _ece_if_calibrated(conf: np.ndarray, in_bin: np.ndarray, draws: int, seed: int = 0) -> np.ndarray:
    """ECEs (draws,) of answers that are right with exactly their confidence ``conf`` (n,), binned by
    ``in_bin`` (n, n_bins one-hot): per bin |hits - sum of confidences| / n, summed (the ECE as
    :func:`calibration` computes it)."""
    rng = np.random.default_rng(seed)
    expected = conf @ in_bin
    out = []
    chunk = max(1, 2_000_000 // conf.size)  # draws at a time, a bounded amount of memory
    for start in range(0, draws, chunk):
        hits = (rng.random((min(chunk, draws - start), conf.size)) < conf).astype(np.float64)
        out.append(np.abs(hits @ in_bin - expected).sum(axis=1) / conf.size)
    return np.concatenate(out)


def fit_temperature(logits: Any, y_true: Any, lo: float = 0.05, hi: float = 20.0) -> float:
    """Temperature T minimising the negative log-likelihood of softmax(logits / T) (Guo et al. 2017),
    by golden-section search over log T. T > 1 softens over-confident probabilities.

    Logits 2·onehot + N(0, 1) have the Bayes posterior softmax(2·logits), i.e. T = 0.5:

    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, 400)
    >>> logits = np.eye(3)[y] * 2.0 + rng.normal(0, 1, (400, 3))
    >>> t1 = fit_temperature(logits, y); t5 = fit_temperature(logits * 5, y)
    >>> round(t1, 1), round(t5 / t1, 3)
    (0.5, 5.0)
    """
    z = np.asarray(logits, dtype=np.float64)
    t = _as_labels(y_true, z.shape[1], "y_true")
    if t.size == 0:
        return 1.0

    def nll(log_temp: float) -> float:
        s = z / np.exp(log_temp)
        s = s - s.max(axis=1, keepdims=True)
        return float((np.log(np.exp(s).sum(axis=1)) - s[np.arange(t.size), t]).mean())

    a, b = np.log(lo), np.log(hi)
    g = (np.sqrt(5.0) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(d)
    return float(np.exp((a + b) / 2))


def bootstrap_ci(
    y_true: Any,
    y_pred: Any,
    probs: Any | None,
    classes: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float] | None]:
    """Percentile bootstrap intervals, resampling patients (rows) with replacement.

    Keys: ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``macro_auc`` (when ``probs``
    is given), ``f1``/``auc`` (as in :func:`classification_metrics`) and
    ``sensitivity_<class>`` per class. A value is None when the metric is undefined in
    every resample. All resamples are evaluated at once (no Python loop over them).

    >>> ci = bootstrap_ci([0, 1] * 50, [0, 1] * 50, None, ("A", "B"), n_boot=200)
    >>> ci["accuracy"]
    (1.0, 1.0)
    """
    classes = [str(c) for c in classes]
    k = len(classes)
    t = _as_labels(y_true, k, "y_true")
    p = _as_labels(y_pred, k, "y_pred")
    n = t.size
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one sample")
    if p.size != n:
        raise ValueError(f"y_true and y_pred differ in length ({n} vs {p.size})")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    counts = np.bincount((np.arange(n_boot)[:, None] * n + idx).ravel(), minlength=n_boot * n)
    counts = counts.reshape(n_boot, n).astype(np.float64)

    pair = np.zeros((n, k * k))
    pair[np.arange(n), t * k + p] = 1.0
    cm = (counts @ pair).reshape(n_boot, k, k)
    batch = _cm_batch_metrics(cm)

    samples: dict[str, np.ndarray] = {
        "accuracy": batch["accuracy"],
        "balanced_accuracy": batch["balanced_accuracy"],
        "macro_f1": batch["macro_f1"],
    }
    for c, name in enumerate(classes):
        samples[f"sensitivity_{name}"] = batch["sensitivity"][:, c]
    pos = positive_class_index(classes)
    samples["f1"] = batch["f1"][:, pos] if k == 2 else batch["macro_f1"]
    if probs is not None:
        pr = np.asarray(probs, dtype=np.float64)
        if pr.shape != (n, k):
            raise ValueError(f"probs has shape {pr.shape}, expected {(n, k)}")
        aucs = np.stack([_weighted_auc(t == c, pr[:, c], counts) for c in range(k)], axis=1)
        samples["macro_auc"] = _nanmean(aucs, axis=1)
        samples["auc"] = aucs[:, pos] if k == 2 else samples["macro_auc"]

    out: dict[str, tuple[float, float] | None] = {}
    for key, values in samples.items():
        v = values[np.isfinite(values)]
        if v.size == 0:
            out[key] = None
        else:
            lo, hi = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            out[key] = (float(lo), float(hi))
    return out


# --------------------------------------------------------------------------- tables


def pct(x: float | None, digits: int = 1, suffix: str = "") -> str:
    """A fraction as a percentage for tables; "–" when there is none.

    >>> pct(0.8666), pct(None), pct(0.5, 2, "%")
    ('86.7', '–', '50.00%')
    """
    return "–" if x is None else f"{100 * x:.{digits}f}{suffix}"


def table1(y_true: Any, y_pred: Any, classes: Sequence[str], title: str = "Class") -> str:
    """The paper's Table 1 form (slice level): per-class sensitivity and overall accuracy.

    >>> print(table1([0, 0, 1], [0, 1, 1], ("COVID-19", "NORMAL")))
    | Class | Sensitivity | Correct / total |
    |---|---|---|
    | COVID-19 | 50.0% | 1/2 |
    | NORMAL | 100.0% | 1/1 |
    | **Overall accuracy** | **66.7%** | **2/3** |
    """
    classes = [str(c) for c in classes]
    cm = confusion_matrix(y_true, y_pred, len(classes))
    lines = [f"| {title} | Sensitivity | Correct / total |", "|---|---|---|"]
    for c, name in enumerate(classes):
        total = int(cm[c].sum())
        sens = cm[c, c] / total if total else None
        lines.append(f"| {name} | {pct(sens, suffix='%')} | {int(cm[c, c])}/{total} |")
    n, correct = int(cm.sum()), int(np.trace(cm))
    acc = correct / n if n else None
    lines.append(f"| **Overall accuracy** | **{pct(acc, suffix='%')}** | **{correct}/{n}** |")
    return "\n".join(lines)


def _class_index(value: Any, classes: Sequence[str]) -> int:
    """A class given by name or by index (as text or int) -> its index."""
    text = str(value).strip()
    if text in classes:
        return list(classes).index(text)
    try:
        i = int(float(text))
    except ValueError:
        raise ValueError(f"unknown class {text!r}; expected one of {list(classes)}") from None
    if not 0 <= i < len(classes):
        raise ValueError(f"class index {i} outside 0..{len(classes) - 1}")
    return i


def table3(rows: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> str:
    """The paper's Table 3 form: per test subset, correct/total per class and accuracy.

    ``rows`` are prediction records with ``subset``, ``label`` and ``prediction`` (class
    names or indices). An ``All`` row follows when there are several subsets.

    >>> rows = [{"subset": "test", "label": "A", "prediction": "A"},
    ...         {"subset": "test", "label": "B", "prediction": "A"}]
    >>> print(table3(rows, ("A", "B")))
    | Subset | A | B | Accuracy |
    |---|---|---|---|
    | test | 1/1 | 0/1 | 50.0% (1/2) |
    """
    classes = [str(c) for c in classes]
    k = len(classes)
    by_subset: dict[str, np.ndarray] = {}
    for r in rows:
        cm = by_subset.setdefault(str(r.get("subset") or "test"), np.zeros((k, k), dtype=np.int64))
        cm[_class_index(r["label"], classes), _class_index(r["prediction"], classes)] += 1
    if len(by_subset) > 1:
        by_subset["All"] = sum(by_subset.values())  # type: ignore[assignment]
    lines = ["| Subset | " + " | ".join(classes) + " | Accuracy |", "|" + "---|" * (k + 2)]
    for name, cm in by_subset.items():
        cells = [f"{int(cm[c, c])}/{int(cm[c].sum())}" for c in range(k)]
        n, correct = int(cm.sum()), int(np.trace(cm))
        acc = f"{pct(correct / n if n else None, suffix='%')} ({correct}/{n})"
        label = f"**{name}**" if name == "All" else name
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {acc} |")
    return "\n".join(lines)
