"""ONNX and static int8 export of the CT-native backbones: the slab network through SlabSession, the
same features as PyTorch; int8 calibrated on real CT slices agrees with fp32 on another real scan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msnet.errors import MsnetError
from msnet.inference.encoder import SliceEncoder
from msnet.inference.onnx import SlabSession, export_backbone, ort_session, quantize_backbone
from msnet.io import read_study
from msnet.models.backbones import create
from msnet.preprocess import PreprocessSpec

from conftest import CAP002, P001


def _spec(bb, size: int) -> PreprocessSpec:
    from msnet.config import load_config

    cfg = load_config("ct")
    cfg.preprocess.size = size
    return PreprocessSpec.from_config(cfg.preprocess, bb.data_config)


def test_exported_slab_network_gives_the_torch_features(tmp_path) -> None:
    """Any study length (slabs past the ends repeat the end slices), fed whole by the encoder: the ONNX
    slab network gives PyTorch's features, slice by slice."""
    torch.manual_seed(0)
    bb = create("astra_slab", pretrained=False, pool_stages=[1, 2], slab=[4, 2]).eval()
    path = export_backbone(bb, 32, tmp_path / "slab.onnx")
    sess = ort_session(path, threads=1)
    assert isinstance(sess, SlabSession) and (sess.k, sess.stride) == (4, 2) and sess.whole_study
    for n in (1, 7, 10):
        x = torch.rand(n, 3, 32, 32)
        with torch.no_grad():
            ref = bb(x).numpy()
        got = sess.run(None, {"images": x.numpy()})[0]
        assert got.shape == ref.shape == (n, bb.num_features)
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
    spec = _spec(bb, 32)
    torch_enc = SliceEncoder(spec, bb, batch_size=3)
    onnx_enc = SliceEncoder(spec, runtime="onnx", onnx_model=path, batch_size=3)  # batch 3 < a slab: fed whole
    hu = np.random.default_rng(0).uniform(-1000, 200, (9, 40, 40)).astype(np.float32)
    np.testing.assert_allclose(onnx_enc.encode(hu).numpy(), torch_enc.encode(hu).numpy(), rtol=1e-3, atol=1e-4)


def test_slab_network_is_calibrated_on_slabs(tmp_path) -> None:
    torch.manual_seed(0)
    bb = create("astra_slab", pretrained=False, pool_stages=[1], slab=[4, 4]).eval()
    path = export_backbone(bb, 32, tmp_path / "slab.onnx")
    with pytest.raises(MsnetError, match="slabs"):
        quantize_backbone(path, tmp_path / "q.onnx", np.zeros((4, 3, 32, 32), np.float32), 0.0, 1.0)
    q = quantize_backbone(path, tmp_path / "q.onnx", np.random.rand(2, 3, 4, 32, 32).astype(np.float32), 0.0, 1.0)
    assert isinstance(ort_session(q), SlabSession)  # the slab metadata is carried over to the int8 model


@pytest.mark.parametrize("name", ["astra", "astra_slab"])
def test_int8_calibrated_on_real_ct_agrees_on_another_real_scan(tmp_path, shared_data, name) -> None:
    """The CT-pretrained network (reduced: 64 px, layer2 only), int8 calibrated on slices of cap002,
    against fp32 on the middle slices of P001: per-slice feature cosine; a wrongly calibrated model
    (calibrated on blank slices) is told apart by the same measure."""
    bb = create(name, pretrained=True, pool_stages=[2], **({"slab": [8, 8]} if name == "astra_slab" else {})).eval()
    spec = _spec(bb, 64)
    cap, p001 = read_study(CAP002), read_study(P001)
    ref = SliceEncoder(spec, bb, batch_size=8, threads=2)
    fp32 = ref.to_onnx(tmp_path / "fp32", threads=2)
    calib = ref.calibration_slices([cap], 32)  # the slab network: slabs of 8 consecutive slices
    assert calib.shape == ((4, 3, 8, 64, 64) if bb.whole_study else (32, 3, 64, 64))
    blank = np.zeros_like(calib)
    q = ref.to_onnx(tmp_path / "int8", int8=True, calibration=calib, threads=2)
    bad = ref.to_onnx(tmp_path / "blank", int8=True, calibration=blank, threads=2)
    hu = p001.hu[64:80]
    want = ref.encode(hu, p001.kind)

    def cosine(enc) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(enc.encode(hu, p001.kind), want, dim=1)

    assert cosine(fp32).min() > 0.9999
    good = cosine(q)
    assert good.min() > 0.98, good
    assert cosine(bad).mean() < good.mean() - 0.01
