"""`msnet run` (all stages, reusing finished work) and `msnet demo` (the main job)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from msnet.config import Config, load_config
from msnet.files import atomic_write_text

log = logging.getLogger(__name__)


def run_pipeline(cfg: Config, overwrite: bool = False) -> Path:
    """finetune -> extract -> train -> evaluate (-> model bundle); returns report.md."""
    from msnet.stages.evaluate import evaluate_run
    from msnet.stages.extract import extract
    from msnet.stages.finetune import finetune
    from msnet.stages.train import train

    timings = {}
    t0 = time.perf_counter()
    if cfg.finetune.enabled:
        log.info("stage 1/4: fine-tuning %s", cfg.backbone.name)
        finetune(cfg, overwrite=overwrite)
    timings["finetune_s"] = time.perf_counter() - t0
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
    path = evaluate_run(cfg.run_path)
    timings["evaluate_s"] = time.perf_counter() - t3
    try:
        from msnet.inference.predictor import build_bundle
    except ImportError:
        build_bundle = None
    if build_bundle is not None:
        bundle = build_bundle(cfg)
        log.info("model bundle: %s", bundle)
    atomic_write_text(cfg.run_path / "timings.json", json.dumps(timings, indent=2))
    return path


def headline(metrics: dict):
    """A compact terminal table of the test metrics of every model (full table: report.md)."""
    from rich.table import Table

    classes = metrics["classes"]
    table = Table(title=f"patient-level test results (%), n = {metrics['n']}; per-class columns: sensitivity")
    for col in ["model", "acc.", "95% CI", "bal. acc.", "AUC", *classes]:
        table.add_column(col, justify="left" if col == "model" else "right")

    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}"

    for name, m in metrics["by_aggregator"].items():
        lo, hi = m["ci"]["accuracy"]
        table.add_row(name, pct(m["accuracy"]), f"{pct(lo)}–{pct(hi)}", pct(m["balanced_accuracy"]),
                      pct(m["macro_auc"]), *[pct(m["sensitivity"][c]) for c in classes])
    return table


def demo_config(out: Path) -> Config:
    """The cpu config pointed at the demo's synthetic cohort."""
    cfg = load_config(Path(__file__).parent / "configs" / "cpu.yaml")
    cfg.source = str(out.resolve())
    cfg.run_dir = "run"
    cfg.data.cohort = "data/cohort.csv"
    cfg.data.slice_labels = "data/slice_labels.csv"
    return cfg


def run_demo(out: Path, n_patients: int = 120, overwrite: bool = False, seed: int = 0) -> dict:
    """Synthetic cohort -> fine-tune -> extract -> MS-Net + baselines -> report; prints the headline."""
    from rich.console import Console

    from msnet.data.synthetic import synth_cohort

    console = Console()
    out = Path(out)
    start = time.perf_counter()
    data = out / "data"
    if overwrite and out.exists():
        shutil.rmtree(out)
    if not (data / "cohort.csv").exists():
        console.print(f"writing a synthetic cohort of {n_patients} patients to {data} …")
        synth_cohort(data, n_patients=n_patients, size=256, seed=seed, slices=(30, 60), split=(0.2, 0.3))
    cfg = demo_config(out)
    report = run_pipeline(cfg, overwrite=False)
    metrics = json.loads((cfg.run_path / "evaluate" / "metrics.json").read_text())
    elapsed = time.perf_counter() - start
    metrics["elapsed_s"] = elapsed
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    console.print(headline(metrics))
    console.print(
        f"\nMS-Net patient-level test accuracy: [bold]{metrics['accuracy']:.3f}[/] "
        f"({elapsed:.0f} s)\nreport: {report}\nmetrics: {out / 'metrics.json'}"
    )
    return metrics
