"""Command line: thin typer commands over the library functions.

Heavy modules are imported inside each command so that ``msnet --help`` is
instant. A :class:`msnet.errors.MsnetError` is printed without a traceback and
exits with code 2. SIGTERM (what systemd, Docker and Kubernetes send) ends a
command as cleanly as Ctrl-C: decode workers are stopped, temp files removed,
exit code 143. JSON output never holds a bare NaN (it would not be JSON).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
import typer.core

from msnet.errors import MsnetError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="msnet: Multi-Slice Net diagnosis of chest CT (COVID-19 / CAP / normal).",
)
bench_app = typer.Typer(no_args_is_help=True, help="Performance, as ratios measured in one run.")
app.add_typer(bench_app, name="bench")

log = logging.getLogger("msnet")
CONFIGS = Path(__file__).parent / "configs"


def _shipped_configs() -> str:
    """The shipped configs' names, read from the package's configs folder."""
    return ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))


CONFIG_HELP = f"YAML config, or the name of a shipped one ({_shipped_configs()})."


def _value_label(self, ctx) -> str | None:
    """What --help shows after an option or argument: nothing after a flag (it takes no value); else the
    value it takes, in capitals (PATH, TEXT, INTEGER), once for a repeatable option."""
    if self.metavar is not None:  # an argument's metavar is its name, shown already
        return None if isinstance(self, typer.core.TyperArgument) else self.metavar
    if getattr(self, "is_flag", False):
        return None
    label = self.display_type(ctx).strip("<>")
    label = label.removeprefix("list[").removesuffix("]")
    return {"str": "TEXT", "int": "INTEGER", "float": "NUMBER"}.get(label, label.upper())


def _plain_help() -> None:
    """Typer's help shows type tags such as <bool> and <list[str]>, which make flags look as if they took
    a value; show PATH, TEXT, INTEGER instead, and nothing after a flag."""
    typer.core.TyperOption.display_type_rich = _value_label
    typer.core.TyperArgument.display_type_rich = _value_label


_plain_help()


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, show_time=False, console=_stderr_console())],
        force=True,
    )
    # third-party chatter
    for name in ("PIL", "matplotlib", "pydicom", "timm", "urllib3", "httpx", "dicomweb_client", "pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _overrides(values: Optional[List[str]]) -> list[str]:
    return list(values or [])


def _print_headline(report: Path) -> None:
    """The headline comparison table of an evaluated run (``report``: its evaluate/report.md)."""
    from rich.console import Console

    from msnet.stages.evaluate import format_console_table

    Console().print(format_console_table(json.loads((report.parent / "metrics.json").read_text())))


def _json(obj) -> str:
    """Strict JSON: a NaN or infinite number is an error, never the invalid token ``NaN``."""
    try:
        return json.dumps(obj, allow_nan=False)
    except ValueError as exc:
        raise MsnetError(f"the result holds a NaN or infinite number ({exc})",
                         fix="report this study; no result with NaN is printed") from exc


def _print_error(label: str, text: str) -> None:
    """``label`` in red, then the message as plain text (a message may hold brackets, never markup)."""
    from rich.text import Text

    _stderr_console().print(Text.assemble((label, "red"), text), highlight=False)


_TERMINATED: list[int] = []


def _on_sigterm(signum: int, frame) -> None:
    """SIGTERM as a clean exit: stop decode workers now, then unwind (finally blocks, atexit)."""
    _TERMINATED.append(signum)
    decode = sys.modules.get("msnet.io.decode")
    if decode is not None:
        decode.stop_workers()
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------- data


@app.command()
def inspect(
    study: str = typer.Argument(..., help="DICOM folder, .nii/.nii.gz, image folder, image file, a .zip of any, "
                                "or DICOMweb study URL."),
    json_out: bool = typer.Option(False, "--json", help="Emit one JSON object."),
    series: Optional[str] = typer.Option(None, help="SeriesInstanceUID or index of the series to read."),
) -> None:
    """Read a study; print slices, spacing, z order, HU range, series chosen, lungs (volume, z-range), every
    check of the chest-CT gate with its value, warnings."""
    from msnet.io import describe, open_study
    from msnet.gates import check_lungs, gate_stats

    vol = open_study(study, series=series)
    info = describe(vol)
    if vol.kind == "hu":  # grey-level images have no HU: no lungs to measure
        stats = gate_stats(vol, coarse=False)  # the fine grid: the values a refusal is judged on
        info.update(stats.to_dict())
        info["checks"] = stats.checks
        try:
            check_lungs(vol, stats)
            info["lung_gate"] = "ok"
            info["warnings"] += stats.warnings
        except MsnetError as exc:
            info["lung_gate"] = "refused"
            info["warnings"].append(f"{exc.problem} (predict refuses it)")
    if json_out:
        typer.echo(_json(info))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"study {info['study_id']}", show_header=False)
    for key, value in info.items():
        if key in ("warnings", "z_mm", "checks") or key.startswith("lung"):
            continue
        table.add_row(key, str(value))
    z = info["z_mm"]
    if z:
        table.add_row("z_mm", f"{z[0]:.1f} … {z[-1]:.1f} ({'descending' if z[0] >= z[-1] else 'ascending'})")
    if "lung_volume_ml" in info:
        table.add_row("lung volume", f"{info['lung_volume_ml']:.0f} ml")
        if info["lung_slices"]:
            (s0, s1), (z0, z1) = info["lung_slices"], info["lung_z_mm"]
            table.add_row("lung z-range", f"slices {s0}-{s1} ({z0:.1f} … {z1:.1f} mm, "
                                          f"{info['lung_height_mm']:.0f} mm), {100 * info['lung_z_coverage']:.0f}% "
                                          f"of the slices")
        table.add_row("lung gate", info["lung_gate"])
        for c in info["checks"]:
            mark = {True: "ok", False: "FAILED" if c["refuses"] else "not found (reported only)", None: "n/a"}[c["ok"]]
            value = c["value"] if not isinstance(c["value"], dict) else ", ".join(f"{k} {v}" for k, v in c["value"].items())
            table.add_row(f"check: {c['name']}", f"{mark}: {value} (expected {c['expected']})")
    console = Console()
    console.print(table)
    for w in info["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")


@app.command()
def index(
    root: Path = typer.Argument(..., help="Dataset folder: COVID-CT-MD, COVIDx CT, MosMedData, CC-CCII, STOIC2021, "
                                "ROOT/<class>/<patient> folders or ROOT/<split>/<class>/ images."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder for cohort.csv / slice_labels.csv."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="User CSV with patient_id,label[,path,subset]."),
    strict: bool = typer.Option(False, help="Stop at the first study that fails to read."),
    check: bool = typer.Option(True, help="Read every study to check it (status/error columns)."),
    group_by: str = typer.Option("source", "--group-by",
                                 help="Slice images: the `group` that grouped folds keep together, `source` (patient, "
                                      "figure, numbering run) or `paper` (all images of the paper that the file name names)."),
    class_map: Optional[List[str]] = typer.Option(None, "--map", help="NAME=CLASS: give the dataset's class NAME "
                                                  "(a folder, MosMedData's CT-0 ... CT-4, STOIC2021's COVID / negative) "
                                                  "another class (repeat for several)."),
) -> None:
    """Build the cohort manifest (+ slice_labels.csv) from a dataset folder."""
    from msnet.data.cohorts import index_dataset

    pairs = [m.split("=", 1) for m in class_map or []]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise MsnetError(f"--map takes NAME=CLASS, got {', '.join(class_map or [])}", fix="e.g. --map CT-1=COVID-19")
    report = index_dataset(root, out, labels_csv=labels, strict=strict, check=check, group_by=group_by,
                           class_map=dict(pairs))
    typer.echo(report.summary())
    if report.n_failed:
        raise typer.Exit(1)


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Output folder."),
    patients: int = typer.Option(12, "--patients", "-n", help="Number of patients (split evenly over classes)."),
    size: int = typer.Option(512, help="Rows and columns of every slice."),
    seed: int = typer.Option(0, help="Random seed (the cohort is deterministic per seed)."),
    min_slices: int = typer.Option(60, help="Fewest slices of a study."),
    max_slices: int = typer.Option(200, help="Most slices of a study."),
) -> None:
    """Write a synthetic cohort (DICOM CT series + cohort.csv + slice_labels.csv)."""
    from msnet.data.synthetic import synth_cohort

    path = synth_cohort(out, n_patients=patients, size=size, seed=seed, slices=(min_slices, max_slices))
    typer.echo(f"wrote {path}")


# --------------------------------------------------------------------------- stages


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


# --------------------------------------------------------------------------- inference


@app.command()
def predict(
    bundle: Path = typer.Argument(..., help="Model bundle folder (RUN/bundle)."),
    studies: List[str] = typer.Argument(..., help="DICOM folders, .nii/.nii.gz, image folders, .zip of any, "
                                        "DICOMweb study URLs."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per study, a prediction or, for a study "
                                  "that failed, its error (docs/prediction.schema.json)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write predictions.jsonl/.csv/.json and status.csv here, "
                                       "study by study; a re-run skips finished studies."),
    explain_dir: Optional[Path] = typer.Option(None, "--explain", help="Write Grad-CAM key-slice strips and score plots here."),
    runtime: str = typer.Option("torch", help="torch or onnx (needs `msnet export BUNDLE --onnx`)."),
    int8: bool = typer.Option(False, "--int8", help="With --runtime onnx: the statically quantised backbone."),
    onnx_dir: Optional[Path] = typer.Option(None, "--onnx-dir", help="With --runtime onnx: where `msnet export` wrote "
                                            "the models (default: recorded in the bundle, else BUNDLE/onnx)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 …"),
    dicom_out: Optional[Path] = typer.Option(None, "--dicom-out", help="Write SR + Key Object Selection (+ Grad-CAM as Secondary Capture with --explain) per study here."),
    store: Optional[str] = typer.Option(None, "--store", help="Send them by STOW-RS to this DICOMweb URL (credentials: MSNET_DICOMWEB_* variables)."),
    store_aet: Optional[str] = typer.Option(None, "--store-aet", help="Send them by C-STORE to AET@HOST:PORT."),
    ae_title: str = typer.Option("MSNET", "--ae-title", help="Calling AE title for --store-aet."),
    fhir_out: Optional[Path] = typer.Option(None, "--fhir-out", help="Write a FHIR R4 DiagnosticReport Bundle per study "
                                            "here (docs/fhir.md; needs the fhir.resources package)."),
    key_gap_mm: float = typer.Option(10.0, "--key-gap-mm", help="Least distance along z between two key slices."),
    series: Optional[str] = typer.Option(None, "--series", help="The series to read of a study with several: a "
                                         "SeriesInstanceUID or an index (as listed in the warning; default: the "
                                         "axial CT series with the most slices)."),
    mirror: bool = typer.Option(True, "--mirror/--no-mirror", help="Also see each study mirrored left-right and "
                                "average the two answers (a second backbone pass, about 2x the time)."),
    strict: bool = typer.Option(False, "--strict", help="Refuse a study whose OOD score is over the bundle's "
                                "threshold (unlike the training data), instead of warning."),
) -> None:
    """Diagnose studies with a trained bundle; optionally write the results as DICOM into the source study.

    Slices are numbered by their index in the study, 0 = the most superior (head first), in the JSON, the
    Grad-CAM strip, the SR and the web viewer alike. A result that cannot be stored is still printed (and
    written to --out); the study then counts as failed."""
    from msnet.inference.batch import predict_many

    on_study = None
    if dicom_out or store or store_aet or fhir_out:
        from msnet.service.pacs import StoreTargets, result_writer

        on_study = result_writer(bundle, dicom_out, StoreTargets(store, store_aet, ae_title), {"fhir": fhir_out})

    def show(r: dict) -> None:
        if json_out:
            typer.echo(_json(r))

    def show_error(s: dict) -> None:  # --json: the failure as its own line, in order; else listed once at the end
        if json_out:
            typer.echo(_json({"study_id": s["study_id"], "study": s["study"], "status": "failed", "error": s["error"]}))

    results, status = predict_many(bundle, list(studies), out=out, explain_dir=explain_dir, on_result=show,
                                   on_error=show_error, on_study=on_study, runtime=runtime, device=device, int8=int8,
                                   onnx_dir=onnx_dir, key_slice_gap_mm=key_gap_mm, strict=strict, series=series,
                                   mirror=mirror)
    if not json_out:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="msnet predictions (research use only)")
        classes = list(results[0]["probabilities"]) if results else []
        for col in ["study", "prediction", *classes, "slices", "key slices", "s"]:
            table.add_column(col)
        for r in results:
            table.add_row(r["study_id"], r["prediction"], *[f"{r['probabilities'][c]:.3f}" for c in classes],
                          str(r["n_slices"]), ", ".join(str(k["slice_index"]) for k in r["key_slices"][:5]),
                          f"{r['timing_s']['total']:.2f}")
        Console().print(table)
        for r in results:
            for w in r["warnings"]:
                _stderr_console().print(f"[yellow]warning:[/] {r['study_id']}: {w}", highlight=False)
    failed = [s for s in status if s["status"] != "ok"]
    for s in failed if not json_out else []:
        _print_error("failed: ", str(s["error"]))
    if failed:
        raise typer.Exit(1)


@app.command()
def serve(
    bundle: Path = typer.Argument(..., help="Model bundle folder."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, help="Port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MSNET_API_KEY", help="Require this X-API-Key header."),
    max_upload_mb: float = typer.Option(1024.0, help="Largest upload accepted (413 above)."),
    workers: int = typer.Option(1, help="Concurrent inferences (others queue)."),
    queue_size: int = typer.Option(16, help="Requests waiting for a worker before 503."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds per request before 504."),
    device: str = typer.Option("auto", help="auto, cpu, cuda …"),
    header_timeout: float = typer.Option(10.0, help="Seconds a connection has to send its request headers (408 past it)."),
    read_timeout: float = typer.Option(30.0, help="Longest pause inside an upload, in seconds (408 past it)."),
    max_connections: int = typer.Option(64, help="Open connections; over it the longest-idle one is closed (503). /health is always answered."),
    max_slice_pixels: Optional[int] = typer.Option(None, help="Rows x Columns of one slice (413 above; default MSNET_MAX_SLICE_PIXELS or 2048*2048)."),
    max_voxels: Optional[int] = typer.Option(None, help="Voxels of one study (413 above; default MSNET_MAX_VOXELS or 2**28)."),
    max_compression_ratio: Optional[float] = typer.Option(None, help="Decoded / stored size of a .nii.gz (413 above; default 200)."),
    viewer_studies: int = typer.Option(8, help="Finished studies kept for the page's viewer (0: no viewer)."),
    viewer_mb: float = typer.Option(512.0, help="Memory for the viewer's studies in all (least recently used go first)."),
    viewer_ttl: float = typer.Option(1800.0, "--viewer-ttl", help="Seconds a study stays viewable after its prediction."),
) -> None:
    """HTTP API (/v1/predict, /health, /docs) and a web page at / with a study viewer, for uploaded studies
    (limits: docs/service.md)."""
    from msnet.service.app import serve as run_server

    run_server(bundle, host=host, port=port, api_key=api_key, max_upload_mb=max_upload_mb, workers=workers,
               timeout_s=timeout, queue_size=queue_size, device=device, header_timeout_s=header_timeout,
               read_timeout_s=read_timeout, max_connections=max_connections, max_slice_pixels=max_slice_pixels,
               max_voxels=max_voxels, max_compression_ratio=max_compression_ratio, viewer_studies=viewer_studies,
               viewer_mb=viewer_mb, viewer_ttl_s=viewer_ttl)


@app.command()
def listen(
    bundle: Optional[Path] = typer.Argument(None, help="Model bundle folder (not needed with --status)."),
    ae_title: str = typer.Option("MSNET", "--ae-title", help="This listener's AE title (called AE title)."),
    port: int = typer.Option(11112, help="DICOM port."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default; 0.0.0.0 for the network)."),
    allow: Optional[List[str]] = typer.Option(None, "--allow", help="Calling AE title allowed to send (repeat; default: any)."),
    quiet_seconds: float = typer.Option(10.0, "--quiet-seconds", help="A study is complete after this many seconds without a new image."),
    store: Optional[str] = typer.Option(None, "--store", help="Send SR + KOS by STOW-RS to this DICOMweb URL."),
    store_aet: Optional[str] = typer.Option(None, "--store-aet", help="Send SR + KOS by C-STORE to AET@HOST:PORT."),
    dicom_out: Optional[Path] = typer.Option(None, "--dicom-out", help="Also keep SR + KOS per study here."),
    fhir_out: Optional[Path] = typer.Option(None, "--fhir-out", help="Also write a FHIR R4 DiagnosticReport Bundle per "
                                            "study here (docs/fhir.md; needs the fhir.resources package)."),
    spool: Path = typer.Option(Path("msnet-spool"), help="Private folder for received studies and results not stored yet."),
    log_file: Optional[Path] = typer.Option(None, "--log", help="JSON-lines outcome log (default SPOOL/outcomes.jsonl)."),
    max_studies: int = typer.Option(8, help="Studies held at once (receiving, waiting, running); more are refused (0xA700)."),
    retry_seconds: float = typer.Option(30.0, "--retry-seconds", help="First wait before a failed store is tried "
                                        "again (doubled each time, at most 15 min); results are kept until stored."),
    status: bool = typer.Option(False, "--status", help="Print what SPOOL holds (studies queued, results not stored "
                                "yet) as JSON, and exit."),
    series: Optional[str] = typer.Option(None, "--series", help="The series to read of a study with several: a "
                                         "SeriesInstanceUID or an index (as listed in the warning; default: the "
                                         "axial CT series with the most slices)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda …"),
) -> None:
    """DICOM C-STORE listener: CT studies in, diagnosis out as SR + Key Object Selection (stops cleanly on SIGTERM;
    results the archive could not take are kept in SPOOL and tried again)."""
    from msnet.service.listener import Listener, ListenerSettings, spool_status

    if status:
        typer.echo(json.dumps(spool_status(spool), indent=2))
        return
    if bundle is None:
        raise MsnetError("no model bundle given", fix="msnet listen BUNDLE [options] (or msnet listen --status)")
    from msnet.inference.dicom_out import parse_aet_target
    from msnet.inference.predictor import Predictor
    from msnet.io.dicomweb import not_dicomweb, service_url
    from msnet.service.pacs import StoreTargets, prepare_outputs

    outputs = prepare_outputs({"fhir": fhir_out})
    if store_aet:
        parse_aet_target(store_aet)
    if store:
        service_url(store)
        wrong = not_dicomweb(store)  # a wrong URL fails now; an archive that is down is only tried later
        if wrong is not None:
            raise wrong
    if not (store or store_aet or dicom_out or fhir_out):
        log.warning("no --store, --store-aet, --dicom-out or --fhir-out: results go to the outcome log only")
    settings = ListenerSettings(spool=spool, ae_title=ae_title, host=host, port=port, allowed_aets=tuple(allow or ()),
                                quiet_s=quiet_seconds, max_studies=max_studies, log_path=log_file, dicom_out=dicom_out,
                                targets=StoreTargets(store, store_aet, ae_title), retry_s=retry_seconds,
                                outputs=outputs)
    Listener(Predictor(bundle, device=device, series=series), bundle, settings).serve_forever()


@app.command()
def export(
    bundle: Path = typer.Argument(..., help="Model bundle folder."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Output folder (default BUNDLE/onnx, where predict looks)."),
    int8: bool = typer.Option(False, "--int8", help="Also a statically quantised backbone, with its agreement figures."),
    calibration: Optional[List[Path]] = typer.Option(None, "--calibration", help="Studies to calibrate int8 on (default: the training cohort)."),
) -> None:
    """ONNX export of backbone + aggregator, with a parity check on a synthetic study."""
    from msnet.inference.export import export_bundle, print_export

    result = export_bundle(bundle, out=onnx, int8=int8, calibration=list(calibration) if calibration else None)
    print_export(result)


# --------------------------------------------------------------------------- bench


@bench_app.command("read")
def bench_read(
    study: Path = typer.Argument(..., help="DICOM study folder."),
    repeats: int = typer.Option(3, help="Timed repetitions of each reader (median and spread printed)."),
) -> None:
    """Reading a DICOM study to HU: msnet.io against a plain pydicom loop."""
    from msnet.bench import bench_read as run

    run(study, repeats=repeats)


@bench_app.command("decoders")
def bench_decoders(
    studies: Optional[list[Path]] = typer.Argument(None, help="JPEG Lossless study folders (default: the shared "
                                                   "real scans of the development checkout)."),
    files: int = typer.Option(40, help="Files of each study, spread over it."),
    repeats: int = typer.Option(3, help="Timed repetitions (median and spread printed)."),
) -> None:
    """JPEG Lossless decoders (imagecodecs, GDCM, pylibjpeg-libjpeg): ms per slice and identical values."""
    from msnet.bench import bench_decoders as run

    run(studies or None, n_files=files, repeats=repeats)


@bench_app.command("predict")
def bench_predict(
    config: str = typer.Option("cpu", help="paper (SE-ResNet50, 224 px), cpu (EfficientNet-Lite0) or ct "
                                           "(CT-native astra_slab; --backbone astra: its 2-D network)."),
    study: Optional[Path] = typer.Option(None, help="DICOM study folder to time (needed outside the development "
                                         "checkout, e.g. a COVID-CT-MD scan)."),
    threads: int = typer.Option(2, help="Threads for every runtime."),
    repeats: int = typer.Option(3, help="Timed repetitions (median and spread printed)."),
    int8: bool = typer.Option(True, help="Include the static int8 ONNX path."),
    backbone: Optional[str] = typer.Option(None, help="Backbone instead of the config's (e.g. astra with ct)."),
    slices: Optional[int] = typer.Option(None, help="Time the study's middle N slices only (default: all; "
                                                    "32 for ct, whose ResNet-152 is slow)."),
) -> None:
    """Predict speed: ours (torch, ONNX fp32, int8) against a naive eager loop and the GEMM floor."""
    from msnet.bench import bench_predict as run

    run(config=config, study=study, threads=threads, repeats=repeats, int8=int8, backbone=backbone, slices=slices)


@bench_app.command("eager")
def bench_eager(
    config: str = typer.Option("paper", help="paper (SE-ResNet50, 224 px) or cpu (EfficientNet-Lite0)."),
    study: Optional[Path] = typer.Option(None, help="DICOM study folder to time (needed outside the development "
                                         "checkout, e.g. a COVID-CT-MD scan)."),
    threads: int = typer.Option(2, help="PyTorch threads."),
    batch_size: int = typer.Option(16, help="Slices per forward pass."),
    repeats: int = typer.Option(3, help="Timed repetitions (median and spread printed)."),
) -> None:
    """The eager PyTorch backbone, variant by variant (channels_last, inference mode, oneDNN fusion,
    torch.compile), against the GEMM floor."""
    from msnet.bench import bench_eager as run

    run(config=config, study=study, threads=threads, batch_size=batch_size, repeats=repeats)


@bench_app.command("extract")
def bench_extract(
    config: str = typer.Option("cpu", help="paper (SE-ResNet50, 224 px), cpu (EfficientNet-Lite0) or ct "
                                           "(CT-native astra_slab; --backbone astra: its 2-D network)."),
    patients: int = typer.Option(6, help="Synthetic studies in the cohort."),
    threads: int = typer.Option(2, help="Threads for every runtime."),
    size: Optional[int] = typer.Option(None, help="Input size (default: the config's)."),
    repeats: int = typer.Option(3, help="Timed repetitions (median and spread printed)."),
    backbone: Optional[str] = typer.Option(None, help="Backbone instead of the config's (e.g. astra with ct)."),
    real_slices: int = typer.Option(24, help="ct: the middle N slices of each shared real scan are encoded "
                                             "(int8 calibrated on their other slices)."),
) -> None:
    """Cohort extraction speed: torch against ONNX Runtime fp32 and int8, through the same SliceEncoder."""
    from msnet.bench import bench_extract as run

    run(config=config, n_patients=patients, threads=threads, size=size, repeats=repeats, backbone=backbone,
        real_slices=real_slices)


@bench_app.command("train")
def bench_train(
    patients: int = typer.Option(300, help="Synthetic patients (20 % of them validate, as in `msnet train`)."),
    epochs: int = typer.Option(100, help="Epochs of the case (times are given per epoch and for these)."),
    measure_epochs: int = typer.Option(5, help="Epochs actually timed for each model; fewer than --epochs "
                                               "extrapolates per epoch (the printout says so)."),
    features: int = typer.Option(2048, help="Feature size d (2048: SE-ResNet50)."),
    min_slices: int = typer.Option(100, help="Fewest slices per patient."),
    max_slices: int = typer.Option(200, help="Most slices per patient."),
    batch_size: int = typer.Option(8, help="Training batch size."),
    threads: int = typer.Option(2, help="PyTorch threads."),
    repeats: int = typer.Option(3, help="Timed repetitions of each model's training (median and spread printed)."),
) -> None:
    """MS-Net training speed (the loop of `msnet train`): ours against a naive padded-batch MS-Net and the GEMM floor."""
    from msnet.bench import bench_train as run

    run(patients=patients, epochs=epochs, measure_epochs=measure_epochs, features=features,
        slices=(min_slices, max_slices), batch_size=batch_size, threads=threads, repeats=repeats)


_INTERRUPTED: list[int] = []
_STAGES = {"run", "demo", "extract", "finetune", "train", "evaluate"}


def _on_sigint(signum: int, frame) -> None:
    """Ctrl-C: noted (so that the exit says what was kept), then the usual KeyboardInterrupt."""
    _INTERRUPTED.append(signum)
    raise KeyboardInterrupt


def _kept_after_interrupt(argv: list[str]) -> str:
    """What an interrupted command leaves, in words (every file msnet writes is written whole or not at all).

    >>> _kept_after_interrupt(["predict", "b", "s1", "--out", "res"])
    'the run was interrupted (Ctrl-C). Kept: the studies finished before it, in res/predictions.jsonl (.csv, status.csv); run the same command again to do the rest (finished studies are skipped)'
    """
    words = [a for a in argv if not a.startswith("-")]
    command = words[0] if words else ""
    head = "the run was interrupted (Ctrl-C). Kept: "
    if command == "predict":
        out = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"), None)
        out = out or next((a.split("=", 1)[1] for a in argv if a.startswith("--out=")), None)
        if out:
            return (head + f"the studies finished before it, in {out}/predictions.jsonl (.csv, status.csv); run the "
                    "same command again to do the rest (finished studies are skipped)")
        return head + ("only the results printed above (pass --out DIR to keep results study by study and resume); "
                       "no partial file was written")
    if command in _STAGES:
        return head + ("the files finished before it, in the run folder, each whole (features already extracted are "
                       "reused when the command is run again)")
    return head + "nothing half-written (each file msnet writes is written whole or not at all)"


def main() -> None:
    """Console entry point."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        app()
    except MsnetError as exc:
        _print_error("error: ", str(exc))
        sys.exit(2)
    except (KeyboardInterrupt, SystemExit) as exc:  # click turns Ctrl-C into "Aborted!" and exit 1
        if isinstance(exc, SystemExit) and not _INTERRUPTED:
            raise
        _print_error("interrupted: ", _kept_after_interrupt(sys.argv[1:]))
        sys.exit(130)
    finally:
        decode = sys.modules.get("msnet.io.decode")
        if _TERMINATED and decode is not None:
            decode.shutdown_pool(kill=True, wait_s=5.0)
