"""The stage commands: ``finetune``, ``extract``, ``train``, ``evaluate``, ``run`` (all of them) and ``demo``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional
import typer
import typer.core
from msnet.cli.common import CONFIG_HELP, _overrides, _print_headline, app


@app.command()
def finetune(
    config: Path = typer.Argument(..., metavar="CONFIG", help=CONFIG_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override, e.g. --set finetune.epochs=2."),
    test: Optional[Path] = typer.Option(None, "--test", help="Held-out folder of the same layout to test on."),
    cv: bool = typer.Option(False, "--cv", help="First cross-validate the recipe on source-grouped folds of "
                            "`train` (finetune.folds, default 5); mean and sd under the key `cv`."),
    overwrite: bool = typer.Option(False, help="Redo finished work."),
    json_out: bool = typer.Option(False, "--json", help="Print the whole result as one JSON object instead of a summary."),
) -> None:
    """Stage 1: fine-tune the slice backbone on slice labels."""
    from msnet.config import load_config
    from msnet.models import check_config
    from msnet.stages.finetune import cross_validate
    from msnet.stages.slice_report import summary
    from msnet.stages.finetune import finetune as run_finetune

    cfg = load_config(config, _overrides(set_))
    check_config(cfg)
    cv_result = cross_validate(cfg, overwrite=overwrite) if cv else None
    result = run_finetune(cfg, test_dir=test, overwrite=overwrite)
    if cv_result is not None:
        result["cv"] = cv_result
    typer.echo(json.dumps(result, indent=2) if json_out else summary(result, cfg.run_path / "finetune"))


@app.command()
def extract(
    config: Path = typer.Argument(..., metavar="CONFIG", help=CONFIG_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override, e.g. --set extract.batch_size=16."),
    overwrite: bool = typer.Option(False, help="Recompute cached features."),
    strict: bool = typer.Option(False, help="Stop at the first study that fails."),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="torch or onnx (default: the config's extract.runtime)."),
    int8: bool = typer.Option(False, "--int8", help="With --runtime onnx: a static int8 backbone, used only where its "
                              "features agree with fp32 on held-out studies."),
) -> None:
    """Stage 2: backbone features of every slice of every study."""
    from msnet.config import load_config
    from msnet.models import check_config
    from msnet.stages.extract import extract as run_extract

    extra = ([f"extract.runtime={runtime}"] if runtime else []) + (["extract.int8=true"] if int8 else [])
    cfg = load_config(config, _overrides(set_) + extra)
    check_config(cfg)
    report = run_extract(cfg, overwrite=overwrite, strict=strict)
    typer.echo(report.summary())
    if report.n_failed:
        raise typer.Exit(1)


@app.command()
def train(
    config: Path = typer.Argument(..., metavar="CONFIG", help=CONFIG_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override, e.g. --set train.epochs=10."),
    folds: Optional[int] = typer.Option(None, "--folds", help="Patient-level stratified k-fold CV."),
    overwrite: bool = typer.Option(False, help="Retrain finished aggregators."),
) -> None:
    """Stage 3: train MS-Net (and baselines) on cached features."""
    from msnet.config import load_config
    from msnet.models import check_config
    from msnet.stages.train import train as run_train

    cfg = load_config(config, _overrides(set_))
    check_config(cfg)
    if folds is not None:
        cfg.train.folds = folds
    result = run_train(cfg, overwrite=overwrite)
    typer.echo(json.dumps(result, indent=2))


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="Run folder (the config's run_dir)."),
    partial: bool = typer.Option(False, "--partial", help="Also every aggregator on random contiguous sub-volumes "
                                 "keeping 100/75/50/25% of each test study's slices (table + plot)."),
    draws: int = typer.Option(5, help="With --partial: seeded draws of sub-volumes per study and fraction."),
    seed: int = typer.Option(0, help="Seed of the bootstrap and of the partial-scan draws."),
) -> None:
    """Metrics, bootstrap CIs, plots and report.md for a trained run."""
    from msnet.stages.evaluate import evaluate_run

    report = evaluate_run(run, seed=seed, partial=partial, partial_draws=draws)
    _print_headline(report)
    if partial:
        from msnet.stages.partial import partial_table

        typer.echo(partial_table(json.loads((report.parent / "partial.json").read_text())))
    typer.echo(f"report: {report}")


@app.command("run")
def run_all(
    config: Path = typer.Argument(..., metavar="CONFIG", help=CONFIG_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override, e.g. --set train.epochs=10."),
    overwrite: bool = typer.Option(False, help="Redo every stage."),
) -> None:
    """All stages (finetune, extract, train, evaluate), reusing finished work, then the bundle.

    CONFIG: a YAML file or a shipped config (`msnet run cpu` on a CPU, `msnet run paper` on a GPU)."""
    from msnet.config import load_config
    from msnet.models import check_config
    from msnet.stages.run import run_pipeline

    cfg = load_config(config, _overrides(set_))
    check_config(cfg)
    report = run_pipeline(cfg, overwrite=overwrite)
    if report.parent.name == "slice_head":  # a cohort too small for a patient-level model
        typer.echo(report.read_text())
    else:
        _print_headline(report)
    typer.echo(f"report: {report}")


@app.command()
def demo(
    out: Path = typer.Argument(Path("msnet-demo"), help="Output folder."),
    patients: int = typer.Option(150, help="Synthetic patients (split over the three classes; half held out for test)."),
    overwrite: bool = typer.Option(False, help="Redo every stage."),
    seed: int = typer.Option(0, help="Seed of the synthetic cohort."),
    threads: int = typer.Option(1, help="CPU threads (fixed, so that the numbers do not depend on free cores; one "
                                        "thread does not wait on a second one that shared cores hold up)."),
    config: str = typer.Option("cpu", help="Shipped config the pipeline runs with (cpu; ct: the CT-pretrained "
                               "astra backbone, frozen, with a linear probe)."),
) -> None:
    """The main job: synthetic cohort -> fine-tune -> extract -> MS-Net + baselines -> report.

    The same arguments give the same table on every run on one machine kind."""
    from msnet.stages.run import run_demo

    run_demo(out, n_patients=patients, overwrite=overwrite, seed=seed, threads=threads, config=config)
