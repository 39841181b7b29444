"""``msnet bench eager``: the eager PyTorch backbone, variant by variant, against the GEMM floor."""

from __future__ import annotations

import time
from pathlib import Path

from msnet.bench.common import (
    REPEATS,
    backbone_floor,
    default_study,
    fmt,
    repeated,
    rounded,
    run_batches,
)
from msnet.bench.predict import temp_bundle
from msnet.errors import MsnetError
from msnet.inference.predictor import Predictor
from msnet.io import read_study
from msnet.io.decode import quiet_pydicom

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
                repeats: int = REPEATS, variants: tuple[str, ...] = EAGER_VARIANTS, size: int | None = None,
                console=None) -> dict:
    """The eager PyTorch backbone over one study's preprocessed slices, one variant at a time (memory
    format, inference mode, oneDNN fusion through TorchScript freezing, torch.compile), each against
    the GEMM floor measured in the same run. Failures of a variant (e.g. no C++ compiler for
    torch.compile) are reported, not raised."""
    import tempfile

    import torch

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

                    st, _ = repeated(lambda: run_batches(run, xv, batch_size), repeats)
                s = st["median"]
                rows[name] = {"s": round(s, 3), "over_floor": round(s / floor_s, 3), "setup_s": round(setup_s, 1),
                              "timing": rounded(st)}
            except Exception as exc:  # a variant this machine cannot run
                rows[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"}
    result = {"config": config, "backbone": pred.metadata["backbone"]["name"], "size": pred.spec.size,
              "n_slices": vol.n_slices, "threads": threads, "batch_size": batch_size,
              "floor_s": round(floor_s, 3), "repeats": repeats, "variants": rows}
    _print_eager(result, console)
    return result


def _print_eager(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"eager {result['backbone']} at {result['size']} px, {result['n_slices']} slices, "
                        f"{result['threads']} threads, batch {result['batch_size']}; floor {result['floor_s']} s; "
                        f"median (min-max) of {result['repeats']}")
    for col in ("variant", "backbone s", "vs floor", "set-up s"):
        table.add_column(col)
    for name, r in result["variants"].items():
        if "error" in r:
            table.add_row(name, r["error"], "", "")
        else:
            table.add_row(name, fmt(r["timing"]), f"{r['over_floor']:.2f}", f"{r['setup_s']:.1f}")
    console.print(table)
