"""Public dataset layouts, one module each: what a download looks like -> manifest rows.

Each module has ``NAME``, ``detect(root) -> bool`` and ``rows(root) -> Found``; :func:`detect`
asks them in order. :func:`msnet.data.cohorts.index_dataset` checks every study and writes the
manifests; nothing here reads pixels (except label masks).

- ``covid-ct-md`` (:mod:`.covid_ct_md`): class folders + ``Index.csv`` + slice-label arrays -> cohort.csv
- ``covidx-ct`` (:mod:`.covidx_ct`): PNG slices + ``{train,val,test}_COVIDx_CT-*.txt`` -> slices.csv
- ``mosmeddata`` (:mod:`.mosmed`): ``CT-0`` ... ``CT-4`` NIfTI studies (+ ``masks/``) -> cohort.csv
- ``cc-ccii`` (:mod:`.cc_ccii`): ``NCP`` / ``CP`` / ``Normal`` / patient / scan / slice images -> cohort.csv
- ``stoic2021`` (:mod:`.stoic`): ``data/mha/<id>.mha`` + ``metadata/reference.csv`` -> cohort.csv
- ``slice-images`` (:mod:`.slice_images`): ``<split>/<class>/*.png|jpg`` (e.g. UCSD COVID-CT) -> slices.csv
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from msnet.io.nifti import NIFTI_SUFFIXES
from msnet.io.readers import has_suffix, study_stem

logger = logging.getLogger(__name__)

_CLASS_ALIASES = {
    "covid": "COVID-19", "covid-19": "COVID-19", "covid19": "COVID-19", "covid_19": "COVID-19",
    "ct_covid": "COVID-19", "cap": "CAP", "pneumonia": "CAP", "normal": "NORMAL",
    "ct_noncovid": "NON-COVID", "noncovid": "NON-COVID", "non-covid": "NON-COVID",
}


@dataclass
class Found:
    """What a layout found.

    ``rows``: for ``kind="cohort"`` dicts with ``patient_id, label, path`` (+ ``subset``, ``group``,
    ``source_class`` and the ``columns``); for ``kind="slices"`` dicts with ``image_path, label, subset,
    group, source_class`` (+ ``columns``). ``label`` is the layout's default class for ``source_class``
    (the dataset's own name for it), which ``msnet index --map`` overrides. ``slice_labels(row,
    n_slices)`` gives a study's slice labels in canonical order, None, or an error text.
    """

    rows: list[dict]
    kind: str = "cohort"
    columns: list[str] = field(default_factory=list)
    slice_labels: Callable[[dict, int | None], np.ndarray | str | None] | None = None


def _modules():
    from msnet.data.layouts import cc_ccii, covid_ct_md, covidx_ct, mosmed, slice_images, stoic

    return [covid_ct_md, covidx_ct, mosmed, cc_ccii, stoic, slice_images]  # one list, asked in this order


def names() -> list[str]:
    """The layouts' names, in the order they are tried."""
    return [m.NAME for m in _modules()]


def detect(root: Path) -> str | None:
    """Name of the first layout that recognises ``root``, or None."""
    return next((m.NAME for m in _modules() if m.detect(Path(root))), None)


def rows(name: str, root: Path) -> Found:
    """The rows of ``root`` read as layout ``name``."""
    return next(m for m in _modules() if m.NAME == name).rows(Path(root))


def visible(p: Path) -> bool:
    return not p.name.startswith(".")


def child_dirs(folder: Path) -> list[Path]:
    """Visible sub-folders, sorted by name."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and visible(d)) if folder.is_dir() else []


def map_class(name: str) -> str:
    """Canonical class name for a folder or label name.

    >>> map_class("Covid19"), map_class("Cap subjects"), map_class("Tumour")
    ('COVID-19', 'CAP', 'Tumour')
    """
    key = re.sub(r"[\s_]+(subjects|cases|patients)$", "", name.strip(), flags=re.I).lower()
    return _CLASS_ALIASES.get(key, _CLASS_ALIASES.get(key.replace(" ", ""), name.strip()))


def is_nifti(p: Path) -> bool:
    return has_suffix(p, NIFTI_SUFFIXES)


def study_id(p: Path) -> str:
    """A study's id from its folder or file name, without the suffix a reader knows (.nii.gz, .nii, .dcm ...;
    :func:`msnet.io.readers.study_stem`, as ``open_study`` names a study)."""
    return study_stem(p.name)


def studies_in(class_dir: Path) -> list[Path]:
    """Studies inside a class folder: sub-folders, NIfTI files and single DICOM files."""
    out = []
    for p in sorted(class_dir.iterdir()):
        if not visible(p):
            continue
        if p.is_dir() or is_nifti(p) or p.suffix.lower() == ".dcm":
            out.append(p)
        else:
            logger.debug("skipping %s: not a study folder or volume file", p)
    return out
