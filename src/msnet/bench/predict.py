"""``msnet bench predict``: one study's prediction from files, against the FLOP floor and a naive eager
loop, on every runtime (torch, ONNX Runtime fp32 and static int8); medians over ``repeats``. Also the
temporary bundles the other bench commands time, and :func:`peak_rss`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from msnet.bench.common import (
    REPEATS,
    backbone_floor,
    default_study,
    fmt,
    load_average,
    repeated,
    rounded,
    summary,
)
from msnet.bench.read import _plain_read
from msnet.config import load_config, versions
from msnet.data.synthetic import synth_cohort
from msnet.errors import MsnetError
from msnet.inference import bundle as B
from msnet.inference.bundle import load_backbone
from msnet.inference.export import export_bundle
from msnet.inference.predictor import Predictor
from msnet.io import read_study
from msnet.io.decode import quiet_pydicom
from msnet.models import aggregators, backbones
from msnet.models.astra import CT_NATIVE
from msnet.preprocess import PreprocessSpec

CONFIGS = ("paper", "cpu", "ct")
CT_SLICES = 32
"""Slices of the study ``ct`` times by default (the middle ones, in order): its ResNet-152 takes about
0.27 s a slice on one thread in eager fp32, so a whole scan times out a bench of three runtimes."""


def bench_config(config: str, size: int | None = None, backbone: str | None = None):
    """The packaged config a bench times, with the input ``size`` and the ``backbone`` overridden (e.g.
    ``ct`` with ``astra``: the 2-D network instead of the slab one; its slab setting dropped)."""

    if config not in CONFIGS:
        raise MsnetError(f"unknown bench config {config!r}", fix=f"use one of: {', '.join(CONFIGS)}")
    cfg = load_config(config)
    if size:
        cfg.preprocess.size = int(size)
    if backbone:
        cfg.backbone.name = backbone
        if backbone != "astra_slab":
            cfg.backbone.slab = []
    return cfg


def bench_backbone(cfg):
    """The config's backbone: CT-native weights (offline, from their package) where the config has them,
    so that the int8 agreement is measured on the real network; random weights otherwise (speed only)."""

    pretrained = cfg.backbone.name in CT_NATIVE and cfg.backbone.pretrained
    return backbones.create(cfg.backbone.name, pretrained=pretrained, **cfg.backbone.pooling()).eval()


def middle_slices(study: Path, n: int | None, folder: Path) -> Path:
    """``study`` itself, or with ``n`` a folder of links to its ``n`` middle slices (in slice order)."""
    import pydicom

    files = sorted(p for p in Path(study).rglob("*") if p.is_file() and p.name.upper() != "DICOMDIR")
    if not n or n >= len(files):
        return Path(study)
    with quiet_pydicom():
        heads = [pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["ImagePositionPatient", "SliceLocation"])
                 for f in files]
    z = [float(h.ImagePositionPatient[2]) if "ImagePositionPatient" in h else float(h.get("SliceLocation", i))
         for i, h in enumerate(heads)]
    order = sorted(range(len(files)), key=lambda i: z[i])
    start = (len(files) - n) // 2
    folder.mkdir(parents=True, exist_ok=True)
    for i in order[start:start + n]:
        (folder / files[i].name).symlink_to(files[i].resolve())
    return folder


def temp_bundle(config: str, folder: Path, size: int | None = None, seed: int = 0, backbone: str | None = None) -> Path:
    """A complete bundle with a random-init MS-Net for a packaged config (speed only): a random-init
    backbone, or the CT-native weights for a CT-native backbone (:func:`bench_backbone`)."""
    import tempfile

    import torch

    cfg = bench_config(config, size, backbone)
    torch.manual_seed(seed)
    bb = bench_backbone(cfg)
    agg = aggregators.create("msnet", bb.num_features, n_classes=len(cfg.data.classes)).eval()
    spec = PreprocessSpec.from_config(cfg.preprocess, bb.data_config)
    classes = list(cfg.data.classes)
    with tempfile.TemporaryDirectory(prefix="msnet-bench-ckpt-") as tmp:
        B.save_backbone(Path(tmp) / B.BACKBONE, bb, spec, classes)
        B.save_aggregator(Path(tmp) / B.AGGREGATOR, agg, "msnet", classes, spec)
        card = B.model_card(spec, classes, backbone={"name": cfg.backbone.name, "fine_tuned": False},
                            aggregator={"name": "msnet"}, training_data={"cohort": ""}, metrics={},
                            versions=versions(), name=f"bench-{cfg.backbone.name}-msnet")
        card["intended_use"] = "speed measurement only (random weights of MS-Net)"
        return B.write_bundle(folder, Path(tmp) / B.BACKBONE, Path(tmp) / B.AGGREGATOR, card)


def _naive(study: Path, bundle: Path, batch: int = 32) -> tuple[float, dict]:
    """Plain PyTorch: pydicom loop, stack, window, resize, eager fp32 backbone in batches of 32 (a slab
    network: the study at once), no overlap."""
    import torch

    backbone, _, spec, _ = load_backbone(bundle / "backbone.pt")
    backbone = backbone.to(memory_format=torch.contiguous_format)
    t0 = time.perf_counter()
    hu = _plain_read(study)
    t1 = time.perf_counter()
    x = spec.prepare(hu, "hu")
    t2 = time.perf_counter()
    step = len(x) if getattr(backbone, "whole_study", False) else batch  # a slab network: the study at once
    with torch.inference_mode():
        feats = torch.cat([backbone(x[i:i + step]) for i in range(0, len(x), step)])
    t3 = time.perf_counter()
    return t3 - t0, {"read": t1 - t0, "preprocess": t2 - t1, "backbone": t3 - t2, "features": feats}


def _backbone_only(predictor, x):
    """(seconds, features) of the predictor's backbone over preprocessed slices, in its batch size (a slab
    network: the study at once), no read, no preprocess."""
    import torch

    enc = predictor.encoder
    whole = getattr(enc.backbone if enc.runtime == "torch" else enc._session, "whole_study", False)
    step = len(x) if whole else enc.batch_size
    t = time.perf_counter()
    feats = [enc.embed(x[i:i + step]) for i in range(0, len(x), step)]
    return time.perf_counter() - t, torch.cat(feats)


def _measure(name: str, predictor, study: Path, x, repeats: int, runs: dict) -> None:
    """End to end (read -> prediction; streamed, and with the whole read first) and backbone-only seconds of
    one predictor, median of ``repeats`` each (with the spread), and its features of ``x``."""
    _backbone_only(predictor, x)  # warm-up (kernels, ORT arenas)
    e2e, res = repeated(lambda: predictor.predict(study), repeats)
    bb_runs = [_backbone_only(predictor, x) for _ in range(max(1, repeats))]
    bb = summary([s for s, _ in bb_runs])
    stream, predictor.stream = predictor.stream, False
    try:
        whole, _ = repeated(lambda: predictor.predict(study), repeats)
    finally:
        predictor.stream = stream
    runs[name] = {"end_to_end_s": e2e["median"], "backbone_only_s": bb["median"], "unstreamed_s": whole["median"],
                  "timings": {"end_to_end": rounded(e2e), "backbone_only": rounded(bb), "unstreamed": rounded(whole)},
                  "timing_s": res.timing_s, "prediction": res.prediction, "probabilities": res.probabilities,
                  "features": bb_runs[-1][1]}


def _int8_verdict(runs: dict, export_result: dict, classes: list[str]) -> dict:
    """int8 is used only where it agrees with fp32 on the synthetic check studies and on this study."""
    a, b = runs["torch"], runs["onnx_int8"]
    on_study = {"n_studies": 1, "all_same_class": a["prediction"] == b["prediction"],
                "max_prob_diff": max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in classes)}
    agreement = {"synthetic": export_result["int8"], "study": on_study,
                 "features": {k: feature_cosine(a["features"], runs[k]["features"]) for k in ("onnx_fp32", "onnx_int8")}}
    agreement["ok"] = bool(export_result["int8"]["ok"] and on_study["all_same_class"]
                           and on_study["max_prob_diff"] <= export_result["int8"]["tolerance"])
    return agreement


def feature_cosine(ref, other) -> dict:
    """Per-slice cosine of two feature arrays (n, d): min and mean."""
    import torch

    cos = torch.nn.functional.cosine_similarity(ref.float(), other.float(), dim=1)
    return {"cosine_min": round(float(cos.min()), 5), "cosine_mean": round(float(cos.mean()), 5)}


def _summary(runs: dict, agreement: dict | None, floor_s: float, naive_s: float) -> dict:
    fp32 = min(("torch", "onnx_fp32"), key=lambda k: runs[k]["end_to_end_s"])
    usable = [k for k in runs if k != "onnx_int8" or (agreement and agreement["ok"])]
    best = min(usable, key=lambda k: runs[k]["end_to_end_s"])
    ours_s = runs[best]["end_to_end_s"]
    return {
        "runs": {k: {**{m: round(v, 3) for m, v in r.items() if m in ("end_to_end_s", "backbone_only_s", "unstreamed_s")},
                     "timing_s": {m: round(v, 3) for m, v in r["timing_s"].items()},
                     "timings": r["timings"],
                     "prediction": r["prediction"]} for k, r in runs.items()},
        "fastest": best, "ours_s": round(ours_s, 3), "fp32": fp32, "fp32_s": round(runs[fp32]["end_to_end_s"], 3),
        "ours_over_floor": round(ours_s / floor_s, 3),
        "fp32_over_floor": round(runs[fp32]["end_to_end_s"] / floor_s, 3),
        "naive_over_ours": round(naive_s / ours_s, 3),
        "end_to_end_over_backbone": round(ours_s / runs[best]["backbone_only_s"], 3),
        "unstreamed_over_backbone": round(runs[best]["unstreamed_s"] / runs[best]["backbone_only_s"], 3),
        "int8_agreement": agreement, "int8_used": best == "onnx_int8",
    }


def bench_predict(config: str = "cpu", study: Path | None = None, threads: int = 2, repeats: int = REPEATS,
                  batch_size: int = 16, size: int | None = None, int8: bool = True, backbone: str | None = None,
                  slices: int | None = None, mirror: bool = False, calibration: list[Path] | None = None,
                  console=None) -> dict:
    """Time one study's prediction: floor (FLOPs / GEMM rate), naive eager PyTorch, and Predictor
    (torch, ONNX Runtime fp32, ONNX Runtime static int8) end to end and backbone only, the median of
    ``repeats`` each; print and return.

    Uses a temporary bundle with random weights (speed does not depend on them; a CT-native backbone
    keeps its weights, :func:`bench_backbone`). ``size`` overrides the config's input size (for quick
    smoke runs), ``backbone`` its backbone; ``slices``: time the study's middle ``slices`` slices only
    (default for ``ct``: :data:`CT_SLICES`). int8 is calibrated on ``calibration`` (default: the study), and its
    agreement with torch fp32 (probabilities, and per-slice feature cosine) measured on this study.
    ``mirror``: the Predictor's mirror averaging on (two backbone passes; off by default, so that end to
    end is one pass, as the naive loop, the floor and "backbone only" are).

    e.g. bench_predict("paper")
    {'n_slices': 148, 'floor_s': 7.4, 'naive_s': 19.0, 'ours_s': 5.4, ...}
    """
    import tempfile

    import torch

    study = Path(study) if study else default_study()
    if not study.exists():
        raise MsnetError("no such study", study, "pass a DICOM study folder")
    bench_config(config)  # an unknown config fails here
    if slices is None and config == "ct":
        slices = CT_SLICES
    torch.set_num_threads(threads)
    opts = {"device": "cpu", "batch_size": batch_size, "threads": threads, "mirror": mirror}
    with tempfile.TemporaryDirectory(prefix="msnet-bench-") as tmp, quiet_pydicom():
        source, study = study, middle_slices(study, slices, Path(tmp) / "study")
        bundle = temp_bundle(config, Path(tmp) / "bundle", size=size, backbone=backbone)
        ref = Predictor(bundle, runtime="torch", **opts)
        vol = read_study(study)  # also starts the decode pool, as in a long-running service
        flops, gflops, floor_s = backbone_floor(ref.bundle.backbone, ref.spec.size, vol.n_slices, threads)
        naive_t, (_, naive) = repeated(lambda: _naive(study, bundle), repeats)
        naive_s = naive_t["median"]
        x = ref.spec.prepare(vol.hu, vol.kind)
        runs: dict[str, dict] = {}
        _measure("torch", ref, study, x, repeats, runs)
        calib = [Path(s) for s in calibration or []] or [source]
        t = time.perf_counter()
        exp = export_bundle(bundle, int8=int8, calibration=calib, check_studies=[], n_calibration=64)
        export_s = time.perf_counter() - t
        _measure("onnx_fp32", Predictor(bundle, runtime="onnx", **opts), study, x, repeats, runs)
        agreement = None
        if int8:
            _measure("onnx_int8", Predictor(bundle, runtime="onnx", int8=True, **opts), study, x, repeats, runs)
            agreement = _int8_verdict(runs, exp, ref.classes)
    result = {
        "config": config, "backbone": ref.metadata["backbone"]["name"], "size": ref.spec.size, "study": str(source),
        "n_slices": vol.n_slices, "slices": slices, "threads": threads, "batch_size": batch_size, "repeats": repeats,
        "mirror": mirror,
        "load_average": load_average(), "naive": rounded(naive_t),
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
    part = f" (its middle {result['n_slices']})" if result.get("slices") else ""
    table = Table(title=f"predict one study{part}: {result['backbone']} {result['size']} px, {result['n_slices']} "
                        f"slices, {result['threads']} threads, batch {result['batch_size']}; seconds, median (min-max) "
                        f"of {result['repeats']}; mirror averaging {'on' if result.get('mirror') else 'off'}; load "
                        f"average {result.get('load_average')}")
    for col in ("path", "end to end s", "whole read first s", "backbone only s", "read s", "prediction"):
        table.add_column(col)
    table.add_row(f"floor: {result['gflops_per_slice']} GFLOP/slice at {result['gemm_gflops']} GFLOP/s (fp32 GEMM)",
                  f"{result['floor_s']:.2f}", "", "", "", "")
    st = result["naive_stages_s"]
    table.add_row("naive: pydicom loop + eager fp32, batch 32", fmt(result["naive"]), "", f"{st['backbone']:.2f}",
                  f"{st['read']:.2f}", "")
    for name, r in result["runs"].items():
        t = r["timings"]
        table.add_row(f"Predictor {name} (streamed)", fmt(t["end_to_end"]), fmt(t["unstreamed"]),
                      fmt(t["backbone_only"]), f"{r['timing_s']['read']:.2f}", r["prediction"])
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
        fc = ag["features"]
        console.print("features on this study vs torch fp32, per-slice cosine min / mean: " + "; ".join(
            f"{k} {v['cosine_min']:.4f} / {v['cosine_mean']:.4f}" for k, v in fc.items()))


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


