"""COVID-CT-MD: class folders of DICOM series, ``Index.csv`` and slice-label arrays.

Class folders named ``<class> subjects`` (the repository's sample, optionally under
``Sample data/``) or ``<class> cases`` (the published full dataset: ``COVID-19 Cases``,
``Cap Cases``, ``Normal Cases``), with ``Index.csv`` and ``Slice-level-labels-updated-1.npy``
(else ``Slice-level-labels.npy``) in ROOT, the class folders' folder or its parent. The label
arrays are indexed by the 0-based *row position* in Index.csv (its ``Label Index`` column skips 43
and is wrong from P044 on); labels run head to feet, i.e. canonical order. Normal patients get
all-zero slice labels. Label files that cannot be used (an array without Index.csv, an array whose
rows do not match Index.csv, or either file beside class folders not recognised as COVID-CT-MD's:
:func:`unused_label_files`) stop the index with an error instead of being dropped.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
from pathlib import Path

import numpy as np

from msnet.data.layouts import Found, studies_in, study_id, visible
from msnet.errors import MsnetError

logger = logging.getLogger(__name__)

NAME = "covid-ct-md"
CLASS_DIRS = {f"{name} {kind}": label for name, label in (("covid-19", "COVID-19"), ("cap", "CAP"),
                                                           ("normal", "NORMAL"))
              for kind in ("subjects", "cases")}  # the sample's names and the published dataset's
LABEL_FILES = ("Index.csv", "Slice-level-labels-updated-1.npy", "Slice-level-labels.npy")
INDEX_COLUMNS = ("Label Index", "Diagnosis", "Relative Path", "Folder/ID")
INDEX_ID = "Folder/ID"


def md_class(name: str) -> str | None:
    """COVID-CT-MD class of a folder name ("Cap Cases", "COVID-19 subjects"), or None."""
    return CLASS_DIRS.get(" ".join(name.lower().split()))


def base(root: Path) -> Path | None:
    """The folder holding the COVID-CT-MD class folders, or None."""
    for folder in (root, root / "Sample data"):
        if folder.is_dir() and any((folder / d).is_dir() for d in os.listdir(folder) if md_class(d)):
            return folder
    return None


def detect(root: Path) -> bool:
    return base(root) is not None


def unused_label_files(root: Path) -> None:
    """COVID-CT-MD label files in ``root`` whose class folders were not recognised: an error, not a silent drop."""
    found = [n for n in LABEL_FILES if (root / n).is_file()]
    if found:
        folders = ", ".join(sorted(d.name for d in root.iterdir() if d.is_dir() and visible(d))) or "none"
        raise MsnetError(f"COVID-CT-MD label files found ({', '.join(found)}) but no COVID-CT-MD class folders "
                         f"(folders: {folders}); the slice labels would be dropped", path=root,
                         fix="name the class folders as the dataset does ('COVID-19 Cases', 'Cap Cases', "
                             "'Normal Cases' or '... subjects'), or move the label files out of the folder")


def _label_rows(root: Path, folder: Path) -> tuple[dict[str, int], np.ndarray | None]:
    """Patient id -> row position in Index.csv, and the slice-label array."""
    folders = [root, folder, folder.parent]
    index_csv = next((d / "Index.csv" for d in folders if (d / "Index.csv").is_file()), None)
    arrays = [d / n for n in LABEL_FILES[1:] for d in folders if (d / n).is_file()]
    if index_csv is None:
        if arrays:
            raise MsnetError("slice-label array found but no Index.csv: its rows cannot be matched to patients",
                             path=arrays[0], fix="put the dataset's Index.csv beside it")
        logger.warning("%s: no Index.csv found; slice labels only for normal patients", root)
        return {}, None
    positions: dict[str, int] = {}
    with open(index_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if INDEX_ID not in fields:
            raise MsnetError(f"Index.csv has no {INDEX_ID!r} column (columns: {', '.join(fields) or 'none'}): "
                             "the COVID/CAP slice labels cannot be matched to patients", path=index_csv,
                             fix=f"restore the dataset's Index.csv (columns {', '.join(INDEX_COLUMNS)})")
        for pos, row in enumerate(reader):  # row POSITION, not the Label Index column
            pid = ({(k or "").strip(): v for k, v in row.items()}.get(INDEX_ID) or "").strip()
            if pid:
                positions[pid] = pos
    npy = None
    for name in LABEL_FILES[1:]:
        hit = next((d / name for d in folders if (d / name).is_file()), None)
        if hit is not None:
            npy = _load_label_array(hit)
            logger.info("slice labels from %s (%d rows)", hit.name, npy.shape[0])
            break
    if npy is not None and npy.shape[0] != len(positions):
        raise MsnetError(f"the slice-label array has {npy.shape[0]} rows but Index.csv lists {len(positions)} "
                         "patients: rows cannot be matched to patients", path=hit,
                         fix="use the Index.csv and label array of the same dataset release")
    return positions, npy


def _load_label_array(path: Path) -> np.ndarray:
    """A COVID-CT-MD slice-label array: 2-D integers (patients x slices), or MsnetError."""
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - truncated, not .npy, pickled objects: all a bad file
        raise MsnetError(f"cannot read the slice-label array ({type(exc).__name__}: {exc})", path=path,
                         fix="restore the file from the dataset (a NumPy .npy array)") from exc
    if arr.ndim != 2 or arr.dtype.kind not in "iubf":
        raise MsnetError(f"slice-label array of shape {arr.shape} and type {arr.dtype}; expected 2-D numbers "
                         "(patients x slices)", path=path, fix="restore the file from the dataset")
    return arr


def rows(root: Path) -> Found:
    folder = base(root)
    if folder is None:
        raise MsnetError("not a COVID-CT-MD folder (no class folders such as 'COVID-19 Cases')", root,
                         "point to the dataset's root or its 'Sample data' folder")
    out = []
    for d in sorted(folder.iterdir()):
        if d.is_dir() and md_class(d.name):
            for p in studies_in(d):
                out.append({"patient_id": study_id(p), "label": md_class(d.name), "path": p})
    positions, npy = _label_rows(root, folder)
    return Found(out, slice_labels=functools.partial(_slice_labels, info={"positions": positions, "npy": npy}))


def _slice_labels(row: dict, n_slices: int | None, info: dict) -> np.ndarray | None:
    if n_slices is None:
        return None
    pid, npy = row["patient_id"], info["npy"]
    if row["label"] == "NORMAL" and pid not in info["positions"]:
        return np.zeros(n_slices, dtype=np.int64)  # normal scans are infection-free by definition
    pos = info["positions"].get(pid)
    if pos is None or npy is None or pos >= npy.shape[0]:
        logger.warning("no slice labels for %s (not in Index.csv or label array)", pid)
        return None
    lab = np.asarray(npy[pos]).astype(np.int64).ravel()
    if n_slices > lab.size:
        logger.warning("%s has %d slices but only %d labels; padding with 0", pid, n_slices, lab.size)
        lab = np.concatenate([lab, np.zeros(n_slices - lab.size, dtype=np.int64)])
    return lab[:n_slices]
