"""Stage 1 on CT cohorts with slice labels: the linear probe, leave-one-patient-out evaluation, and tests.

Real CT studies (``data.cohort`` + ``data.slice_labels`` of ``msnet index``) with a frozen backbone
(``finetune.mode: linear_probe``). Every slice of every study is encoded once, through the same
:class:`~msnet.inference.encoder.SliceEncoder` that extraction and serving use (2-D or slab backbones
alike), and cached per study; the probe is a logistic regression on those features
(:func:`msnet.stages.probe.fit_probe`).

Slice targets (:func:`slice_targets`): every slice of a NORMAL patient is the normal class; a slice
labelled infected carries its patient's class; with ``finetune.clean_slices_normal`` a slice of an
infected patient that carries no infection label is the normal class too (the head then learns what
an infected slice looks like, not which patient it comes from); other slices are not trained on.

What is measured (:func:`infection_report`), always on predictions of a model that never saw the
patient: the **infection score** 1 - p(normal) of every slice, its AUC for labelled infected slices
against every slice of the normal patients (``vs_normal``) and against the same patients' unlabelled
slices (``within_patients``, per class too), the same on the **slices that show lung** (lung area at
least ``LUNG_SLICE_FRACTION`` of the patient's largest), the **lung-area baseline** beside each (the
AUC of the slice's lung area alone, taken in whichever direction scores higher: no model that only
counts lung pixels can beat it by chance), and each patient's mean score.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from msnet.config import Config, save_run_info
from msnet.data.cohorts import read_cohort, read_slice_labels
from msnet.data.splits import stratified_folds
from msnet.device import pick_device
from msnet.errors import MsnetError
from msnet.files import atomic_path, atomic_write_text, file_hash, write_csv_atomic
from msnet.inference.bundle import save_backbone
from msnet.inference.encoder import SliceEncoder
from msnet.io import read_study
from msnet.metrics import auc_score
from msnet.models.backbones import create
from msnet.plots import plot_slice_scores
from msnet.preprocess import PreprocessSpec, lung_stats, model_slices
from msnet.stages.probe import fit_probe, softmax
from msnet.stages.transfer import (
    SLICE_FIELDS,
    infection_metrics,
    is_normal_patient,
    normal_class,
)

log = logging.getLogger(__name__)

LUNG_SLICE_FRACTION = 0.1
"""A slice 'shows lung' when its lung area is at least this fraction of the patient's largest."""
OOF_FILE = "oof.npz"


@dataclass
class StudySlices:
    """Every slice of one study: features (l, d), lung area per slice (mm^2), slice labels (or None)."""

    patient_id: str
    label: str
    feats: np.ndarray
    lung_area_mm2: np.ndarray
    slice_labels: np.ndarray | None

    @property
    def lung(self) -> np.ndarray:
        """Slices that show lung (:data:`LUNG_SLICE_FRACTION`)."""
        peak = float(self.lung_area_mm2.max()) if self.lung_area_mm2.size else 0.0
        return self.lung_area_mm2 >= LUNG_SLICE_FRACTION * peak if peak > 0 else np.zeros(self.feats.shape[0], bool)


def frozen_backbone(cfg: Config):
    """(backbone, spec, cache key) of the configured pretrained backbone, frozen, with its preprocessing."""

    b = cfg.backbone
    weights = cfg.resolve(b.weights) if b.weights else None
    backbone = create(b.name, pretrained=b.pretrained, weights=weights, **b.pooling()).eval()
    spec = PreprocessSpec.from_config(cfg.preprocess, backbone.data_config, "hu")
    key = json.dumps({"backbone": b.name, "pretrained": b.pretrained, "weights": file_hash(weights) if weights else "",
                      **b.pooling(), "spec": spec.to_dict()}, sort_keys=True)
    return backbone, spec, hashlib.blake2b(key.encode(), digest_size=6).hexdigest()


def study_slices(cfg: Config, rows: Sequence[dict], slice_labels: dict, encoder, cache: Path | None,
                 desc: str = "encoding studies") -> list[StudySlices]:
    """Features and lung areas of every slice of every study in ``rows``, cached per study in ``cache``
    (a folder named by the backbone and preprocessing, so a change of either recomputes)."""
    from rich.progress import track

    out = []
    for r in track(list(rows), description=desc, transient=True):
        pid, label = str(r["patient_id"]), str(r["label"])
        file = cache / f"{pid}.npz" if cache is not None else None
        if file is not None and file.is_file():
            with np.load(file) as f:
                feats, area = f["feats"], f["lung_area_mm2"]
        else:
            vol = read_study(r["path"], study_id=pid)
            lungs = lung_stats(vol.hu, vol.spacing_mm, vol.z_mm)
            feats = encoder.encode(model_slices(vol, encoder.spec, lungs), vol.kind).numpy().astype(np.float32)
            area = np.asarray(lungs.slice_area_mm2, np.float32)
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(file, suffix=".npz") as tmp:
                    np.savez(tmp, feats=feats, lung_area_mm2=area)
        labels = slice_labels.get(pid)
        if labels is not None and len(labels) != feats.shape[0]:
            raise MsnetError(f"patient {pid}: {len(labels)} slice labels for {feats.shape[0]} slices", path=r["path"],
                             fix="list every slice of the study once in slice_labels.csv (0 = most superior)")
        out.append(StudySlices(pid, label, feats, area, None if labels is None else np.asarray(labels)))
    return out


def slice_targets(study: StudySlices, classes: Sequence[str], normal: str, clean_as_normal: bool) -> np.ndarray:
    """The class index each slice is trained on, -1 where it is not trained on (see the module's text).

    >>> s = StudySlices("p", "CAP", np.zeros((4, 1)), np.ones(4), np.array([0, 1, 1, 0]))
    >>> slice_targets(s, ["COVID-19", "CAP", "NORMAL"], "NORMAL", True).tolist()
    [2, 1, 1, 2]
    >>> slice_targets(s, ["COVID-19", "CAP", "NORMAL"], "NORMAL", False).tolist()
    [-1, 1, 1, -1]
    """
    n = study.feats.shape[0]
    k_normal = list(classes).index(normal)
    if is_normal_patient(study.label) or study.label == normal:
        return np.full(n, k_normal)
    if study.label not in classes or study.slice_labels is None:
        return np.full(n, -1)
    infected = np.asarray(study.slice_labels[:n]) > 0
    return np.where(infected, list(classes).index(study.label), k_normal if clean_as_normal else -1)


def fit_head(x: np.ndarray, y: np.ndarray, cfg: Config, classes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear probe on training slices ``x`` (n, d) with targets ``y`` (:func:`training_slices`)."""
    return fit_probe(torch.from_numpy(x), torch.from_numpy(y), len(classes), cfg.finetune.probe_c,
                     cfg.finetune.probe_scale, cfg.finetune.class_weights)


def training_slices(studies: Sequence[StudySlices], cfg: Config, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for s in studies:
        t = slice_targets(s, classes, cfg.data.normal_class, cfg.finetune.clean_slices_normal)
        xs.append(s.feats[t >= 0])
        ys.append(t[t >= 0])
    x, y = np.concatenate(xs), np.concatenate(ys).astype(np.int64)
    if len(set(y.tolist())) < 2:
        raise MsnetError(f"the training slices hold one class only ({sorted(set(y.tolist()))})",
                         fix="train on patients of at least two classes, with slice labels for the infected ones")
    return x, y


def logits_of(feats: np.ndarray, w: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return (torch.from_numpy(feats).double() @ w.double().T + b.double()).numpy()


def infection_temperature(logits: np.ndarray, targets: np.ndarray, k_normal: int) -> float:
    """The temperature that makes the infection probability 1 - p(normal) of ``logits`` best calibrated
    (binary log-loss against target != normal; a grid from 0.05 to 20). Fitted on the infection question,
    not on the classes: a left-out patient's class may be missing from its fold's training slices.

    >>> z = np.array([[4.0, -4.0], [-4.0, 4.0], [4.0, -4.0], [-4.0, 4.0]])
    >>> infection_temperature(z, np.array([0, 1, 1, 0]), 1) > 5   # right half the time: flatten
    True
    """
    infected = (np.asarray(targets) != k_normal).astype(float)
    best, best_t = np.inf, 1.0
    for t in np.exp(np.linspace(np.log(0.05), np.log(20.0), 121)):
        p = np.clip(1.0 - softmax(np.asarray(logits, float) / t)[:, k_normal], 1e-7, 1 - 1e-7)
        nll = -np.mean(infected * np.log(p) + (1 - infected) * np.log(1 - p))
        if nll < best:
            best, best_t = nll, float(t)
    return best_t


def either_way(auc: float | None) -> float | None:
    """A baseline's AUC taken in whichever direction scores higher (a cue may rise or fall with infection).

    >>> either_way(0.2), either_way(None)
    (0.8, None)
    """
    return None if auc is None else float(max(auc, 1.0 - auc))


def infection_report(patients: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Infection AUCs of per-patient slice scores (``patient_id``, ``label``, ``scores``, ``slice_labels``,
    ``lung`` (bool per slice), ``lung_area_mm2``): on all slices and on the slices that show lung, per
    class within patients, each beside the lung-area baseline; and each patient's mean score."""

    def restricted(ps, keep_lung: bool, key: str = "scores"):
        out = []
        for p in ps:
            keep = np.asarray(p["lung"]) if keep_lung else np.ones(len(p["scores"]), bool)
            labels = p.get("slice_labels")
            out.append({"label": p["label"], "scores": np.asarray(p[key], float)[keep],
                        "slice_labels": None if labels is None else np.asarray(labels)[keep]})
        return out

    report: dict[str, Any] = {}
    for name, keep_lung in (("all_slices", False), ("lung_slices", True)):
        m = infection_metrics(restricted(patients, keep_lung))
        base = infection_metrics(restricted(patients, keep_lung, "lung_area_mm2"))
        part = {"auc_vs_normal": m["infection_auc_vs_normal"], "auc_within_patients": m["infection_auc_within_patients"],
                **{k: v for k, v in m.items() if not k.startswith("infection_auc")}}
        for k, metric in (("vs_normal", "infection_auc_vs_normal"), ("within_patients", "infection_auc_within_patients")):
            part[f"lung_area_baseline_{k}"] = either_way(base[metric])
        per_class = {}
        normal = [p for p in patients if is_normal_patient(p["label"])]
        for label in sorted({p["label"] for p in patients if not is_normal_patient(p["label"])}):
            own = [p for p in patients if p["label"] == label] + normal
            mc, bc = infection_metrics(restricted(own, keep_lung)), infection_metrics(restricted(own, keep_lung, "lung_area_mm2"))
            per_class[label] = {"auc_within_patients": mc["infection_auc_within_patients"],
                                "lung_area_baseline": either_way(bc["infection_auc_within_patients"]),
                                "auc_vs_normal": mc["infection_auc_vs_normal"],
                                "lung_area_baseline_vs_normal": either_way(bc["infection_auc_vs_normal"])}
        part["per_class"] = per_class
        report[name] = part
    report["patients"] = {p["patient_id"]: {"label": p["label"], "mean_score": float(np.mean(p["scores"])),
                                            "mean_score_lung_slices": float(np.mean(np.asarray(p["scores"])[np.asarray(p["lung"])]))
                                            if np.any(p["lung"]) else None, "n_slices": int(len(p["scores"]))}
                          for p in patients}
    return report


def _patient(study: StudySlices, scores: np.ndarray) -> dict[str, Any]:
    return {"patient_id": study.patient_id, "label": study.label, "scores": scores, "slice_labels": study.slice_labels,
            "lung": study.lung, "lung_area_mm2": study.lung_area_mm2}


def slice_rows(patients: Sequence[dict[str, Any]]) -> list[dict]:
    """One row per slice (patient_id, label, slice_index, slice_label, infection_score, lung_area_mm2)."""
    rows = []
    for p in patients:
        labels = p.get("slice_labels")
        for i, s in enumerate(p["scores"]):
            rows.append({"patient_id": p["patient_id"], "label": p["label"], "slice_index": i,
                         "slice_label": "" if labels is None else int(labels[i]),
                         "infection_score": f"{float(s):.6f}", "lung_area_mm2": f"{float(p['lung_area_mm2'][i]):.1f}"})
    return rows


def _cohort(cfg: Config) -> tuple[list[dict], dict]:
    if not cfg.data.cohort:
        raise MsnetError("the config names no data.cohort", fix="run `msnet index ROOT -o OUT` and set data.cohort")
    rows = [r for r in read_cohort(cfg.resolve(cfg.data.cohort), only_ok=True) if r.get("subset", "") != "test"]
    labels = read_slice_labels(cfg.resolve(cfg.data.slice_labels)) if cfg.data.slice_labels else {}
    return rows, labels


def _encoder(cfg: Config):
    backbone, spec, key = frozen_backbone(cfg)
    return SliceEncoder(spec, backbone, device=pick_device(cfg.device), batch_size=cfg.extract.batch_size), key


def _check_mode(cfg: Config) -> None:
    if cfg.finetune.mode != "linear_probe":
        raise MsnetError(f"finetune.mode={cfg.finetune.mode!r} on a CT cohort: only linear_probe is built for CT "
                         "cohorts with slice labels", fix="set finetune.mode=linear_probe")


LOPO_MAX_PATIENTS = 20
"""Cohorts up to this many patients are cross-validated leave-one-patient-out; larger ones in
``finetune.folds`` (default 5) patient-grouped, class-stratified folds."""


def patient_folds(studies: Sequence[StudySlices], k: int, seed: int) -> list[list[int]]:
    """Indices of ``studies`` per fold: one patient each (up to :data:`LOPO_MAX_PATIENTS` patients), else
    ``k`` class-stratified folds of whole patients. A patient is never in two folds.

    >>> s = [StudySlices(str(i), "NORMAL", np.zeros((1, 1)), np.ones(1), None) for i in range(3)]
    >>> patient_folds(s, 5, 0)
    [[0], [1], [2]]
    """

    if len(studies) <= LOPO_MAX_PATIENTS:
        return [[i] for i in range(len(studies))]
    ids = [str(i) for i in range(len(studies))]
    folds = stratified_folds(ids, [s.label for s in studies], k, seed, groups=[s.patient_id for s in studies])
    return [sorted(int(i) for i in f) for f in folds if f]


def cross_validate_cohort(cfg: Config, overwrite: bool = False) -> dict:
    """Patient-grouped CV of the probe on the cohort (:func:`patient_folds`: leave-one-patient-out on small
    cohorts; never a patient in two folds): every patient scored by a probe fitted on the others. Writes
    ``finetune/cv/``: ``cv_metrics.json`` (:func:`infection_report`), ``slice_scores.csv`` and its plot
    ``slice_scores.png``, ``oof.npz``."""

    _check_mode(cfg)
    out = cfg.run_path / "finetune" / "cv"
    done = out / "cv_metrics.json"
    if done.exists() and not overwrite:
        return json.loads(done.read_text())
    save_run_info(cfg, out, "finetune-cv")
    classes = list(cfg.data.classes)
    rows, labels = _cohort(cfg)
    if len(rows) < 2:
        raise MsnetError(f"{len(rows)} patient(s): leave-one-patient-out needs at least 2", fix="index more studies")
    encoder, key = _encoder(cfg)
    studies = study_slices(cfg, rows, labels, encoder, cfg.run_path / "finetune" / "features" / key)
    k_normal = classes.index(cfg.data.normal_class)
    patients, oof_logits, oof_labels, skipped = [], [], [], []
    folds = patient_folds(studies, cfg.finetune.folds if cfg.finetune.folds > 1 else 5, cfg.finetune.seed)
    for fold in folds:
        rest = [s for j, s in enumerate(studies) if j not in fold]
        try:
            w, b = fit_head(*training_slices(rest, cfg, classes), cfg, classes)
        except MsnetError as exc:
            log.warning("fold of patients %s skipped: %s", [studies[i].patient_id for i in fold], exc)
            skipped += [studies[i].patient_id for i in fold]
            continue
        for i in fold:
            held = studies[i]
            logits = logits_of(held.feats, w, b)
            scores = 1.0 - softmax(logits)[:, k_normal]
            patients.append(_patient(held, scores))
            t = slice_targets(held, classes, cfg.data.normal_class, cfg.finetune.clean_slices_normal)
            oof_logits.append(logits[t >= 0])
            oof_labels.append(t[t >= 0])
            log.info("left out %s (%s): mean infection score %.3f", held.patient_id, held.label, float(scores.mean()))
    if not patients:
        raise MsnetError("no fold could be fitted", fix="index patients of at least two classes with slice labels")
    result = infection_report(patients)
    logits, y = np.concatenate(oof_logits), np.concatenate(oof_labels)
    lopo = len(folds) == len(studies)
    result.update(protocol="leave-one-patient-out" if lopo else "patient-grouped k-fold", k=len(folds), skipped_folds=skipped, mode="linear_probe",
                  backbone=cfg.backbone.name, feature_cache=key, n_features=int(studies[0].feats.shape[1]),
                  lung_slice_fraction=LUNG_SLICE_FRACTION, clean_slices_normal=bool(cfg.finetune.clean_slices_normal),
                  oof_temperature=infection_temperature(logits, y, k_normal))
    rows_out = slice_rows(patients)
    write_csv_atomic(out / "slice_scores.csv", SLICE_FIELDS + ["lung_area_mm2"], rows_out)
    plot_slice_scores(rows_out, out / "slice_scores.png", f"out-of-fold infection score ({cfg.backbone.name})")
    with atomic_path(out / OOF_FILE, suffix=".npz") as tmp:
        np.savez(tmp, logits=logits, labels=y)
    atomic_write_text(done, json.dumps(result, indent=2))
    return result


def finetune_cohort(cfg: Config, overwrite: bool = False) -> dict:
    """Stage 1 on a CT cohort: the probe fitted on every (non-test) patient's trained slices, its
    temperature from the leave-one-patient-out predictions (``finetune.calibration: cv``, run first where
    missing) or 1; saved as ``finetune/backbone.pt`` with the backbone's provenance."""

    _check_mode(cfg)
    out = cfg.run_path / "finetune"
    done = out / "metrics.json"
    if done.exists() and not overwrite:
        return json.loads(done.read_text())
    temperature, cv = 1.0, None
    if cfg.finetune.calibration == "cv":
        cv = cross_validate_cohort(cfg)
        temperature = float(cv["oof_temperature"])
    save_run_info(cfg, out, "finetune")
    classes = list(cfg.data.classes)
    rows, labels = _cohort(cfg)
    encoder, key = _encoder(cfg)
    studies = study_slices(cfg, rows, labels, encoder, out / "features" / key)
    x, y = training_slices(studies, cfg, classes)
    w, b = fit_head(x, y, cfg, classes)
    head = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    backbone = encoder.backbone
    save_backbone(out / "backbone.pt", backbone, encoder.spec, classes, head=head,
                  extra={"temperature": temperature, "epoch": 0, "trained_on": "ct_cohort",
                         "n_train_slices": int(len(y))})
    metrics = {"mode": "linear_probe", "n_train": int(len(y)), "n_patients": len(studies), "temperature": temperature,
               "train_class_counts": {c: int((y == k).sum()) for k, c in enumerate(classes)},
               "backbone": cfg.backbone.name, "best_epoch": 0}
    if cv is not None:
        metrics["cv"] = cv
    atomic_write_text(done, json.dumps(metrics, indent=2))
    return metrics


def score_test_cohort(cfg: Config, model, test_dir: Path, rows: Sequence[dict], slice_labels: dict) -> dict:
    """Score every slice of a held-out CT cohort with a stage-1 model (its backbone, spec, head and
    temperature): :func:`infection_report` of its infection scores."""

    classes = list(model.classes)
    k_normal = classes.index(normal_class(classes, cfg.data.normal_class))
    encoder = SliceEncoder(model.spec, model.backbone, device=pick_device(cfg.device), batch_size=cfg.extract.batch_size)
    studies = study_slices(cfg, rows, slice_labels, encoder, None, "scoring test studies")
    w, b = model.fc.weight.detach().cpu(), model.fc.bias.detach().cpu()
    patients = [_patient(s, 1.0 - softmax(logits_of(s.feats, w, b) / model.temperature)[:, k_normal]) for s in studies]
    result = infection_report(patients)
    every = result["all_slices"]  # its figures at the top level too: the keys of every --test cohort result
    result.update({k: v for k, v in every.items() if k not in ("per_class", "auc_vs_normal", "auc_within_patients")
                   and not k.startswith("lung_area")},
                  infection_auc_vs_normal=every["auc_vs_normal"], infection_auc_within_patients=every["auc_within_patients"],
                  cohort_classes=sorted({str(r["label"]) for r in rows}))
    result.update(test_dir=str(test_dir), n=int(sum(len(p["scores"]) for p in patients)), normal_class=classes[k_normal],
                  classes=classes, slice_rows=slice_rows(patients))
    return result
