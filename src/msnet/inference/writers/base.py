"""The writer registry: every kind of result file msnet writes is one :class:`Writer`, registered by name.

A writer has a name (what ``write_outputs`` and the CLI's output options select), what it ``needs``
of a study (``"dicom"``: a study read from DICOM files, whose UIDs and header the object refers to;
``"explanation"``: the Grad-CAM key-slice strip of ``--explain``) and one method,
``write(prediction, study, out)``, that writes the files for one study's prediction under ``out``
and returns their paths. A new output is one module with a class decorated by
:func:`register_writer` (imported in ``msnet/inference/writers/__init__.py``) and, for the CLI,
one option that names its folder.

e.g. write_outputs(["sr", "ko", "fhir"], prediction, StudyContext(volume, model_identity(bundle)), "out")
[PosixPath('out/P001/msnet-sr.dcm'), PosixPath('out/P001/msnet-ko.dcm'), PosixPath('out/P001/msnet-fhir.json')]
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable

from msnet.errors import MsnetError
from msnet.inference.dicom_out import ModelIdentity

NEEDS = frozenset({"dicom", "explanation"})
"""What a writer may need of a study: a DICOM source, the Grad-CAM strip."""


@dataclass(frozen=True)
class StudyContext:
    """What a writer knows of the study besides its prediction: the volume as read (a DICOM-read
    :class:`msnet.io.CTVolume` has ``sop_instance_uids`` and ``dicom_headers``), the model's identity
    and the Grad-CAM strip, when the prediction was explained."""

    volume: Any
    model: ModelIdentity
    explanation_png: Path | None = None

    @property
    def is_dicom(self) -> bool:
        return getattr(self.volume, "dicom_headers", None) is not None and bool(
            getattr(self.volume, "sop_instance_uids", None))

    @staticmethod
    def of(volume, prediction: dict, model: ModelIdentity) -> "StudyContext":
        """The context of a prediction dict (its Grad-CAM strip from ``explanation.key_slices_png``)."""
        png = (prediction.get("explanation") or {}).get("key_slices_png")
        return StudyContext(volume, model, Path(png) if png else None)


class Writer(ABC):
    """One kind of output. Subclasses set ``name``, ``needs``, ``summary`` and ``write``."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    summary: ClassVar[str] = ""

    def prepare(self, out: Path | None) -> None:
        """Checks run once before any study is read (a missing optional package, a bad folder)."""

    @abstractmethod
    def write(self, prediction: dict, study: StudyContext, out: Path) -> list[Path]:
        """Write this output for one study's prediction under ``out``; returns the files written."""


WRITERS: dict[str, Writer] = {}
"""Every registered writer by name, in registration order."""


def register_writer(cls: type[Writer]) -> type[Writer]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if not re.fullmatch(r"[a-z][a-z0-9-]*", getattr(cls, "name", "") or ""):
        raise ValueError(f"writer {cls.__name__} needs a lower-case name")
    if cls.name in WRITERS:
        raise ValueError(f"two writers named {cls.name!r}: {type(WRITERS[cls.name]).__name__} and {cls.__name__}")
    if not cls.needs <= NEEDS:
        raise ValueError(f"writer {cls.name!r} needs {sorted(cls.needs - NEEDS)}, not one of {sorted(NEEDS)}")
    WRITERS[cls.name] = cls()
    return cls


def get_writer(name: str) -> Writer:
    """The writer registered as ``name``; a clear error listing the others."""
    try:
        return WRITERS[name]
    except KeyError:
        raise MsnetError(f"no output named {name!r}", fix=f"use one of {', '.join(WRITERS)}") from None


def write_outputs(names: Iterable[str], prediction: dict, study: StudyContext, out: str | Path) -> list[Path]:
    """Run the writers ``names`` for one prediction, in that order; returns every file written.

    A writer that needs the explanation is skipped when the prediction was not explained (the
    Secondary Capture without ``--explain``); one that needs DICOM raises MsnetError on any other
    source (its own message names the study and what to pass)."""
    files: list[Path] = []
    for writer in [get_writer(n) for n in names]:
        if "explanation" in writer.needs and study.explanation_png is None:
            continue
        files += writer.write(prediction, study, Path(out))
    return files


def study_folder(out: str | Path, prediction: dict, volume=None) -> Path:
    """``out/<study id>/``: where each writer puts its files of one study (the id made safe as a name).

    >>> study_folder("out", {"study_id": "../P 001"}).as_posix()
    'out/P_001'
    """
    text = str(prediction.get("study_id") or getattr(volume, "study_id", "") or "")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text).strip("._") or "study"
    return Path(out) / name[:120]
