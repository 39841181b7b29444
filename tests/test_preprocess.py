"""Preprocessing: windows, channels, resize and normalisation on a real CT slice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msnet import preprocess as P


@pytest.fixture(scope="module")
def real_slices(shared_data):
    from conftest import P001

    from msnet.io import read_study

    return read_study(P001).hu[70:72]


def test_lung_window_maps_air_lung_and_soft_tissue(real_slices):
    unit = P.prepare_unit(real_slices, "hu", [P.LUNG], 512)
    assert unit.shape == (2, 1, 512, 512)
    hu = torch.from_numpy(real_slices)
    assert float(unit.min()) >= 0.0 and float(unit.max()) <= 1.0
    assert torch.all(unit[:, 0][hu <= -1350] == 0.0)  # below the window: black
    assert torch.all(unit[:, 0][hu >= 150] == 1.0)  # above it: white
    lung = (hu > -900) & (hu < -700)
    assert 0.2 < float(unit[:, 0][lung].mean()) < 0.45  # parenchyma sits low in the window


def test_three_windows_give_three_different_channels(real_slices):
    x = P.prepare_unit(real_slices, "hu", P.THREE_WINDOWS, 224)
    assert x.shape == (2, 3, 224, 224)
    lung, mediastinum, bone = x[:, 0], x[:, 1], x[:, 2]
    assert float((lung - mediastinum).abs().mean()) > 0.05
    assert float(bone.mean()) < float(mediastinum.mean()) < float(lung.mean())


def test_one_window_replicated_and_normalised(real_slices):
    x = P.prepare(real_slices, "hu", [P.LUNG], 224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert x.shape == (2, 3, 224, 224)
    torch.testing.assert_close(x[:, 0], x[:, 2])
    assert -1.0 - 1e-5 <= float(x.min()) and float(x.max()) <= 1.0 + 1e-5  # [0, 1] -> [-1, 1]


def test_grey_images_skip_windowing():
    grey = np.full((1, 8, 8), 255.0, dtype=np.float32)
    grey[0, :4] = 0.0
    x = P.prepare_unit(grey, "grey", [P.LUNG], 8)
    assert x[0, 0, 0, 0] == 0.0 and x[0, 0, 7, 0] == 1.0  # 0..255 -> 0..1, no HU window
    assert torch.equal(P.dequantize(P.quantize(x)), x)
