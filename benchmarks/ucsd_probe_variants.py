"""UCSD COVID-CT: the shipped probe's features pooled inside a rough 2-D lung mask, and read by an
RBF-kernel SVM instead of a logistic regression; cross-validated two ways.

An experiment, not part of msnet. The features are those of ``configs/ucsd.yaml`` (frozen ImageNet
Lite0, 224 px, every image re-encoded as JPEG q75, channel mean and standard deviation of blocks 3
and 4), computed by msnet's own loader and backbone:
- ``whole``: over the whole image, as shipped;
- ``lungs``: inside the image's 2-D lung mask (``backbone.pool_lungs``: ``msnet.preprocess.grey_lung_mask``;
  the whole image where the mask covers under a tenth of it). The DICOM slices get the same mask of their
  lung-window image;
- ``both``: the two concatenated.

Each feature set is read by a logistic regression (C 0.1, class weights, each feature standardised:
the shipped probe without its temperature and refit) and by an RBF SVM (C 3, class weights, the
same standardisation). Mirror test-time augmentation throughout; the decision threshold is 0.

Cross-validation on ``train``, 5 folds, with msnet's own grouped folds (``manifest_folds``), over
three fold assignments (seeds 0-2):
- ``patient``: the manifest's source groups (a COVID image's patient), as ``msnet finetune --cv``;
- ``paper``: a COVID image's group is the paper its file name names (``2020.02.25.20021568-p..``):
  a paper's figure style (size, coding, window) never lies on both sides of a fold. These are the
  groups ``msnet index --group-by paper`` writes (``msnet.data.cohorts.group_by_paper``), so the
  folds are those of ``msnet finetune --cv`` on such an index.

Then each model trained on all of ``train`` scores the official ``val`` and, with ``--ctmd``, the
slices of a cohort with slice labels (``msnet finetune --test``'s infection AUCs). ``--crop`` first
crops every image to the lungs (``preprocess.lung_crop``: the UCSD images by their 2-D lung masks,
the DICOM slices by the HU lung mask). ``--covariance`` takes each map's channel covariance instead of
its standard deviation (``backbone.pool_covariance``); ``--backbone NAME@SIZE`` (repeatable) other
frozen networks and input sizes, their features side by side (the CT-pretrained ``astra``: the mean and sd
of its layer2 and layer3). ``--calibration`` then compares, in a
nested CV, the logistic regression's temperature fitted on a selection fifth and on out-of-fold
predictions (``finetune.calibration``), by the ECE on the held-out folds.

    msnet index UCSD-COVID-CT/ -o ucsd
    msnet index COVID-CT-MD/ -o ctmd
    OMP_NUM_THREADS=2 python benchmarks/ucsd_probe_variants.py ucsd/slices.csv --ctmd ctmd

About 1 min on 2 cores; needs scikit-learn (the dev extras).
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch


class Features:
    """Whole-image and lung features of grey [0, 1] images, plain and mirrored: msnet's backbone with
    ``pool_stages`` and ``pool_lungs`` (the whole image's statistics, then those inside the lungs), and
    ``pool_covariance`` if asked; ``name`` and ``size`` default to the ``ucsd`` config's."""

    def __init__(self, name: str = "", size: int = 0, covariance: bool = False) -> None:
        from msnet.config import load_config
        from msnet.device import channels_last
        from msnet.models.backbones import create

        self.cfg = cfg = load_config("ucsd", [f"backbone.name={name}"] * bool(name) + [f"preprocess.size={size}"] * bool(size))
        # the CT-native ResNet-152 has five stages (stem, layer1-4): its mid-level ones are layer2 and layer3
        stages = [2, 3] if cfg.backbone.name.startswith("astra") else cfg.backbone.pool_stages
        self.backbone = create(cfg.backbone.name, pretrained=True, pool_stages=stages,
                               pool_lungs=True, pool_covariance=covariance).eval()
        self.mean, self.std = self.backbone.data_config["mean"], self.backbone.data_config["std"]
        self.to_device = channels_last
        self.size = cfg.preprocess.size
        self.reencode = cfg.data.reencode_jpeg

    @torch.inference_mode()
    def __call__(self, unit: torch.Tensor) -> dict[str, np.ndarray]:
        from msnet.preprocess import finish

        out: dict[str, np.ndarray] = {}
        half = self.backbone.num_features // 2
        for flip in (False, True):
            x = finish(unit.flip(-1) if flip else unit, self.mean, self.std)
            feats = self.backbone(self.to_device(x, "cpu")).numpy()
            tag = "_mirror" if flip else ""
            out["whole" + tag], out["lungs" + tag] = feats[:, :half], feats[:, half:]
            if not flip:
                out["mask_fraction"] = self.backbone.lung_weights(x).mean(dim=(1, 2, 3)).numpy()
        return out


def _stack(parts: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _side_by_side(sets: list[dict]) -> dict[str, np.ndarray]:
    """The features of several backbones of the same images, concatenated (each image's lung mask is the same)."""
    return {k: sets[0][k] if k == "mask_fraction" else np.concatenate([d[k] for d in sets], 1) for k in sets[0]}


def ucsd_features(rows: list[dict], feats: Features, crop: bool, batch: int = 32) -> dict[str, np.ndarray]:
    from msnet.data.slices import load_image_slice

    parts = []
    for i in range(0, len(rows), batch):
        imgs = [load_image_slice(r["image_path"], feats.size, feats.reencode, lung_crop=crop) for r in rows[i:i + batch]]
        parts.append(feats(torch.stack(imgs).float() / 255.0))
    return _stack(parts)


def cohort_features(folder: Path, feats: Features, spec, batch: int = 32) -> tuple[list[dict], dict[str, np.ndarray]]:
    from msnet.data.cohorts import read_cohort, read_slice_labels
    from msnet.io import read_study
    from msnet.preprocess import model_slices

    labels = read_slice_labels(folder / "slice_labels.csv") if (folder / "slice_labels.csv").is_file() else {}
    patients, parts = [], []
    for r in read_cohort(folder / "cohort.csv", only_ok=True):
        vol = read_study(r["path"], study_id=r["patient_id"])
        hu = model_slices(vol, spec)
        for i in range(0, hu.shape[0], batch):
            parts.append(feats(spec.unit(hu[i:i + batch], vol.kind)[:, :1].float()))
        patients.append({"label": r["label"], "n": hu.shape[0], "slice_labels": labels.get(r["patient_id"])})
    return patients, _stack(parts)


def feature_sets(d: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    both = (np.concatenate([d["whole"], d["lungs"]], 1), np.concatenate([d["whole_mirror"], d["lungs_mirror"]], 1))
    return {"whole": (d["whole"], d["whole_mirror"]), "lungs": (d["lungs"], d["lungs_mirror"]), "both": both}


def classifiers():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return {
        "logistic regression": lambda: make_pipeline(
            StandardScaler(), LogisticRegression(C=0.1, max_iter=5000, class_weight="balanced")),
        "RBF SVM": lambda: make_pipeline(StandardScaler(), SVC(C=3.0, class_weight="balanced")),
    }


def temperatures_compared(X: np.ndarray, Xm: np.ndarray, y: np.ndarray, rows: list[dict], seeds: int) -> dict:
    """Nested CV of where the logistic regression's temperature is fitted, as ``msnet finetune`` does it
    (``finetune.calibration``): each outer fold's model is fitted on the other folds; its temperature
    on a grouped selection fifth of them (``select``; the regression fitted on the other four fifths)
    or on the out-of-fold predictions of an inner 5-fold CV of them (``cv``); the model is then refitted
    on all of them and its ECE taken on the held-out fold (``none``: no temperature)."""
    from msnet.metrics import calibration, fit_temperature
    from msnet.data.slices import manifest_folds

    make = classifiers()["logistic regression"]
    pos = {r["image_path"]: i for i, r in enumerate(rows)}

    def ids(rs):
        return np.array([pos[r["image_path"]] for r in rs])

    def logits(m, idx):
        d = (m.decision_function(X[idx]) + m.decision_function(Xm[idx])) / 2
        return np.stack([np.zeros_like(d), d], 1)

    ece = {"select": [], "cv": [], "none": []}
    temps = {"select": [], "cv": []}
    for seed in range(seeds):
        outer = manifest_folds(rows, 5, seed)
        for i, held in enumerate(outer):
            rest = [r for j, f in enumerate(outer) if j != i for r in f]
            inner = manifest_folds(rest, 5, seed + 1 + i)
            fit_on = ids([r for f in inner[1:] for r in f])
            t = {"select": fit_temperature(logits(make().fit(X[fit_on], y[fit_on]), ids(inner[0])), y[ids(inner[0])])}
            others = [ids([r for k, g in enumerate(inner) if k != j for r in g]) for j in range(len(inner))]
            oof = [(logits(make().fit(X[o], y[o]), ids(f)), y[ids(f)]) for o, f in zip(others, inner)]
            t["cv"] = fit_temperature(np.concatenate([o[0] for o in oof]), np.concatenate([o[1] for o in oof]))
            final = make().fit(X[ids(rest)], y[ids(rest)])
            z = logits(final, ids(held))
            for name, temp in (*t.items(), ("none", 1.0)):
                p = np.exp(z / temp - (z / temp).max(1, keepdims=True))
                ece[name].append(calibration(y[ids(held)], p / p.sum(1, keepdims=True))["ece"])
            for name in temps:
                temps[name].append(t[name])
    return {"ece": {k: (np.mean(v), np.std(v)) for k, v in ece.items()},
            "temperature": {k: (np.mean(v), np.std(v)) for k, v in temps.items()},
            "cv_lower": float(np.mean(np.array(ece["cv"]) < np.array(ece["select"])))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("manifest", type=Path, help="slices.csv of `msnet index UCSD-COVID-CT/`")
    ap.add_argument("--ctmd", type=Path, help="a cohort folder with slice labels (`msnet index` of COVID-CT-MD)")
    ap.add_argument("--seeds", type=int, default=3, help="fold assignments per grouping")
    ap.add_argument("--crop", action="store_true", help="crop every UCSD image to its 2-D lung mask's box, "
                    "and the DICOM slices to the lungs (preprocess.lung_crop), before the features")
    ap.add_argument("--backbone", action="append", default=[], metavar="NAME[@SIZE]",
                    help="the frozen network (and its input size); repeated: the features of each, side by side "
                    "(default: the ucsd config's, efficientnet_lite0@224)")
    ap.add_argument("--covariance", action="store_true", help="each map's channel covariance instead of its "
                    "standard deviation (backbone.pool_covariance)")
    ap.add_argument("--features", action="append", choices=("whole", "lungs", "both"),
                    help="only these feature sets (default: all three)")
    ap.add_argument("--each", action="store_true", help="with several --backbone: each alone too, before them side by side")
    ap.add_argument("--classifier", action="append", choices=("logistic regression", "RBF SVM"),
                    help="only these classifiers (repeatable; default both)")
    ap.add_argument("--calibration", action="store_true", help="then compare, in nested CV, the logistic "
                    "regression's temperature fitted on a selection fifth and on out-of-fold predictions")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    from sklearn.metrics import f1_score, roc_auc_score

    from msnet.data.cohorts import group_by_paper, read_slice_manifest
    from msnet.data.slices import manifest_folds
    from msnet.stages.slice_model import spec_for
    from msnet.stages.transfer import infection_metrics

    rows = read_slice_manifest(args.manifest, only_ok=True)
    train = [r for r in rows if r["subset"] == "train"]
    val = [r for r in rows if r["subset"] == "val"]
    members = [Features(name, int(size or 0), args.covariance)
               for name, _, size in (b.partition("@") for b in args.backbone)] or [Features(covariance=args.covariance)]
    member_sets = [ucsd_features(train + val, f, args.crop) for f in members]
    d = _side_by_side(member_sets)
    y = np.array([r["label"] == "COVID-19" for r in train + val], int)
    tr, va = np.arange(len(train)), np.arange(len(train), len(rows))
    jpeg = np.array([r["format"] != "PNG" for r in val])
    whole = d["mask_fraction"] == 1.0  # lung_weights' answer where it found under a tenth of an image
    print(f"2-D lung mask: median {np.median(d['mask_fraction'][tr][~whole[tr]]):.2f} of a UCSD image "
          f"(under a tenth, whole image used: {np.mean(whole):.3f} of images)")
    index = {r["image_path"]: i for i, r in enumerate(train)}
    groupings = {"patient": train, "paper": group_by_paper(train)}
    folds = {g: [[[index[r["image_path"]] for r in f] for f in manifest_folds(rs, 5, seed)]
                 for seed in range(args.seeds)] for g, rs in groupings.items()}
    cohort, sets = None, []
    if args.ctmd:
        for f in members:
            patients, c = cohort_features(args.ctmd, f, dataclasses.replace(spec_for(f.cfg, f.backbone), lung_crop=args.crop))
            sets.append(c)
        cohort = patients, _side_by_side(sets)
    # with several backbones: each alone first (--each), then side by side
    names = [f.cfg.backbone.name for f in members]
    candidates = [(" + ".join(names) if len(members) > 1 else "", d, cohort)]
    if args.each and len(members) > 1:
        candidates = [(n, m, (cohort[0], c) if cohort else None)
                      for n, m, c in zip(names, member_sets, sets or [None] * len(names))] + candidates
    header = ["features", "classifier", "CV patient-grouped acc / AUC", "CV paper-grouped acc / AUC",
              "val acc / F1 / AUC", "val PNG / JPEG"]
    if cohort:
        header.append("transfer: vs normal / within patients")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for label, d, cohort in candidates:
        for fname, (X, Xm) in feature_sets(d).items():
            if args.features and fname not in args.features:
                continue
            for cname, make in classifiers().items():
                if args.classifier and cname not in args.classifier:
                    continue
                def fit(idx):
                    return make().fit(X[idx], y[idx])

                def score(m, A, Am):
                    return (m.decision_function(A) + m.decision_function(Am)) / 2

                cv = {}
                for g, assignments in folds.items():
                    acc, auc = [], []
                    for fs in assignments:
                        for k, held in enumerate(fs):
                            rest = np.array([i for j, f in enumerate(fs) if j != k for i in f])
                            held = np.array(held)
                            s = score(fit(rest), X[held], Xm[held])
                            acc.append(np.mean((s > 0) == y[held]))
                            auc.append(roc_auc_score(y[held], s))
                    cv[g] = f"{np.mean(acc):.3f} / {np.mean(auc):.3f}"
                m = fit(tr)
                s = score(m, X[va], Xm[va])
                pred = (s > 0).astype(int)
                hit = pred == y[va]
                cells = [f"{label}: {fname}" if label else fname, cname, cv["patient"], cv["paper"],
                         f"{hit.mean():.3f} / {f1_score(y[va], pred):.3f} / {roc_auc_score(y[va], s):.3f}",
                         f"{hit[~jpeg].mean():.3f} / {hit[jpeg].mean():.3f}"]
                if cohort:
                    patients, c = cohort
                    cs = feature_sets(c)[fname]
                    scores = score(m, *cs)
                    at, parts = 0, []
                    for p in patients:
                        parts.append(dict(p, scores=scores[at:at + p["n"]]))
                        at += p["n"]
                    t = infection_metrics(parts)
                    cells.append(f"{t['infection_auc_vs_normal']:.3f} / {t['infection_auc_within_patients']:.3f}")
                print("| " + " | ".join(cells) + " |", flush=True)
    if args.calibration:
        print("\n| features | CV grouped by | held-out ECE: selection-fifth temperature | out-of-fold temperature | "
              "no temperature | temperature: selection fifth / out-of-fold (mean ± sd) | folds where out-of-fold is lower |"
              "\n|---|---|---|---|---|---|---|")
        for fname, (X, Xm) in feature_sets(d).items():
            if args.features and fname not in args.features:
                continue
            for g, rs in groupings.items():
                r = temperatures_compared(X[tr], Xm[tr], y[tr], rs, args.seeds)
                e, t = r["ece"], r["temperature"]
                print(f"| {fname} | {g} | {e['select'][0]:.3f} ± {e['select'][1]:.3f} | {e['cv'][0]:.3f} ± {e['cv'][1]:.3f} "
                      f"| {e['none'][0]:.3f} ± {e['none'][1]:.3f} | {t['select'][0]:.2f} ± {t['select'][1]:.2f} / "
                      f"{t['cv'][0]:.2f} ± {t['cv'][1]:.2f} | {r['cv_lower']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
