"""Stage 1: fine-tune the slice backbone on slice-level labels.

The paper's way: infected slices of COVID-19 and CAP patients carry the
patient's class, slices sampled from normal patients are NORMAL; or a
slice-image manifest (UCSD layout). Paper augmentation, class-weighted
cross-entropy, Adam, best-validation checkpoint; resumable after interruption;
data-parallel under torchrun.
"""

from __future__ import annotations

import io as _io
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from msnet.config import Config, save_run_info
from msnet.files import atomic_torch_save, atomic_write_text
from msnet.data.splits import carve, class_weights
from msnet.errors import MsnetError
from msnet.metrics import table1
from msnet.stages.probe import PROBE_SCALES, fit_probe, softmax  # noqa: F401 (PROBE_SCALES: part of this stage's face)
from msnet import device as D
from msnet.device import pick_device, seed_everything
from msnet import preprocess as P

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


def select_slices(label: str, slice_labels: np.ndarray | None, n_slices: int, cfg: Config) -> np.ndarray:
    """Slice indices of one patient used for fine-tuning (the paper's rule by default).

    >>> from msnet.config import Config
    >>> select_slices("CAP", np.array([0, 1, 1, 0]), 4, Config()).tolist()
    [1, 2]
    >>> select_slices("NORMAL", None, 4, Config()).tolist()
    [0, 1, 2, 3]
    """
    ft = cfg.finetune
    if label == cfg.data.normal_class:
        idx = _evenly(np.arange(n_slices), ft.normal_slices_per_patient)
    elif not ft.infected_only:
        idx = np.arange(n_slices)
    else:
        if slice_labels is None:
            return np.zeros(0, dtype=int)
        idx = np.flatnonzero(np.asarray(slice_labels[:n_slices]) > 0)
    return _evenly(idx, ft.max_slices_per_patient)


def _split_patients(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Stratified patient-level split (train, val) when the cohort names none."""

    by_id = {r["patient_id"]: r for r in rows}
    train, val = carve(sorted(by_id), {p: r["label"] for p, r in by_id.items()}, fraction, seed)
    return [by_id[p] for p in train], [by_id[p] for p in val]


def _cohort_slices(rows: list[dict], slice_labels: dict, cfg: Config, classes: list[str], desc: str) -> SliceSet:
    from rich.progress import track

    from msnet.io import read_study

    from msnet.models.astra import declared_hu_window

    size, windows = cfg.preprocess.size, cfg.preprocess.windows
    if declared_hu_window(cfg.backbone.name):  # the window the weights declare, as spec_for serves them
        windows = [list(declared_hu_window(cfg.backbone.name))]
    images, labels, groups = [], [], []
    for r in track(rows, description=f"reading {desc} slices", transient=True, disable=not D.is_main()):
        pid, label = r["patient_id"], r["label"]
        if label not in classes:
            log.warning("patient %s: label %r is not one of %s; skipped", pid, label, classes)
            continue
        vol = read_study(r["path"], study_id=pid)
        idx = select_slices(label, slice_labels.get(pid), vol.n_slices, cfg)
        if len(idx) == 0:
            continue
        hu = vol.hu if not cfg.preprocess.lung_crop else P.model_slices(vol, P.PreprocessSpec(lung_crop=True))
        unit = P.prepare_unit(hu[idx], vol.kind, windows, size, cfg.preprocess.base_size)
        images.append(P.quantize(unit))
        labels += [classes.index(label)] * len(idx)
        groups += [pid] * len(idx)
    if not images:
        raise MsnetError(f"no {desc} slices selected", fix="check slice_labels.csv and the cohort's labels")
    return SliceSet(torch.cat(images), torch.tensor(labels), groups)


def image_format(path: str | Path) -> str:
    """The encoded format of an image file, read from its content (not its extension)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return str(im.format)
    except OSError:
        return "unknown"


SHORTCUT_PROBES = ("jpeg", "half")
"""Changes of an image that carry no diagnosis: ``jpeg`` codes it as JPEG (quality 75) at its own size,
``half`` halves its resolution. A model that changes its answer under them reads the file, not the lungs."""


def jpeg_coded(im, quality: int):
    """A grey PIL image as it comes back from JPEG coding at ``quality``."""
    from PIL import Image

    buf = _io.BytesIO()
    im.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert("L")


def _probe(im, probe: str):
    from PIL import Image

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
    from PIL import Image, UnidentifiedImageError

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


def _image_slices(rows: list[dict], cfg: Config, classes: list[str], desc: str, probe: str = "") -> SliceSet:
    images, labels, groups, formats = [], [], [], []
    for r in rows:
        if r["label"] not in classes:
            raise MsnetError(
                f"label {r['label']!r} of {r['image_path']} is not one of the config's classes {classes}",
                fix="set data.classes in the config",
            )
        images.append(load_image_slice(r["image_path"], cfg.preprocess.size, cfg.data.reencode_jpeg,
                                       cfg.preprocess.base_size, probe, cfg.preprocess.lung_crop))
        labels.append(classes.index(r["label"]))
        groups.append(str(r.get("group") or r["image_path"]))
        formats.append(r.get("format") or image_format(r["image_path"]))
    if not images:
        raise MsnetError(f"no {desc} images")
    return SliceSet(torch.stack(images), torch.tensor(labels), groups, formats)


def image_folder_rows(folder: Path) -> list[dict]:
    """Rows (image_path, label) of a folder laid out as <class>/<images>."""
    from msnet.data.cohorts import map_class

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
    from msnet.data.splits import stratified_folds

    if k < 2:
        raise MsnetError(f"finetune.folds={k}: cross-validation needs at least 2 folds", fix="set finetune.folds >= 2")
    keys = [str(i) for i in range(len(rows))]
    groups = [str(r.get("group") or r["image_path"]) for r in rows]
    if len(set(groups)) < k:
        raise MsnetError(f"{len(set(groups))} source groups cannot fill {k} folds", fix="lower finetune.folds")
    folds = stratified_folds(keys, [r["label"] for r in rows], k, seed, groups=groups)
    return [[rows[int(i)] for i in sorted(f, key=int)] for f in folds]


def build_slice_sets(cfg: Config) -> dict[str, SliceSet]:
    """The train and val slice sets of stage 1 (test patients are never used)."""
    classes = list(cfg.data.classes)
    ft = cfg.finetune
    if cfg.data.slice_manifest:
        from msnet.data.cohorts import read_slice_manifest

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
        return {"train": _image_slices(train, cfg, classes, "train"), "val": _image_slices(val, cfg, classes, "val")}

    from msnet.data.cohorts import read_cohort, read_slice_labels

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
            train, val = _split_patients(train, ft.val_fraction, ft.seed)
    else:
        train, val = _split_patients([r for r in rows if r.get("subset", "") != "test"], ft.val_fraction, ft.seed)
    return {
        "train": _cohort_slices(train, slice_labels, cfg, classes, "train"),
        "val": _cohort_slices(val, slice_labels, cfg, classes, "val"),
    }


def augment_images(batch: torch.Tensor, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    """Geometric and codec augmentation of uint8 slices (n, c, S, S): random resized crop, small
    rotation, random down- and up-sizing, random JPEG re-encoding (each as configured, else a no-op)."""
    from PIL import Image

    ft = cfg.finetune
    if ft.crop_scale >= 1 and not ft.rotate and ft.downscale >= 1 and not (ft.jpeg_quality and ft.jpeg_prob > 0):
        return batch
    if ft.jpeg_quality and len(ft.jpeg_quality) != 2:
        raise MsnetError(f"finetune.jpeg_quality={ft.jpeg_quality} is not a [low, high] pair", fix="e.g. [30, 95]")
    rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    out = []
    for img in batch:
        chans = []
        for plane in img:
            chans.append(_augment_plane(Image.fromarray(plane.numpy()), ft, rng))
        out.append(torch.stack(chans))
    return torch.stack(out)


def _augment_plane(im, ft, rng: random.Random) -> torch.Tensor:
    from PIL import Image

    size = im.size[0]
    if ft.crop_scale < 1:
        area = rng.uniform(ft.crop_scale, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w = min(size, int(round(size * np.sqrt(area * ratio))))
        h = min(size, int(round(size * np.sqrt(area / ratio))))
        x0, y0 = rng.randint(0, size - w), rng.randint(0, size - h)
        im = im.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
    if ft.rotate:
        im = im.rotate(rng.uniform(-ft.rotate, ft.rotate), resample=Image.BILINEAR)
    if ft.downscale < 1:
        small = max(8, int(round(size * rng.uniform(ft.downscale, 1.0))))
        im = im.resize((small, small), Image.BILINEAR).resize((size, size), Image.BILINEAR)
    if ft.jpeg_quality and rng.random() < ft.jpeg_prob:
        im = jpeg_coded(im, rng.randint(int(ft.jpeg_quality[0]), int(ft.jpeg_quality[1])))
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())


def augment(batch: torch.Tensor, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    """Paper augmentation on [0, 1] 3-channel slices: horizontal flip, brightness/contrast/saturation jitter."""
    from torchvision.transforms.v2 import functional as TF

    ft = cfg.finetune
    out = []
    for img in batch:
        if ft.hflip and torch.rand((), generator=gen) < ft.hflip:
            img = img.flip(-1)
        if ft.brightness:
            img = TF.adjust_brightness(img, float(1 + (torch.rand((), generator=gen) * 2 - 1) * ft.brightness))
        if ft.contrast:
            img = TF.adjust_contrast(img, float(1 + (torch.rand((), generator=gen) * 2 - 1) * ft.contrast))
        if ft.saturation:
            img = TF.adjust_saturation(img, float(1 + (torch.rand((), generator=gen) * 2 - 1) * ft.saturation))
        out.append(img)
    return torch.stack(out)


def model_batches(images: torch.Tensor, backbone: nn.Module, device: torch.device, batch_size: int = 64):
    """Stored uint8 slices (n, c, S, S), batch by batch, as the slice classifier takes them: [0, 1], three
    channels, the backbone's normalisation, on ``device``, channels last (the classifier is kept so too)."""
    mean, std = backbone.data_config["mean"], backbone.data_config["std"]
    for i in range(0, len(images), batch_size):
        yield D.channels_last(P.finish(P.dequantize(images[i : i + batch_size]), mean, std), device)


def build_model(cfg: Config, n_classes: int, pretrained: bool | None = None):
    from msnet.models.backbones import SliceClassifier, create

    backbone = create(
        cfg.backbone.name,
        pretrained=cfg.backbone.pretrained if pretrained is None else pretrained,
        weights=cfg.resolve(cfg.backbone.weights) if cfg.backbone.weights else None,
        freeze=cfg.backbone.freeze or None,
        **cfg.backbone.pooling(),
    )
    if backbone.whole_study and cfg.finetune.mode != "linear_probe":
        raise MsnetError(f"finetune.mode={cfg.finetune.mode} trains on single slices; backbone {backbone.name!r} reads "
                         "slabs of neighbouring slices", fix="use finetune.mode=linear_probe with it, or backbone astra")
    return SliceClassifier(backbone, n_classes)


@torch.inference_mode()
def predict_slices(model: nn.Module, data: SliceSet, cfg: Config, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (n, n_classes) of every slice (with ``finetune.tta``: the mean over the slice
    and its mirror image)."""
    model.eval()
    probs = []
    for x in model_batches(data.images, model.backbone, device, batch_size):
        p = torch.softmax(model(x).float(), dim=1)
        if cfg.finetune.tta:
            p = (p + torch.softmax(model(x.flip(-1)).float(), dim=1)) / 2
        probs.append(p.cpu())
    return torch.cat(probs).numpy()


def _log(probs: np.ndarray) -> np.ndarray:
    """Log-probabilities (the logits temperature scaling works on)."""
    return np.log(np.clip(probs, 1e-12, None))


def calibrated_probs(model: nn.Module, data: SliceSet, cfg: Config, device: torch.device,
                     temperature: float | None = None) -> np.ndarray:
    """Probabilities after the model's temperature (or the one given)."""
    t = float(getattr(model, "temperature", 1.0) if temperature is None else temperature)
    return softmax(_log(predict_slices(model, data, cfg, device)) / t)


def shortcut_flips(model: nn.Module, rows: list[dict], probs: np.ndarray, cfg: Config, classes: list[str],
                   device: torch.device) -> dict:
    """How often the answer changes under :data:`SHORTCUT_PROBES` (JPEG coding at the image's own size,
    half the resolution): the fraction of images whose predicted class flips, over all images and over
    those coded as PNG (for ``jpeg``). Neither change carries a diagnosis; a model that reads the file's
    format or sharpness as a class cue flips often."""
    pred = probs.argmax(1)
    out = {}
    for probe in SHORTCUT_PROBES:
        data = _image_slices(rows, cfg, classes, f"{probe} probe", probe=probe)
        flipped = calibrated_probs(model, data, cfg, device).argmax(1) != pred
        out[probe] = {"flip_rate": float(flipped.mean()), "n": int(flipped.size)}
        png = np.array([f == "PNG" for f in data.formats])
        if probe == "jpeg" and png.any():
            out[probe]["flip_rate_png"] = float(flipped[png].mean())
    return out


def slice_metrics(data: SliceSet, probs: np.ndarray, classes: list[str]) -> dict:
    from msnet.metrics import classification_metrics

    y = data.labels.numpy()
    return classification_metrics(y, probs.argmax(1), probs, classes)


@dataclass
class _Trainer:
    """One fine-tuning run's moving parts: model (DDP-wrapped when distributed), optimiser, loss, state."""

    cfg: Config
    model: nn.Module
    opt: torch.optim.Optimizer
    loss_fn: nn.Module
    device: torch.device
    rank: int = 0
    world: int = 1
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"accuracy": -1.0, "loss": float("inf"), "epoch": -1})
    start_epoch: int = 0
    ema: nn.Module | None = None
    """Exponential moving average of the weights (finetune.ema > 0): validated and saved instead."""

    @property
    def eval_model(self) -> nn.Module:
        return self.ema if self.ema is not None else self.model

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = self.cfg.finetune.ema
        for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
            pe.mul_(d).add_(pm.detach(), alpha=1 - d)
        for be, bm in zip(self.ema.buffers(), self.model.buffers()):
            be.copy_(bm)

    @property
    def train_model(self) -> nn.Module:
        if self.world > 1 and not hasattr(self, "_ddp"):
            self._ddp = nn.parallel.DistributedDataParallel(self.model)
        return self._ddp if self.world > 1 else self.model

    def resume(self, state_file: Path) -> None:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.start_epoch, self.history, self.best = state["epoch"] + 1, state["history"], state["best"]
        log.info("resuming fine-tuning at epoch %d", self.start_epoch + 1)

    def epoch(self, epoch: int, train_set: SliceSet, advance) -> float:
        """One pass over this rank's shard of the training slices; returns the mean training loss."""
        cfg, bs = self.cfg, self.cfg.finetune.batch_size
        mean, std = self.model.backbone.data_config["mean"], self.model.backbone.data_config["std"]
        gen = torch.Generator().manual_seed(cfg.finetune.seed * 1000 + epoch)
        order = torch.randperm(len(train_set), generator=gen)[self.rank::self.world]  # same permutation everywhere
        self.train_model.train()
        if cfg.finetune.freeze_bn:  # keep the normalisation statistics the probe saw
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        total, n_seen = 0.0, 0
        for i in range(0, len(order), bs):
            idx = order[i : i + bs]
            x = P.to_three_channels(P.dequantize(augment_images(train_set.images[idx], cfg, gen)))
            x = D.channels_last(P.normalize(augment(x, cfg, gen), mean, std), self.device)
            y = train_set.labels[idx].to(self.device)
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.train_model(x), y)
            loss.backward()
            self.opt.step()
            if self.ema is not None:
                self._update_ema()
            total += loss.item() * len(idx)
            n_seen += len(idx)
            advance()
        return total / max(n_seen, 1)

    def validate(self, epoch: int, train_loss: float | None, val_set: SliceSet, out: Path, classes: list[str]) -> bool:
        """Score the validation slices, log, checkpoint the best and the resume state; True if improved.
        ``epoch`` -1 (``train_loss`` None): the fitted probe, before any fine-tuning (history's epoch 0)."""
        probs = predict_slices(self.eval_model, val_set, self.cfg, self.device)
        val_loss = float(nn.functional.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-8)), val_set.labels))
        val_acc = float((probs.argmax(1) == val_set.labels.numpy()).mean())
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc}
        self.history.append(row)
        if train_loss is None:
            log.info("the fitted probe (epoch 0): val loss %.4f, val accuracy %.4f", val_loss, val_acc)
        else:
            log.info("epoch %d/%d: train loss %.4f, val loss %.4f, val accuracy %.4f", epoch + 1,
                     self.cfg.finetune.epochs, train_loss, val_loss, val_acc)
        improved = val_acc > self.best["accuracy"] or (val_acc == self.best["accuracy"] and val_loss < self.best["loss"])
        if improved:
            self.best = {"accuracy": val_acc, "loss": val_loss, "epoch": epoch + 1}
            if D.is_main():
                save_backbone(self.eval_model, self.cfg, classes, out / "backbone.pt",
                              extra={"epoch": epoch + 1, "val_accuracy": val_acc})
        if D.is_main():
            state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "epoch": epoch,
                     "history": self.history, "best": self.best}
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
            atomic_torch_save(state, out / "state.pt")
            _write_history(out / "history.csv", self.history)
        return improved


MODES = ("full", "linear_probe", "lp_ft")


@torch.inference_mode()
def pooled_features(backbone: nn.Module, data: SliceSet, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """The backbone's pooled features (n, num_features) of every slice, in eval mode, unaugmented."""
    was_training = backbone.training
    backbone.eval()
    out = [backbone(x).float().cpu() for x in model_batches(data.images, backbone, device, batch_size)]
    backbone.train(was_training)
    return torch.cat(out)


def fit_linear_probe(model: nn.Module, data: SliceSet, cfg: Config, device: torch.device) -> None:
    """Fit ``model.fc`` as the linear probe (:func:`msnet.stages.probe.fit_probe`) on the frozen
    backbone's pooled features of ``data``, with ``finetune.probe_c`` and ``finetune.probe_scale``.
    The backbone is not changed."""
    feats = pooled_features(model.backbone, data, device)
    w, b = fit_probe(feats, data.labels, model.fc.out_features, cfg.finetune.probe_c, cfg.finetune.probe_scale,
                     cfg.finetune.class_weights)
    with torch.no_grad():
        model.fc.weight.copy_(w)
        model.fc.bias.copy_(b)


def _trainer(cfg: Config, train_set: SliceSet, n_classes: int, rank: int, world: int) -> _Trainer:
    ft = cfg.finetune
    if ft.mode not in MODES:
        raise MsnetError(f"finetune.mode={ft.mode!r} is not one of {', '.join(MODES)}", fix="set finetune.mode")
    if ft.probe_refit and ft.mode != "linear_probe":
        raise MsnetError(f"finetune.probe_refit applies to mode linear_probe, not {ft.mode}",
                         fix="set finetune.probe_refit=false, or finetune.mode=linear_probe")
    device = pick_device(cfg.device)
    model = build_model(cfg, n_classes).to(device, memory_format=torch.channels_last)
    if ft.mode in ("linear_probe", "lp_ft"):
        fit_linear_probe(model, train_set, cfg, device)
    head = list(model.fc.parameters())
    body = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": head, "lr": ft.lr}]
    if body and ft.backbone_lr_scale > 0:
        groups.append({"params": body, "lr": ft.lr * ft.backbone_lr_scale})
    opt = torch.optim.Adam(groups, lr=ft.lr, weight_decay=ft.weight_decay)
    weights = class_weights(train_set.labels, n_classes) if ft.class_weights else None
    loss_fn = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device))
    tr = _Trainer(cfg, model, opt, loss_fn, device, rank, world)
    if ft.ema > 0 and ft.mode != "linear_probe":
        import copy

        tr.ema = copy.deepcopy(model).eval()
        for q in tr.ema.parameters():
            q.requires_grad_(False)
    return tr


def _fit(cfg: Config, train_set: SliceSet, val_set: SliceSet, out: Path, classes: list[str], rank: int = 0,
         world: int = 1, resume: bool = False) -> _Trainer:
    """Train one model (as finetune.mode says) with model selection on ``val_set``; the best
    checkpoint is ``out/backbone.pt``."""
    from msnet.progress import Rate

    tr = _trainer(cfg, train_set, len(classes), rank, world)
    ft = cfg.finetune
    if resume and (out / "state.pt").exists():
        tr.resume(out / "state.pt")
    elif ft.mode != "full":  # the probe is a candidate too: epoch 0
        tr.validate(-1, None, val_set, out, classes)
    if ft.mode == "linear_probe":
        return tr
    stale, rate = 0, Rate(ft.epochs - tr.start_epoch, "epochs")
    for epoch in range(tr.start_epoch, ft.epochs):
        train_loss = tr.epoch(epoch, train_set, lambda: None)
        stale = 0 if tr.validate(epoch, train_loss, val_set, out, classes) else stale + 1
        log.info("fine-tuning: %s", rate.update())
        if ft.early_stopping and stale >= ft.early_stopping:
            log.info("early stopping after %d epochs without improvement", stale)
            break
    return tr


CALIBRATIONS = ("select", "cv")
OOF_FILE = "oof.npz"
"""Out-of-fold log-probabilities and labels of `--cv` (finetune/cv/oof.npz), for calibration: cv."""


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


def _resave(model: nn.Module, path: Path, cfg: Config, **extra) -> None:
    """Write ``model`` back over its stage-1 checkpoint, keeping the checkpoint's epoch and selection
    accuracy and adding ``extra`` (main process only)."""
    from msnet.inference.bundle import checkpoint_info

    if D.is_main():
        info = checkpoint_info(path)
        kept = {k: info[k] for k in ("epoch", "val_accuracy") if k in info}
        save_backbone(model, cfg, list(info["classes"]), path, extra={**kept, **extra})


def _calibrate(path: Path, val_set: SliceSet, cfg: Config, device: torch.device,
               fit_on: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, float, nn.Module]:
    """Fit the slice classifier's temperature on the validation slices (or on ``fit_on``: log-probabilities
    and labels) and store it in its checkpoint; returns the calibrated validation probabilities, the
    temperature and the model (loaded from ``path``, its temperature set)."""
    from msnet.metrics import fit_temperature

    model = load_slice_classifier(path, device)
    logits = _log(predict_slices(model, val_set, cfg, device))
    temperature = fit_temperature(*(fit_on if fit_on is not None else (logits, val_set.labels.numpy())))
    _resave(model, path, cfg, temperature=temperature)
    model.temperature = float(temperature)
    return softmax(logits / temperature), temperature, model


def _refit_probe(model: nn.Module, path: Path, sets: list[SliceSet], cfg: Config, device: torch.device) -> nn.Module:
    """finetune.probe_refit: the calibrated linear probe ``model`` (saved at ``path``) fitted again on all
    of ``sets`` (the training and the selection images), its temperature kept; saved in place and returned."""
    both = SliceSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]))
    fit_linear_probe(model, both, cfg, device)
    _resave(model, path, cfg, temperature=model.temperature, refit_on=len(both))
    return model.eval()


def finetune(cfg: Config, test_dir: Path | None = None, overwrite: bool = False) -> dict:
    """Run stage 1; returns the slice-level validation metrics (and test metrics with `test_dir`)."""
    if on_ct_cohort(cfg):
        from msnet.stages.ct_eval import finetune_cohort

        result = finetune_cohort(cfg, overwrite)
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
    data = build_slice_sets(cfg)
    train_set, val_set = data["train"], data["val"]
    log.info("fine-tuning (%s) on %d slices, validating on %d (classes %s)", cfg.finetune.mode, len(train_set),
             len(val_set), classes)
    tr = _fit(cfg, train_set, val_set, out, classes, rank, world, resume=not overwrite)
    D.barrier()
    probs, temperature, model = _calibrate(out / "backbone.pt", val_set, cfg, tr.device, fit_on)
    metrics = slice_metrics(val_set, probs, classes)  # of the model before any refit: its selection images are unseen
    metrics.update(best_epoch=tr.best["epoch"], n_train=len(train_set), n_val=len(val_set), temperature=temperature,
                   table1=table1(val_set.labels.numpy(), probs.argmax(1), classes))
    if cfg.finetune.probe_refit:
        _refit_probe(model, out / "backbone.pt", [train_set, val_set], cfg, tr.device)
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
    from msnet.data.cohorts import read_slice_manifest
    from msnet.files import atomic_path
    from msnet.metrics import classification_metrics, fit_temperature

    if on_ct_cohort(cfg):
        from msnet.stages.ct_eval import cross_validate_cohort

        return cross_validate_cohort(cfg, overwrite)
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
        data = {n: _image_slices(r, cfg, classes, n) for n, r in (("train", fit_rows), ("select", sel_rows),
                                                                  ("test", held))}
        tr = _fit(cfg, data["train"], data["select"], fold_out, classes)
        _, temperature, model = _calibrate(fold_out / "backbone.pt", data["select"], cfg, tr.device)
        if ft.probe_refit:
            model = _refit_probe(model, fold_out / "backbone.pt", [data["train"], data["select"]], cfg, tr.device)
        logits = _log(predict_slices(model, data["test"], cfg, tr.device))
        probs = softmax(logits / temperature)
        y = data["test"].labels.numpy()
        oof_logits.append(logits)
        oof_labels.append(y)
        m = classification_metrics(y, probs.argmax(1), probs, classes)
        m = {key: m[key] for key in ("accuracy", "f1", "auc", "ece", "brier") if key in m}
        m.update(n=len(y), best_epoch=tr.best["epoch"], temperature=temperature,
                 by_format=_by_format(data["test"], probs, classes),
                 shortcut=shortcut_flips(model, held, probs, cfg, classes, tr.device))
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


def _by_format(data: SliceSet, probs: np.ndarray, classes: list[str]) -> dict:
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


def _write_history(path: Path, history: list[dict]) -> None:
    from msnet.files import write_csv_atomic

    write_csv_atomic(path, list(history[0]), history)


def spec_for(cfg: Config, backbone) -> "P.PreprocessSpec":
    """The preprocessing a run's backbone is trained and served with."""
    kind = "grey" if cfg.data.slice_manifest and not cfg.data.slice_labels else "hu"
    return P.PreprocessSpec.from_config(cfg.preprocess, backbone.data_config, kind)


def save_backbone(model: nn.Module, cfg: Config, classes: list[str], path: Path, extra: dict | None = None) -> None:
    """The fine-tuned slice classifier as a bundle backbone checkpoint (backbone + slice head + spec)."""
    from msnet.inference.bundle import save_backbone as save

    save(path, model.backbone, spec_for(cfg, model.backbone), classes, head=model.fc, extra=extra)


def load_slice_classifier(path: Path, device: torch.device | str = "cpu"):
    """Rebuild a SliceClassifier from a stage-1 checkpoint (no network, no pretrained download)."""
    from msnet.inference.bundle import load_backbone
    from msnet.models.backbones import SliceClassifier

    if not Path(path).is_file():
        raise MsnetError("backbone checkpoint not found", path=path, fix="run `msnet finetune CONFIG` first")
    backbone, head, spec, meta = load_backbone(path)
    model = SliceClassifier(backbone, len(meta["classes"]))
    model.fc.load_state_dict(head.state_dict())
    model.classes = list(meta["classes"])
    model.spec = spec
    model.temperature = float(meta.get("temperature", 1.0))
    if backbone.whole_study:  # 3-D (slab) weights have no channels-last layout
        return model.to(device).eval()
    return model.to(device, memory_format=torch.channels_last).eval()


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
        from msnet.data.cohorts import read_cohort, read_slice_labels

        rows = read_cohort(test_dir / "cohort.csv", only_ok=True)
        labels_file = test_dir / "slice_labels.csv"
        slice_labels = read_slice_labels(labels_file) if labels_file.exists() else {}
        if {r["label"] for r in rows} - set(classes) or on_ct_cohort(cfg):
            from msnet.files import write_csv_atomic
            from msnet.plots import plot_slice_scores
            from msnet.stages.ct_eval import score_test_cohort
            from msnet.stages.transfer import SLICE_FIELDS

            metrics = score_test_cohort(cfg, model, test_dir, rows, slice_labels)
            slice_rows = metrics.pop("slice_rows")
            out = results_folder(cfg, test_dir)
            metrics["results_dir"] = str(out)
            write_csv_atomic(out / "slice_scores.csv", SLICE_FIELDS + ["lung_area_mm2"], slice_rows)
            plot_slice_scores(slice_rows, out / "slice_scores.png",
                              f"infection score per slice, 1 - p({metrics['normal_class']})")
            atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
            return metrics
        image_rows = None
        data = _cohort_slices(rows, slice_labels, cfg, classes, "test")
    else:
        image_rows = image_folder_rows(test_dir)
        data = _image_slices(image_rows, cfg, classes, "test")
    models = [model] + (_fold_models(stage, device) if cfg.finetune.ensemble else [])
    per_model = [calibrated_probs(m, data, cfg, device) for m in models]
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
        metrics["by_format"] = _by_format(data, probs, classes)
    if image_rows is not None:
        metrics["shortcut"] = shortcut_flips(model, image_rows, per_model[0], cfg, classes, device)
    out = results_folder(cfg, test_dir)
    metrics["results_dir"] = str(out)
    _reliability_plot(data.labels.numpy(), probs, out / "reliability.png")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


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
    import hashlib

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


def _fold_models(out: Path, device) -> list:
    """The `--cv` fold models (finetune/cv/fold*/backbone.pt), for finetune.ensemble."""
    paths = sorted((out / "cv").glob("fold*/backbone.pt"))
    if not paths:
        raise MsnetError("finetune.ensemble needs the cross-validation fold models", path=out / "cv",
                         fix="run `msnet finetune CONFIG --cv` first (or set finetune.ensemble=false)")
    return [load_slice_classifier(p, device) for p in paths]


def _reliability_plot(y: np.ndarray, probs: np.ndarray, path: Path) -> None:
    """The reliability diagram of the test predictions, next to their metrics.json."""
    from msnet.plots import plot_reliability

    plot_reliability({"slice classifier": (y, probs)}, path, "slice level, test set (calibrated probabilities)")
