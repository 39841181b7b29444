"""Performance measurements, reported as ratios measured in one run.

``bench_read``: reading a DICOM study to HU with :func:`msnet.io.read_study`
against a plain single-process pydicom loop (dcmread + pixel_array with
pylibjpeg + rescale, sorted by SliceLocation), best of ``repeats`` each.

``bench_train``: MS-Net training as ``msnet train`` runs it, packed :class:`MSNet` against the
padded-batch :class:`MSNetReference`, and the GEMM floor.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from msnet.errors import MsnetError

logger = logging.getLogger(__name__)


def _plain_read(study: Path) -> np.ndarray:
    """The reference: one process, pylibjpeg, SliceLocation descending (superior first)."""
    import pydicom
    from pydicom.pixels import pixel_array

    from msnet.io import AIR_HU, OUT_OF_FIELD_HU

    slices = []
    for f in sorted(p for p in Path(study).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(f)
        except Exception:
            continue
        if "PixelData" not in ds:
            continue
        arr = pixel_array(ds, decoding_plugin="pylibjpeg")
        hu = arr.astype(np.float32)
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        if slope != 1:
            hu *= np.float32(slope)
        if intercept != 0:
            hu += np.float32(intercept)
        hu[hu < OUT_OF_FIELD_HU] = AIR_HU
        slices.append((float(ds.SliceLocation), hu))
    slices.sort(key=lambda s: -s[0])
    return np.stack([s[1] for s in slices])


def run_batches(fn, x, batch_size: int) -> None:
    """``fn`` over ``x`` in slices of ``batch_size`` (a backbone over a study's preprocessed slices)."""
    for i in range(0, len(x), batch_size):
        fn(x[i:i + batch_size])


def timed(fn, device, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``; on a CUDA ``device`` synchronised before and after."""
    import torch

    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)
    out = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def backbone_floor(backbone, size: int, n_slices: int, threads: int) -> tuple[float, float, float]:
    """(FLOPs per slice, this machine's fp32 GEMM GFLOP/s, floor seconds for ``n_slices``): the backbone's
    FLOPs at the GEMM rate measured now."""
    from msnet.models.backbones import flops_per_image

    flops = flops_per_image(backbone, (3, size, size))
    gflops = gemm_gflops(threads)
    return flops, gflops, flops * n_slices / (gflops * 1e9)


def _best(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def bench_read(study: str | Path, repeats: int = 2, console=None) -> dict:
    """Time ``read_study`` against a plain pydicom loop on one study; print and return the result.

    e.g. bench_read("P001")
    {'n_slices': 148, 'ours_s': 0.6, 'plain_s': 1.8, 'ratio': 3.0, 'equal': True, ...}
    """
    import pydicom

    from msnet.io import read_study
    from msnet.io.decode import decode_file, gdcm_direct_ok, quiet_pydicom

    study = Path(study)
    if not study.is_dir():
        raise MsnetError("not a folder", study, "pass a DICOM study folder")
    with quiet_pydicom():  # cap002's GUID-style UIDs would log one line per file
        plain_s, plain = _best(lambda: _plain_read(study), repeats)
        ours_s, vol = _best(lambda: read_study(study), repeats)
    equal = bool(plain.shape == vol.hu.shape and np.array_equal(plain, vol.hu))
    first = next(p for p in sorted(study.rglob("*")) if p.is_file() and p.name.upper() != "DICOMDIR")
    header = pydicom.dcmread(first, stop_before_pixels=True)
    direct = (int(header.Rows), int(header.Columns)) if gdcm_direct_ok(header) else None
    decoder = decode_file(str(first), direct)[1]
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    result = {
        "study": str(study), "n_slices": vol.n_slices, "transfer_syntax": vol.transfer_syntax,
        "cores": cores, "repeats": repeats, "decoder": decoder,
        "ours_s": round(ours_s, 4), "plain_s": round(plain_s, 4),
        "ours_slices_per_s": round(vol.n_slices / ours_s, 1),
        "plain_slices_per_s": round(plain.shape[0] / plain_s, 1),
        "ratio": round(plain_s / ours_s, 2), "equal": equal,
    }
    print_bench_read(result, console)
    if not equal:
        raise MsnetError("read_study and the plain pydicom loop disagree on the HU array", study,
                         "report this with the study's transfer syntax and the versions of pydicom and GDCM")
    return result


def print_bench_read(result: dict, console=None) -> None:
    """Print a bench_read result as a small table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"read {result['n_slices']} slices ({result['transfer_syntax']}), "
                        f"{result['cores']} cores, best of {result['repeats']}")
    for col in ("reader", "seconds", "slices/s"):
        table.add_column(col)
    table.add_row(f"msnet.io.read_study ({result['decoder']}, worker processes)",
                  f"{result['ours_s']:.3f}", f"{result['ours_slices_per_s']:.1f}")
    table.add_row("plain pydicom loop (pylibjpeg, 1 process)",
                  f"{result['plain_s']:.3f}", f"{result['plain_slices_per_s']:.1f}")
    console.print(table)
    console.print(f"speed-up plain/ours: {result['ratio']:.2f}x; HU arrays identical: {result['equal']}")


# ------------------------------------------------------------------ predict


CONFIGS = ("paper", "cpu")


def default_study() -> Path:
    """The study timed when none is given: a real scan of the development checkout, if there is one."""
    from msnet.inference.export import SHARED_SCANS

    if not SHARED_SCANS[0].is_dir():
        raise MsnetError("no study to time", fix="pass --study PATH (a DICOM study folder, e.g. a COVID-CT-MD scan)")
    return SHARED_SCANS[0]


def temp_bundle(config: str, folder: Path, size: int | None = None, seed: int = 0) -> Path:
    """A complete bundle with a random-init backbone and MS-Net for a packaged config (speed only)."""
    import tempfile

    import torch

    from msnet.config import load_config, versions
    from msnet.inference import bundle as B
    from msnet.models import aggregators, backbones
    from msnet.preprocess import PreprocessSpec

    if config not in CONFIGS:
        raise MsnetError(f"unknown bench config {config!r}", fix=f"use one of: {', '.join(CONFIGS)}")
    cfg = load_config(config)
    if size:
        cfg.preprocess.size = int(size)
    torch.manual_seed(seed)
    bb = backbones.create(cfg.backbone.name, pretrained=False).eval()
    agg = aggregators.create("msnet", bb.num_features, n_classes=len(cfg.data.classes)).eval()
    spec = PreprocessSpec.from_config(cfg.preprocess, bb.data_config)
    classes = list(cfg.data.classes)
    with tempfile.TemporaryDirectory(prefix="msnet-bench-ckpt-") as tmp:
        B.save_backbone(Path(tmp) / B.BACKBONE, bb, spec, classes)
        B.save_aggregator(Path(tmp) / B.AGGREGATOR, agg, "msnet", classes, spec)
        card = B.model_card(spec, classes, backbone={"name": cfg.backbone.name, "fine_tuned": False},
                            aggregator={"name": "msnet"}, training_data={"cohort": ""}, metrics={},
                            versions=versions(), name=f"bench-{cfg.backbone.name}-msnet")
        card["intended_use"] = "speed measurement only (random weights)"
        return B.write_bundle(folder, Path(tmp) / B.BACKBONE, Path(tmp) / B.AGGREGATOR, card)


def gemm_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """fp32 GEMM throughput of this machine (best of ``repeats`` n x n matmuls), GFLOP/s."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, _ = _best(lambda: torch.mm(a, b), repeats)
    return 2.0 * n**3 / best / 1e9


def _naive(study: Path, bundle: Path, batch: int = 32) -> tuple[float, dict]:
    """Plain PyTorch: pydicom loop, stack, window, resize, eager fp32 backbone in batches of 32, no overlap."""
    import torch

    from msnet.inference.bundle import load_backbone

    backbone, _, spec, _ = load_backbone(bundle / "backbone.pt")
    backbone = backbone.to(memory_format=torch.contiguous_format)
    t0 = time.perf_counter()
    hu = _plain_read(study)
    t1 = time.perf_counter()
    x = spec.prepare(hu, "hu")
    t2 = time.perf_counter()
    with torch.inference_mode():
        feats = torch.cat([backbone(x[i:i + batch]) for i in range(0, len(x), batch)])
    t3 = time.perf_counter()
    return t3 - t0, {"read": t1 - t0, "preprocess": t2 - t1, "backbone": t3 - t2, "features": feats}


def _backbone_only(predictor, x) -> float:
    """Seconds for the predictor's backbone over preprocessed slices, in its batch size (no read, no preprocess)."""
    enc = predictor.encoder
    enc.embed(x[:enc.batch_size])  # warm-up outside the timing
    t = time.perf_counter()
    run_batches(enc.embed, x, enc.batch_size)
    return time.perf_counter() - t


def _measure(name: str, predictor, study: Path, x, repeats: int, runs: dict) -> None:
    """End to end (read -> prediction; streamed, and with the whole read first) and backbone-only seconds of
    one predictor, best of ``repeats``."""
    _backbone_only(predictor, x[: predictor.batch_size])  # warm-up (kernels, ORT arenas)
    e2e, res = _best(lambda: predictor.predict(study), repeats)
    bb, _ = _best(lambda: _backbone_only(predictor, x), repeats)
    stream, predictor.stream = predictor.stream, False
    try:
        whole, _ = _best(lambda: predictor.predict(study), repeats)
    finally:
        predictor.stream = stream
    runs[name] = {"end_to_end_s": e2e, "backbone_only_s": bb, "unstreamed_s": whole, "timing_s": res.timing_s,
                  "prediction": res.prediction, "probabilities": res.probabilities}


def _int8_verdict(runs: dict, export_result: dict, classes: list[str]) -> dict:
    """int8 is used only where it agrees with fp32 on the synthetic check studies and on this study."""
    a, b = runs["torch"], runs["onnx_int8"]
    on_study = {"n_studies": 1, "all_same_class": a["prediction"] == b["prediction"],
                "max_prob_diff": max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in classes)}
    agreement = {"synthetic": export_result["int8"], "study": on_study}
    agreement["ok"] = bool(export_result["int8"]["ok"] and on_study["all_same_class"]
                           and on_study["max_prob_diff"] <= export_result["int8"]["tolerance"])
    return agreement


def _summary(runs: dict, agreement: dict | None, floor_s: float, naive_s: float) -> dict:
    fp32 = min(("torch", "onnx_fp32"), key=lambda k: runs[k]["end_to_end_s"])
    usable = [k for k in runs if k != "onnx_int8" or (agreement and agreement["ok"])]
    best = min(usable, key=lambda k: runs[k]["end_to_end_s"])
    ours_s = runs[best]["end_to_end_s"]
    return {
        "runs": {k: {**{m: round(v, 3) for m, v in r.items() if m in ("end_to_end_s", "backbone_only_s", "unstreamed_s")},
                     "timing_s": {m: round(v, 3) for m, v in r["timing_s"].items()},
                     "prediction": r["prediction"]} for k, r in runs.items()},
        "fastest": best, "ours_s": round(ours_s, 3), "fp32": fp32, "fp32_s": round(runs[fp32]["end_to_end_s"], 3),
        "ours_over_floor": round(ours_s / floor_s, 3),
        "fp32_over_floor": round(runs[fp32]["end_to_end_s"] / floor_s, 3),
        "naive_over_ours": round(naive_s / ours_s, 3),
        "end_to_end_over_backbone": round(ours_s / runs[best]["backbone_only_s"], 3),
        "unstreamed_over_backbone": round(runs[best]["unstreamed_s"] / runs[best]["backbone_only_s"], 3),
        "int8_agreement": agreement, "int8_used": best == "onnx_int8",
    }


def bench_predict(config: str = "cpu", study: Path | None = None, threads: int = 2, repeats: int = 1,
                  batch_size: int = 16, size: int | None = None, int8: bool = True, console=None) -> dict:
    """Time one study's prediction: floor (FLOPs / GEMM rate), naive eager PyTorch, and Predictor
    (torch, ONNX Runtime fp32, ONNX Runtime static int8) end to end and backbone only; print and return.

    Uses a temporary bundle with random weights (speed does not depend on them). ``size`` overrides the
    config's input size (for quick smoke runs).

    e.g. bench_predict("paper")
    {'n_slices': 148, 'floor_s': 7.4, 'naive_s': 19.0, 'ours_s': 5.4, ...}
    """
    import tempfile

    import torch

    from msnet.inference.export import SHARED_SCANS, export_bundle
    from msnet.inference.predictor import Predictor
    from msnet.io import read_study
    from msnet.io.decode import quiet_pydicom

    study = Path(study) if study else default_study()
    if not study.exists():
        raise MsnetError("no such study", study, "pass a DICOM study folder")
    torch.set_num_threads(threads)
    opts = {"device": "cpu", "batch_size": batch_size, "threads": threads}
    with tempfile.TemporaryDirectory(prefix="msnet-bench-") as tmp, quiet_pydicom():
        bundle = temp_bundle(config, Path(tmp) / "bundle", size=size)
        ref = Predictor(bundle, runtime="torch", **opts)
        vol = read_study(study)  # also starts the decode pool, as in a long-running service
        flops, gflops, floor_s = backbone_floor(ref.bundle.backbone, ref.spec.size, vol.n_slices, threads)
        _, (naive_s, naive) = _best(lambda: _naive(study, bundle), repeats)
        x = ref.spec.prepare(vol.hu, vol.kind)
        runs: dict[str, dict] = {}
        _measure("torch", ref, study, x, repeats, runs)
        calib = [s for s in SHARED_SCANS[1:] if s.is_dir() and s.resolve() != study.resolve()] or [study]
        t = time.perf_counter()
        exp = export_bundle(bundle, int8=int8, calibration=calib, check_studies=[], n_calibration=64)
        export_s = time.perf_counter() - t
        _measure("onnx_fp32", Predictor(bundle, runtime="onnx", **opts), study, x, repeats, runs)
        agreement = None
        if int8:
            _measure("onnx_int8", Predictor(bundle, runtime="onnx", int8=True, **opts), study, x, repeats, runs)
            agreement = _int8_verdict(runs, exp, ref.classes)
    result = {
        "config": config, "backbone": ref.metadata["backbone"]["name"], "size": ref.spec.size, "study": str(study),
        "n_slices": vol.n_slices, "threads": threads, "batch_size": batch_size, "repeats": repeats,
        "gflops_per_slice": round(flops / 1e9, 3), "gemm_gflops": round(gflops, 1),
        "floor_s": round(floor_s, 3), "naive_s": round(naive_s, 3),
        "naive_stages_s": {k: round(v, 3) for k, v in naive.items() if k != "features"},
        "export_s": round(export_s, 2), **_summary(runs, agreement, floor_s, naive_s),
    }
    print_bench_predict(result, console)
    return result


def print_bench_predict(result: dict, console=None) -> None:
    """Print a bench_predict result as a table and the headline ratios."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"predict one study: {result['backbone']} {result['size']} px, {result['n_slices']} slices, "
                        f"{result['threads']} threads, batch {result['batch_size']}")
    for col in ("path", "end to end s", "whole read first s", "backbone only s", "read s", "prediction"):
        table.add_column(col)
    table.add_row(f"floor: {result['gflops_per_slice']} GFLOP/slice at {result['gemm_gflops']} GFLOP/s (fp32 GEMM)",
                  f"{result['floor_s']:.2f}", "", "", "", "")
    st = result["naive_stages_s"]
    table.add_row("naive: pydicom loop + eager fp32, batch 32", f"{result['naive_s']:.2f}", "", f"{st['backbone']:.2f}",
                  f"{st['read']:.2f}", "")
    for name, r in result["runs"].items():
        table.add_row(f"Predictor {name} (streamed)", f"{r['end_to_end_s']:.2f}", f"{r['unstreamed_s']:.2f}",
                      f"{r['backbone_only_s']:.2f}", f"{r['timing_s']['read']:.2f}", r["prediction"])
    console.print(table)
    console.print(f"fastest: {result['fastest']} {result['ours_s']:.2f} s; ours/floor {result['ours_over_floor']:.2f}; "
                  f"fp32 ({result['fp32']})/floor {result['fp32_over_floor']:.2f}; naive/ours "
                  f"{result['naive_over_ours']:.2f}x; end-to-end/backbone-only {result['end_to_end_over_backbone']:.2f} "
                  f"(whole read first: {result['unstreamed_over_backbone']:.2f})")
    ag = result.get("int8_agreement")
    if ag:
        s, st = ag["synthetic"], ag["study"]
        console.print(f"int8 agreement: synthetic {s['n_studies']} studies same class {s['all_same_class']}, "
                      f"max prob diff {s['max_prob_diff']:.4f}; this study same class {st['all_same_class']}, "
                      f"max prob diff {st['max_prob_diff']:.4f} -> {'used' if ag['ok'] else 'NOT used'}")


_RSS_CHILD = """
import json, resource, sys
from msnet.inference.predictor import Predictor
bundle, study, runtime, int8 = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
stream = len(sys.argv) < 6 or sys.argv[5] == "1"
r = Predictor(bundle, device="cpu", runtime=runtime, int8=int8, threads=2, stream=stream).predict(study)
from msnet.io.decode import shutdown_pool
shutdown_pool()
def hwm():  # VmHWM starts afresh at exec; ru_maxrss would carry the parent's peak over
    try:
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"self_mb": hwm(),
                  "children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "n_slices": r.n_slices, "total_s": r.timing_s["total"]}))
"""


def peak_rss(config: str = "paper", n_slices: int = 200, pixels: int = 512, runtime: str = "torch",
             int8: bool = False, stream: bool = True) -> dict:
    """Peak resident memory (MB) of one ``Predictor.predict`` (streamed decode, or with ``stream=False`` the
    whole read first) on a synthetic study, in a fresh subprocess.

    ``self_mb`` is the predicting process (VmHWM), ``children_mb`` the largest decode worker
    (ru_maxrss, counting pages shared with the parent at fork).

    e.g. peak_rss("paper", 200)["self_mb"] < 2048
    True
    """
    import subprocess
    import sys
    import tempfile

    from msnet.inference.export import export_bundle
    from msnet.data.synthetic import synth_cohort

    with tempfile.TemporaryDirectory(prefix="msnet-rss-") as tmp:
        tmp = Path(tmp)
        bundle = temp_bundle(config, tmp / "bundle")
        synth_cohort(tmp / "data", n_patients=1, size=pixels, slices=(n_slices, n_slices))
        study = next(p for p in (tmp / "data").iterdir() if p.is_dir())
        if runtime == "onnx":
            export_bundle(bundle, int8=int8, calibration=[study], check_studies=[], n_calibration=32)
        out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(bundle), str(study), runtime, "1" if int8 else "0",
                              "1" if stream else "0"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise MsnetError(f"peak-memory run failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update({"config": config, "runtime": runtime, "int8": int8, "pixels": pixels, "stream": stream})
    return result


# ------------------------------------------------------------------ extract


def bench_extract(config: str = "cpu", n_patients: int = 6, slices: tuple[int, int] = (40, 60), pixels: int = 256,
                  threads: int = 2, size: int | None = None, console=None) -> dict:
    """Cohort extraction speed through the one SliceEncoder on every runtime, measured in one run: torch
    (eager, channels_last), ONNX Runtime fp32 and ONNX Runtime static int8, on a synthetic cohort of real
    DICOM studies (read once beforehand, so only the encoding is timed). Prints slices/s and the int8
    features' agreement with fp32 (per-slice cosine).

    e.g. bench_extract("paper", n_patients=4)
    """
    import tempfile

    import torch

    from msnet.config import load_config
    from msnet.data.synthetic import synth_cohort
    from msnet.inference.encoder import SliceEncoder
    from msnet.io import read_study
    from msnet.models import backbones
    from msnet.preprocess import PreprocessSpec

    if config not in CONFIGS:
        raise MsnetError(f"unknown bench config {config!r}", fix=f"use one of: {', '.join(CONFIGS)}")
    torch.set_num_threads(threads)
    cfg = load_config(config)
    if size:
        cfg.preprocess.size = int(size)
    bb = backbones.create(cfg.backbone.name, pretrained=False).eval()
    spec = PreprocessSpec.from_config(cfg.preprocess, bb.data_config)
    with tempfile.TemporaryDirectory(prefix="msnet-bench-extract-") as tmp:
        synth_cohort(Path(tmp) / "data", n_patients=n_patients, size=pixels, slices=slices, seed=1)
        vols = [read_study(p) for p in sorted((Path(tmp) / "data").iterdir()) if p.is_dir()]
        n = sum(v.n_slices for v in vols)
        ref = SliceEncoder(spec, bb, batch_size=cfg.extract.batch_size, threads=threads)
        t = time.perf_counter()
        fp32 = ref.to_onnx(Path(tmp) / "onnx", threads=threads)
        q = ref.to_onnx(Path(tmp) / "onnx", int8=True, calibration=ref.calibration_slices(vols[:3], 64), threads=threads)
        export_s = time.perf_counter() - t
        runs, feats = {}, {}
        for name, enc in (("torch", ref), ("onnx_fp32", fp32), ("onnx_int8", q)):
            enc.encode(vols[0].hu[:enc.batch_size], vols[0].kind)  # warm-up
            t = time.perf_counter()
            feats[name] = [enc.encode(v.hu, v.kind) for v in vols]
            runs[name] = {"seconds": round(time.perf_counter() - t, 3)}
            runs[name]["slices_per_s"] = round(n / runs[name]["seconds"], 2)
    for name in ("onnx_fp32", "onnx_int8"):
        cos = torch.cat([torch.nn.functional.cosine_similarity(a, b, dim=1) for a, b in zip(feats["torch"], feats[name])])
        runs[name].update(cosine_min=round(float(cos.min()), 5), cosine_mean=round(float(cos.mean()), 5),
                          speedup_vs_torch=round(runs["torch"]["seconds"] / runs[name]["seconds"], 2))
    result = {"config": config, "backbone": cfg.backbone.name, "size": spec.size, "n_studies": len(vols), "n_slices": n,
              "threads": threads, "export_s": round(export_s, 2), "runs": runs}
    print_bench_extract(result, console)
    return result


def print_bench_extract(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"extract {result['n_slices']} slices of {result['n_studies']} studies: {result['backbone']} "
                        f"{result['size']} px, {result['threads']} threads")
    for col in ("runtime", "seconds", "slices/s", "vs torch", "feature cosine min / mean (vs torch)"):
        table.add_column(col)
    for name, r in result["runs"].items():
        cos = f"{r['cosine_min']:.5f} / {r['cosine_mean']:.5f}" if "cosine_min" in r else ""
        table.add_row(name, f"{r['seconds']:.2f}", f"{r['slices_per_s']:.1f}", f"{r.get('speedup_vs_torch', 1.0):.2f}x", cos)
    console.print(table)


# ------------------------------------------------------------------ train


def msnet_flops_per_slice(in_features: int, width: int = 64, n_blocks: int = 4, kernel_size: int = 3
                          ) -> tuple[float, float]:
    """FLOPs (2 x multiply-adds) per slice of MS-Net's convolutions: (forward, one training step).

    A training step is the forward pass plus the backward pass: gradients of the weights of every
    conv and of the inputs of every conv but the first (the features need none).

    >>> msnet_flops_per_slice(2048)
    (409600.0, 966656.0)
    """
    stem = 2.0 * in_features * width
    rest = 2.0 * width * width * (n_blocks * (kernel_size + 1) + 2)
    return stem + rest, 2 * stem + 3 * rest


def _synthetic_features(patients: int, d: int, slices: tuple[int, int], n_classes: int, seed: int
                        ) -> tuple[list, "torch.Tensor"]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(slices[0], slices[1] + 1, (patients,), generator=g).tolist()
    feats = [torch.randn(n, d, generator=g).relu_() for n in lengths]  # like pooled CNN features: >= 0
    labels = torch.arange(patients) % n_classes
    return feats, labels[torch.randperm(patients, generator=g)]


def _expected_rows(seqs: list, crop_prob: float, min_fraction: float) -> float:
    """Mean number of slices an epoch of ``fit`` feeds: each study whole, or with probability
    ``crop_prob`` a crop of uniform length in [ceil(n * min_fraction), n]."""
    total = 0.0
    for s in seqs:
        n = s.shape[0]
        lo = max(1, int(np.ceil(n * min_fraction)))
        total += (1 - crop_prob) * n + crop_prob * (lo + n) / 2
    return total


def bench_train(patients: int = 300, epochs: int = 100, measure_epochs: int = 5, features: int = 2048,
                slices: tuple[int, int] = (100, 200), batch_size: int = 8, threads: int = 2, seed: int = 0,
                console=None) -> dict:
    """Time MS-Net training as ``msnet train`` runs it (``stages.train.fit``: Adam, batch 8, random crops,
    class weights, validation every epoch) on synthetic features, for :class:`~msnet.models.aggregators.MSNet`
    and for the naive :class:`~msnet.models.aggregators.MSNetReference` (padded batch, mask after every
    layer: MS-Net as it was written first), in the same run, against the GEMM floor; print and return.

    Both train ``measure_epochs`` epochs from the same initial weights and seed; times for ``epochs``
    are extrapolated from them when ``measure_epochs < epochs``. 20 % of the patients are the
    validation set, as ``msnet train`` carves it. Also reported: how far the two runs' losses and
    final weights are apart (the same training, up to float rounding).

    e.g. bench_train(patients=300, epochs=100)
    {'ours_s_per_epoch': 0.3, 'naive_s_per_epoch': 1.4, 'naive_over_ours': 4.6, ...}
    """
    import torch

    from msnet.config import Config
    from msnet.data.splits import carve
    from msnet.models.aggregators import MSNet, MSNetReference
    from msnet.stages.train import fit

    if patients < 4 or epochs < 1 or measure_epochs < 1 or slices[0] < 1 or slices[1] < slices[0]:
        raise MsnetError(f"bench train needs >= 4 patients, >= 1 epoch and 1 <= min slices <= max slices; got "
                         f"patients={patients}, epochs={epochs}, measure_epochs={measure_epochs}, slices={slices}",
                         fix="e.g. --patients 300 --epochs 100 --measure-epochs 5")
    n_classes = 3
    measured = min(measure_epochs, epochs)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        feats, labels = _synthetic_features(patients, features, slices, n_classes, seed)
        ids = [f"p{i:04d}" for i in range(patients)]
        cfg = Config()
        cfg.train.batch_size = batch_size
        train_ids, val_ids = carve(ids, [int(y) for y in labels], cfg.train.val_fraction, seed)
        pos = {p: i for i, p in enumerate(ids)}
        tx, ty = [feats[pos[p]] for p in train_ids], labels[[pos[p] for p in train_ids]]
        vx, vy = [feats[pos[p]] for p in val_ids], labels[[pos[p] for p in val_ids]]

        def train(cls, n_epochs: int, x=tx, y=ty, v=vx, w=vy) -> tuple[float, dict, list[dict], "torch.nn.Module"]:
            cfg.train.epochs = n_epochs
            torch.manual_seed(seed)
            model = cls(features, n_classes=n_classes)
            t = time.perf_counter()
            best, history = fit(model, x, y, v, w, cfg, n_classes, seed)
            return time.perf_counter() - t, best, history, model

        for cls in (MSNet, MSNetReference):  # warm-up: lazy imports, oneDNN kernels
            train(cls, 1, tx[:2 * batch_size], ty[:2 * batch_size], vx[:batch_size], vy[:batch_size])
        ours_t, _, ours_hist, ours_model = train(MSNet, measured)
        naive_t, _, naive_hist, naive_model = train(MSNetReference, measured)
        gflops = gemm_gflops(threads)
    finally:
        torch.set_num_threads(threads_before)
    fwd, step = msnet_flops_per_slice(features)
    rows = _expected_rows(tx, cfg.train.crop_prob, cfg.train.crop_min_fraction)
    flops_epoch = rows * step + sum(s.shape[0] for s in vx) * fwd
    floor_epoch = flops_epoch / (gflops * 1e9)
    ours_epoch, naive_epoch = ours_t / measured, naive_t / measured
    loss_diff = max(abs(a[k] - b[k]) for a, b in zip(ours_hist, naive_hist) for k in ("train_loss", "val_loss"))
    weight_diff = max(float((a - b).abs().max()) for a, b in zip(ours_model.state_dict().values(),
                                                                 naive_model.state_dict().values()))
    result = {
        "patients": patients, "train_patients": len(tx), "val_patients": len(vx), "features": features,
        "slices": list(slices), "batch_size": batch_size, "threads": threads, "epochs": epochs,
        "measured_epochs": measured, "extrapolated": measured < epochs,
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "gemm_gflops": round(gflops, 1), "gflop_per_epoch": round(flops_epoch / 1e9, 2),
        "floor_s_per_epoch": round(floor_epoch, 4), "ours_s_per_epoch": round(ours_epoch, 4),
        "naive_s_per_epoch": round(naive_epoch, 4),
        "floor_s": round(floor_epoch * epochs, 2), "ours_s": round(ours_epoch * epochs, 2),
        "naive_s": round(naive_epoch * epochs, 2),
        "naive_over_ours": round(naive_epoch / ours_epoch, 2), "ours_over_floor": round(ours_epoch / floor_epoch, 2),
        "naive_over_floor": round(naive_epoch / floor_epoch, 2),
        "max_loss_diff": loss_diff, "max_weight_diff": weight_diff,
        "same_val_accuracy": all(a["val_accuracy"] == b["val_accuracy"] for a, b in zip(ours_hist, naive_hist)),
    }
    print_bench_train(result, console)
    return result


def print_bench_train(result: dict, console=None) -> None:
    """Print a bench_train result as a table and the headline ratios."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    r = result
    how = (f"measured over {r['measured_epochs']} epochs, times for {r['epochs']} extrapolated"
           if r["extrapolated"] else f"measured over all {r['epochs']} epochs")
    table = Table(title=f"train MS-Net: {r['patients']} patients ({r['train_patients']} train, {r['val_patients']} val), "
                        f"{r['slices'][0]}-{r['slices'][1]} slices x {r['features']} features, batch {r['batch_size']}, "
                        f"Adam, {r['threads']} threads; {how}")
    for col in ("", "s / epoch", f"s / {r['epochs']} epochs", "x floor"):
        table.add_column(col)
    table.add_row(f"floor: {r['gflop_per_epoch']} GFLOP/epoch at {r['gemm_gflops']} GFLOP/s (fp32 GEMM)",
                  f"{r['floor_s_per_epoch']:.3f}", f"{r['floor_s']:.1f}", "1.00")
    table.add_row("naive: MSNetReference (padded batch, mask after every layer)", f"{r['naive_s_per_epoch']:.3f}",
                  f"{r['naive_s']:.1f}", f"{r['naive_over_floor']:.2f}")
    table.add_row("ours: MSNet (packed, no padding)", f"{r['ours_s_per_epoch']:.3f}", f"{r['ours_s']:.1f}",
                  f"{r['ours_over_floor']:.2f}")
    console.print(table)
    console.print(f"naive/ours {r['naive_over_ours']:.2f}x; ours/floor {r['ours_over_floor']:.2f}; same training: "
                  f"max loss difference {r['max_loss_diff']:.1e}, max weight difference {r['max_weight_diff']:.1e}, "
                  f"same validation accuracy every epoch: {r['same_val_accuracy']}; load average {r['load_average']}")


EAGER_VARIANTS = ("contiguous, no_grad", "channels_last, no_grad", "channels_last, inference_mode",
                  "oneDNN fused (TorchScript freeze)", "torch.compile")
"""The eager-backbone variants :func:`bench_eager` times; the Predictor's torch runtime is the third."""


def _eager_variant(name: str, backbone, x):
    """(callable over one batch, input of that batch's memory format) for one of :data:`EAGER_VARIANTS`."""
    import copy

    import torch

    model = copy.deepcopy(backbone).eval()
    if name not in EAGER_VARIANTS:
        raise MsnetError(f"unknown variant {name!r}", fix=f"use one of: {', '.join(EAGER_VARIANTS)}")
    if name.startswith("contiguous"):
        return (lambda b: model(b)), torch.no_grad, x.contiguous()
    x = x.contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    if name == "channels_last, no_grad":
        return (lambda b: model(b)), torch.no_grad, x
    if name == "channels_last, inference_mode":
        return (lambda b: model(b)), torch.inference_mode, x
    if name.startswith("oneDNN"):
        with torch.no_grad():
            traced = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, x[:2])))
        return (lambda b: traced(b)), torch.no_grad, x
    compiled = torch.compile(model)
    return (lambda b: compiled(b)), torch.inference_mode, x


def bench_eager(config: str = "paper", study: Path | None = None, threads: int = 2, batch_size: int = 16,
                repeats: int = 1, variants: tuple[str, ...] = EAGER_VARIANTS, size: int | None = None,
                console=None) -> dict:
    """The eager PyTorch backbone over one study's preprocessed slices, one variant at a time (memory
    format, inference mode, oneDNN fusion through TorchScript freezing, torch.compile), each against
    the GEMM floor measured in the same run. Failures of a variant (e.g. no C++ compiler for
    torch.compile) are reported, not raised."""
    import tempfile

    import torch

    from msnet.inference.predictor import Predictor
    from msnet.io import read_study
    from msnet.io.decode import quiet_pydicom

    study = Path(study) if study else default_study()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="msnet-bench-") as tmp, quiet_pydicom():
        pred = Predictor(temp_bundle(config, Path(tmp) / "bundle", size=size), device="cpu", threads=threads,
                         batch_size=batch_size)
        vol = read_study(study)
        x = pred.spec.prepare(vol.hu, vol.kind)
        _, _, floor_s = backbone_floor(pred.bundle.backbone, pred.spec.size, vol.n_slices, threads)
        rows = {}
        for name in variants:
            try:
                t = time.perf_counter()
                run, mode, xv = _eager_variant(name, pred.bundle.backbone, x)
                with mode():
                    run(xv[:batch_size])  # warm-up (and the compilation, timed apart)
                    setup_s = time.perf_counter() - t

                    s, _ = _best(lambda: run_batches(run, xv, batch_size), repeats)
                rows[name] = {"s": round(s, 3), "over_floor": round(s / floor_s, 3), "setup_s": round(setup_s, 1)}
            except Exception as exc:  # a variant this machine cannot run
                rows[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"}
    result = {"config": config, "backbone": pred.metadata["backbone"]["name"], "size": pred.spec.size,
              "n_slices": vol.n_slices, "threads": threads, "batch_size": batch_size,
              "floor_s": round(floor_s, 3), "variants": rows}
    _print_eager(result, console)
    return result


def _print_eager(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"eager {result['backbone']} at {result['size']} px, {result['n_slices']} slices, "
                        f"{result['threads']} threads, batch {result['batch_size']}; floor {result['floor_s']} s")
    for col in ("variant", "backbone s", "vs floor", "set-up s"):
        table.add_column(col)
    for name, r in result["variants"].items():
        if "error" in r:
            table.add_row(name, r["error"], "", "")
        else:
            table.add_row(name, f"{r['s']:.2f}", f"{r['over_floor']:.2f}", f"{r['setup_s']:.1f}")
    console.print(table)
