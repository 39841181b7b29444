"""The lung gate's cost per study, on the fine grid and on the gates' coarse one (the same verdict).

For every real scan of the shared data: the lung mask alone on the fine grid (3 mm, 2.5 mm: what the lung
gate computed before the chest-CT checks), the full gate on the fine grid (mask + every chest-CT check),
and the full gate as ``predict`` runs it (coarse grid, 6 mm, 5 mm; a refusal made again on the fine one).
Median and spread of ``--repeats`` runs, and the ratios, measured in one run.

    python benchmarks/gate_speed.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid-ct-md" / "Sample data"


def _median(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), float(np.ptp(ts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from msnet.gates import check_lungs, gate_stats
    from msnet.io import read_study
    from msnet.lungs import lung_stats

    print("| scan | slices | mask only, fine grid (s) | gate, fine grid (s) | gate, coarse grid (s) | coarse / mask only | coarse / fine gate |")
    print("|---|---|---|---|---|---|---|")
    for folder in sorted(p for p in DATA.glob("*/*") if p.is_dir()):
        vol = read_study(folder)
        mask, s1 = _median(lambda: lung_stats(vol.hu, vol.spacing_mm, vol.z_mm), args.repeats)
        fine, s2 = _median(lambda: check_lungs(vol, coarse=False), args.repeats)
        coarse, s3 = _median(lambda: check_lungs(vol), args.repeats)
        assert gate_stats(vol).grid_mm != gate_stats(vol, coarse=False).grid_mm  # the coarse verdict stood
        print(f"| {folder.name} | {vol.n_slices} | {mask:.3f} ±{s1:.3f} | {fine:.3f} ±{s2:.3f} | {coarse:.3f} ±{s3:.3f} "
              f"| {coarse / mask:.2f} | {coarse / fine:.2f} |")


if __name__ == "__main__":
    main()
