"""`msnet run` (all stages, reusing finished work) and `msnet demo` (the main job)."""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
from pathlib import Path

from msnet.config import Config, load_config, versions
from msnet.data.cohorts import read_cohort
from msnet.data.synthetic import SYNTHETIC_MARKER, is_synthetic, synth_cohort
from msnet.device import reproducible
from msnet.errors import MsnetError
from msnet.files import atomic_write_text, read_csv_rows
from msnet.inference import bundle as B
from msnet.inference.predictor import pick_key_slices
from msnet.metrics import pct
from msnet.models import check_config
from msnet.stages.evaluate import evaluate_run, format_console_table
from msnet.stages.extract import backbone_source, extract, feature_dir, load_encoder
from msnet.stages.finetune import finetune
from msnet.stages.train import train

log = logging.getLogger(__name__)


def run_pipeline(cfg: Config, overwrite: bool = False, partial: bool = False) -> Path:
    """finetune -> extract -> train -> evaluate (-> model bundle); returns report.md.

    ``partial``: evaluate also re-evaluates every aggregator on partial scans (``evaluate --partial``).
    """

    check_config(cfg)  # names checked before any stage runs
    timings = {}
    t0 = time.perf_counter()
    if cfg.finetune.enabled:
        log.info("stage 1/4: fine-tuning %s", cfg.backbone.name)
        finetune(cfg, overwrite=overwrite)
    timings["finetune_s"] = time.perf_counter() - t0
    too_small = cohort_too_small(cfg)
    if too_small:  # no aggregator can be trained and tested on it: the slice head's scores are the result
        log.warning("%s", too_small)
        atomic_write_text(cfg.run_path / "timings.json", json.dumps(timings, indent=2))
        return slice_head_report(cfg, too_small)
    t1 = time.perf_counter()
    log.info("stage 2/4: extracting features")
    report = extract(cfg, overwrite=overwrite)
    log.info(report.summary())
    timings["extract_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    log.info("stage 3/4: training %s", ", ".join(cfg.train.aggregators))
    train(cfg, overwrite=overwrite)
    timings["train_s"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    log.info("stage 4/4: evaluating")
    path = evaluate_run(cfg.run_path, partial=partial)
    timings["evaluate_s"] = time.perf_counter() - t3
    bundle = build_bundle(cfg)
    log.info("model bundle: %s", bundle)
    atomic_write_text(cfg.run_path / "timings.json", json.dumps(timings, indent=2))
    return path


MIN_PATIENTS_PER_CLASS = 4
"""Fewer patients of a class than this cannot fill MS-Net's training, validation and test splits."""
KEY_SLICES = 5
KEY_SLICE_DISTANCE = 5
"""Key slices of the slice-head report lie at least this many slices apart (one per region)."""


def key_slices(scores) -> list[int]:
    """The report's :data:`KEY_SLICES` key slices, :data:`KEY_SLICE_DISTANCE` slices apart: the predictor's
    non-maximum suppression along z, on slice indices."""
    import numpy as np

    return [int(i) for i in pick_key_slices(np.asarray(scores, float), KEY_SLICES, np.arange(len(scores), dtype=float),
                                            KEY_SLICE_DISTANCE)]


def cohort_too_small(cfg: Config) -> str | None:
    """Why the cohort cannot train and test an aggregator (fewer than :data:`MIN_PATIENTS_PER_CLASS` patients of
    a class, or none of a class), or None."""

    if not cfg.data.cohort:
        return None
    rows = read_cohort(cfg.resolve(cfg.data.cohort), only_ok=True)
    counts = {c: sum(r["label"] == c for r in rows) for c in cfg.data.classes}
    if min(counts.values()) >= MIN_PATIENTS_PER_CLASS:
        return None
    return (f"{len(rows)} patients ({', '.join(f'{c}: {n}' for c, n in counts.items())}) cannot train and test "
            f"MS-Net or any patient-level aggregator (at least {MIN_PATIENTS_PER_CLASS} patients of each class are "
            "needed for its training, validation and test splits); the run stops after the slice head: its "
            "per-slice infection scores, each patient scored by a slice head that never saw it, are the result")


def slice_head_report(cfg: Config, why: str) -> Path:
    """``RUN/slice_head/report.md`` (+ ``report.json``): each patient's mean infection score and key slices
    from the stage-1 cross-validation's out-of-fold slice scores (``msnet finetune CONFIG --cv``)."""
    import numpy as np

    out = cfg.run_path / "slice_head"
    scores_csv = cfg.run_path / "finetune" / "cv" / "slice_scores.csv"
    patients: dict[str, dict] = {}
    if scores_csv.is_file():
        for r in read_csv_rows(scores_csv):
            p = patients.setdefault(r["patient_id"], {"label": r["label"], "scores": [], "labels": []})
            p["scores"].append(float(r["infection_score"]))
            p["labels"].append(r["slice_label"])
    result = {"why": why, "source": str(scores_csv) if patients else None, "out_of_fold": bool(patients),
              "patients": {pid: {"label": p["label"], "n_slices": len(p["scores"]),
                                 "mean_infection_score": round(float(np.mean(p["scores"])), 4),
                                 "key_slices": [{"slice_index": i, "score": round(p["scores"][i], 4),
                                                 "labelled_infected": p["labels"][i] == "1"}
                                                for i in key_slices(p["scores"])]}
                           for pid, p in patients.items()}}
    lines = ["# Slice head only", "", why + ".", ""]
    if patients:
        lines += [f"Out-of-fold slice scores from `{scores_csv}` (slice index: canonical order, 0 = most superior).", "",
                  "| patient | label | mean infection score | key slices (score, * = labelled infected) |",
                  "|---|---|---|---|"]
        for pid, p in result["patients"].items():
            keys = ", ".join(f"{k['slice_index']} ({k['score']:.2f}{'*' if k['labelled_infected'] else ''})"
                             for k in p["key_slices"])
            lines.append(f"| {pid} | {p['label']} | {p['mean_infection_score']:.3f} | {keys} |")
    else:
        lines.append("No out-of-fold slice scores: run `msnet finetune CONFIG --cv` (a linear probe on a CT cohort).")
    atomic_write_text(out / "report.json", json.dumps(result, indent=2))
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


def build_bundle(cfg: Config, aggregator: str = "msnet", out: Path | None = None) -> Path:
    """Collect the run's backbone, aggregator, config and a model card into ``RUN/bundle``."""
    from dataclasses import asdict

    import yaml

    run = cfg.run_path
    adir = run / "train" / aggregator
    agg_ckpt = next((p for p in [adir / "model.pt", *sorted(adir.glob("model_fold*.pt"))] if p.is_file()), None)
    if agg_ckpt is None:
        raise MsnetError(f"no trained {aggregator!r} model", adir, "run `msnet train CONFIG` first")
    ckpt_path, _ = backbone_source(cfg)
    if ckpt_path is None:  # no fine-tuning: the configured backbone, written in the bundle schema
        encoder = load_encoder(cfg)
        ckpt_path = run / "train" / "backbone.pt"
        B.save_backbone(ckpt_path, encoder.backbone, encoder.spec, list(cfg.data.classes))
    binfo, ainfo = B.checkpoint_info(ckpt_path), B.checkpoint_info(agg_ckpt)

    def read_json(path: Path) -> dict:
        return json.loads(path.read_text()) if path.is_file() else {}

    metrics = read_json(run / "evaluate" / "metrics.json")
    by_agg = metrics.get("by_aggregator", {}).get(aggregator, metrics)
    ft = read_json(run / "finetune" / "metrics.json")
    fmeta = read_json(feature_dir(cfg) / "meta.json")
    synthetic = bool(cfg.data.cohort) and is_synthetic(cfg.resolve(cfg.data.cohort))
    card = B.model_card(
        spec=B.PreprocessSpec.from_dict(binfo["preprocess"]), classes=list(ainfo["classes"]),
        name=f"msnet-{cfg.backbone.name}-{aggregator}",
        backbone={"name": cfg.backbone.name, "fine_tuned": cfg.finetune.enabled, "n_features": ainfo["in_features"],
                  "features": (f"channel mean and {'covariance' if binfo.get('pool_covariance') else 'sd'} of stages "
                               f"{list(binfo['pool_stages'])}"
                               + (", over the image and inside its lungs" if binfo.get("pool_lungs") else "")
                               if binfo.get("pool_stages") else "average-pooled last feature map"),
                  **({"pretrained_weights": binfo["provenance"]} if binfo.get("provenance") else {}),
                  **({"plane": "ras"} if cfg.backbone.name.startswith("astra") else {})},
        aggregator={"name": aggregator, "config": ainfo["config"], "fold": ainfo.get("fold", 0),
                    "feature_dtype": ainfo.get("feature_dtype", "float32")},
        training_data={"cohort": str(cfg.resolve(cfg.data.cohort)) if cfg.data.cohort else "",
                       "n_studies": fmeta.get("n_studies"), "feature_set": ainfo.get("feature_set"),
                       "synthetic": synthetic},
        metrics={"patient_level_test": {k: by_agg.get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1",
                                                                     "macro_auc", "sensitivity") if k in by_agg},
                 "slice_level_val": {k: ft.get(k) for k in ("accuracy", "sensitivity") if k in ft}},
        versions=versions(),
    )
    return B.write_bundle(Path(out) if out else run / "bundle", ckpt_path, agg_ckpt, card,
                          yaml.safe_dump(asdict(cfg), sort_keys=False),
                          ood=B.describe_training_features(feature_dir(cfg)))


DEMO_SPLIT = (0.15, 0.5)
"""Validation and test fractions of the demo cohort (per class): half the patients are held out, so that
one test patient is about one point of accuracy and the aggregators' differences are several patients."""
DEMO_THREADS = 1
"""CPU threads of every demo run, whatever the machine has or has free (the numbers depend on it)."""


DEMO_SETTINGS = ["finetune.batch_size=16", "finetune.epochs=6"]
"""The demo's changes to the ``cpu`` config: fine-tuning takes three times its optimiser steps, enough for
the backbone to tell small ground-glass foci from vessels, nodules and atelectasis."""


def demo_config(out: Path, config: str = "cpu", overrides: list[str] | None = None) -> Config:
    """A shipped config (``cpu`` with :data:`DEMO_SETTINGS` by default) pointed at the demo's synthetic
    cohort in ``out/data``."""
    if overrides is None:
        overrides = DEMO_SETTINGS if config == "cpu" else []
    cfg = load_config(config, overrides)
    cfg.source = str(out.resolve())
    cfg.run_dir = "run"
    cfg.data.cohort = "data/cohort.csv"
    cfg.data.slice_labels = "data/slice_labels.csv"
    return cfg


def markdown_table(metrics: dict) -> str:
    """The demo's headline as the Markdown table README.md shows (percentages, per-class sensitivity)."""

    classes = metrics["classes"]
    lines = ["| model | accuracy [95% CI] | balanced acc. | macro AUC | " + " | ".join(f"sens. {c}" for c in classes)
             + " |", "|---" * (4 + len(classes)) + "|"]
    for name, m in metrics["by_aggregator"].items():
        lo, hi = (m.get("ci") or {}).get("accuracy") or (None, None)
        cells = [name, f"{pct(m.get('accuracy'))} [{pct(lo)}, {pct(hi)}]", pct(m.get("balanced_accuracy")),
                 pct(m.get("macro_auc")), *[pct((m.get("sensitivity") or {}).get(c)) for c in classes]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _demo_cohort(data: Path, n_patients: int, size: int, seed: int, slices: tuple[int, int], console) -> None:
    """Write the demo's cohort, or check that the one already in ``data`` was made with these arguments."""

    wanted = {"n_patients": n_patients, "size": size, "seed": seed, "slices": list(slices)}
    marker = data / SYNTHETIC_MARKER
    if (data / "cohort.csv").exists() and marker.is_file():
        made = json.loads(marker.read_text())
        if {k: made.get(k) for k in wanted} != wanted:
            raise MsnetError(f"this folder holds a demo cohort made with other arguments "
                             f"({', '.join(f'{k}={made.get(k)}' for k in wanted)})", data,
                             "pass --overwrite to remake it, or another output folder")
        return
    console.print(f"writing a synthetic cohort of {n_patients} patients to {data} …")
    synth_cohort(data, n_patients=n_patients, size=size, seed=seed, slices=slices, split=DEMO_SPLIT)


def run_demo(out: Path, n_patients: int = 150, overwrite: bool = False, seed: int = 0, threads: int = DEMO_THREADS,
             *, size: int = 256, slices: tuple[int, int] = (30, 60), config: str = "cpu",
             overrides: list[str] | None = None) -> dict:
    """Synthetic cohort -> fine-tune -> extract -> MS-Net + baselines -> report; prints the headline.

    Reproducible: the same arguments give the same tables on every run on one machine kind, however busy
    it is (seeded RNGs, ``threads`` CPU threads, deterministic algorithms; see :func:`msnet.device.reproducible`).
    Writes ``out/table.txt`` (the console table) and ``out/table.md`` (README's table) beside ``out/metrics.json``.
    """
    from rich.console import Console

    console = Console()
    out = Path(out)
    start = time.perf_counter()
    if overwrite and out.exists():
        shutil.rmtree(out)
    with reproducible(seed, threads):
        _demo_cohort(out / "data", n_patients, size, seed, slices, console)
        cfg = demo_config(out, config, overrides)
        report = run_pipeline(cfg, overwrite=False, partial=True)
    metrics = json.loads((cfg.run_path / "evaluate" / "metrics.json").read_text())
    elapsed = time.perf_counter() - start
    metrics["elapsed_s"] = elapsed
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    table = format_console_table(metrics)
    plain = Console(width=80, color_system=None, force_terminal=False, record=True, file=io.StringIO())
    plain.print(table)
    atomic_write_text(out / "table.txt", plain.export_text())
    atomic_write_text(out / "table.md", markdown_table(metrics))
    console.print(table)
    console.print(
        f"\nMS-Net patient-level test accuracy: [bold]{metrics['accuracy']:.3f}[/] "
        f"({elapsed:.0f} s, {threads} threads)\nreport: {report}\nmetrics: {out / 'metrics.json'}"
    )
    return metrics
