"""Public dataset layouts, one module each: what a download looks like -> manifest rows.

Each module has ``NAME``, ``detect(root) -> bool`` and ``rows(root) -> Found``; :func:`detect`
asks them in order. :func:`msnet.data.cohorts.index_dataset` checks every study and writes the
manifests; nothing here reads pixels (except label masks).

- ``covidx-ct`` (:mod:`.covidx_ct`): PNG slices + ``{train,val,test}_COVIDx_CT-*.txt`` -> slices.csv
- ``mosmeddata`` (:mod:`.mosmed`): ``CT-0`` ... ``CT-4`` NIfTI studies (+ ``masks/``) -> cohort.csv
- ``cc-ccii`` (:mod:`.cc_ccii`): ``NCP`` / ``CP`` / ``Normal`` / patient / scan / slice images -> cohort.csv
- ``stoic2021`` (:mod:`.stoic`): ``data/mha/<id>.mha`` + ``metadata/reference.csv`` -> cohort.csv
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np


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
    from msnet.data.layouts import cc_ccii, covidx_ct, mosmed, stoic  # one list, asked in this order

    return [covidx_ct, mosmed, cc_ccii, stoic]


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
