"""ONNX export with dynamic batch and slice axes: ONNX Runtime matches PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msnet.models import aggregators, backbones
from msnet.models.aggregators import AGGREGATORS

import onnxruntime as ort

D = 48


def _run(path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregator_onnx_dynamic_slices(tmp_path, name: str) -> None:
    torch.manual_seed(0)
    agg = aggregators.create(name, in_features=D).eval()
    example = (torch.randn(2, 7, D), torch.ones(2, 7, dtype=torch.bool))
    path = backbones.export_onnx(
        agg, example, tmp_path / f"{name}.onnx", input_names=["features", "mask"], output_names=["logits"],
        dynamic_axes={"features": {0: "batch", 1: "slices"}, "mask": {0: "batch", 1: "slices"},
                      "logits": {0: "batch"}})
    for lengths in ([5, 11, 2], [150]):
        x = torch.randn(len(lengths), max(lengths), D)
        mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
        with torch.no_grad():
            expected = agg(x, mask).numpy()
        got = _run(path, {"features": x.numpy(), "mask": mask.numpy()})
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4


def test_backbone_onnx_dynamic_batch(tmp_path) -> None:
    torch.manual_seed(0)
    bb = backbones.create("resnet18").eval()
    path = backbones.export_onnx(bb, (torch.randn(2, 3, 64, 64),), tmp_path / "resnet18.onnx",
                                 input_names=["images"], output_names=["features"],
                                 dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            expected = bb(x).numpy()
        got = _run(path, {"images": x.numpy()})
        assert got.shape == (batch, 512)
        assert np.abs(got - expected).max() <= 1e-4
