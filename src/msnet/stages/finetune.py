"""Stage 1: fine-tune the slice backbone on slice-level labels.

The paper's way: infected slices of COVID-19 and CAP patients carry the patient's class, slices
sampled from normal patients are NORMAL; or a slice-image manifest (UCSD layout). Paper augmentation,
class-weighted cross-entropy, Adam, best-validation checkpoint; resumable after interruption;
data-parallel under torchrun. The stage's parts: the slices (:mod:`msnet.data.slices`), their
augmentation (:mod:`msnet.data.augment`), the model (:mod:`msnet.stages.slice_model`), the training
engine (:mod:`msnet.stages.engine`), calibration (:mod:`msnet.stages.calibration`) and the reports
(:mod:`msnet.stages.slice_report`); a CT cohort probed with a frozen backbone goes to
:mod:`msnet.stages.ct_eval`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from msnet import device as D
from msnet import preprocess as P
from msnet.config import Config, save_run_info
from msnet.data.augment import augment, augment_images
from msnet.data.cohorts import read_cohort, read_slice_labels, read_slice_manifest
from msnet.data.slices import (SHORTCUT_PROBES, SliceSet, build_slice_sets, cohort_slices, image_folder_rows,
                               image_slices, manifest_folds)
from msnet.data.splits import class_weights
from msnet.device import pick_device, seed_everything
from msnet.errors import MsnetError
from msnet.files import atomic_path, atomic_write_text, write_csv_atomic
from msnet.metrics import classification_metrics, fit_temperature, table1
from msnet.plots import plot_slice_scores
from msnet.stages import ct_eval
from msnet.stages.calibration import CALIBRATIONS, OOF_FILE, calibrate, refit_probe
from msnet.stages.engine import Engine
from msnet.stages.probe import softmax
from msnet.stages.slice_model import (MODES, calibrated_probs, fit_linear_probe, load_slice_classifier, log_probs,
                                      model_for, predict_slices, save_backbone, shortcut_flips, slice_metrics, spec_for,
                                      train_windows)
from msnet.stages.slice_report import by_format, reliability_plot, results_folder
from msnet.stages.transfer import SLICE_FIELDS

log = logging.getLogger(__name__)


def _engine(cfg: Config, train_set: SliceSet, out: Path, classes: list[str], rank: int, world: int) -> Engine:
    """The training engine of one fine-tuning run: the model (its probe fitted first where finetune.mode
    says), Adam over the head and the unfrozen backbone, class-weighted cross-entropy, the resume state
    and history in ``out``, the best model saved as ``out/backbone.pt``."""
    ft = cfg.finetune
    if ft.mode not in MODES:
        raise MsnetError(f"finetune.mode={ft.mode!r} is not one of {', '.join(MODES)}", fix="set finetune.mode")
    if ft.probe_refit and ft.mode != "linear_probe":
        raise MsnetError(f"finetune.probe_refit applies to mode linear_probe, not {ft.mode}",
                         fix="set finetune.probe_refit=false, or finetune.mode=linear_probe")
    device = pick_device(cfg.device)
    model = model_for(cfg, len(classes)).to(device, memory_format=torch.channels_last)
    if ft.mode in ("linear_probe", "lp_ft"):
        fit_linear_probe(model, train_set, ft, device)
    head = list(model.fc.parameters())
    body = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": head, "lr": ft.lr}]
    if body and ft.backbone_lr_scale > 0:
        groups.append({"params": body, "lr": ft.lr * ft.backbone_lr_scale})
    opt = torch.optim.Adam(groups, lr=ft.lr, weight_decay=ft.weight_decay)
    weights = class_weights(train_set.labels, len(classes)) if ft.class_weights else None
    loss_fn = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device))
    spec = spec_for(cfg, model.backbone)

    def keep(best: nn.Module, row: dict) -> None:
        save_backbone(best, spec, classes, out / "backbone.pt",
                      extra={"epoch": row["epoch"], "val_accuracy": row["val_accuracy"]})

    return Engine(model, opt, loss_fn, epochs=ft.epochs, device=device, early_stopping=ft.early_stopping,
                  ema=ft.ema if ft.mode != "linear_probe" else 0.0, freeze_bn=ft.freeze_bn, rank=rank, world=world,
                  state_file=out / "state.pt", history_file=out / "history.csv", on_best=keep, name="fine-tuning")


def _fit(cfg: Config, train_set: SliceSet, val_set: SliceSet, out: Path, classes: list[str], rank: int = 0,
         world: int = 1, resume: bool = False) -> Engine:
    """Train one model (as finetune.mode says) with model selection on ``val_set``; the best
    checkpoint is ``out/backbone.pt``."""
    ft = cfg.finetune
    engine = _engine(cfg, train_set, out, classes, rank, world)
    mean, std = engine.model.backbone.data_config["mean"], engine.model.backbone.data_config["std"]

    def score(model: nn.Module):
        return predict_slices(model, val_set, engine.device, ft.tta), val_set.labels

    def batches(epoch: int):  # this rank's shard of one permutation, the same on every rank
        gen = torch.Generator().manual_seed(ft.seed * 1000 + epoch)
        order = torch.randperm(len(train_set), generator=gen)[rank::world]
        for i in range(0, len(order), ft.batch_size):
            idx = order[i : i + ft.batch_size]
            x = P.to_three_channels(P.dequantize(augment_images(train_set.images[idx], ft, gen)))
            yield D.channels_last(P.normalize(augment(x, ft, gen), mean, std), engine.device), train_set.labels[idx]

    if not (resume and engine.resume()) and ft.mode != "full":  # the probe is a candidate too: epoch 0
        engine.validate(-1, None, score)
    if ft.mode != "linear_probe":
        engine.run(batches, score)
    return engine


def _cv_calibration(cfg: Config) -> tuple[np.ndarray, np.ndarray] | None:
    """(log-probabilities, labels) to fit the temperature on, for finetune.calibration = cv; else None."""
    how = cfg.finetune.calibration
    if how not in CALIBRATIONS:
        raise MsnetError(f"unknown finetune.calibration {how!r}", fix=f"use one of {', '.join(CALIBRATIONS)}")
    if how == "select":
        return None
    path = cfg.run_path / "finetune" / "cv" / OOF_FILE
    if not path.is_file():
        log.info("finetune.calibration=cv: cross-validating first, for the out-of-fold predictions (%s)", path)
        cross_validate(cfg)
    with np.load(path) as f:
        return f["logits"], f["labels"]


def finetune(cfg: Config, test_dir: Path | None = None, overwrite: bool = False) -> dict:
    """Run stage 1; returns the slice-level validation metrics (and test metrics with `test_dir`)."""
    if on_ct_cohort(cfg):
        result = ct_eval.finetune_cohort(cfg, overwrite)
        if test_dir is not None:
            result["test"] = test(cfg, test_dir)
        return result
    rank, world = D.init_from_env()
    out = cfg.run_path / "finetune"
    done_file = out / "metrics.json"
    classes = list(cfg.data.classes)
    if done_file.exists() and not overwrite:
        log.info("fine-tuning already done: %s (use --overwrite to redo)", out)
        result = json.loads(done_file.read_text())
        if test_dir is not None:
            result["test"] = test(cfg, test_dir)
        return result
    fit_on = _cv_calibration(cfg)  # before training (runs --cv where calibration=cv finds no out-of-fold predictions)
    if D.is_main():
        save_run_info(cfg, out, "finetune")
    seed_everything(cfg.finetune.seed)
    data = build_slice_sets(cfg, train_windows(cfg))
    train_set, val_set = data["train"], data["val"]
    log.info("fine-tuning (%s) on %d slices, validating on %d (classes %s)", cfg.finetune.mode, len(train_set),
             len(val_set), classes)
    tr = _fit(cfg, train_set, val_set, out, classes, rank, world, resume=not overwrite)
    D.barrier()
    probs, temperature, model = calibrate(out / "backbone.pt", val_set, tr.device, cfg.finetune.tta, fit_on)
    metrics = slice_metrics(val_set, probs, classes)  # of the model before any refit: its selection images are unseen
    metrics.update(best_epoch=tr.result.best["epoch"], n_train=len(train_set), n_val=len(val_set), temperature=temperature,
                   table1=table1(val_set.labels.numpy(), probs.argmax(1), classes))
    if cfg.finetune.probe_refit:
        refit_probe(model, out / "backbone.pt", [train_set, val_set], cfg.finetune, tr.device)
        metrics["probe_refit_on"] = len(train_set) + len(val_set)
    if D.is_main():
        atomic_write_text(done_file, json.dumps(metrics, indent=2))
        (out / "state.pt").unlink(missing_ok=True)
    if test_dir is not None:
        metrics["test"] = test(cfg, test_dir)
    return metrics


def on_ct_cohort(cfg: Config) -> bool:
    """Stage 1 probes a frozen backbone on a CT cohort with slice labels (:mod:`msnet.stages.ct_eval`)."""
    return not cfg.data.slice_manifest and bool(cfg.data.cohort) and cfg.finetune.mode == "linear_probe"


def cross_validate(cfg: Config, overwrite: bool = False) -> dict:
    """Source-grouped, stratified k-fold CV of the recipe on the manifest's `train` images
    (k = finetune.folds, at least 2): each fold is trained on the others, with model selection on a
    grouped part of them, and scored once. Writes ``finetune/cv/cv_metrics.json`` (per fold, mean, sd).
    On a CT cohort with a linear probe: leave-one-patient-out (:func:`msnet.stages.ct_eval.cross_validate_cohort`)."""
    if on_ct_cohort(cfg):
        return ct_eval.cross_validate_cohort(cfg, overwrite)
    if not cfg.data.slice_manifest:
        raise MsnetError("--cv needs a slice manifest (data.slice_manifest)", fix="run `msnet index` on the images")
    ft, classes = cfg.finetune, list(cfg.data.classes)
    out = cfg.run_path / "finetune" / "cv"
    done = out / "cv_metrics.json"
    if done.exists() and not overwrite:
        return json.loads(done.read_text())
    save_run_info(cfg, out, "finetune-cv")
    rows = [r for r in read_slice_manifest(cfg.resolve(cfg.data.slice_manifest), only_ok=True)
            if r.get("subset", "train") == "train"]
    k = ft.folds if ft.folds > 1 else 5
    folds = manifest_folds(rows, k, ft.seed)
    per_fold, oof_logits, oof_labels = [], [], []
    for i, held in enumerate(folds):
        seed_everything(ft.seed + i)
        rest = [r for j, f in enumerate(folds) if j != i for r in f]
        inner = manifest_folds(rest, k, ft.seed + 1 + i)
        fit_rows, sel_rows = [r for f in inner[1:] for r in f], inner[0]
        fold_out = out / f"fold{i}"
        fold_out.mkdir(parents=True, exist_ok=True)
        data = {n: image_slices(r, classes, n, cfg.preprocess, cfg.data.reencode_jpeg)
                for n, r in (("train", fit_rows), ("select", sel_rows), ("test", held))}
        tr = _fit(cfg, data["train"], data["select"], fold_out, classes)
        _, temperature, model = calibrate(fold_out / "backbone.pt", data["select"], tr.device, ft.tta)
        if ft.probe_refit:
            model = refit_probe(model, fold_out / "backbone.pt", [data["train"], data["select"]], ft, tr.device)
        logits = log_probs(predict_slices(model, data["test"], tr.device, ft.tta))
        probs = softmax(logits / temperature)
        y = data["test"].labels.numpy()
        oof_logits.append(logits)
        oof_labels.append(y)
        m = classification_metrics(y, probs.argmax(1), probs, classes)
        m = {key: m[key] for key in ("accuracy", "f1", "auc", "ece", "brier") if key in m}
        m.update(n=len(y), best_epoch=tr.result.best["epoch"], temperature=temperature,
                 by_format=by_format(data["test"], probs, classes),
                 shortcut=shortcut_flips(model, held, probs, classes, tr.device, cfg.preprocess,
                                         cfg.data.reencode_jpeg, ft.tta))
        log.info("fold %d/%d: %s", i + 1, k, {key: m[key] for key in ("accuracy", "f1", "auc") if key in m})
        per_fold.append(m)
    summary = {key: {"mean": float(np.mean([f[key] for f in per_fold])), "sd": float(np.std([f[key] for f in per_fold]))}
               for key in ("accuracy", "f1", "auc", "ece", "brier") if all(key in f for f in per_fold)}
    summary["shortcut"] = {probe: float(np.mean([f["shortcut"][probe]["flip_rate"] for f in per_fold]))
                           for probe in SHORTCUT_PROBES}
    logits, labels = np.concatenate(oof_logits), np.concatenate(oof_labels)
    with atomic_path(out / OOF_FILE, suffix=".npz") as tmp:
        np.savez(tmp, logits=logits, labels=labels)
    result = {"folds": per_fold, **summary, "k": k, "mode": ft.mode, "tta": bool(ft.tta),
              "oof_temperature": fit_temperature(logits, labels)}
    atomic_write_text(done, json.dumps(result, indent=2))
    return result


def test(cfg: Config, test_dir: Path) -> dict:
    """Evaluate the best stage-1 checkpoint on a held-out folder of the same layout.

    A cohort folder (cohort.csv + slice_labels.csv) whose labels are not the model's classes
    (UCSD COVID/NON-COVID model, COVID-CT-MD cohort), or any cohort of a probe trained on a CT cohort, is
    scored by infection score per slice instead: :func:`msnet.stages.ct_eval.score_test_cohort` (keys
    ``infection_auc_vs_normal``, ``infection_auc_within_patients``, the same on the slices that show lung
    beside the lung-area baseline; every slice's score in ``slice_scores.csv``).

    Each test set's results go to their own folder, ``finetune/test/<folder name>/`` (``metrics.json``,
    ``reliability.png``, or ``slice_scores.csv`` and its plot ``slice_scores.png``; :func:`results_folder`), so
    testing on another set keeps them.
    """
    device = pick_device(cfg.device)
    stage = cfg.run_path / "finetune"
    model = load_slice_classifier(stage / "backbone.pt", device)
    classes = list(model.classes)
    test_dir = Path(test_dir).resolve()
    if (test_dir / "cohort.csv").exists():
        rows = read_cohort(test_dir / "cohort.csv", only_ok=True)
        labels_file = test_dir / "slice_labels.csv"
        slice_labels = read_slice_labels(labels_file) if labels_file.exists() else {}
        if {r["label"] for r in rows} - set(classes) or on_ct_cohort(cfg):
            metrics = ct_eval.score_test_cohort(cfg, model, test_dir, rows, slice_labels)
            slice_rows = metrics.pop("slice_rows")
            out = results_folder(cfg, test_dir)
            metrics["results_dir"] = str(out)
            write_csv_atomic(out / "slice_scores.csv", SLICE_FIELDS + ["lung_area_mm2"], slice_rows)
            plot_slice_scores(slice_rows, out / "slice_scores.png",
                              f"infection score per slice, 1 - p({metrics['normal_class']})")
            atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
            return metrics
        image_rows = None
        data = cohort_slices(rows, slice_labels, classes, "test", ft=cfg.finetune, pre=cfg.preprocess,
                             windows=train_windows(cfg), normal_class=cfg.data.normal_class)
    else:
        image_rows = image_folder_rows(test_dir)
        data = image_slices(image_rows, classes, "test", cfg.preprocess, cfg.data.reencode_jpeg)
    models = [model] + (_fold_models(stage, device) if cfg.finetune.ensemble else [])
    per_model = [calibrated_probs(m, data, device, cfg.finetune.tta) for m in models]
    probs = np.mean(per_model, axis=0)
    metrics = slice_metrics(data, probs, classes)
    metrics["n"] = len(data)
    metrics["temperature"] = model.temperature
    metrics["models"] = len(models)
    metrics["tta"] = bool(cfg.finetune.tta)
    if len(models) > 1:  # each model alone, for the ensemble's gain
        metrics["single_model_accuracy"] = [float((p.argmax(1) == data.labels.numpy()).mean()) for p in per_model]
    metrics["test_dir"] = str(test_dir)
    if data.formats:  # the file-format shortcut check: accuracy per encoded format and class
        metrics["by_format"] = by_format(data, probs, classes)
    if image_rows is not None:
        metrics["shortcut"] = shortcut_flips(model, image_rows, per_model[0], classes, device, cfg.preprocess,
                                            cfg.data.reencode_jpeg, cfg.finetune.tta)
    out = results_folder(cfg, test_dir)
    metrics["results_dir"] = str(out)
    reliability_plot(data.labels.numpy(), probs, out / "reliability.png")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _fold_models(out: Path, device) -> list:
    """The `--cv` fold models (finetune/cv/fold*/backbone.pt), for finetune.ensemble."""
    paths = sorted((out / "cv").glob("fold*/backbone.pt"))
    if not paths:
        raise MsnetError("finetune.ensemble needs the cross-validation fold models", path=out / "cv",
                         fix="run `msnet finetune CONFIG --cv` first (or set finetune.ensemble=false)")
    return [load_slice_classifier(p, device) for p in paths]
