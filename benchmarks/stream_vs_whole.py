"""Streamed decode against the whole read first: one study predicted both ways, alternating, in one process.

A temporary bundle with random weights (the `paper` or `cpu` config), its backbone on the runtime
asked for (ONNX Runtime int8 by default, the fastest CPU path), the study (default P001) predicted
``--rounds`` times each way in alternating order, and the backbone alone over the preprocessed
slices each round. Prints every time, the medians and the ratios to the backbone-only time.

    python benchmarks/stream_vs_whole.py --config paper
    python benchmarks/stream_vs_whole.py --config cpu --runtime torch
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    from msnet.bench import default_study, temp_bundle
    from msnet.inference.export import export_bundle
    from msnet.inference.predictor import Predictor
    from msnet.io import read_study

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="paper", choices=["paper", "cpu"])
    ap.add_argument("--runtime", default="onnx-int8", choices=["torch", "onnx", "onnx-int8"])
    ap.add_argument("--study", type=Path, default=None)
    ap.add_argument("--calibration", type=Path, nargs="*", default=[], help="studies to calibrate int8 on")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    study = args.study or default_study()
    torch.set_num_threads(args.threads)
    runtime, int8 = args.runtime.split("-")[0], args.runtime.endswith("int8")
    with tempfile.TemporaryDirectory(prefix="msnet-stream-") as tmp:
        bundle = temp_bundle(args.config, Path(tmp) / "bundle")
        if runtime == "onnx":
            calib = list(args.calibration) or [study]
            export_bundle(bundle, int8=int8, calibration=calib, check_studies=[], n_calibration=64)
        p = Predictor(bundle, device="cpu", runtime=runtime, int8=int8, batch_size=16, threads=args.threads)
        vol = read_study(study)
        x = p.spec.prepare(vol.hu, vol.kind)
        p.predict(study)  # warm-up: decode pool, kernels, arenas
        times: dict[str, list[float]] = {"streamed": [], "whole read first": [], "backbone only": []}
        for i in range(args.rounds):
            for stream in ((True, False) if i % 2 else (False, True)):
                p.stream = stream
                t = time.perf_counter()
                p.predict(study)
                times["streamed" if stream else "whole read first"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for j in range(0, len(x), p.batch_size):
                p.encoder.embed(x[j:j + p.batch_size])
            times["backbone only"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:18s} {' '.join(f'{s:.2f}' for s in v)}  median {med[k]:.3f} s")
    bb = med["backbone only"]
    print(f"{args.config} {args.runtime}, {vol.n_slices} slices: end to end / backbone only: streamed "
          f"{med['streamed'] / bb:.2f}, whole read first {med['whole read first'] / bb:.2f}; "
          f"whole / streamed {med['whole read first'] / med['streamed']:.2f}x")
    return med


if __name__ == "__main__":
    main()
