"""Grad-CAM of the 3-D slab backbone: the map of a slice comes from the slab it takes its features from,
read at the slice's depth and turned back to the display plane, so it falls where the evidence is."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from msnet.inference.explain import grad_cam
from msnet.models.backbones import create
from msnet.preprocess import PreprocessSpec


def _predictor(bb, head):
    spec = PreprocessSpec(size=64, windows=((-400.0, 1200.0),), mean=(0.0,) * 3, std=(1.0,) * 3)
    return SimpleNamespace(spec=spec, bundle=SimpleNamespace(backbone=bb), head=head, device=torch.device("cpu"),
                           aggregator=None)


def _study(n: int, block: tuple[slice, slice], rows: slice) -> np.ndarray:
    """Soft-tissue slices (40 HU) with a dense block (400 HU) in the given quadrant of the given slices."""
    hu = np.full((n, 64, 64), 40.0, np.float32)
    hu[rows, block[0], block[1]] = 400.0
    return hu


def test_a_slab_map_falls_on_the_evidence_in_the_display_plane():
    torch.manual_seed(0)
    bb = create("astra_slab", pretrained=True, pool_stages=[1], slab=[4, 4]).eval()
    top_left = (slice(4, 28), slice(4, 28))
    with_block = _study(8, top_left, slice(4, 8))  # the block in the second slab only
    without = _study(8, top_left, slice(0, 0))
    spec = _predictor(bb, None).spec
    with torch.no_grad():
        f_with = bb(P_finish(spec, with_block))
        f_without = bb(P_finish(spec, without))
    direction = (f_with[5] - f_without[5])  # a head whose logit rises with the block's features
    head = torch.nn.Linear(bb.num_features, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[1] = direction / direction.norm()
    pred = _predictor(bb, head)
    unit = spec.unit(with_block[5:6], "hu")[0]
    cam = grad_cam(pred, unit, f_with, 5, 1, normalise=False, study=with_block, kind="hu")
    assert cam.shape == (64, 64) and np.isfinite(cam).all() and cam.max() > 0
    inside = np.zeros((64, 64), bool)
    inside[top_left] = True
    assert cam[inside].mean() > 2 * cam[~inside].mean()  # on the block, in the plane the slice is shown in
    mirrored = np.zeros_like(inside)
    mirrored[top_left[0], 64 - 28:64 - 4] = True  # where a map left in the weights' plane would fall
    assert cam[inside].mean() > 2 * cam[mirrored].mean()
    # a slice of the first slab (no block there) takes that slab's map, not the block's
    other = grad_cam(pred, spec.unit(with_block[1:2], "hu")[0], f_with, 1, 1, normalise=False, study=with_block)
    assert not np.allclose(other, cam)
    # without the study, a slab backbone has no map to give
    assert not grad_cam(pred, unit, f_with, 5, 1, normalise=False).any()


def P_finish(spec, hu: np.ndarray) -> torch.Tensor:
    from msnet import preprocess as P

    return P.finish(spec.unit(hu, "hu"), spec.mean, spec.std)
