"""ONNX export of a model bundle, parity checks, and static int8 quantisation.

``export_bundle`` writes, by default under ``BUNDLE/onnx/``::

    backbone.onnx          slice backbone, input images (n, 3, S, S) -> features (n, d), dynamic n; a slab
                           backbone (astra_slab): slabs (m, 3, k, S, S) -> features (m, d), read through
                           msnet.inference.onnx.SlabSession, which takes slices
    aggregator.onnx        aggregator, features (1, l, d) -> logits (1, k), dynamic l
    parity.json            torch vs ONNX Runtime on synthetic studies (max probability difference)
    backbone_int8.onnx     with ``int8=True``: statically quantised backbone (QDQ, per-channel weights)
    int8_agreement.json    with ``int8=True``: fp32 vs int8 (same class, max probability difference)

and records the folder in ``BUNDLE/onnx.json`` so that ``--runtime onnx`` finds it.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from msnet.data.cohorts import read_cohort
from msnet.data.synthetic import synth_cohort
from msnet.errors import MsnetError
from msnet.files import atomic_write_text
from msnet.inference.encoder import SliceEncoder
from msnet.inference.onnx import (
    AGGREGATOR_ONNX,
    BACKBONE_INT8_ONNX,
    BACKBONE_ONNX,
    ONNX_RECORD,
    export_backbone,
    ort_session,
    quantize_backbone,
)
from msnet.inference.predictor import Predictor
from msnet.io import read_study
from msnet.models.backbones import export_onnx

log = logging.getLogger(__name__)

PARITY_TOL = 1e-4
INT8_PROB_TOL = 0.02

# ------------------------------------------------------------------ export


class _AggregatorGraph(nn.Module):
    """Aggregator logits for one study's features (no mask input)."""

    def __init__(self, agg: nn.Module) -> None:
        super().__init__()
        self.agg = agg

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.agg(feats)


def _export_models(predictor, out: Path) -> None:
    export_backbone(predictor.bundle.backbone, predictor.spec.size, out / BACKBONE_ONNX)
    d = int(predictor.bundle.info["aggregator"]["in_features"])
    export_onnx(_AggregatorGraph(predictor.aggregator).eval(), (torch.randn(1, 7, d),), out / AGGREGATOR_ONNX,
                ["features"], ["logits"], {"features": {1: "slices"}})


def synthetic_studies(folder: Path, n: int = 3, size: int = 128, slices: tuple[int, int] = (8, 12),
                      seed: int = 11) -> list[Path]:
    """Write ``n`` small synthetic DICOM studies (one per class in turn) and return their folders."""

    synth_cohort(Path(folder), n_patients=n, size=size, seed=seed, slices=slices)
    return sorted(p for p in Path(folder).iterdir() if p.is_dir())


def _probs(result, classes: Sequence[str]) -> np.ndarray:
    return np.array([result.probabilities[c] for c in classes], dtype=np.float64)


def compare_runtimes(reference, other, volumes: list, cache: dict | None = None) -> dict:
    """Predict each volume with two predictors: per-study and overall agreement figures.

    ``cache`` (study_id -> result) keeps the reference's results between calls.
    """
    cache = {} if cache is None else cache
    rows = []
    for vol in volumes:
        a = cache.get(vol.study_id) or cache.setdefault(vol.study_id, reference.predict_volume(vol))
        b = other.predict_volume(vol)
        pa, pb = _probs(a, reference.classes), _probs(b, reference.classes)
        rows.append({"study_id": vol.study_id, "n_slices": vol.n_slices, "reference": a.prediction,
                     "other": b.prediction, "same_class": a.prediction == b.prediction,
                     "max_prob_diff": float(np.abs(pa - pb).max()),
                     "reference_probabilities": a.probabilities, "other_probabilities": b.probabilities})
    return {"n_studies": len(rows), "all_same_class": all(r["same_class"] for r in rows),
            "max_prob_diff": max((r["max_prob_diff"] for r in rows), default=0.0), "studies": rows}


def onnx_encoder(predictor, model: Path) -> SliceEncoder:
    """An ONNX Runtime encoder with the predictor's preprocessing and batch size."""
    return SliceEncoder(predictor.spec, runtime="onnx", onnx_model=model, batch_size=predictor.batch_size)


def _volumes(studies: Sequence[Path]) -> list:
    return [read_study(s) for s in studies]


# ------------------------------------------------------------------ int8


def _cohort_studies(bundle: Path) -> list[Path]:
    """Training studies of the bundle's cohort (metadata training_data.cohort, else config.yaml data.cohort)."""
    import yaml

    meta = json.loads((bundle / "metadata.json").read_text())
    csv = meta.get("training_data", {}).get("cohort") or ""
    if not csv and (bundle / "config.yaml").is_file():
        cfg = yaml.safe_load((bundle / "config.yaml").read_text()) or {}
        csv = (cfg.get("data") or {}).get("cohort") or ""
        if csv and not Path(csv).is_absolute() and cfg.get("source"):
            csv = str(Path(cfg["source"]) / csv)
    if not csv or not Path(csv).is_file():
        return []
    rows = read_cohort(Path(csv), only_ok=True)
    train = [r["path"] for r in rows if r.get("subset", "train") in ("train", "")]
    return [Path(p) for p in (train or [r["path"] for r in rows]) if Path(p).exists()]


def _calibration_sources(bundle: Path, calibration: Sequence[Path] | None) -> list[Path]:
    sources = [Path(p) for p in calibration] if calibration else _cohort_studies(bundle)
    if not sources:
        raise MsnetError("no calibration studies for int8: the bundle's training cohort is not readable",
                         bundle / "metadata.json", "pass calibration studies (calibration=[PATH, ...])")
    return sources


def calibration_batch(predictor, studies: Sequence[Path], n_slices: int = 96, max_studies: int = 12) -> np.ndarray:
    """Preprocessed slices (n, 3, S, S) spread evenly over up to ``max_studies`` studies."""

    studies = list(studies)
    if len(studies) > max_studies:
        studies = [studies[i] for i in np.linspace(0, len(studies) - 1, max_studies).round().astype(int)]
    return predictor.encoder.calibration_slices([read_study(s) for s in studies], n_slices)  # a slab network: slabs


def slab_length(backbone) -> int | None:
    """k of a slab backbone (it reads slabs of k neighbouring slices), None for a 2-D backbone."""
    return int(backbone.model.k) if getattr(backbone, "whole_study", False) else None


# ------------------------------------------------------------------ main entry


def export_bundle(bundle: Path, out: Path | None = None, int8: bool = False,
                  calibration: list[Path] | None = None, check_studies: list[Path] | None = None,
                  n_calibration: int = 96) -> dict:
    """Export a bundle's backbone and aggregator to ONNX, check parity, optionally add a static int8 backbone.

    Parity (torch vs ONNX Runtime fp32) is measured on small synthetic studies and must be within
    1e-4 in every probability. With ``int8``, calibration slices come from ``calibration`` (study
    paths) when given, else from the training studies of the bundle's cohort; agreement (same class,
    max probability difference) is measured on the synthetic studies and ``check_studies``
    (real studies, e.g. ``msnet export --check-study``) and written to int8_agreement.json.

    e.g. export_bundle(Path("runs/cpu/bundle"), int8=True)["int8"]["all_same_class"]
    True
    """

    bundle = Path(bundle)
    sources = _calibration_sources(bundle, calibration) if int8 else []
    out = Path(out) if out else bundle / "onnx"
    t0 = time.perf_counter()
    ref = Predictor(bundle, device="cpu", runtime="torch")
    out.mkdir(parents=True, exist_ok=True)
    _export_models(ref, out)
    onnx = ref.with_encoder(onnx_encoder(ref, out / BACKBONE_ONNX))
    with tempfile.TemporaryDirectory(prefix="msnet-export-") as tmp:
        synth = _volumes(synthetic_studies(Path(tmp) / "synthetic"))
    cache: dict = {}
    parity = compare_runtimes(ref, onnx, synth, cache)
    agg_session = ort_session(out / AGGREGATOR_ONNX)
    feats = ref.features(synth[0].hu, synth[0].kind)
    with torch.inference_mode():
        logits = ref.aggregator(feats[None]).numpy()
    onnx_logits = agg_session.run(None, {"features": np.ascontiguousarray(feats[None].numpy(), dtype=np.float32)})[0]
    parity["aggregator_max_logit_diff"] = float(np.abs(onnx_logits - logits).max())
    parity["tolerance"] = PARITY_TOL
    parity["ok"] = bool(parity["all_same_class"] and parity["max_prob_diff"] <= PARITY_TOL)
    atomic_write_text(out / "parity.json", json.dumps(parity, indent=2))
    log.info("ONNX parity on %d synthetic studies: max probability difference %.2e", parity["n_studies"],
             parity["max_prob_diff"])
    if not parity["ok"]:
        raise MsnetError(f"ONNX export does not match PyTorch (max probability difference "
                         f"{parity['max_prob_diff']:.2e} > {PARITY_TOL})", out / "parity.json",
                         "report this with the bundle's backbone name and the versions of torch and onnxruntime")
    result = {"out": str(out), "backbone": str(out / BACKBONE_ONNX), "aggregator": str(out / AGGREGATOR_ONNX),
              "parity": {k: v for k, v in parity.items() if k != "studies"}}
    if int8:
        result["int8"] = export_int8(bundle, out, ref, calibration=sources, check_studies=check_studies,
                                     synth=synth, n_calibration=n_calibration, cache=cache)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_text(bundle / ONNX_RECORD, json.dumps({"out": str(out.resolve())}, indent=2))
    return result


def int8_agreement(ref, model: Path, volumes: list, cache: dict | None = None) -> dict:
    """fp32 torch (``ref``) against an int8 ONNX backbone on ``volumes``: per-study figures and ``ok``
    (same class everywhere and every probability within INT8_PROB_TOL)."""
    agree = compare_runtimes(ref, ref.with_encoder(onnx_encoder(ref, model)), volumes, cache)
    agree["tolerance"] = INT8_PROB_TOL
    agree["ok"] = bool(agree["all_same_class"] and agree["max_prob_diff"] <= INT8_PROB_TOL)
    return agree


def export_int8(bundle: Path, out: Path, ref, calibration: list[Path] | None = None,
                check_studies: list[Path] | None = None, synth: list | None = None,
                n_calibration: int = 96, cache: dict | None = None) -> dict:
    """Write backbone_int8.onnx and int8_agreement.json (fp32 torch vs int8 ONNX Runtime); return the figures."""
    sources = _calibration_sources(bundle, calibration)
    t = time.perf_counter()
    calib = calibration_batch(ref, sources, n_slices=n_calibration)
    quantize_backbone(out / BACKBONE_ONNX, out / BACKBONE_INT8_ONNX, calib, *ref.encoder.normalisation)
    quant_s = time.perf_counter() - t
    check_studies = list(check_studies or [])  # real studies to check on, besides the synthetic ones
    vols = list(synth or []) + _volumes(check_studies)
    agree = int8_agreement(ref, out / BACKBONE_INT8_ONNX, vols, cache)
    agree.update({"calibration_slices": int(len(calib)) * (slab_length(ref.bundle.backbone) or 1),
                  "calibration_studies": len(sources),
                  "quantize_s": round(quant_s, 2),
                  "format": "QDQ, per-channel int8 weights, uint8 activations, MinMax calibration"})
    atomic_write_text(out / "int8_agreement.json", json.dumps(agree, indent=2))
    msg = (f"int8 backbone: same class on {sum(r['same_class'] for r in agree['studies'])}/{agree['n_studies']} "
           f"studies, max probability difference {agree['max_prob_diff']:.4f} (tolerance {INT8_PROB_TOL})")
    (log.info if agree["ok"] else log.warning)(msg)
    return {k: v for k, v in agree.items() if k != "studies"}


def print_export(result: dict, console=None) -> None:
    """Print what export_bundle wrote, its parity and (with int8) the agreement figures."""
    from rich.console import Console

    console = console or Console()
    p = result["parity"]
    console.print(f"ONNX models in {result['out']}: {BACKBONE_ONNX}, {AGGREGATOR_ONNX}")
    console.print(f"parity torch vs ONNX Runtime on {p['n_studies']} synthetic studies: same class {p['all_same_class']}, "
                  f"max probability difference {p['max_prob_diff']:.2e} (tolerance {p['tolerance']:.0e})")
    q = result.get("int8")
    if q:
        verdict = "agrees" if q["ok"] else "does NOT agree: use the fp32 model"
        console.print(f"int8 {BACKBONE_INT8_ONNX} (calibrated on {q['calibration_slices']} slices of "
                      f"{q['calibration_studies']} studies): same class {q['all_same_class']} on {q['n_studies']} studies, "
                      f"max probability difference {q['max_prob_diff']:.4f} (tolerance {q['tolerance']}) -> {verdict}")
