"""Stage 1's training augmentation: the paper's flip and colour jitter on [0, 1] slices
(:func:`augment`), and the geometric and codec changes of uint8 slices that the UCSD recipe adds
(:func:`augment_images`), each as ``finetune`` configures it, drawn from one generator.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from msnet.config import FinetuneConfig
from msnet.data.slices import jpeg_coded
from msnet.errors import MsnetError


def augment_images(batch: torch.Tensor, ft: FinetuneConfig, gen: torch.Generator) -> torch.Tensor:
    """Geometric and codec augmentation of uint8 slices (n, c, S, S): random resized crop, small
    rotation, random down- and up-sizing, random JPEG re-encoding (each as configured, else a no-op)."""
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


def _augment_plane(im, ft: FinetuneConfig, rng: random.Random) -> torch.Tensor:
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


def augment(batch: torch.Tensor, ft: FinetuneConfig, gen: torch.Generator) -> torch.Tensor:
    """Paper augmentation on [0, 1] 3-channel slices: horizontal flip, brightness/contrast/saturation jitter."""
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
