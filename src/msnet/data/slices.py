"""Stage 1's slices in memory: which slices of a CT cohort or a slice-image manifest are trained on,
read once into uint8 arrays with their labels, source groups and file formats.

The paper's rule: infected slices of COVID-19 and CAP patients carry the patient's class, slices
sampled from normal patients are NORMAL (:func:`select_slices`); or a slice-image manifest (UCSD
layout, :func:`image_slices`). Model selection sets never share a patient or a source group with the
training set (:func:`split_patients`, :func:`manifest_folds`).
"""

from __future__ import annotations

import io as _io
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from msnet import preprocess as P
from msnet.config import Config, FinetuneConfig, PreprocessConfig
from msnet.data.cohorts import image_format, map_class, read_cohort, read_slice_labels, read_slice_manifest
from msnet.data.splits import carve, stratified_folds
from msnet.device import is_main
from msnet.errors import MsnetError
from msnet.io import read_study

log = logging.getLogger(__name__)


@dataclass
class SliceSet:
    """Slices in memory as uint8 [0, 255] of shape (n, c, S, S), c = 1 or 3."""

    images: torch.Tensor
    labels: torch.Tensor
    groups: list[str] = field(default_factory=list)
    """patient id (or image path) of each slice"""
    formats: list[str] = field(default_factory=list)
    """encoded format of each slice image (PNG, JPEG, ...; DICOM for CT studies)"""

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _evenly(indices: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or len(indices) <= k:
        return indices
    pos = np.linspace(0, len(indices) - 1, k).round().astype(int)
    return indices[pos]


def select_slices(label: str, slice_labels: np.ndarray | None, n_slices: int, ft: FinetuneConfig,
                  normal_class: str = "NORMAL") -> np.ndarray:
    """Slice indices of one patient used for fine-tuning (the paper's rule by default).

    >>> select_slices("CAP", np.array([0, 1, 1, 0]), 4, FinetuneConfig()).tolist()
    [1, 2]
    >>> select_slices("NORMAL", None, 4, FinetuneConfig()).tolist()
    [0, 1, 2, 3]
    """
    if label == normal_class:
        idx = evenly(np.arange(n_slices), ft.normal_slices_per_patient)
    elif not ft.infected_only:
        idx = np.arange(n_slices)
    else:
        if slice_labels is None:
            return np.zeros(0, dtype=int)
        idx = np.flatnonzero(np.asarray(slice_labels[:n_slices]) > 0)
    return evenly(idx, ft.max_slices_per_patient)


def evenly(indices: np.ndarray, k: int) -> np.ndarray:
    """``k`` of ``indices`` spread evenly over them (all of them when k <= 0 or there are no more)."""
    if k <= 0 or len(indices) <= k:
        return indices
    pos = np.linspace(0, len(indices) - 1, k).round().astype(int)
    return indices[pos]


def split_patients(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Stratified patient-level split (train, val) when the cohort names none."""

    by_id = {r["patient_id"]: r for r in rows}
    train, val = carve(sorted(by_id), {p: r["label"] for p, r in by_id.items()}, fraction, seed)
    return [by_id[p] for p in train], [by_id[p] for p in val]


def cohort_slices(rows: list[dict], slice_labels: dict, classes: list[str], desc: str, *, ft: FinetuneConfig,
                  pre: PreprocessConfig, windows: Sequence[Sequence[float]], normal_class: str = "NORMAL") -> SliceSet:
    """The selected slices (:func:`select_slices`) of every study of a cohort, windowed with ``windows`` (the
    HU windows the backbone is served with) and resized as ``pre`` says, as uint8."""
    from rich.progress import track

    images, labels, groups = [], [], []
    for r in track(rows, description=f"reading {desc} slices", transient=True, disable=not is_main()):
        pid, label = r["patient_id"], r["label"]
        if label not in classes:
            log.warning("patient %s: label %r is not one of %s; skipped", pid, label, classes)
            continue
        vol = read_study(r["path"], study_id=pid)
        idx = select_slices(label, slice_labels.get(pid), vol.n_slices, ft, normal_class)
        if len(idx) == 0:
            continue
        hu = vol.hu if not pre.lung_crop else P.model_slices(vol, P.PreprocessSpec(lung_crop=True))
        unit = P.prepare_unit(hu[idx], vol.kind, windows, pre.size, pre.base_size)
        images.append(P.quantize(unit))
        labels += [classes.index(label)] * len(idx)
        groups += [pid] * len(idx)
    if not images:
        raise MsnetError(f"no {desc} slices selected", fix="check slice_labels.csv and the cohort's labels")
    return SliceSet(torch.cat(images), torch.tensor(labels), groups)


SHORTCUT_PROBES = ("jpeg", "half")
"""Changes of an image that carry no diagnosis: ``jpeg`` codes it as JPEG (quality 75) at its own size,
``half`` halves its resolution. A model that changes its answer under them reads the file, not the lungs."""


def jpeg_coded(im, quality: int):
    """A grey PIL image as it comes back from JPEG coding at ``quality``."""
    buf = _io.BytesIO()
    im.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert("L")


def _probe(im, probe: str):
    if probe == "jpeg":
        return jpeg_coded(im, 75)
    if probe == "half":
        return im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.BILINEAR)
    raise ValueError(f"unknown shortcut probe {probe!r}; expected one of {SHORTCUT_PROBES}")


def load_image_slice(path: str | Path, size: int, reencode_jpeg: int = 0, base_size: int = 0,
                     probe: str = "", lung_crop: bool = False) -> torch.Tensor:
    """A 2-D image file -> uint8 (1, size, size) grey, opened by content, optionally re-encoded as JPEG.

    ``base_size`` > 0: resized to base_size x base_size first, so every image carries the same detail
    whatever its source resolution. Re-encoding every image the same way (after resizing) gives all
    classes the same compression artefacts, so a model cannot tell classes apart by their file format.
    ``probe`` (one of :data:`SHORTCUT_PROBES`) changes the image at its own size first; ``lung_crop``
    then crops it to its 2-D lung mask's box (:func:`msnet.preprocess.grey_lung_crop`).
    """
    try:
        with Image.open(path) as im:
            im = im.convert("L")
            if probe:
                im = _probe(im, probe)
            if lung_crop:
                im = Image.fromarray(P.grey_lung_crop(np.asarray(im)[None])[0])
            if base_size:
                im = im.resize((base_size, base_size), Image.BILINEAR)
            im = im.resize((size, size), Image.BILINEAR)
    except (OSError, UnidentifiedImageError) as exc:
        raise MsnetError(f"cannot read image ({exc})", path=path) from exc
    if reencode_jpeg:
        im = jpeg_coded(im, reencode_jpeg)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).unsqueeze(0)


def image_slices(rows: list[dict], classes: list[str], desc: str, pre: PreprocessConfig, reencode_jpeg: int = 0,
                 probe: str = "") -> SliceSet:
    """The slice images of manifest rows (``image_path``, ``label``, optional ``group`` and ``format``),
    read as :func:`load_image_slice` says."""
    images, labels, groups, formats = [], [], [], []
    for r in rows:
        if r["label"] not in classes:
            raise MsnetError(
                f"label {r['label']!r} of {r['image_path']} is not one of the config's classes {classes}",
                fix="set data.classes in the config",
            )
        images.append(load_image_slice(r["image_path"], pre.size, reencode_jpeg, pre.base_size, probe,
                                       pre.lung_crop))
        labels.append(classes.index(r["label"]))
        groups.append(str(r.get("group") or r["image_path"]))
        formats.append(r.get("format") or image_format(r["image_path"]))
    if not images:
        raise MsnetError(f"no {desc} images")
    return SliceSet(torch.stack(images), torch.tensor(labels), groups, formats)


def image_folder_rows(folder: Path) -> list[dict]:
    """Rows (image_path, label) of a folder laid out as <class>/<images>."""
    rows = []
    for cls_dir in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        for f in sorted(cls_dir.iterdir()):
            if f.is_file() and f.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
                rows.append({"image_path": str(f), "label": map_class(cls_dir.name)})
    if not rows:
        raise MsnetError("no images found in <class>/ sub-folders", path=folder)
    return rows


def manifest_folds(rows: list[dict], k: int, seed: int) -> list[list[dict]]:
    """``k`` label-stratified folds of manifest rows that never split a source group (``group``
    column; rows without one are their own group)."""
    if k < 2:
        raise MsnetError(f"finetune.folds={k}: cross-validation needs at least 2 folds", fix="set finetune.folds >= 2")
    keys = [str(i) for i in range(len(rows))]
    groups = [str(r.get("group") or r["image_path"]) for r in rows]
    if len(set(groups)) < k:
        raise MsnetError(f"{len(set(groups))} source groups cannot fill {k} folds", fix="lower finetune.folds")
    folds = stratified_folds(keys, [r["label"] for r in rows], k, seed, groups=groups)
    return [[rows[int(i)] for i in sorted(f, key=int)] for f in folds]


def build_slice_sets(cfg: Config, windows: Sequence[Sequence[float]] | None = None) -> dict[str, SliceSet]:
    """The train and val slice sets of stage 1 (test patients are never used); CT slices windowed with
    ``windows`` (default: the configured ones)."""
    classes = list(cfg.data.classes)
    ft = cfg.finetune
    if cfg.data.slice_manifest:
        rows = read_slice_manifest(cfg.resolve(cfg.data.slice_manifest))
        train = [r for r in rows if r.get("subset", "train") == "train"]
        val = [r for r in rows if r.get("subset") == "val" and ft.val_fraction < 0]
        if not val and ft.folds > 1:
            folds = manifest_folds(train, ft.folds, ft.seed)
            train, val = [r for f in folds[1:] for r in f], folds[0]
        elif not val:
            # model selection on a part of train; the manifest's own val stays unseen (use --test)
            rng = random.Random(ft.seed)
            rng.shuffle(train)
            by_label: dict[str, list] = {}
            for r in train:
                by_label.setdefault(r["label"], []).append(r)
            train, val = [], []
            for label in sorted(by_label):
                g = by_label[label]
                k = max(1, int(round(len(g) * abs(ft.val_fraction))))
                val += g[:k]
                train += g[k:]
        return {n: image_slices(r, classes, n, cfg.preprocess, cfg.data.reencode_jpeg) for n, r in
                (("train", train), ("val", val))}

    if not cfg.data.cohort:
        raise MsnetError("the config names no data.cohort", fix="run `msnet index ROOT -o OUT` and set data.cohort")
    rows = [r for r in read_cohort(cfg.resolve(cfg.data.cohort)) if r.get("status", "ok") in ("", "ok")]
    labels_path = cfg.resolve(cfg.data.slice_labels) if cfg.data.slice_labels else None
    slice_labels = read_slice_labels(labels_path) if labels_path else {}
    subsets = {r.get("subset", "") for r in rows}
    if "train" in subsets:
        train = [r for r in rows if r.get("subset") == "train"]
        val = [r for r in rows if r.get("subset") == "val"]
        if not val:
            train, val = split_patients(train, ft.val_fraction, ft.seed)
    else:
        train, val = split_patients([r for r in rows if r.get("subset", "") != "test"], ft.val_fraction, ft.seed)
    windows = cfg.preprocess.windows if windows is None else windows
    return {n: cohort_slices(r, slice_labels, classes, n, ft=ft, pre=cfg.preprocess, windows=windows,
                             normal_class=cfg.data.normal_class) for n, r in (("train", train), ("val", val))}
