"""Pure preprocessing functions: HU windows -> [0, 1] -> resize -> channels -> mean/std, and the slices a
model sees (:func:`model_slices`, cropped to the lungs when asked).

Nothing here touches files; inputs are arrays of a :class:`msnet.io.CTVolume`. The lung mask and crop
(:func:`lung_stats`, :func:`lung_crop`, :func:`grey_lung_mask`) live in :mod:`msnet.lungs`, the gates
that refuse a study (:func:`check_lungs`, the chest-CT checks) in :mod:`msnet.gates`; their names are
importable from here too.

>>> import numpy as np
>>> hu = np.array([[[-1350.0, -600.0, 150.0]]], dtype=np.float32)
>>> window(hu, level=-600, width=1500).round(2).tolist()
[[[0.0, 0.5, 1.0]]]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from msnet.errors import MsnetError
from msnet.gates import check_lungs  # noqa: F401 (importable from here)
from msnet.lungs import (  # noqa: F401 (importable from here)
    GREY_LUNG_MIN_FRACTION, GRID_MM, GRID_Z_MM, LUNG_HU_MAX, MIN_LUNG_ML, LungStats, grey_lung_crop, grey_lung_mask, lung_box, lung_crop,
    lung_stats,
)

LUNG = (-600.0, 1500.0)
MEDIASTINUM = (40.0, 400.0)
BONE = (400.0, 1800.0)
THREE_WINDOWS = [list(LUNG), list(MEDIASTINUM), list(BONE)]
"""Lung, mediastinum and bone windows, one per channel (instead of one window replicated)."""


def window(hu: np.ndarray | torch.Tensor, level: float, width: float):
    """Map HU to [0, 1] through a window given by level (centre) and width."""
    lo = level - width / 2.0
    if isinstance(hu, torch.Tensor):
        return hu.sub(lo).div_(width).clamp_(0.0, 1.0)  # one new tensor, the same numbers as (hu - lo) / width
    return np.clip((hu - lo) / width, 0.0, 1.0).astype(np.float32)


def to_unit(slices: np.ndarray | torch.Tensor, kind: str, windows: Sequence[Sequence[float]]) -> torch.Tensor:
    """(n, H, W) HU or grey levels -> (n, c, H, W) float32 in [0, 1].

    One window gives one channel (replicated later), several windows one channel
    each. Grey-level images (kind ``grey``, 0..255) skip windowing.
    """
    x = torch.as_tensor(np.ascontiguousarray(slices) if isinstance(slices, np.ndarray) else slices)
    x = x.float()
    if kind == "grey":
        return (x / 255.0).clamp_(0.0, 1.0).unsqueeze(1)
    if len(windows) == 1:
        return window(x, float(windows[0][0]), float(windows[0][1])).unsqueeze(1)
    return torch.stack([window(x, float(lv), float(wd)) for lv, wd in windows], dim=1)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (n, c, H, W) to (n, c, size, size), bilinear with antialiasing."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def to_three_channels(x: torch.Tensor) -> torch.Tensor:
    """Replicate a single channel to three (the paper's input); keep three as they are."""
    if x.shape[1] == 3:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Backbone normalisation, per channel."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m).div_(s)


def prepare_unit(slices: np.ndarray | torch.Tensor, kind: str, windows: Sequence[Sequence[float]], size: int,
                 base_size: int = 0) -> torch.Tensor:
    """HU/grey slices -> (n, c, size, size) in [0, 1], c = number of windows (1 or 3).

    ``base_size`` > 0: through base_size x base_size first (antialiased), so that every slice
    carries the same detail whatever its source resolution.
    """
    x = to_unit(slices, kind, windows)
    if base_size:
        x = resize(x, base_size)
    return resize(x, size)


def prepare(
    slices: np.ndarray | torch.Tensor,
    kind: str,
    windows: Sequence[Sequence[float]],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    base_size: int = 0,
) -> torch.Tensor:
    """HU/grey slices (n, H, W) -> backbone input (n, 3, size, size) (``base_size``: see :func:`prepare_unit`)."""
    return finish(prepare_unit(slices, kind, windows, size, base_size), mean, std)


def finish(unit: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[0, 1] tensor (n, 1|3, S, S) -> normalised 3-channel backbone input."""
    return normalize(to_three_channels(unit), mean, std)


def quantize(unit: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8 (compact in-memory slice cache)."""
    return (unit * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8)


def dequantize(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0)


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything that turns a slice into backbone input, as one typed record stored with the weights.

    ``kind`` is the input the backbone was trained on (``hu`` or ``grey``); ``windows`` the HU
    windows as (level, width); ``size`` the square input size; ``mean``/``std`` the backbone's
    normalisation.

    >>> s = PreprocessSpec(windows=((-600.0, 1500.0),), size=128)
    >>> PreprocessSpec.from_dict(s.to_dict()) == s
    True
    >>> s.prepare(np.zeros((2, 64, 64), np.float32), "hu").shape
    torch.Size([2, 3, 128, 128])
    """

    kind: str = "hu"
    windows: tuple[tuple[float, float], ...] = (LUNG,)
    size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    lung_crop: bool = False
    """Crop every slice to the lungs' bounding box (one box per volume) before resizing: by the HU lung
    mask, or for grey images by their 2-D masks (:func:`grey_lung_crop`)."""
    base_size: int = 0
    """> 0: every slice is resized to base_size x base_size before ``size`` (the same detail for every
    source resolution: a model cannot tell classes apart by how sharp their images are)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "windows", tuple((float(lv), float(wd)) for lv, wd in self.windows))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "base_size", int(self.base_size))
        if self.kind not in ("hu", "grey"):
            raise MsnetError(f"preprocessing kind must be 'hu' or 'grey', got {self.kind!r}")
        if self.kind == "hu" and len(self.windows) not in (1, 3):
            raise MsnetError(f"{len(self.windows)} HU windows given", fix="use one window (replicated) or three")
        if self.size < 8 or not (self.base_size == 0 or 8 <= self.base_size) or len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise MsnetError(f"implausible preprocessing: size {self.size}, base_size {self.base_size}, mean {self.mean}, std {self.std}")

    @classmethod
    def from_config(cls, preprocess, data_config: dict, kind: str = "hu") -> "PreprocessSpec":
        """From a config's ``preprocess`` section (windows, size) and a backbone's data_config (mean, std;
        and ``hu_window``, where the weights were trained on one HU window: it replaces the config's)."""
        windows = tuple(tuple(w) for w in preprocess.windows)
        if data_config.get("hu_window") is not None and kind == "hu":
            own = (tuple(float(v) for v in data_config["hu_window"]),)
            if tuple(tuple(float(v) for v in w) for w in windows) != own:
                logging.getLogger(__name__).info("HU window %s of the backbone's weights used instead of the "
                                                 "configured %s", list(own[0]), [list(w) for w in windows])
            windows = own
        return cls(kind=kind, windows=windows, size=preprocess.size,
                   mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
                   lung_crop=bool(getattr(preprocess, "lung_crop", False)),
                   base_size=int(getattr(preprocess, "base_size", 0)))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "windows": [list(w) for w in self.windows], "size": self.size,
                "mean": list(self.mean), "std": list(self.std), "lung_crop": self.lung_crop,
                "base_size": self.base_size}

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None) -> "PreprocessSpec":
        """Rebuild from :meth:`to_dict` output; a missing or unknown key is a clear error."""
        keys = {"kind", "windows", "size", "mean", "std"}
        if not isinstance(d, dict) or not keys <= set(d) <= keys | {"lung_crop", "base_size"}:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise MsnetError(f"preprocessing record has keys {got}, expected {sorted(keys)}", where,
                             "rebuild the checkpoint with this version of msnet")
        return cls(kind=d["kind"], windows=tuple(tuple(w) for w in d["windows"]), size=d["size"],
                   mean=tuple(d["mean"]), std=tuple(d["std"]), lung_crop=bool(d.get("lung_crop", False)),
                   base_size=int(d.get("base_size", 0)))

    def unit(self, slices: np.ndarray | torch.Tensor, kind: str) -> torch.Tensor:
        """Slices (n, H, W) -> (n, c, size, size) in [0, 1]."""
        return prepare_unit(slices, kind, self.windows, self.size, self.base_size)

    def prepare(self, slices: np.ndarray | torch.Tensor, kind: str) -> torch.Tensor:
        """Slices (n, H, W) -> normalised backbone input (n, 3, size, size)."""
        return prepare(slices, kind, self.windows, self.size, self.mean, self.std, self.base_size)


def model_slices(vol, spec: PreprocessSpec, lungs: "LungStats | None" = None) -> np.ndarray:
    """The slices a model sees of a volume: its HU (or grey levels), cropped to the lungs when
    ``spec.lung_crop`` (``lungs``: stats already computed for this HU volume; grey images are cropped by
    their 2-D masks). Training, extraction and serving all use it. Stats made on another grid than the
    crop's (the gates' coarser one) are not used: the crop box is always the one of the fine grid."""
    if not spec.lung_crop:
        return vol.hu
    if vol.kind != "hu":
        return grey_lung_crop(np.asarray(vol.hu))
    if lungs is None or tuple(lungs.grid_mm) != (GRID_Z_MM, GRID_MM):
        lungs = lung_stats(vol.hu, vol.spacing_mm, vol.z_mm)
    return lung_crop(vol.hu, lungs)
