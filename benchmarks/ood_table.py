"""The OOD score on real chest CT against odd inputs: which description separates them best (docs/gates.md).

The features are those of the ``cpu`` config's backbone (EfficientNet-Lite0, ImageNet weights, 128 px, the
lung window), the description is fitted on the three real COVID-CT-MD scans of the shared data (held in;
every scan is also scored by a description of the other two: held out), and scored on: the same scans
mirrored left-right, a sagittal reformat, the scan without its -1024 intercept, a cat photo as a 40-slice
NIfTI in -983..54 HU and as a PNG, the abdomen scans of the shared data, figures of the UCSD set (PNG),
and msnet's synthetic phantoms. The gate's verdict is printed beside each (the OOD score is a second line
of defence behind it). Prints a markdown table and, per method, the AUC of held-out real scans against
the odd inputs and the margin between them.

    python benchmarks/ood_table.py [FEATURES.npz]   # about 2-4 min on 2 cores; the npz keeps the features
"""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SAMPLE = DATA / "covid-ct-md" / "Sample data"
REAL = {"P001": SAMPLE / "COVID-19 subjects" / "P001", "cap002": SAMPLE / "Cap subjects" / "cap002",
        "normal001": SAMPLE / "Normal subjects" / "normal001"}


def _cases():
    from PIL import Image
    from scipy import ndimage as ndi
    from skimage import color, data

    from msnet.data.synthetic import synth_cohort
    from msnet.io import CTVolume, read_study

    real = {k: read_study(p) for k, p in REAL.items()}
    yield "real", real
    n = real["normal001"]
    odd = {}
    for k, v in real.items():
        odd[f"{k} mirrored (pixels)"] = CTVolume(np.ascontiguousarray(v.hu[:, :, ::-1]), v.spacing_mm, v.z_mm, k, "x")
    iso = ndi.zoom(n.hu[:, 96:416, :], (n.spacing_mm[0] / n.spacing_mm[1], 1.0, 1.0), order=1)  # (z, y, x) 0.635 mm
    sag = np.ascontiguousarray(iso.transpose(2, 0, 1)[128:384:4])  # 64 sagittal slices of (z, y)
    odd["normal001 sagittal"] = CTVolume(sag.astype(np.float32), (4 * n.spacing_mm[2], n.spacing_mm[1], n.spacing_mm[1]),
                                         -np.arange(len(sag)) * 4 * n.spacing_mm[2], "sag", "x")
    odd["normal001 without intercept"] = CTVolume(n.hu + 1024.0, n.spacing_mm, n.z_mm, "noint", "x")
    cat = color.rgb2gray(data.chelsea())
    cat_hu = (-983.0 + 1037.0 * (cat - cat.min()) / np.ptp(cat)).astype(np.float32)
    odd["cat as NIfTI (-983..54 HU)"] = CTVolume(np.repeat(cat_hu[None], 40, 0), (2.0, 0.8, 0.8), -np.arange(40) * 2.0,
                                                 "cat", "x")
    odd["cat as PNG (grey)"] = CTVolume((cat * 255.0).astype(np.float32)[None], (1.0, 1.0, 1.0), np.zeros(1), "cat",
                                        "x", kind="grey")
    zoo = DATA / "dicom-zoo" / "totalsegmentator-example"
    odd["abdomen NIfTI (shared)"] = read_study(zoo / "example_ct.nii.gz")
    odd["upper abdomen DICOM (shared)"] = read_study(zoo / "example_ct_dicom")
    ucsd = sorted((DATA / "ucsd-covid-ct" / "val" / "CT_NonCOVID").iterdir())[:12]
    for i, f in enumerate(ucsd[:4]):
        grey = np.asarray(Image.open(f).convert("L"), dtype=np.float32)[None]
        odd[f"UCSD figure {i} (PNG, grey)"] = CTVolume(grey, (1.0, 1.0, 1.0), np.zeros(1), f.stem, "x", kind="grey")
    with tempfile.TemporaryDirectory() as tmp:
        synth_cohort(Path(tmp), 2, size=256, seed=3, slices=(30, 40))
        for i, st in enumerate(sorted(p for p in Path(tmp).iterdir() if p.is_dir())):
            odd[f"synthetic phantom {i}"] = read_study(st)
    yield "odd", odd


def _auc(pos: list[float], neg: list[float]) -> float:
    """P(an odd input scores above a held-out real scan)."""
    return float(np.mean([(o > r) + 0.5 * (o == r) for o in pos for r in neg]))


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(2)
    from msnet.errors import MsnetError
    from msnet.gates import check_input_kind, check_lungs
    from msnet.inference.encoder import SliceEncoder
    from msnet.inference.ood import FeatureDescription
    from msnet.models.backbones import create
    from msnet.preprocess import LUNG, PreprocessSpec

    bb = create("efficientnet_lite0", pretrained=True).eval()
    spec = PreprocessSpec(windows=(LUNG,), size=128, mean=tuple(bb.data_config["mean"]), std=tuple(bb.data_config["std"]))
    enc = SliceEncoder(spec, bb, batch_size=32)
    feats, verdict = {}, {}
    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else None  # features and verdicts kept here between runs
    if cache is not None and cache.is_file():
        saved = np.load(cache, allow_pickle=False)
        feats = {k[2:]: saved[k] for k in saved.files if k.startswith("f:")}
        verdict = {k[2:]: str(saved[k]) for k in saved.files if k.startswith("v:")}
    for group, vols in ([] if feats else _cases()):
        for name, v in vols.items():
            with torch.inference_mode():
                feats[name] = enc.encode(v.hu, v.kind).float().numpy()
            try:
                check_input_kind(v, "hu")
                check_lungs(v)
                verdict[name] = "passes"
            except MsnetError as exc:
                verdict[name] = "refused: " + ("2-D images" if "2-D" in str(exc) else "not a chest CT"
                                               if "plausible" in str(exc) else "no/too little lung")
            print(f"  encoded {name} ({len(v.hu)} slices)", file=sys.stderr)
    if cache is not None and not cache.is_file():
        np.savez(cache, **{f"f:{k}": v for k, v in feats.items()}, **{f"v:{k}": np.str_(v) for k, v in verdict.items()})
    real = list(REAL)
    odd = [k for k in feats if k not in REAL]
    rows = {}
    for method in ("knn", "mahalanobis"):
        held_in = FeatureDescription.fit({k: feats[k] for k in real}, method=method)
        out = {k: held_in.score(feats[k]) for k in feats}
        loso = {k: FeatureDescription.fit({j: feats[j] for j in real if j != k}, method=method).score(feats[k])
                for k in real}
        rows[method] = (held_in, out, loso)
        neg, pos = list(loso.values()), [out[k] for k in odd]
        mirrored = [k for k in odd if "mirrored" in k]
        pos_strict = [out[k] for k in odd if k not in mirrored]
        print(f"{method}: threshold {held_in.threshold:.3f}; AUC held-out real vs odd (mirrors excluded) "
              f"{_auc(pos_strict, neg):.3f}; lowest odd / highest held-out real "
              f"{min(pos_strict) / max(neg):.2f}; mirrors / held-in real {np.mean([out[k] for k in mirrored]) / np.mean([out[k] for k in real]):.2f}")
    print()
    print("| input | gate | kNN score (percentile) | kNN held out | Mahalanobis score (percentile) | Mahalanobis held out |")
    print("|---|---|---|---|---|---|")
    for k in feats:
        cells = []
        for method in ("knn", "mahalanobis"):
            d, out, loso = rows[method]
            flag = " **over**" if out[k] > d.threshold else ""
            cells += [f"{out[k]:.3f} ({d.percentile(out[k]):.0f}){flag}", f"{loso[k]:.3f}" if k in loso else ""]
        print(f"| {k} | {verdict[k]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
