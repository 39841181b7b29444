"""Commands that use a model bundle: ``predict``, ``serve``, ``listen`` and ``export``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional
import typer
import typer.core
from msnet.errors import MsnetError
from msnet.cli.common import _json, _print_error, _stderr_console, app, log


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
    check_study: Optional[List[Path]] = typer.Option(None, "--check-study", help="Real studies to check int8's "
                                                     "agreement with fp32 on, besides synthetic ones (repeatable)."),
) -> None:
    """ONNX export of backbone + aggregator, with a parity check on a synthetic study."""
    from msnet.inference.export import export_bundle, print_export

    result = export_bundle(bundle, out=onnx, int8=int8, calibration=list(calibration) if calibration else None,
                           check_studies=list(check_study or []))
    print_export(result)
