"""The PACS path as four steps a test can call one by one: read, predict, write, store.

``msnet listen`` goes through :func:`diagnose`; ``msnet predict ... --dicom-out/--store/--store-aet/--fhir-out``
hands :func:`result_writer` to the batch loop. The files are written by the registered writers of
:mod:`msnet.inference.writers` (``outputs``: writer name -> folder, e.g. ``{"fhir": Path("fhir")}``).

e.g. pred, files = diagnose(predictor, "http://pacs/dicom-web/studies/1.2.3", bundle="run/bundle",
                            store_url="http://pacs/dicom-web")
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from msnet.inference.dicom_out import (
    model_identity,
    parse_aet_target,
    store_cstore,
    store_stow,
)
from msnet.inference.writers import DICOM, StudyContext, get_writer, write_outputs
from msnet.io import open_study
from msnet.io.dicomweb import not_dicomweb, service_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreTargets:
    """Where results go besides ``dicom_out``: a DICOMweb base URL (STOW-RS) and/or ``AET@HOST:PORT``."""

    url: str | None = None
    aet: str | None = None
    calling_aet: str = "MSNET"

    def __bool__(self) -> bool:
        return bool(self.url or self.aet)


def read(study: str | Path, study_id: str | None = None, series: str | int | None = None):
    """Step 1: a folder, file, zip or DICOMweb URL -> CTVolume (with SOP instance UIDs and the source header),
    through :func:`msnet.io.open_study`; ``series``: a SeriesInstanceUID or an index."""
    return open_study(study, series=series, study_id=study_id)


def predict(predictor, volume, explain_dir: Path | None = None) -> dict:
    """Step 2: the prediction for a volume already read, as the JSON dict of DESIGN.md."""
    if hasattr(predictor, "predict_volume"):
        p = predictor.predict_volume(volume, explain_dir=explain_dir)
    else:
        p = predictor.predict(volume, study_id=volume.study_id, explain_dir=explain_dir)
    return p.to_dict() if hasattr(p, "to_dict") else dict(p)


def write(volume, prediction: dict, out_dir: Path | None, bundle: Path, outputs: dict[str, Path] | None = None) -> list[Path]:
    """Step 3: SR + Key Object Selection (+ the Grad-CAM strip as Secondary Capture when explained) in
    ``out_dir`` (none when ``out_dir`` is None); then every other output of ``outputs`` (writer name ->
    folder) in its folder. Returns the DICOM files (those that are stored)."""
    study = StudyContext.of(volume, prediction, model_identity(bundle))
    files = [] if out_dir is None else write_outputs(DICOM, prediction, study, out_dir)
    for name, folder in (outputs or {}).items():
        write_outputs([name], prediction, study, folder)
    return files


def prepare_outputs(outputs: dict[str, Path] | None) -> dict[str, Path]:
    """The outputs (writer name -> folder) without the unset ones, each writer's checks run (a missing
    optional package fails before any study is read)."""
    chosen = {name: Path(folder) for name, folder in (outputs or {}).items() if folder is not None}
    for name, folder in chosen.items():
        get_writer(name).prepare(folder)
    return chosen


def store(files: list[Path], targets: StoreTargets) -> int:
    """Step 4: send the files by STOW-RS and/or C-STORE; returns how many objects were sent per target."""

    n = 0
    if targets.url:
        n = store_stow(targets.url, files)
    if targets.aet:
        n = store_cstore(targets.aet, files, calling_aet=targets.calling_aet)
    return n


@contextmanager
def _out_folder(dicom_out: Path | None) -> Iterator[Path]:
    if dicom_out is not None:
        yield Path(dicom_out)
        return
    tmp = Path(tempfile.mkdtemp(prefix="msnet-dicom-out-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def diagnose(predictor, study: str | Path, bundle: Path, study_id: str | None = None, dicom_out: Path | None = None,
             targets: StoreTargets = StoreTargets(), explain_dir: Path | None = None,
             outputs: dict[str, Path] | None = None, series: str | int | None = None) -> tuple[dict, list[Path]]:
    """Read, predict and, with ``dicom_out`` or store targets, write and store; ``outputs`` (writer name
    -> folder, e.g. ``{"fhir": path}``) are written too. Returns the prediction dict and the DICOM files
    kept (none when only stored: they are written to a temp folder)."""
    t0 = time.perf_counter()
    volume = read(study, study_id, series if series is not None else getattr(predictor, "series", None))
    read_s = time.perf_counter() - t0
    result = predict(predictor, volume, explain_dir=explain_dir)
    timing = result.get("timing_s")
    if isinstance(timing, dict) and not timing.get("read"):
        timing["read"] = read_s
        timing["total"] = float(timing.get("total", 0.0)) + read_s
    if dicom_out is None and not targets:
        if outputs:
            write(volume, result, None, bundle, outputs)
        return result, []
    with _out_folder(dicom_out) as folder:
        files = write(volume, result, folder, bundle, outputs)
        if targets:
            store(files, targets)
        return result, (files if dicom_out is not None else [])


def result_writer(bundle: Path, dicom_out: Path | None, targets: StoreTargets, outputs: dict[str, Path] | None = None):
    """A per-study hook for :func:`msnet.inference.batch.predict_many`: write the SR + KOS (+ Secondary
    Capture) of each finished study to ``dicom_out`` and/or send them to ``targets``, and the other
    ``outputs`` (writer name -> folder). Destinations are checked before any study is read."""

    if targets.aet:  # a typo in a destination fails before any work
        parse_aet_target(targets.aet)
    if targets.url:
        service_url(targets.url)
        wrong = not_dicomweb(targets.url)  # a server that is down is no error yet: the study is stored after
        if wrong is not None:
            raise wrong
    outputs = prepare_outputs(outputs)

    def on_study(volume, prediction: dict) -> None:
        if dicom_out is None and not targets:
            write(volume, prediction, None, bundle, outputs)
            return
        with _out_folder(dicom_out) as folder:
            files = write(volume, prediction, folder, bundle, outputs)
            if targets:
                store(files, targets)

    return on_study
