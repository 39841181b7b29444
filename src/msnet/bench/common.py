"""What every bench command shares: repeated timings summarised as median and spread, the fp32 GEMM
rate of this machine, and the FLOP floor of a backbone."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from msnet.errors import MsnetError
from msnet.models.astra import slab_starts
from msnet.models.backbones import flops_per_image

REPEATS = 3
"""Timed repetitions of every measurement, by default; the median is reported, with the spread."""


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def summary(seconds: list[float]) -> dict:
    """Median, min, max and count of repeated timings, and the spread (max - min) / median.

    >>> summary([2.0, 1.0, 4.0])
    {'median': 2.0, 'min': 1.0, 'max': 4.0, 'n': 3, 'spread': 1.5}
    """
    med = statistics.median(seconds)
    return {"median": med, "min": min(seconds), "max": max(seconds), "n": len(seconds),
            "spread": (max(seconds) - min(seconds)) / med if med > 0 else 0.0}


def repeated(fn, repeats: int) -> tuple[dict, object]:
    """(:func:`summary` of ``repeats`` timed calls of ``fn``, the last call's result)."""
    times, result = [], None
    for _ in range(max(1, int(repeats))):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return summary(times), result


def fmt(s: dict, digits: int = 2) -> str:
    """A summary as "median (min-max)"; a single timing as itself.

    >>> fmt({'median': 2.0, 'min': 1.0, 'max': 4.0, 'n': 3, 'spread': 1.5})
    '2.00 (1.00-4.00)'
    """
    if s["n"] < 2:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def rounded(s: dict, digits: int = 4) -> dict:
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in s.items()}


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


def gemm_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """fp32 GEMM throughput of this machine (median of ``repeats`` n x n matmuls), GFLOP/s."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    s, _ = repeated(lambda: torch.mm(a, b), repeats)
    return 2.0 * n**3 / s["median"] / 1e9


def study_flops(backbone, size: int, n_slices: int) -> float:
    """FLOPs (2 x multiply-adds of the convolutions and linear layers) of a backbone over one study of
    ``n_slices`` slices: per slice for a 2-D backbone, per slab times the slabs of the study for a slab
    network (3-D convolutions counted by their kernel volume)."""
    import torch
    from torch import nn

    if not getattr(backbone, "whole_study", False):
        return float(flops_per_image(backbone, (3, size, size))) * n_slices

    net = backbone.model
    macs = 0

    def hook(module, inputs, output) -> None:
        nonlocal macs
        per_out = module.in_channels // module.groups
        for k in module.kernel_size:
            per_out *= k
        macs += output.numel() * per_out

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv3d, nn.Conv2d))]
    try:
        with torch.inference_mode():
            net.pool_slabs(torch.rand(1, 3, net.k, size, size))
    finally:
        for h in handles:
            h.remove()
    return 2.0 * macs * len(slab_starts(n_slices, net.k, net.stride))


def backbone_floor(backbone, size: int, n_slices: int, threads: int) -> tuple[float, float, float]:
    """(FLOPs per slice, this machine's fp32 GEMM GFLOP/s, floor seconds for ``n_slices``): the backbone's
    FLOPs at the GEMM rate measured now."""
    flops = study_flops(backbone, size, n_slices)
    gflops = gemm_gflops(threads)
    return flops / n_slices, gflops, flops / (gflops * 1e9)


def default_study() -> Path:
    """The study timed when none is given: there is none; the error says what to pass."""
    raise MsnetError("no study to time", fix="pass --study PATH (a DICOM study folder, e.g. a COVID-CT-MD scan)")
