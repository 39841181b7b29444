"""Stage 3: train MS-Net (or any baseline aggregator) on cached slice features.

Padded batches with a mask, partial-scan augmentation (random contiguous crops
of the slice sequence), class weights, best-validation checkpoint, and
patient-level stratified k-fold cross-validation with the splits saved once.
Outputs per aggregator in ``RUN/train/<name>/``: ``model.pt`` (or
``model_fold<k>.pt``), ``history.csv``, ``predictions.csv``, ``info.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from msnet.config import Config, save_run_info
from msnet.data.splits import carve, class_weights, stratified_folds
from msnet.errors import MsnetError
from msnet.files import atomic_write_text, read_csv_rows, write_csv_atomic
from msnet.inference.bundle import save_aggregator
from msnet.metrics import fit_temperature
from msnet.models.aggregators import create, pad_batch, sequence_logits  # noqa: F401 (pad_batch: public here too)
from msnet.preprocess import PreprocessSpec
from msnet.stages.engine import Engine, best_state
from msnet.stages.extract import feature_dir

log = logging.getLogger(__name__)


def random_crop(seq: torch.Tensor, min_fraction: float, gen: torch.Generator) -> torch.Tensor:
    """A random contiguous run of at least ``min_fraction`` of the slices (a partial scan)."""
    n = seq.shape[0]
    lo = max(1, int(np.ceil(n * min_fraction)))
    length = int(torch.randint(lo, n + 1, (), generator=gen))
    start = int(torch.randint(0, n - length + 1, (), generator=gen))
    return seq[start : start + length]


def make_splits(rows: list[dict], cfg: Config) -> list[dict[str, list[str]]]:
    """Train/val/test patient lists: one from the cohort's subsets, or one per CV fold."""
    t = cfg.train
    labels = {r["patient_id"]: r["label"] for r in rows}
    if t.folds and t.folds > 1:
        pids = sorted(labels)
        folds = stratified_folds(pids, [labels[p] for p in pids], t.folds, t.seed)
        splits = []
        for k in range(t.folds):
            rest = [p for j, f in enumerate(folds) if j != k for p in f]
            train, val = carve(rest, labels, t.val_fraction, t.seed + k)
            splits.append({"train": sorted(train), "val": sorted(val), "test": sorted(folds[k])})
        return splits
    subset = {r["patient_id"]: r.get("subset", "") for r in rows}
    test = sorted(p for p in labels if subset[p] == "test" or (subset[p] not in ("", "train", "val")))
    if not test:
        raise MsnetError(
            "the cohort has no test patients (subset column)",
            path=cfg.data.cohort,
            fix="add a subset column with train/val/test, or pass --folds K for cross-validation",
        )
    train = sorted(p for p in labels if subset[p] == "train" or subset[p] == "")
    val = sorted(p for p in labels if subset[p] == "val")
    if not val:
        train, val = carve(train, labels, t.val_fraction, t.seed)
    return [{"train": sorted(train), "val": sorted(val), "test": test}]


def load_features(fdir: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    manifest = fdir / "manifest.csv"
    if not manifest.is_file():
        raise MsnetError("no feature manifest", path=manifest, fix="run `msnet extract CONFIG` first")
    rows = [r for r in read_csv_rows(manifest) if r["status"] == "ok"]
    if not rows:
        raise MsnetError("no study has features", path=manifest, fix="check the failures in manifest.csv")
    feats = {r["patient_id"]: torch.from_numpy(np.load(fdir / r["file"])) for r in rows}
    return rows, feats


@torch.inference_mode()
def predict_proba(model: nn.Module, seqs: list[torch.Tensor], batch_size: int = 16,
                  temperature: float = 1.0) -> np.ndarray:
    """Class probabilities softmax(logits / temperature) of each feature sequence."""
    model.eval()
    out = []
    for i in range(0, len(seqs), batch_size):
        out.append(torch.softmax(sequence_logits(model, seqs[i : i + batch_size]).float() / temperature, dim=1))
    return torch.cat(out).numpy()


def fit_temperature_on(model: nn.Module, val_x: list[torch.Tensor], val_y: torch.Tensor) -> float:
    """Temperature scaling on the validation patients (Guo et al. 2017). A validation set the model gets
    entirely right says nothing about under-confidence, so then the temperature is not below 1."""

    if len(val_x) < 2:
        return 1.0
    logits = np.log(np.clip(predict_proba(model, val_x), 1e-12, None))
    temperature = fit_temperature(logits, val_y.numpy())
    if (logits.argmax(1) == val_y.numpy()).all():
        temperature = max(temperature, 1.0)
    return temperature


def fit(
    model: nn.Module,
    train_x: list[torch.Tensor],
    train_y: torch.Tensor,
    val_x: list[torch.Tensor],
    val_y: torch.Tensor,
    cfg: Config,
    n_classes: int,
    seed: int,
    progress=None,
) -> tuple[dict, list[dict]]:
    """Train one aggregator (:class:`msnet.stages.engine.Engine`); returns the selection (accuracy, loss,
    epoch and the selected epoch's ``state`` dict) and the history."""
    t = cfg.train
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    w = class_weights(train_y, n_classes) if t.class_weights else None

    def batches(epoch: int):
        order = torch.randperm(len(train_x), generator=gen).tolist()
        for i in range(0, len(order), t.batch_size):
            idx = order[i : i + t.batch_size]
            seqs = [
                random_crop(train_x[j], t.crop_min_fraction, gen)
                if t.crop_prob and float(torch.rand((), generator=gen)) < t.crop_prob
                else train_x[j]
                for j in idx
            ]
            yield seqs, train_y[idx]

    kept: dict = {}
    engine = Engine(model, opt, nn.CrossEntropyLoss(weight=w), epochs=t.epochs, forward=sequence_logits,
                    on_best=lambda m, row: kept.update(state=best_state(m)), log_epochs=False, progress=progress,
                    name="epochs")
    result = engine.run(batches, lambda m: (predict_proba(m, val_x), val_y))
    return {**result.best, **kept}, result.history


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    write_csv_atomic(path, fields, rows)


def _train_fold(name: str, k: int, split: dict, feats: dict, y_of: dict, by_id: dict, meta: dict, fdir: Path,
                adir: Path, cfg: Config, classes: list[str], n_splits: int, progress) -> tuple:
    """Train one aggregator on one split, calibrate it on the split's validation patients, save it, and
    return its (calibrated) predictions for every patient of the split, its history, its size and (for
    int8 features) its decisions on the int8 reference studies."""

    seed = cfg.train.seed * 100 + k
    torch.manual_seed(seed)
    model = create(name, int(meta["n_features"]), n_classes=len(classes))
    tx, vx = [feats[p] for p in split["train"]], [feats[p] for p in split["val"]]
    ty, vy = torch.tensor([y_of[p] for p in split["train"]]), torch.tensor([y_of[p] for p in split["val"]])
    best, hist = fit(model, tx, ty, vx, vy, cfg, len(classes), seed, progress)
    model.load_state_dict(best["state"])
    temperature = fit_temperature_on(model, vx, vy)
    save_aggregator(adir / ("model.pt" if n_splits == 1 else f"model_fold{k}.pt"), model, name, classes,
                    PreprocessSpec.from_dict(meta["preprocess"], str(fdir / "meta.json")),
                    extra={"feature_set": meta["set_id"], "backbone": meta["backbone"],
                           "feature_dtype": meta.get("feature_dtype", "float32"), "temperature": temperature,
                           "best_epoch": best["epoch"], "fold": k})
    int8 = _int8_decisions(model, temperature, feats, meta, fdir)
    preds = []
    for role in ("train", "val", "test"):
        pids = split[role]
        if not pids:
            continue
        for p, pr in zip(pids, predict_proba(model, [feats[p] for p in pids], temperature=temperature)):
            r = by_id[p]
            preds.append({"patient_id": p, "label": r["label"], "subset": r.get("subset", "") or role, "split": role,
                          "fold": k, "prediction": classes[int(pr.argmax())],
                          **{f"p_{c}": f"{v:.6f}" for c, v in zip(classes, pr)}})
    return preds, [{"fold": k, **h} for h in hist], sum(p.numel() for p in model.parameters()), int8


def _record_int8(fdir: Path, name: str, int8: dict) -> None:
    """Int8 decisions recorded in the feature cache's meta.json; different decisions stop the run."""
    meta_path = fdir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.setdefault("int8_agreement", {}).setdefault("decisions", {})[name] = int8
    atomic_write_text(meta_path, json.dumps(meta, indent=2))
    if int8["identical"] < int8["studies"]:
        raise MsnetError(f"{name}: on {int8['studies'] - int8['identical']} of {int8['studies']} held-out studies the "
                         "decision from int8 features differs from the decision from fp32 features", meta_path,
                         "extract fp32 features (--set extract.int8=false) and train again")


def _int8_decisions(model: nn.Module, temperature: float, feats: dict, meta: dict, fdir: Path) -> dict | None:
    """For int8 features: the trained aggregator's decisions on the held-out reference studies, from their
    int8 features (the cached ones) and from their fp32 features (kept by ``msnet extract``)."""
    ref = (meta.get("int8_agreement") or {}).get("reference") or {}
    pids = [p for p in ref.get("patients", []) if p in feats and (fdir / ref["folder"] / f"{p}.npy").is_file()]
    if not pids:
        return None
    fp32 = [torch.from_numpy(np.load(fdir / ref["folder"] / f"{p}.npy")) for p in pids]
    a = predict_proba(model, fp32, temperature=temperature).argmax(1)
    b = predict_proba(model, [feats[p] for p in pids], temperature=temperature).argmax(1)
    return {"studies": len(pids), "identical": int((a == b).sum())}


def train(cfg: Config, overwrite: bool = False) -> dict:
    """Run stage 3 for every aggregator of the config; returns {aggregator: test accuracy}."""
    from rich.progress import Progress

    fdir = feature_dir(cfg)
    rows, feats = load_features(fdir)
    meta = json.loads((fdir / "meta.json").read_text())
    classes = list(cfg.data.classes)
    rows = [r for r in rows if r["label"] in classes]
    out = cfg.run_path / "train"
    out.mkdir(parents=True, exist_ok=True)
    save_run_info(cfg, out, "train")

    splits_file = out / "splits.json"
    key = {"folds": cfg.train.folds, "seed": cfg.train.seed, "patients": sorted(r["patient_id"] for r in rows)}
    saved = json.loads(splits_file.read_text()) if splits_file.exists() else None
    if saved and not overwrite and {k: saved.get(k) for k in key} == key:
        splits = saved["splits"]
    else:
        splits = make_splits(rows, cfg)
        atomic_write_text(splits_file, json.dumps({**key, "splits": splits}, indent=2))

    by_id = {r["patient_id"]: r for r in rows}
    y_of = {p: classes.index(r["label"]) for p, r in by_id.items()}
    results = {}
    with Progress(transient=True) as progress:
        for name in cfg.train.aggregators:
            adir = out / name
            if (adir / "info.json").exists() and not overwrite:
                info = json.loads((adir / "info.json").read_text())
                if info.get("features") == meta["set_id"]:
                    results[name] = info.get("test_accuracy")
                    log.info("%s: already trained (use --overwrite to retrain)", name)
                    continue
                log.info("%s: trained on other features (%s, now %s): training again", name, info.get("features"),
                         meta["set_id"])
            adir.mkdir(parents=True, exist_ok=True)
            preds, history = [], []
            task = progress.add_task(f"training {name}", total=len(splits))
            n_params, int8 = 0, {"studies": 0, "identical": 0}
            for k, split in enumerate(splits):
                fold_preds, hist, n_params, fold_int8 = _train_fold(name, k, split, feats, y_of, by_id, meta, fdir,
                                                                    adir, cfg, classes, len(splits), progress)
                preds += fold_preds
                history += hist
                for key in int8:
                    int8[key] += (fold_int8 or {}).get(key, 0)
                progress.advance(task)
            progress.remove_task(task)
            _write_csv(adir / "history.csv", history, ["fold", "epoch", "train_loss", "val_loss", "val_accuracy"])
            fields = ["patient_id", "label", "subset", "split", "fold", "prediction"] + [f"p_{c}" for c in classes]
            _write_csv(adir / "predictions.csv", preds, fields)
            test_rows = [p for p in preds if p["split"] == "test"]
            acc = float(np.mean([p["prediction"] == p["label"] for p in test_rows])) if test_rows else None
            info = {
                "aggregator": name,
                "backbone": meta["backbone"],
                "features": meta["set_id"],
                "n_parameters": n_params,
                "folds": len(splits),
                "classes": classes,
                "test_accuracy": acc,
            }
            if int8["studies"]:
                info["int8_decisions"] = int8
            atomic_write_text(adir / "info.json", json.dumps(info, indent=2))
            if int8["studies"]:
                _record_int8(fdir, name, int8)
            log.info("%s: test accuracy %s", name, "n/a" if acc is None else f"{acc:.4f}")
            results[name] = acc
    return results
