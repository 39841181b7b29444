"""UCSD COVID-CT: long fine-tuning with heavy augmentation, alone and averaged with the shipped probe.

An experiment, not part of msnet: it trains EfficientNet-Lite0 (ImageNet weights, stem and first
block frozen, dropout 0.2 + linear head) with its own loop on a GPU (runs on a CPU too, slowly), to
ask whether recipes too slow to search on a 2-core CPU (30-60 epochs, cosine schedule, random zoom
crops, rotation, shrinking, blur, mixup, layer-wise learning-rate decay, stochastic weight
averaging) beat the linear probe of ``configs/ucsd.yaml``. The images are exactly those
``msnet finetune ucsd`` trains on (224 px, every image re-encoded as JPEG q75, grey), and so are
the 5 source-grouped folds of ``train``.

Per recipe: 5-fold grouped CV on ``train`` (each fold model trained on the other four: its final
weights or, with SWA, their average over the last epochs; no selection), a model trained on all of
``train`` scored on the official ``val``, the 5 fold models averaged on ``val``, mirror test-time
augmentation everywhere, and how often the answer flips at half resolution. ``blend`` then averages
each recipe's probabilities with the shipped probe's calibrated ones (its ``--cv`` out-of-fold
predictions and its ``val`` predictions);
it takes ``msnet finetune --cv`` run folders too (e.g. the FT rows of README's table).

    msnet index UCSD-COVID-CT/ -o ucsd
    python benchmarks/ucsd_finetune_sweep.py pack ucsd.pt.gz               # images, folds, weights (50 MB)
    python benchmarks/ucsd_finetune_sweep.py run ucsd.pt.gz --out sweep    # needs torch, timm, scikit-learn
    msnet finetune ucsd --cv                                               # the shipped probe (runs/ucsd)
    python benchmarks/ucsd_finetune_sweep.py blend sweep --probe runs/ucsd/finetune

On one H100 a recipe of 30 epochs takes about 50 s (CV and the model on all of ``train``); the first
recipe after a machine starts takes 2-3 min more (cuDNN's autotuning of every batch shape).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

dev = torch.device("cpu")
state: dict = {}
TX = TY = TXH = VX = VXH = None
FOLD = VY = VFMT = None
OUT = Path(".")


def pack(path: Path, manifest: Path) -> None:
    """Images (as msnet finetune ucsd loads them, and at half resolution), labels, folds, formats and
    the Lite0 ImageNet weights, in one file that needs only torch to read."""
    from msnet.config import load_config
    from msnet.data.cohorts import read_slice_manifest
    from msnet.models.backbones import create
    from msnet.data.slices import image_slices, manifest_folds

    cfg = load_config("ucsd", ["preprocess.lung_crop=false"])  # the images the sweep in README was run on
    rows = read_slice_manifest(manifest)
    train = [r for r in rows if r["subset"] == "train"]
    val = [r for r in rows if r["subset"] == "val"]
    fold_of = {r["image_path"]: k for k, f in enumerate(manifest_folds(train, cfg.finetune.folds, cfg.finetune.seed))
               for r in f}
    classes = list(cfg.data.classes)
    sets = {f"{n}{p}": image_slices(r, classes, n, cfg.preprocess, cfg.data.reencode_jpeg, probe=p)
            for n, r in (("tr", train), ("va", val)) for p in ("", "half")}
    with gzip.open(path, "wb") as f:  # about 50 MB
        torch.save({"classes": classes, "tr_x": sets["tr"].images, "tr_y": sets["tr"].labels,
                    "tr_half": sets["trhalf"].images,
                    "tr_fold": torch.tensor([fold_of[r["image_path"]] for r in train]),
                    "va_x": sets["va"].images, "va_y": sets["va"].labels, "va_half": sets["vahalf"].images,
                    "va_fmt": sets["va"].formats,
                    "lite0": create("efficientnet_lite0", pretrained=True).model.state_dict()}, f)
    print(f"{path}: {len(train)} train images in {cfg.finetune.folds} folds, {len(val)} val images")


def load(path: Path, device: str, smoke: bool) -> None:
    global dev, state, TX, TY, TXH, VX, VXH, FOLD, VY, VFMT
    dev = torch.device(device)
    with gzip.open(path, "rb") as f:
        d = torch.load(f, map_location="cpu", weights_only=False)
    state = d["lite0"]
    TX, TY, TXH = d["tr_x"].to(dev), d["tr_y"].long().to(dev), d["tr_half"].to(dev)
    FOLD, VY, VFMT = d["tr_fold"].numpy(), d["va_y"].numpy(), np.array(d["va_fmt"])
    VX, VXH = d["va_x"].to(dev), d["va_half"].to(dev)
    if smoke:  # every 8th training image, every 6th val image
        keep = np.arange(0, len(FOLD), 8)
        TX, TY, TXH, FOLD = TX[keep], TY[keep], TXH[keep], FOLD[keep]
        VX, VY, VXH, VFMT = VX[::6], VY[::6], VXH[::6], VFMT[::6]


def make_model(freeze=2):
    import timm

    m = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    m.load_state_dict(state)
    stages = [[m.conv_stem, m.bn1]] + [[b] for b in m.blocks] + [[m.conv_head, m.bn2]]
    for i, g in enumerate(stages):
        for mod in g:
            mod.requires_grad_(i >= freeze)
    net = nn.Sequential(m, nn.Dropout(0.2), nn.Linear(m.num_features, 2))
    net.frozen = [mod for g in stages[:freeze] for mod in g]
    net.stages = stages
    return net.to(dev).to(memory_format=torch.channels_last)


def norm(x):  # [0, 1] float (n,1,S,S) -> normalised 3-channel float, channels last
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)


def augment(x, r, g):
    """x: float [0,1] (n,1,S,S) on the device."""
    n, _, S, _ = x.shape
    u = lambda *s: torch.rand(*s, device=dev, generator=g)
    if r.get("scale", 1.0) < 1 or r.get("rotate", 0) or r.get("translate", 0):
        area = r.get("scale", 1.0) + (1 - r.get("scale", 1.0)) * u(n)
        s = area.sqrt()
        ang = (u(n) * 2 - 1) * math.radians(r.get("rotate", 0))
        tmax = (1 - s) + r.get("translate", 0)
        tx, ty = (u(n) * 2 - 1) * tmax, (u(n) * 2 - 1) * tmax
        theta = torch.stack([torch.stack([s * torch.cos(ang), -s * torch.sin(ang), tx], 1),
                             torch.stack([s * torch.sin(ang), s * torch.cos(ang), ty], 1)], 1)
        grid = F.affine_grid(theta, x.shape, align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if r.get("down", 0) > 0:
        p = r["down"]
        sel = u(n) < p
        if sel.any():
            f = float(r.get("down_min", 0.4) + (1 - r.get("down_min", 0.4)) * u(1))
            small = max(16, int(S * f))
            xs = F.interpolate(x[sel], size=(small, small), mode="bilinear", antialias=True, align_corners=False)
            x[sel] = F.interpolate(xs, size=(S, S), mode="bilinear", align_corners=False)
    if r.get("blur", 0) > 0:
        sel = u(n) < r["blur"]
        if sel.any():
            sig = float(0.3 + 1.2 * u(1))
            k = torch.arange(-3, 4, device=dev).float()
            w = torch.exp(-k**2 / (2 * sig**2)); w = w / w.sum()
            xb = F.conv2d(F.pad(x[sel], (3, 3, 0, 0), mode="replicate"), w.view(1, 1, 1, 7))
            xb = F.conv2d(F.pad(xb, (0, 0, 3, 3), mode="replicate"), w.view(1, 1, 7, 1))
            x[sel] = xb
    if r.get("noise", 0) > 0:
        x = x + torch.randn(x.shape, device=dev, generator=g) * r["noise"] * u(n, 1, 1, 1)
    # paper: flip + brightness / contrast jitter
    flip = u(n) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    j = r.get("jitter", 0.4)
    if j:
        b = 1 + (u(n, 1, 1, 1) * 2 - 1) * j
        x = (x * b).clamp(0, 1)
        c = 1 + (u(n, 1, 1, 1) * 2 - 1) * j
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (m + (x - m) * c).clamp(0, 1)
    return x.clamp(0, 1)


def train(idx, r, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    torch.manual_seed(seed)
    net = make_model(r.get("freeze", 2))
    X, Y = TX[idx], TY[idx]
    counts = torch.bincount(Y, minlength=2).float()
    weight = counts.sum() / (2 * counts)
    decay = r.get("lwd", 1.0)
    groups = []
    n_st = len(net.stages)
    for i, st in enumerate(net.stages):
        ps = [p for mod in st for p in mod.parameters() if p.requires_grad]
        if ps:
            groups.append({"params": ps, "lr": r["lr"] * decay ** (n_st - i)})
    groups.append({"params": list(net[2].parameters()), "lr": r["lr"] * r.get("head_mult", 1.0)})
    opt = torch.optim.AdamW(groups, weight_decay=r.get("wd", 0.0)) if r.get("wd") else torch.optim.Adam(groups)
    base = [gp["lr"] for gp in opt.param_groups]
    E, bs = r["epochs"], r.get("bs", 32)
    steps = E * math.ceil(len(idx) / bs)
    step = 0
    ls = r.get("smooth", 0.0)
    swa = None
    for ep in range(E):
        net.train()
        for mod in net.frozen:
            mod.eval()
        order = torch.randperm(len(idx), device=dev, generator=g)
        for i in range(0, len(idx), bs):
            b = order[i:i + bs]
            if r.get("sched") == "cos":
                warm = max(1, steps // 20)
                f = step / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
                for gp, b0 in zip(opt.param_groups, base):
                    gp["lr"] = b0 * f
            x = norm(augment(X[b].float() / 255.0, r, g))
            y = Y[b]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                if r.get("mixup", 0) > 0:
                    lam = float(np.random.default_rng(seed * 100000 + step).beta(r["mixup"], r["mixup"]))
                    perm = torch.randperm(len(b), device=dev, generator=g)
                    out = net(lam * x + (1 - lam) * x[perm])
                    loss = lam * F.cross_entropy(out.float(), y, weight=weight, label_smoothing=ls) + \
                        (1 - lam) * F.cross_entropy(out.float(), y[perm], weight=weight, label_smoothing=ls)
                else:
                    loss = F.cross_entropy(net(x).float(), y, weight=weight, label_smoothing=ls)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if r.get("swa_from") is not None and ep + 1 >= r["swa_from"]:
            swa = _average(swa, net, ep + 1 - r["swa_from"])
    if r.get("swa_from") is not None:
        net.load_state_dict(swa)
        _refresh_bn(net, X)
    return net


def _average(avg, net, k):
    """Running mean of the weights after ``k + 1`` snapshots (SWA; Izmailov et al. 2018)."""
    now = {n: t.detach().clone() for n, t in net.state_dict().items()}
    if avg is None or k == 0:
        return now
    return {n: (avg[n] * k + t) / (k + 1) if t.is_floating_point() else t for n, t in now.items()}


@torch.no_grad()
def _refresh_bn(net, X, bs=64):
    """Batch-norm statistics of the trainable stages recomputed for the averaged weights, on the
    unaugmented training images (the frozen stages keep theirs)."""
    frozen = {id(m) for mod in net.frozen for m in mod.modules()}
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d) and id(m) not in frozen]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative mean over all batches
    net.train()
    for mod in net.frozen:
        mod.eval()
    for i in range(0, len(X), bs):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            net(norm(X[i:i + bs].float() / 255.0))
    for m in bns:
        m.momentum = 0.1


@torch.inference_mode()
def predict(net, X):
    net.eval()
    out = []
    for i in range(0, len(X), 128):
        x = norm(X[i:i + 128].float() / 255.0)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            p = torch.softmax(net(x).float(), 1) + torch.softmax(net(x.flip(-1)).float(), 1)
        out.append((p / 2).cpu())
    return torch.cat(out).numpy()


def scores(y, p):
    from sklearn.metrics import f1_score, roc_auc_score

    pred = p.argmax(1)
    return {"acc": float((pred == y).mean()), "f1": float(f1_score(y, pred, pos_label=0)),
            "auc": float(roc_auc_score(y == 0, p[:, 0]))}


def run(name, r):
    t = time.time()
    oof = np.zeros((len(FOLD), 2)); oofh = np.zeros((len(FOLD), 2)); per = []
    vals = []
    for k in range(5):
        tr = np.flatnonzero(FOLD != k); te = np.flatnonzero(FOLD == k)
        net = train(torch.from_numpy(tr).to(dev), r, seed=k)
        oof[te] = predict(net, TX[te]); oofh[te] = predict(net, TXH[te])
        per.append(scores(TY[te].cpu().numpy(), oof[te])["acc"])
        vals.append(predict(net, VX))
    ty = TY.cpu().numpy()
    net = train(torch.arange(len(FOLD), device=dev), r, seed=99)
    pv = predict(net, VX); pvh = predict(net, VXH)
    ens = np.mean(vals, 0)
    png = VFMT == "PNG"
    res = {"recipe": name, **r, "cv_acc": float(np.mean(per)), "cv_sd": float(np.std(per)),
           "cv_pooled": scores(ty, oof), "cv_half_flip": float((oof.argmax(1) != oofh.argmax(1)).mean()),
           "val": scores(VY, pv), "val_png": float((pv.argmax(1) == VY)[png].mean()),
           "val_jpeg": float((pv.argmax(1) == VY)[~png].mean()),
           "val_half_flip": float((pv.argmax(1) != pvh.argmax(1)).mean()),
           "val_ens": scores(VY, ens), "val_ens_png": float((ens.argmax(1) == VY)[png].mean()),
           "val_ens_jpeg": float((ens.argmax(1) == VY)[~png].mean()),
           "val_fold_accs": [float((v.argmax(1) == VY).mean()) for v in vals],
           "secs": round(time.time() - t, 1)}
    print(json.dumps(res), flush=True)
    np.savez(OUT / f"pred_{name}.npz", oof=oof, val=pv, ens=ens, y=TY.cpu().numpy(), vy=VY)
    return res


HEAVY = dict(scale=0.5, rotate=10, translate=0.05, down=0.5, down_min=0.4, blur=0.3)
RECIPES = {
    "ft5": dict(epochs=5, lr=3e-4),
    "ft30cos": dict(epochs=30, lr=3e-4, sched="cos"),
    "heavy30": dict(epochs=30, lr=3e-4, sched="cos", **HEAVY),
    "heavy30_mix": dict(epochs=30, lr=3e-4, sched="cos", mixup=0.4, smooth=0.1, **HEAVY),
    "heavy30_lwd": dict(epochs=30, lr=3e-4, sched="cos", lwd=0.7, head_mult=3.0, **HEAVY),
    "heavy60_mix": dict(epochs=60, lr=3e-4, sched="cos", mixup=0.4, smooth=0.1, **HEAVY),
    "heavy30_f4": dict(epochs=30, lr=3e-4, sched="cos", freeze=4, **HEAVY),
    "heavy30_wd": dict(epochs=30, lr=1e-3, sched="cos", wd=0.05, **HEAVY),
    "ft10": dict(epochs=10, lr=3e-4),
    "ft10_swa": dict(epochs=10, lr=3e-4, swa_from=3),  # weights averaged after epochs 3-10
}


def run_predictions(run: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Calibrated probabilities of an ``msnet finetune --cv`` run folder (``runs/NAME/finetune``): its
    out-of-fold predictions on ``train`` in manifest order, its model's on ``val``, and both labels."""
    from msnet.config import load_config
    from msnet.data.cohorts import read_slice_manifest
    from msnet.data.slices import image_slices, manifest_folds
    from msnet.stages.slice_model import calibrated_probs, load_slice_classifier
    from msnet.stages.probe import softmax

    cfg = load_config(run / "config.yaml")
    cv = json.loads((run / "cv" / "cv_metrics.json").read_text())
    with np.load(run / "cv" / "oof.npz") as f:
        logits, labels = f["logits"], f["labels"]
    rows = read_slice_manifest(cfg.resolve(cfg.data.slice_manifest))
    train = [r for r in rows if r["subset"] == "train"]
    pos = {r["image_path"]: i for i, r in enumerate(train)}
    order = [pos[r["image_path"]] for f in manifest_folds(train, cfg.finetune.folds, cfg.finetune.seed) for r in f]
    temps = np.concatenate([[f["temperature"]] * f["n"] for f in cv["folds"]])
    oof, y = np.empty_like(logits), np.empty_like(labels)
    oof[order], y[order] = softmax(logits / temps[:, None]), labels  # oof.npz holds one fold after the other
    val = image_slices([r for r in rows if r["subset"] == "val"], list(cfg.data.classes), "val", cfg.preprocess,
                       cfg.data.reencode_jpeg)
    pv = calibrated_probs(load_slice_classifier(run / "backbone.pt"), val, torch.device("cpu"), cfg.finetune.tta)
    return oof, pv, y, val.labels.numpy()


def blend(sources: list[Path], probe: Path) -> None:
    """Each source (a folder of this script's ``run``, or an ``msnet finetune --cv`` run folder) alone and
    averaged with the shipped probe's calibrated probabilities, against the probe alone."""
    po, pv, y0, vy0 = run_predictions(probe)
    print(f"{'shipped probe':28s} CV {_fmt(y0, po)} | val {_fmt(vy0, pv)}")
    for source in sources:
        if (source / "cv" / "oof.npz").is_file():
            o, v, y, vy = run_predictions(source)
            found = [(source.parent.name, o, v, y, vy)]
        else:
            found = []
            for path in sorted(source.glob("pred_*.npz")):
                with np.load(path) as f:
                    found.append((path.stem[len("pred_"):], f["oof"], f["val"], f["y"], f["vy"]))
        for name, oof, pval, y, vy in found:
            if not ((y == y0).all() and (vy == vy0).all()):
                raise SystemExit(f"{name}: other images or another order than the probe's")
            print(f"{name:28s} CV {_fmt(y, oof)} | val {_fmt(vy, pval)}")
            print(f"{name + ' + probe':28s} CV {_fmt(y, (oof + po) / 2)} | val {_fmt(vy, (pval + pv) / 2)}")


def _fmt(y, p) -> str:
    s = scores(y, p)
    return f"accuracy {s['acc']:.3f} F1 {s['f1']:.3f} AUC {s['auc']:.3f}"


def main(argv: list[str] | None = None) -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="write the images, folds and weights to one file")
    p.add_argument("file", type=Path)
    p.add_argument("--manifest", type=Path, default=Path("ucsd/slices.csv"))
    r = sub.add_parser("run", help="train and score the recipes")
    r.add_argument("file", type=Path)
    r.add_argument("recipes", nargs="*", help=f"default: all of {', '.join(RECIPES)}")
    r.add_argument("--out", type=Path, default=Path("sweep"))
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--budget", type=float, default=float("inf"), help="start no recipe after this many seconds")
    r.add_argument("--smoke", action="store_true", help="a check of the code: 1 epoch, an eighth of the images")
    b = sub.add_parser("blend", help="each recipe (or msnet finetune run) averaged with the shipped probe")
    b.add_argument("sources", type=Path, nargs="+", help="run folders of this script or of msnet finetune --cv")
    b.add_argument("--probe", type=Path, default=Path("runs/ucsd/finetune"))
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        return pack(args.file, args.manifest)
    if args.cmd == "blend":
        return blend(args.sources, args.probe)
    import timm

    t0 = time.time()
    OUT = args.out
    OUT.mkdir(parents=True, exist_ok=True)
    load(args.file, args.device, args.smoke)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print("device", torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "timm", timm.__version__, flush=True)
    results = []
    for n in args.recipes or list(RECIPES):
        if time.time() - t0 > args.budget:
            print("budget spent; skipped", n, flush=True)
            continue
        rec = dict(RECIPES[n])
        if args.smoke:
            rec["epochs"] = 1
            if "swa_from" in rec:
                rec["swa_from"] = 1
        results.append(run(n, rec))
        (OUT / "sweep.json").write_text(json.dumps(results, indent=1))
    print("total", round(time.time() - t0, 1), "s")


if __name__ == "__main__":
    main()
