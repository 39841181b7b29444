"""What mirror test-time averaging costs: one study predicted with and without it (``Predictor(mirror=)``),
alternating, the median of the repeats of each, and the ratio measured in the same run; plus how far the
probabilities of the study and of its mirror image lie apart with and without it.

    python benchmarks/mirror_cost.py BUNDLE STUDY [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np
import torch

from msnet.inference.predictor import Predictor
from msnet.io import open_study


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("study")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vol = open_study(args.study)
    flipped = replace(vol, hu=np.ascontiguousarray(vol.hu[:, :, ::-1]))
    runs = {True: Predictor(args.bundle, device="cpu", mirror=True), False: Predictor(args.bundle, device="cpu", mirror=False)}
    times: dict[bool, list[float]] = {True: [], False: []}
    for p in runs.values():
        p.predict_volume(vol)  # warm-up
    for _ in range(args.repeats):
        for mirror, p in runs.items():
            t = time.perf_counter()
            p.predict_volume(vol)
            times[mirror].append(time.perf_counter() - t)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"study {vol.study_id}: {vol.n_slices} slices, {args.repeats} repeats, {args.threads} threads")
    print(f"without mirror averaging: {off:.3f} s (median)")
    print(f"with mirror averaging:    {on:.3f} s (median), {on / off:.2f}x")
    for mirror, p in runs.items():
        a, b = p.predict_volume(vol).probabilities, p.predict_volume(flipped).probabilities
        print(f"mirror={mirror}: largest probability change, study vs its mirror image: "
              f"{max(abs(a[c] - b[c]) for c in a):.4f}")


if __name__ == "__main__":
    main()
