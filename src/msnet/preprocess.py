"""Pure preprocessing functions: HU windows -> [0, 1] -> resize -> channels -> mean/std.

Nothing here touches files; inputs are arrays of a :class:`msnet.io.CTVolume`.

>>> import numpy as np
>>> hu = np.array([[[-1350.0, -600.0, 150.0]]], dtype=np.float32)
>>> window(hu, level=-600, width=1500).round(2).tolist()
[[[0.0, 0.5, 1.0]]]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

LUNG = (-600.0, 1500.0)
MEDIASTINUM = (40.0, 400.0)
BONE = (400.0, 1800.0)
THREE_WINDOWS = [list(LUNG), list(MEDIASTINUM), list(BONE)]


def window(hu: np.ndarray | torch.Tensor, level: float, width: float):
    """Map HU to [0, 1] through a window given by level (centre) and width."""
    lo = level - width / 2.0
    if isinstance(hu, torch.Tensor):
        return ((hu - lo) / width).clamp_(0.0, 1.0)
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
    return (x - m) / s


def prepare_unit(slices: np.ndarray | torch.Tensor, kind: str, windows: Sequence[Sequence[float]], size: int) -> torch.Tensor:
    """HU/grey slices -> (n, c, size, size) in [0, 1], c = number of windows (1 or 3)."""
    return resize(to_unit(slices, kind, windows), size)


def prepare(
    slices: np.ndarray | torch.Tensor,
    kind: str,
    windows: Sequence[Sequence[float]],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """HU/grey slices (n, H, W) -> backbone input (n, 3, size, size)."""
    return normalize(to_three_channels(prepare_unit(slices, kind, windows, size)), mean, std)


def finish(unit: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[0, 1] tensor (n, 1|3, S, S) -> normalised 3-channel backbone input."""
    return normalize(to_three_channels(unit), mean, std)


def quantize(unit: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8 (compact in-memory slice cache)."""
    return (unit * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8)


def dequantize(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0)
