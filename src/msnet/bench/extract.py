"""``msnet bench extract``: cohort extraction speed through the one SliceEncoder on every runtime."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from msnet.bench.common import REPEATS, fmt, load_average, repeated, rounded
from msnet.bench.predict import bench_backbone, bench_config, feature_cosine
from msnet.data.synthetic import synth_cohort
from msnet.errors import MsnetError
from msnet.inference.encoder import SliceEncoder
from msnet.io import read_study
from msnet.preprocess import PreprocessSpec

CT_EXTRACT_SLICES = 24
"""Slices of each real scan ``ct`` encodes by default (its middle ones)."""


def _real_volumes(n_slices: int, studies: list[Path] | None) -> tuple[list, list]:
    """(the middle ``n_slices`` slices of each real scan of ``studies``, the rest of each scan): timed
    volumes and calibration volumes that share no slice."""
    scans = [Path(s) for s in studies or []]
    if not scans:
        raise MsnetError("the ct extract bench encodes real CT scans and none was given",
                         fix="pass --study DICOM_FOLDER (repeatable, e.g. three COVID-CT-MD scans), or --synthetic")
    timed, rest = [], []
    for s in scans:
        vol = read_study(s)
        a = max(0, (vol.n_slices - n_slices) // 2)
        b = min(vol.n_slices, a + n_slices)
        timed.append(SimpleNamespace(hu=vol.hu[a:b], kind=vol.kind, n_slices=b - a))
        for part in (vol.hu[:a], vol.hu[b:]):
            if len(part):
                rest.append(SimpleNamespace(hu=part, kind=vol.kind, n_slices=len(part)))
    return timed, rest


def bench_extract(config: str = "cpu", n_patients: int = 6, slices: tuple[int, int] = (40, 60), pixels: int = 256,
                  threads: int = 2, size: int | None = None, repeats: int = REPEATS, backbone: str | None = None,
                  real: bool | None = None, real_slices: int = CT_EXTRACT_SLICES, studies: list[Path] | None = None,
                  console=None) -> dict:
    """Cohort extraction speed through the one SliceEncoder on every runtime, measured in one run: torch
    (eager), ONNX Runtime fp32 and ONNX Runtime static int8, the median of ``repeats`` each. Studies are
    read once beforehand, so only the encoding is timed: a synthetic cohort of DICOM studies, or with
    ``real`` (default for ``ct``) the middle ``real_slices`` slices of each real scan of ``studies``, int8
    calibrated on the other slices of those scans. Prints slices/s and the features' agreement with
    torch (per-slice cosine).

    e.g. bench_extract("paper", n_patients=4)
    """
    import tempfile

    import torch

    cfg = bench_config(config, size, backbone)
    real = config == "ct" if real is None else real
    torch.set_num_threads(threads)
    bb = bench_backbone(cfg)
    spec = PreprocessSpec.from_config(cfg.preprocess, bb.data_config)
    with tempfile.TemporaryDirectory(prefix="msnet-bench-extract-") as tmp:
        if real:
            vols, calib_vols = _real_volumes(real_slices, studies)
        else:
            synth_cohort(Path(tmp) / "data", n_patients=n_patients, size=pixels, slices=slices, seed=1)
            vols = [read_study(p) for p in sorted((Path(tmp) / "data").iterdir()) if p.is_dir()]
            calib_vols = vols[:3]
        n = sum(v.n_slices for v in vols)
        ref = SliceEncoder(spec, bb, batch_size=cfg.extract.batch_size, threads=threads)
        calib = ref.calibration_slices(calib_vols, 64)  # a slab network: slabs of consecutive slices
        t = time.perf_counter()
        fp32 = ref.to_onnx(Path(tmp) / "onnx", threads=threads)
        q = ref.to_onnx(Path(tmp) / "onnx", int8=True, calibration=calib, threads=threads)
        export_s = time.perf_counter() - t
        runs, feats = {}, {}
        for name, enc in (("torch", ref), ("onnx_fp32", fp32), ("onnx_int8", q)):
            enc.encode(vols[0].hu[:enc.batch_size], vols[0].kind)  # warm-up
            s, feats[name] = repeated(lambda enc=enc: [enc.encode(v.hu, v.kind) for v in vols], repeats)
            t = rounded(s)  # the median as its spread is rounded, so it always lies inside it
            runs[name] = {"seconds": t["median"], "timing": t, "slices_per_s": round(n / s["median"], 2)}
    for name in ("onnx_fp32", "onnx_int8"):
        runs[name].update(feature_cosine(torch.cat(feats["torch"]), torch.cat(feats[name])),
                          speedup_vs_torch=round(runs["torch"]["seconds"] / runs[name]["seconds"], 2))
    result = {"config": config, "backbone": cfg.backbone.name, "size": spec.size, "n_studies": len(vols),
              "n_slices": n, "data": "real scans (middle slices)" if real else "synthetic",
              "calibration": f"{len(calib)} {'slabs' if bb.whole_study else 'slices'}", "threads": threads,
              "repeats": repeats, "load_average": load_average(), "export_s": round(export_s, 2), "runs": runs}
    print_bench_extract(result, console)
    return result


def print_bench_extract(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"extract {result['n_slices']} slices of {result['n_studies']} studies "
                        f"({result.get('data', 'synthetic')}): {result['backbone']} {result['size']} px, "
                        f"{result['threads']} threads; seconds, median (min-max) of {result.get('repeats', 1)}")
    for col in ("runtime", "seconds", "slices/s", "vs torch", "feature cosine min / mean (vs torch)"):
        table.add_column(col)
    for name, r in result["runs"].items():
        cos = f"{r['cosine_min']:.5f} / {r['cosine_mean']:.5f}" if "cosine_min" in r else ""
        table.add_row(name, fmt(r["timing"]) if "timing" in r else f"{r['seconds']:.2f}", f"{r['slices_per_s']:.1f}",
                      f"{r.get('speedup_vs_torch', 1.0):.2f}x", cos)
    console.print(table)
    console.print(f"int8 calibrated on {result.get('calibration')}; export {result['export_s']} s; "
                  f"load average {result.get('load_average')}")
