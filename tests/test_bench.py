"""Smoke test of bench_predict: a tiny synthetic DICOM study, the cpu config at a small input size."""

from __future__ import annotations

import pytest


from msnet.bench import bench_predict, gemm_gflops  # noqa: E402
from msnet.errors import MsnetError  # noqa: E402
from msnet.inference.export import synthetic_studies

from conftest import CAP002, NORMAL001, P001

SCANS = [P001, CAP002, NORMAL001]


def test_gemm_rate_positive() -> None:
    assert gemm_gflops(1, n=256, repeats=2) > 0.1


def test_bench_predict_smoke(tmp_path) -> None:
    study = synthetic_studies(tmp_path / "s", n=1, size=64, slices=(10, 10), seed=2)[0]
    r = bench_predict("cpu", study=study, threads=2, size=64)
    for key in ("floor_s", "naive_s", "ours_s", "fp32_s", "ours_over_floor", "fp32_over_floor", "naive_over_ours",
                "end_to_end_over_backbone", "unstreamed_over_backbone", "int8_agreement", "runs", "fastest"):
        assert key in r, key
    assert r["n_slices"] == 10 and r["backbone"] == "efficientnet_lite0" and r["size"] == 64
    assert set(r["runs"]) == {"torch", "onnx_fp32", "onnx_int8"}
    for key in ("floor_s", "naive_s", "ours_s", "ours_over_floor", "naive_over_ours", "end_to_end_over_backbone",
                "unstreamed_over_backbone"):
        assert r[key] > 0, key
    assert r["ours_s"] == min(v["end_to_end_s"] for k, v in r["runs"].items()
                              if k != "onnx_int8" or r["int8_agreement"]["ok"])
    assert r["int8_used"] == (r["fastest"] == "onnx_int8")


def test_bench_predict_bad_config(tmp_path) -> None:
    with pytest.raises(MsnetError, match="config"):
        bench_predict("gpu", study=tmp_path)


def test_bench_extract_smoke() -> None:
    from msnet.bench import bench_extract

    r = bench_extract("cpu", n_patients=2, slices=(6, 6), pixels=64, size=64)
    assert r["n_slices"] == 12 and set(r["runs"]) == {"torch", "onnx_fp32", "onnx_int8"}
    assert r["runs"]["onnx_fp32"]["cosine_min"] > 0.9999  # fp32 ONNX computes the same features
    assert all(v["slices_per_s"] > 0 for v in r["runs"].values())


def test_bench_eager_variants_compute_the_same_features(tmp_path) -> None:
    """Each eager variant is timed against the floor; an unknown one is refused by name."""
    from msnet.bench import _eager_variant, bench_eager, temp_bundle
    from msnet.inference.bundle import read_bundle

    import torch

    study = synthetic_studies(tmp_path / "s", n=1, size=64, slices=(6, 6), seed=3)[0]
    names = ("contiguous, no_grad", "channels_last, inference_mode", "oneDNN fused (TorchScript freeze)")
    r = bench_eager("cpu", study=study, size=64, batch_size=4, variants=names[:2])
    assert list(r["variants"]) == list(names[:2]) and r["n_slices"] == 6 and r["floor_s"] > 0
    assert all(v["s"] > 0 and v["over_floor"] > 0 for v in r["variants"].values()), r["variants"]
    backbone = read_bundle(temp_bundle("cpu", tmp_path / "b", size=64)).backbone.eval()
    x = torch.rand(3, 3, 64, 64)
    outs = []
    for name in names:
        run, mode, xv = _eager_variant(name, backbone, x)
        with mode():
            outs.append(run(xv))
    for out in outs[1:]:  # the variants change speed, never the features
        assert torch.allclose(out, outs[0], atol=1e-4)
    with pytest.raises(MsnetError, match="unknown variant"):
        _eager_variant("fast please", backbone, x)


def test_bench_decoders_agree_on_the_real_scans(shared_data) -> None:
    """Every installed JPEG Lossless decoder gives pydicom + pylibjpeg's stored values on the shared scans;
    imagecodecs' libjpeg-turbo (a dependency) is the default."""
    from msnet.bench import bench_decoders

    r = bench_decoders(SCANS, n_files=3, repeats=2)
    assert r["n_slices"] == 9 and r["default"] == "imagecodecs-jpeg8"
    assert {"imagecodecs-jpeg8", "imagecodecs-ljpeg", "gdcm-region"} <= set(r["decoders"])
    assert all(v["identical"] and v["ms_per_slice"] > 0 for v in r["decoders"].values())


def test_bench_extract_ct_on_real_slices(shared_data) -> None:
    """ct: the CT-pretrained slab network on the middle slices of the shared real scans, int8 calibrated
    on their other slices; medians of the repeats, the features' agreement with torch."""
    from msnet.bench import bench_extract

    r = bench_extract("ct", size=32, real_slices=4, repeats=2, studies=SCANS)
    assert r["backbone"] == "astra_slab" and r["n_studies"] == 3 and r["n_slices"] == 12
    assert r["data"].startswith("real scans") and r["calibration"].endswith("slabs")
    assert all(v["timing"]["n"] == 2 and v["timing"]["min"] <= v["seconds"] <= v["timing"]["max"]
               for v in r["runs"].values())
    assert r["runs"]["onnx_fp32"]["cosine_min"] > 0.9999 and r["runs"]["onnx_int8"]["cosine_mean"] > 0.9


def test_bench_commands_ask_for_a_study_instead_of_guessing_one() -> None:
    """No development path as a default: without a study the bench says what to pass."""
    from msnet.bench import bench_decoders, bench_extract

    with pytest.raises(MsnetError, match="--study"):
        bench_predict("cpu")
    with pytest.raises(MsnetError, match="--study"):
        bench_extract("ct")
    with pytest.raises(MsnetError, match="no studies"):
        bench_decoders([])
