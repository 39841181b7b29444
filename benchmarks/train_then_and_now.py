"""MS-Net training, an older checkout of msnet against this one: the same bench case, each in its own process.

`msnet bench train` compares the packed MS-Net with ``MSNetReference`` (MS-Net as first written)
inside one run. This script checks that reference against the code itself as it was: it times
``stages.train.fit`` of another source tree (e.g. the commit the speed issue was filed against)
and of this one on the bench's case (300 synthetic patients, 100-200 slices x 2048 features, 20 %
validation, batch 8, default config), alternating the two processes ``--rounds`` times on the
same number of threads, and prints seconds per epoch and the ratio.

    git worktree add /tmp/msnet-then f83fd8b
    python benchmarks/train_then_and_now.py /tmp/msnet-then/src --epochs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from msnet.config import Config
from msnet.data.splits import carve
from msnet.models.aggregators import create
from msnet.stages.train import fit
threads, epochs = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
lengths = torch.randint(100, 201, (300,), generator=g).tolist()
feats = [torch.randn(n, 2048, generator=g).relu_() for n in lengths]
labels = (torch.arange(300) % 3)[torch.randperm(300, generator=g)]
ids = [f"p{i:04d}" for i in range(300)]
cfg = Config()
cfg.train.batch_size = 8
tr, va = carve(ids, [int(y) for y in labels], cfg.train.val_fraction, 0)
pos = {p: i for i, p in enumerate(ids)}
tx, ty = [feats[pos[p]] for p in tr], labels[[pos[p] for p in tr]]
vx, vy = [feats[pos[p]] for p in va], labels[[pos[p] for p in va]]
cfg.train.epochs = 1
fit(create("msnet", 2048, n_classes=3), tx[:16], ty[:16], vx[:8], vy[:8], cfg, 3, 0)  # warm-up
cfg.train.epochs = epochs
torch.manual_seed(0)
model = create("msnet", 2048, n_classes=3)
t = time.perf_counter()
fit(model, tx, ty, vx, vy, cfg, 3, 0)
print(json.dumps({"s_per_epoch": (time.perf_counter() - t) / epochs}))
"""


def _time(src: Path, threads: int, epochs: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(epochs)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["s_per_epoch"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("then", type=Path, help="the older source tree (the folder that holds its msnet package)")
    ap.add_argument("--now", type=Path, default=Path(__file__).resolve().parents[1] / "src")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    for tree in (args.then, args.now):
        if not (tree / "msnet" / "stages" / "train.py").is_file():
            ap.error(f"{tree} holds no msnet/stages/train.py: pass the src folder of a checkout")
    times: dict[str, list[float]] = {"then": [], "now": []}
    for r in range(args.rounds):
        for name, tree in (("then", args.then), ("now", args.now)):
            times[name].append(_time(tree, args.threads, args.epochs))
            print(f"round {r + 1}: {name} {times[name][-1]:.3f} s/epoch", flush=True)
    then, now = statistics.median(times["then"]), statistics.median(times["now"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"median s/epoch over {args.epochs} epochs, {args.threads} threads: then {then:.3f}, now {now:.3f}; "
          f"then/now {then / now:.2f}x; load average {load:.2f}")
    return {"then": then, "now": now, "ratio": then / now}


if __name__ == "__main__":
    main()
