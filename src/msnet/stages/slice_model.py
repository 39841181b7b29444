"""Stage 1's model: the slice classifier (a backbone and a linear head), built, probed, scored, saved
and loaded again.

The checkpoint it is saved as is a bundle backbone (backbone + slice head + the preprocessing it is
served with), so stage 2 and ``msnet predict`` read it with :func:`msnet.inference.bundle.load_backbone`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from msnet import preprocess as P
from msnet.config import BackboneConfig, Config, FinetuneConfig, PreprocessConfig
from msnet.data.slices import SHORTCUT_PROBES, SliceSet, image_slices
from msnet.device import channels_last
from msnet.errors import MsnetError
from msnet.inference.bundle import load_backbone, save_backbone as save_bundle_backbone
from msnet.metrics import classification_metrics
from msnet.models.astra import declared_hu_window
from msnet.models.backbones import SliceClassifier, create
from msnet.stages.probe import fit_probe, softmax

MODES = ("full", "linear_probe", "lp_ft")


def model_batches(images: torch.Tensor, backbone: nn.Module, device: torch.device, batch_size: int = 64):
    """Stored uint8 slices (n, c, S, S), batch by batch, as the slice classifier takes them: [0, 1], three
    channels, the backbone's normalisation, on ``device``, channels last (the classifier is kept so too)."""
    mean, std = backbone.data_config["mean"], backbone.data_config["std"]
    for i in range(0, len(images), batch_size):
        yield channels_last(P.finish(P.dequantize(images[i : i + batch_size]), mean, std), device)


def build_model(bb: BackboneConfig, n_classes: int, mode: str = "full", weights: Path | None = None,
                pretrained: bool | None = None) -> SliceClassifier:
    """The slice classifier of backbone config ``bb`` (``weights``: its local weights file, resolved)."""
    backbone = create(bb.name, pretrained=bb.pretrained if pretrained is None else pretrained, weights=weights,
                      freeze=bb.freeze or None, **bb.pooling())
    if backbone.whole_study and mode != "linear_probe":
        raise MsnetError(f"finetune.mode={mode} trains on single slices; backbone {backbone.name!r} reads "
                         "slabs of neighbouring slices", fix="use finetune.mode=linear_probe with it, or backbone astra")
    return SliceClassifier(backbone, n_classes)


def model_for(cfg: Config, n_classes: int, pretrained: bool | None = None) -> SliceClassifier:
    """:func:`build_model` as a run's config says (its weights file resolved against the config)."""
    weights = cfg.resolve(cfg.backbone.weights) if cfg.backbone.weights else None
    return build_model(cfg.backbone, n_classes, cfg.finetune.mode, weights, pretrained)


@torch.inference_mode()
def predict_slices(model: nn.Module, data: SliceSet, device: torch.device, tta: bool = False,
                   batch_size: int = 64) -> np.ndarray:
    """Class probabilities (n, n_classes) of every slice (with ``tta``: the mean over the slice and its
    mirror image)."""
    model.eval()
    probs = []
    for x in model_batches(data.images, model.backbone, device, batch_size):
        p = torch.softmax(model(x).float(), dim=1)
        if tta:
            p = (p + torch.softmax(model(x.flip(-1)).float(), dim=1)) / 2
        probs.append(p.cpu())
    return torch.cat(probs).numpy()


def log_probs(probs: np.ndarray) -> np.ndarray:
    """Log-probabilities (the logits temperature scaling works on)."""
    return np.log(np.clip(probs, 1e-12, None))


def calibrated_probs(model: nn.Module, data: SliceSet, device: torch.device, tta: bool = False,
                     temperature: float | None = None) -> np.ndarray:
    """Probabilities after the model's temperature (or the one given)."""
    t = float(getattr(model, "temperature", 1.0) if temperature is None else temperature)
    return softmax(log_probs(predict_slices(model, data, device, tta)) / t)


@torch.inference_mode()
def pooled_features(backbone: nn.Module, data: SliceSet, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """The backbone's pooled features (n, num_features) of every slice, in eval mode, unaugmented."""
    was_training = backbone.training
    backbone.eval()
    out = [backbone(x).float().cpu() for x in model_batches(data.images, backbone, device, batch_size)]
    backbone.train(was_training)
    return torch.cat(out)


def fit_linear_probe(model: nn.Module, data: SliceSet, ft: FinetuneConfig, device: torch.device) -> None:
    """Fit ``model.fc`` as the linear probe (:func:`msnet.stages.probe.fit_probe`) on the frozen
    backbone's pooled features of ``data``, with ``ft.probe_c`` and ``ft.probe_scale``.
    The backbone is not changed."""
    feats = pooled_features(model.backbone, data, device)
    w, b = fit_probe(feats, data.labels, model.fc.out_features, ft.probe_c, ft.probe_scale, ft.class_weights)
    with torch.no_grad():
        model.fc.weight.copy_(w)
        model.fc.bias.copy_(b)


def spec_for(cfg: Config, backbone) -> P.PreprocessSpec:
    """The preprocessing a run's backbone is trained and served with."""
    kind = "grey" if cfg.data.slice_manifest and not cfg.data.slice_labels else "hu"
    return P.PreprocessSpec.from_config(cfg.preprocess, backbone.data_config, kind)


def train_windows(cfg: Config) -> list[list[float]]:
    """The HU windows CT slices are trained with: the ones the backbone is served with (a CT-pretrained
    backbone declares its own, :func:`msnet.models.astra.declared_hu_window`)."""
    declared = declared_hu_window(cfg.backbone.name)
    return [list(declared)] if declared else [list(w) for w in cfg.preprocess.windows]


def save_backbone(model: nn.Module, spec: P.PreprocessSpec, classes: Sequence[str], path: Path,
                  extra: dict | None = None) -> None:
    """The fine-tuned slice classifier as a bundle backbone checkpoint (backbone + slice head + spec)."""
    save_bundle_backbone(path, model.backbone, spec, list(classes), head=model.fc, extra=extra)


def load_slice_classifier(path: Path, device: torch.device | str = "cpu") -> SliceClassifier:
    """Rebuild a SliceClassifier from a stage-1 checkpoint (no network, no pretrained download)."""
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


def slice_metrics(data: SliceSet, probs: np.ndarray, classes: list[str]) -> dict:
    """Classification metrics of slice probabilities against the slices' labels."""
    y = data.labels.numpy()
    return classification_metrics(y, probs.argmax(1), probs, classes)


def shortcut_flips(model: nn.Module, rows: list[dict], probs: np.ndarray, classes: list[str], device: torch.device,
                   pre: PreprocessConfig, reencode_jpeg: int = 0, tta: bool = False) -> dict:
    """How often the answer changes under :data:`msnet.data.slices.SHORTCUT_PROBES` (JPEG coding at the
    image's own size, half the resolution): the fraction of images whose predicted class flips, over all
    images and over those coded as PNG (for ``jpeg``). Neither change carries a diagnosis; a model that
    reads the file's format or sharpness as a class cue flips often."""
    pred = probs.argmax(1)
    out = {}
    for probe in SHORTCUT_PROBES:
        data = image_slices(rows, classes, f"{probe} probe", pre, reencode_jpeg, probe=probe)
        flipped = calibrated_probs(model, data, device, tta).argmax(1) != pred
        out[probe] = {"flip_rate": float(flipped.mean()), "n": int(flipped.size)}
        png = np.array([f == "PNG" for f in data.formats])
        if probe == "jpeg" and png.any():
            out[probe]["flip_rate_png"] = float(flipped[png].mean())
    return out
