"""Stage 4: metrics, bootstrap confidence intervals, plots and ``report.md`` for a run.

Reads ``RUN/train/<model>/{predictions.csv, history.csv, info.json}`` (one folder per
trained aggregator / feature set) and optionally ``RUN/finetune/metrics.json``; writes
``RUN/evaluate/{metrics.json, predictions.csv, report.md, *.png}``.

e.g. report = evaluate_run(Path("runs/demo"))
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from msnet import __version__
from msnet.errors import MsnetError
from msnet.files import atomic_write_text
from msnet.metrics import (
    _class_index,
    bootstrap_ci,
    classification_metrics,
    pct,
    roc_curve,
    table3,
)
from msnet.plots import figure as _figure
from msnet.plots import plot_reliability
from msnet.plots import save_png as _save_png
from msnet.stages.partial import partial_scans, partial_section

logger = logging.getLogger(__name__)

__all__ = ["evaluate_run", "headline_table", "format_console_table", "PRIMARY_AGGREGATOR"]

PRIMARY_AGGREGATOR = "msnet"
_REQUIRED = ("patient_id", "label", "split", "prediction")


# --------------------------------------------------------------------------- file helpers


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MsnetError(f"cannot read CSV ({exc})", path=path, fix="re-run `msnet train CONFIG`") from exc


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"


# --------------------------------------------------------------------------- loading


def _load_model_dir(folder: Path) -> dict[str, Any]:
    """One trained model's predictions, history and info from ``train/<name>/``."""
    pred_path = folder / "predictions.csv"
    fields, rows = _read_csv(pred_path)
    missing = [c for c in _REQUIRED if c not in fields]
    classes = [f[2:] for f in fields if f.startswith("p_")]
    if missing or len(classes) < 2:
        what = f"missing columns {missing}" if missing else "fewer than two p_<class> columns"
        raise MsnetError(
            f"predictions file has {what} (expected patient_id,label,subset,split,fold,prediction,p_<class>...)",
            path=pred_path,
            fix="re-run `msnet train CONFIG --overwrite`",
        )
    info: dict[str, Any] = {}
    info_path = folder / "info.json"
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise MsnetError(f"cannot read JSON ({exc})", path=info_path, fix="re-run `msnet train CONFIG`") from exc
    else:
        logger.warning("%s is missing; the model is named after its folder", info_path)
    history: list[dict[str, str]] = []
    hist_path = folder / "history.csv"
    if hist_path.is_file():
        history = _read_csv(hist_path)[1]
    else:
        logger.warning("%s is missing; no training curves for this model", hist_path)
    return {
        "name": folder.name,
        "aggregator": str(info.get("aggregator", folder.name)),
        "info": info,
        "classes": classes,
        "fields": fields,
        "rows": rows,
        "history": history,
        "path": pred_path,
    }


def _test_arrays(model: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, str]]]:
    """Labels, predictions and probabilities of the split=test rows, one per patient.

    A patient tested by several fold models (a shared held-out set) is scored by the
    mean of their probabilities (an ensemble), so that the bootstrap resamples patients.
    """
    classes, path = model["classes"], model["path"]
    rows = [r for r in model["rows"] if (r.get("split") or "").strip().lower() == "test"]
    if not rows:
        raise MsnetError("no rows with split=test", path=path, fix="train with a test subset or with --folds K")
    by_patient: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], []).append(r)
    y, pred, probs = [], [], []
    try:
        for pid, group in by_patient.items():
            labels = {_class_index(r["label"], classes) for r in group}
            if len(labels) != 1:
                raise MsnetError(f"patient {pid} has conflicting labels", path=path, fix="check the cohort manifest")
            p = np.array([[float(r[f"p_{c}"]) for c in classes] for r in group]).mean(axis=0)
            y.append(labels.pop())
            pred.append(_class_index(group[0]["prediction"], classes) if len(group) == 1 else int(np.argmax(p)))
            probs.append(p)
    except (ValueError, KeyError) as exc:
        raise MsnetError(f"bad value in predictions ({exc})", path=path, fix="re-run `msnet train CONFIG`") from exc
    n_dup = len(rows) - len(by_patient)
    if n_dup:
        logger.info("%s: %d test rows repeat a patient; their fold models' probabilities are averaged", path, n_dup)
    return np.array(y), np.array(pred), np.array(probs), rows


# --------------------------------------------------------------------------- plots


def _plot_confusion(cm: np.ndarray, classes: Sequence[str], title: str, path: Path) -> None:
    fig = _figure(4.2, 3.8)
    ax = fig.add_subplot()
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    _save_png(fig, path)


def _plot_roc(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], metrics: dict, title: str, path: Path) -> None:
    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot()
    for c, name in enumerate(classes):
        pos = y == c
        if 0 < pos.sum() < y.size:
            fpr, tpr, _ = roc_curve(pos, probs[:, c])
            ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {metrics['auc_per_class'][name]:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    macro = metrics.get("macro_auc")
    ax.legend(title=f"macro AUC {macro:.3f}" if macro is not None else "macro AUC –", loc="lower right", fontsize=8)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title)
    _save_png(fig, path)


def _num(x: str | None) -> float:
    try:
        return float(x) if x not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _plot_history(models: Sequence[dict[str, Any]], path: Path) -> bool:
    if not any(m["history"] for m in models):
        return False
    fig = _figure(10, 3.8)
    ax_loss, ax_acc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colours = [f"C{i % 10}" for i in range(len(models))]
    for model, colour in zip(models, colours):
        folds: dict[str, list[dict[str, str]]] = {}
        for r in model["history"]:
            folds.setdefault(r.get("fold", "0"), []).append(r)
        for i, rows in enumerate(folds.values()):
            epoch = [_num(r.get("epoch")) for r in rows]
            label = model["name"] if i == 0 else None
            ax_loss.plot(epoch, [_num(r.get("train_loss")) for r in rows], color=colour, lw=0.8, label=label)
            ax_loss.plot(epoch, [_num(r.get("val_loss")) for r in rows], color=colour, lw=0.8, ls="--")
            ax_acc.plot(epoch, [_num(r.get("val_accuracy")) for r in rows], color=colour, lw=0.8, label=label)
    ax_loss.set_title("loss (solid: train, dashed: val)")
    ax_acc.set_title("validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    _save_png(fig, path)
    return True


def _plot_comparison(entries: dict[str, dict[str, Any]], path: Path) -> None:
    names = list(entries)
    acc = np.array([entries[n]["accuracy"] or 0.0 for n in names])
    lo = np.array([(entries[n]["ci"].get("accuracy") or (a, a))[0] for n, a in zip(names, acc)])
    hi = np.array([(entries[n]["ci"].get("accuracy") or (a, a))[1] for n, a in zip(names, acc)])
    fig = _figure(max(4.0, 1.1 * len(names) + 2), 3.8)
    ax = fig.add_subplot()
    ax.bar(range(len(names)), acc, color=[f"C{i % 10}" for i in range(len(names))])
    ax.errorbar(range(len(names)), acc, yerr=[acc - lo, hi - acc], fmt="none", ecolor="black", capsize=4)
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 4 else 0)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("patient-level accuracy (95% CI)")
    ax.set_title("aggregators compared")
    _save_png(fig, path)


# --------------------------------------------------------------------------- tables


def _with_ci(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "–"
    return f"{pct(value)} [{pct(ci[0])}, {pct(ci[1])}]" if ci else pct(value)


def headline_table(metrics_json: dict[str, Any]) -> str:
    """Markdown comparison table, one row per trained model, from ``metrics.json``.

    Values are percentages; accuracy carries its 95% bootstrap interval.

    >>> m = {"classes": ["A", "B"], "aggregator": "msnet", "by_aggregator": {"msnet": {
    ...     "accuracy": 0.9, "balanced_accuracy": 0.9, "macro_f1": 0.9, "macro_auc": 0.95,
    ...     "sensitivity": {"A": 1.0, "B": 0.8}, "ci": {"accuracy": [0.8, 1.0]},
    ...     "info": {"n_parameters": 1234}}}}
    >>> print(headline_table(m).splitlines()[2])
    | **msnet** | – | – | 90.0 [80.0, 100.0] | 90.0 | 90.0 | 95.0 | 100.0 | 80.0 | 1,234 |
    """
    entries = metrics_json.get("by_aggregator") or {metrics_json.get("aggregator", "model"): metrics_json}
    classes = metrics_json.get("classes") or list(next(iter(entries.values())).get("sensitivity", {}))
    primary = metrics_json.get("aggregator")
    head = ["model", "backbone", "features", "accuracy [95% CI]", "balanced acc.", "macro F1", "macro AUC"]
    head += [f"sens. {c}" for c in classes] + ["parameters"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in entries.items():
        info = m.get("info") or {}
        n_par = info.get("n_parameters")
        cells = [
            f"**{name}**" if name == primary else name,
            str(info.get("backbone", "–")),
            str(info.get("features", "–")),
            _with_ci(m.get("accuracy"), (m.get("ci") or {}).get("accuracy")),
            pct(m.get("balanced_accuracy")),
            pct(m.get("macro_f1")),
            pct(m.get("macro_auc")),
        ]
        cells += [pct((m.get("sensitivity") or {}).get(c)) for c in classes]
        cells.append(f"{int(n_par):,}" if isinstance(n_par, (int, float)) else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_console_table(metrics: dict[str, Any]) -> Any:
    """The headline comparison as a compact ``rich.table.Table`` (fits 80 columns; full table: report.md)."""
    from rich.table import Table

    classes = metrics["classes"]
    table = Table(title=f"patient-level test results (%), n = {metrics.get('n', '?')}; "
                        "per-class columns: sensitivity")
    for col in ["model", "acc.", "95% CI", "bal. acc.", "AUC", *classes]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, m in metrics["by_aggregator"].items():
        lo, hi = (m.get("ci") or {}).get("accuracy") or (None, None)
        table.add_row(name, pct(m.get("accuracy")), f"{pct(lo)}–{pct(hi)}", pct(m.get("balanced_accuracy")),
                      pct(m.get("macro_auc")), *[pct((m.get("sensitivity") or {}).get(c)) for c in classes])
    return table


def _per_class_table(m: dict[str, Any]) -> str:
    ci = m.get("ci") or {}
    lines = [
        "| class | n | sensitivity [95% CI] | specificity | precision | F1 | AUC (one-vs-rest) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in m["classes"]:
        lines.append(
            f"| {c} | {m['support'][c]} | {_with_ci(m['sensitivity'][c], ci.get(f'sensitivity_{c}'))} | "
            f"{pct(m['specificity'][c])} | {pct(m['precision'][c])} | {pct(m['f1_per_class'][c])} | "
            f"{pct(m['auc_per_class'][c])} |"
        )
    return "\n".join(lines)


def _slice_level_section(run_dir: Path) -> str | None:
    path = run_dir / "finetune" / "metrics.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("%s: cannot read slice-level metrics (%s); left out of the report", path, exc)
        return None
    body = data.get("table1")
    if not body:
        scalars = {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        body = "\n".join(f"- {k}: {v:.4g}" for k, v in scalars.items()) or "(no summary values)"
    return "## Slice level (fine-tuned backbone, Table 1 form)\n\n" + body


# --------------------------------------------------------------------------- the stage


def _collect_models(run_dir: Path) -> list[dict[str, Any]]:
    train = run_dir / "train"
    folders = sorted(p for p in train.iterdir() if (p / "predictions.csv").is_file()) if train.is_dir() else []
    if not folders:
        raise MsnetError(
            "no trained models (train/<aggregator>/predictions.csv) in this run folder",
            path=train,
            fix="run `msnet train CONFIG` first (with this folder as the config's run_dir)",
        )
    models = [_load_model_dir(f) for f in folders]
    primary = next((m for m in models if m["name"] == PRIMARY_AGGREGATOR), None)
    primary = primary or next((m for m in models if m["aggregator"] == PRIMARY_AGGREGATOR), models[0])
    models.remove(primary)
    key = lambda m: (str(m["info"].get("features", "")), str(m["info"].get("backbone", "")), m["name"])  # noqa: E731
    return [primary] + sorted(models, key=key)


def _versions() -> dict[str, str]:
    import matplotlib

    return {"msnet": __version__, "numpy": np.__version__, "matplotlib": matplotlib.__version__}


def evaluate_run(run_dir: Path, n_boot: int = 1000, seed: int = 0, partial: bool = False,
                 partial_draws: int = 5) -> Path:
    """Evaluate every trained model of a run; return the path of ``evaluate/report.md``.

    The primary model (``msnet`` if present, else the first) gives the top level of
    ``metrics.json``; every model appears under ``by_aggregator`` and in the comparison.
    ``partial``: also re-evaluate every aggregator on random contiguous sub-volumes of the
    test studies (:func:`msnet.stages.partial.partial_scans`; needs the run's checkpoints and
    cached features); ``partial.json``, ``partial.png`` and a section of report.md.
    """
    run_dir = Path(run_dir)
    models = _collect_models(run_dir)
    out = run_dir / "evaluate"
    out.mkdir(parents=True, exist_ok=True)
    classes = models[0]["classes"]
    by_agg: dict[str, dict[str, Any]] = {}
    test_rows: dict[str, list[dict[str, str]]] = {}
    plots: dict[str, tuple[str, str]] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for model in models:
        name = model["name"]
        if model["classes"] != classes:
            logger.warning("%s: classes %s differ from %s", model["path"], model["classes"], classes)
        y, pred, probs, rows = _test_arrays(model)
        curves[name] = (y, probs)
        m = classification_metrics(y, pred, probs, model["classes"])
        ci = bootstrap_ci(y, pred, probs, model["classes"], n_boot=n_boot, seed=seed)
        m["ci"] = {k: (list(v) if v else None) for k, v in ci.items()}
        m["aggregator"] = model["aggregator"]
        m["info"] = model["info"]
        m["n_test_rows"] = len(rows)
        folds = sorted({r.get("fold", "") for r in rows})
        if len(folds) > 1:
            cls = model["classes"]
            correct = [_class_index(r["label"], cls) == _class_index(r["prediction"], cls) for r in rows]
            m["fold_accuracy"] = {
                f: float(np.mean([ok for ok, r in zip(correct, rows) if r.get("fold", "") == f])) for f in folds
            }
        m["table3"] = table3(rows, model["classes"])
        by_agg[name] = m
        test_rows[name] = rows
        cm_png, roc_png = f"confusion_matrix_{_safe_name(name)}.png", f"roc_{_safe_name(name)}.png"
        _plot_confusion(np.array(m["confusion_matrix"]), model["classes"], f"{name}: confusion matrix", out / cm_png)
        _plot_roc(y, probs, model["classes"], m, f"{name}: ROC (one-vs-rest)", out / roc_png)
        plots[name] = (cm_png, roc_png)
        logger.info("%s: test accuracy %.3f on %d patients", name, m["accuracy"], m["n"])

    primary = models[0]["name"]
    pm = by_agg[primary]
    result: dict[str, Any] = {k: v for k, v in pm.items()}
    result.update(aggregator=primary, by_aggregator=by_agg, table3=pm["table3"], versions=_versions())
    result["headline"] = headline_table(result)

    partial_result = None
    if partial:

        partial_result = partial_scans(run_dir, draws=partial_draws, seed=seed)
        result["partial"] = partial_result
    has_curves = _plot_history(models, out / "training_curves.png")
    plot_reliability(curves, out / "reliability.png", "patient level, test set (calibrated probabilities)")
    _plot_comparison(by_agg, out / "comparison.png")
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2, allow_nan=False))
    _write_predictions(out / "predictions.csv", models, test_rows)
    report = out / "report.md"
    atomic_write_text(report, _report(run_dir, result, models, plots, has_curves, partial_result))
    logger.info("report written to %s", report)
    return report


def _write_predictions(path: Path, models: Sequence[dict[str, Any]], rows: dict[str, list[dict[str, str]]]) -> None:
    fields = ["aggregator"]
    for m in models:
        fields += [f for f in m["fields"] if f not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for m in models:
        for r in rows[m["name"]]:
            writer.writerow({**r, "aggregator": m["name"]})
    atomic_write_text(path, buf.getvalue())


def _report(run_dir: Path, result: dict[str, Any], models: Sequence[dict[str, Any]], plots: dict, curves: bool,
            partial: dict[str, Any] | None = None) -> str:
    primary = result["aggregator"]
    pm = result["by_aggregator"][primary]
    parts = [
        f"# msnet evaluation: {run_dir.name}",
        f"Patient-level results on the test patients (split=test; n = {pm['n']}). "
        "Values in %; intervals are 95% percentile bootstrap intervals over patients. "
        f"Primary model: **{primary}**. Research use only; not for diagnostic use.",
        "## Models compared",
        result["headline"],
    ]
    if len(models) > 1:
        parts.append("![accuracy per model](comparison.png)")
    parts += [f"## Per-class metrics ({primary})", _per_class_table(pm)]
    if "fold_accuracy" in pm:
        accs = list(pm["fold_accuracy"].values())
        parts.append(
            f"Accuracy per fold: {', '.join(f'{k}: {pct(v)}' for k, v in pm['fold_accuracy'].items())} "
            f"(mean {pct(float(np.mean(accs)))}, sd {pct(float(np.std(accs)))})."
        )
    parts += [f"## Per test subset ({primary}, Table 3 form)", pm["table3"]]
    parts += ["## Calibration",
              "Probabilities are temperature-scaled on each model's validation patients (`msnet train`). "
              "ECE: expected calibration error over 15 confidence bins; Brier: multi-class Brier score; "
              "ECE if calibrated: the mean (and 95th percentile) ECE of a perfectly calibrated model with the "
              "same confidences on as many patients, the ECE that chance alone gives.",
              "| model | ECE | ECE if calibrated (p95) | Brier |\n|---|---|---|---|\n" + "\n".join(
                  f"| {n} | {m.get('ece', 0.0):.3f} | {m.get('ece_if_calibrated', 0.0):.3f} "
                  f"({m.get('ece_if_calibrated_p95', 0.0):.3f}) | {m.get('brier', 0.0):.3f} |"
                  for n, m in result["by_aggregator"].items()),
              "![reliability diagram](reliability.png)"]
    if partial is not None:

        parts.append(partial_section(partial))
    parts.append("## Confusion matrices and ROC curves")
    for name, (cm_png, roc_png) in plots.items():
        parts.append(f"### {name}\n\n![{name} confusion matrix]({cm_png}) ![{name} ROC]({roc_png})")
    if curves:
        parts += ["## Training curves", "![training curves](training_curves.png)"]
    slice_level = _slice_level_section(run_dir)
    if slice_level:
        parts.append(slice_level)
    return "\n\n".join(parts) + "\n"
