"""The DICOM outputs, each a registered writer: the SR (``sr``), the Key Object Selection (``ko``) and
the Grad-CAM strip as Secondary Capture (``sc``), into ``out/<study id>/`` (the objects themselves are
built in :mod:`msnet.inference.dicom_out`). ``DICOM`` is the set ``--dicom-out`` writes and ``--store``
sends: SR + KO, and the Secondary Capture when the prediction was explained.
"""

from __future__ import annotations

from pathlib import Path

from msnet.inference.dicom_out import write_kos, write_secondary_capture, write_sr
from msnet.inference.writers.base import StudyContext, Writer, register_writer, study_folder

DICOM = ("sr", "ko", "sc")


def _key_slices(prediction: dict) -> list[int]:
    return [int(k["slice_index"]) for k in prediction["key_slices"]]


@register_writer
class SRWriter(Writer):
    name = "sr"
    needs = frozenset({"dicom"})
    summary = "DICOM Comprehensive SR (TID 1500): class, probabilities, model, key slices, warnings"

    def write(self, prediction: dict, study: StudyContext, out: Path) -> list[Path]:
        return [write_sr(study.volume, prediction["prediction"], prediction["probabilities"], _key_slices(prediction),
                         study_folder(out, prediction, study.volume), study.model,
                         warnings=list(prediction.get("warnings") or []))]


@register_writer
class KOWriter(Writer):
    name = "ko"
    needs = frozenset({"dicom"})
    summary = "DICOM Key Object Selection referencing the key slices"

    def write(self, prediction: dict, study: StudyContext, out: Path) -> list[Path]:
        return [write_kos(study.volume, prediction["prediction"], _key_slices(prediction),
                          study_folder(out, prediction, study.volume), study.model)]


@register_writer
class SecondaryCaptureWriter(Writer):
    name = "sc"
    needs = frozenset({"dicom", "explanation"})
    summary = "the Grad-CAM key-slice strip as a DICOM Secondary Capture image"

    def write(self, prediction: dict, study: StudyContext, out: Path) -> list[Path]:
        return [write_secondary_capture(study.volume, study.explanation_png, study_folder(out, prediction, study.volume),
                                        study.model)]
