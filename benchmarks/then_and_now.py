"""An older checkout of msnet against this one on the same case, each in its own process.

Times the case in a process that imports another source tree (e.g. the commit a speed issue was
filed against) and in one that imports this tree, alternating the two ``--rounds`` times on the
same number of threads, and prints the median seconds of each and the ratio. Cases:

- ``train`` (``--epochs``, default 5): MS-Net training, ``stages.train.fit`` on the case of
  ``msnet bench train`` (300 synthetic patients, 100-200 slices x 2048 features, 20 % validation,
  batch 8, default config); seconds per epoch. ``msnet bench train`` compares the packed MS-Net with
  ``MSNetReference`` inside one run; this checks that reference against the code as it was.
- ``finetune``: stage 1 on real UCSD COVID-CT images (``--images``, the ``train`` folder of the
  shared data): one epoch of full fine-tuning of Lite0 at 224 px (96 images, then the selection
  pass over 32), and the frozen features the ``ucsd`` config's linear probe reads (channel
  statistics of blocks 3-4) of 128 images; seconds of each.

    git worktree add /tmp/msnet-then f83fd8b
    python benchmarks/then_and_now.py /tmp/msnet-then/src --case train --epochs 5
    python benchmarks/then_and_now.py /tmp/msnet-then/src --case finetune
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

TRAIN = r"""
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

FINETUNE = r"""
import json, sys, tempfile, time, torch
from pathlib import Path
from msnet.config import BackboneConfig, load_config
from msnet.data import slices as S
from msnet.stages import finetune as F
from msnet.stages import slice_model as M
threads, folder = int(sys.argv[1]), sys.argv[3]
# the recipe both versions know: no lung crop, no pooling inside the lungs, no covariance (newer than the
# "then" code)
plain = ["preprocess.lung_crop=false"] + [f"backbone.{flag}=false" for flag in ("pool_lungs", "pool_covariance")
                                          if flag in BackboneConfig.__dataclass_fields__]
torch.set_num_threads(threads)
rows = S.image_folder_rows(Path(folder))
rows = [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:256].tolist()]
cfg = load_config("ucsd", plain + ["finetune.mode=full", "backbone.pool_stages=[]", "finetune.probe_refit=false",
                                   "finetune.epochs=1", "finetune.early_stopping=0"])
classes = list(cfg.data.classes)
train, val = (S.image_slices(rows[:96], classes, "train", cfg.preprocess, cfg.data.reencode_jpeg),
              S.image_slices(rows[96:128], classes, "val", cfg.preprocess, cfg.data.reencode_jpeg))
probe_set = S.image_slices(rows[128:], classes, "probe", cfg.preprocess, cfg.data.reencode_jpeg)
probe = M.model_for(load_config("ucsd", plain), 2).backbone
M.pooled_features(probe, S.SliceSet(probe_set.images[:16], probe_set.labels[:16]), torch.device("cpu"))  # warm-up
torch.manual_seed(0)
with tempfile.TemporaryDirectory() as out:
    t = time.perf_counter()
    F._fit(cfg, train, val, Path(out), classes)
    epoch = time.perf_counter() - t
t = time.perf_counter()
M.pooled_features(probe, probe_set, torch.device("cpu"))
print(json.dumps({"full_epoch_s": epoch, "probe_features_s": time.perf_counter() - t}))
"""

CASES = {"train": TRAIN, "finetune": FINETUNE}


def _time(case: str, src: Path, threads: int, epochs: int, images: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", CASES[case], str(threads), str(epochs), str(images)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("then", type=Path, help="the older source tree (the folder that holds its msnet package)")
    ap.add_argument("--now", type=Path, default=Path(__file__).resolve().parents[1] / "src")
    ap.add_argument("--case", choices=sorted(CASES), default="train")
    ap.add_argument("--images", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
                    / "ucsd-covid-ct" / "train", help="finetune: a <class>/<images> folder of UCSD COVID-CT")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    for tree in (args.then, args.now):
        if not (tree / "msnet" / "stages" / "train.py").is_file():
            ap.error(f"{tree} holds no msnet/stages/train.py: pass the src folder of a checkout")
    if args.case == "finetune" and not args.images.is_dir():
        ap.error(f"{args.images} is not a folder: pass --images (the UCSD COVID-CT train folder)")
    times: dict[str, list[dict]] = {"then": [], "now": []}
    for r in range(args.rounds):
        for name, tree in (("then", args.then), ("now", args.now)):
            times[name].append(_time(args.case, tree, args.threads, args.epochs, args.images))
            print(f"round {r + 1}: {name} " + ", ".join(f"{k} {v:.3f}" for k, v in times[name][-1].items()), flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    result = {}
    for key in times["now"][0]:
        then, now = (statistics.median(t[key] for t in times[n]) for n in ("then", "now"))
        result[key] = {"then": then, "now": now, "ratio": then / now}
        print(f"{key}: median of {args.rounds}, {args.threads} threads: then {then:.3f}, now {now:.3f}; "
              f"then/now {then / now:.2f}x")
    print(f"load average {load:.2f}")
    return result


if __name__ == "__main__":
    main()
