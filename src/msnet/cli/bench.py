"""``msnet bench ...``: performance, as ratios measured in one run."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional
import typer
import typer.core
from msnet.cli.common import bench_app


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
    studies: List[Path] = typer.Argument(..., help="JPEG Lossless DICOM study folders (e.g. COVID-CT-MD scans)."),
    files: int = typer.Option(40, help="Files of each study, spread over it."),
    repeats: int = typer.Option(3, help="Timed repetitions (median and spread printed)."),
) -> None:
    """JPEG Lossless decoders (imagecodecs, GDCM, pylibjpeg-libjpeg): ms per slice and identical values."""
    from msnet.bench import bench_decoders as run

    run(list(studies), n_files=files, repeats=repeats)


@bench_app.command("predict")
def bench_predict(
    config: str = typer.Option("cpu", help="paper (SE-ResNet50, 224 px), cpu (EfficientNet-Lite0) or ct "
                                           "(CT-native astra_slab; --backbone astra: its 2-D network)."),
    study: Path = typer.Option(..., help="DICOM study folder to time (e.g. a COVID-CT-MD scan)."),
    threads: int = typer.Option(2, help="Threads for every runtime."),
    repeats: int = typer.Option(3, help="Timed repetitions (median and spread printed)."),
    int8: bool = typer.Option(True, help="Include the static int8 ONNX path."),
    backbone: Optional[str] = typer.Option(None, help="Backbone instead of the config's (e.g. astra with ct)."),
    slices: Optional[int] = typer.Option(None, help="Time the study's middle N slices only (default: all; "
                                                    "32 for ct, whose ResNet-152 is slow)."),
    mirror: bool = typer.Option(False, "--mirror/--no-mirror", help="Time predict's mirror averaging too (a second "
                                "backbone pass; off by default, one pass as the naive loop and the floor count)."),
    calibration: Optional[List[Path]] = typer.Option(None, "--calibration", help="Studies to calibrate int8 on "
                                                     "(repeatable; default: the timed study itself)."),
) -> None:
    """Predict speed: ours (torch, ONNX fp32, int8) against a naive eager loop and the GEMM floor."""
    from msnet.bench import bench_predict as run

    run(config=config, study=study, threads=threads, repeats=repeats, int8=int8, backbone=backbone, slices=slices,
        mirror=mirror, calibration=list(calibration or []))


@bench_app.command("eager")
def bench_eager(
    config: str = typer.Option("paper", help="paper (SE-ResNet50, 224 px) or cpu (EfficientNet-Lite0)."),
    study: Path = typer.Option(..., help="DICOM study folder to time (e.g. a COVID-CT-MD scan)."),
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
    real_slices: int = typer.Option(24, help="ct: the middle N slices of each --study are encoded (int8 "
                                             "calibrated on their other slices)."),
    study: Optional[List[Path]] = typer.Option(None, "--study", help="ct: real CT study folders to encode "
                                               "(repeatable, e.g. three COVID-CT-MD scans)."),
    synthetic: bool = typer.Option(False, "--synthetic", help="ct: a synthetic cohort instead of real scans."),
) -> None:
    """Cohort extraction speed: torch against ONNX Runtime fp32 and int8, through the same SliceEncoder."""
    from msnet.bench import bench_extract as run

    run(config=config, n_patients=patients, threads=threads, size=size, repeats=repeats, backbone=backbone,
        real_slices=real_slices, studies=list(study or []), real=False if synthetic else None)


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
