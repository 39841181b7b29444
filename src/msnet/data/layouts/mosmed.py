"""MosMedData: Chest CT Scans with COVID-19 Related Findings (Moscow, 1,110 studies).

Layout as published: ``studies/CT-0/study_0001.nii.gz`` ... ``studies/CT-4/...`` (ROOT or ROOT/studies),
and ``masks/study_0255_mask.nii.gz`` for 50 CT-1 studies. The grades are the share of lung tissue
with COVID-19 findings: CT-0 none, CT-1 up to 25 %, CT-2 25-50 %, CT-3 50-75 %, CT-4 over 75 %.

Default rule (:data:`GRADES`): CT-0 -> NORMAL, CT-1 ... CT-4 -> COVID-19; the grade is kept in the
``source_class`` column, and ``msnet index --map CT-1=...`` maps any grade to another class. With
masks, a masked study's slice labels are 1 where its mask marks any voxel (canonical order, read
with the study's own orientation) and a CT-0 study's are all 0; without masks none are written.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from msnet.data.layouts import Found, child_dirs
from msnet.errors import MsnetError

NAME = "mosmeddata"
GRADES = {"CT-0": "NORMAL", "CT-1": "COVID-19", "CT-2": "COVID-19", "CT-3": "COVID-19", "CT-4": "COVID-19"}
_GRADE = re.compile(r"^CT-([0-4])$", re.I)
_NII = (".nii.gz", ".nii")


def _base(root: Path) -> Path | None:
    for base in (root, root / "studies"):
        if sum(1 for d in child_dirs(base) if _GRADE.match(d.name)) >= 2:
            return base
    return None


def detect(root: Path) -> bool:
    return _base(root) is not None


def _stem(p: Path) -> str:
    return next((p.name[: -len(s)] for s in _NII if p.name.lower().endswith(s)), p.name)


def _masks(root: Path, base: Path) -> dict[str, Path]:
    """study id -> mask file, from ``masks/`` beside or above the grade folders."""
    out = {}
    for folder in dict.fromkeys([root / "masks", base / "masks", base.parent / "masks"]):
        for f in sorted(folder.iterdir()) if folder.is_dir() else []:
            if f.name.lower().endswith(_NII):
                out[re.sub(r"_mask$", "", _stem(f), flags=re.I)] = f
    return out


def rows(root: Path) -> Found:
    base = _base(root)
    if base is None:
        raise MsnetError("not a MosMedData folder (no CT-0 ... CT-4 folders)", path=root,
                         fix="point to the dataset's root or its studies/ folder")
    out = []
    for d in child_dirs(base):
        m = _GRADE.match(d.name)
        if not m:
            continue
        grade = f"CT-{m.group(1)}"
        for f in sorted(d.iterdir()):
            if f.is_file() and f.name.lower().endswith(_NII):
                out.append({"patient_id": _stem(f), "label": GRADES[grade], "source_class": grade, "path": f})
    masks = _masks(root, base)
    if not masks:
        return Found(out)

    def slice_labels(row: dict, n_slices: int | None) -> np.ndarray | str | None:
        if row["patient_id"] in masks:
            from msnet.io.nifti import mask_slices

            lab = mask_slices(masks[row["patient_id"]]).astype(np.int64)
            if n_slices is not None and lab.size != n_slices:
                return f"its mask {masks[row['patient_id']].name} has {lab.size} slices but the study {n_slices}"
            return lab
        if row["source_class"] == "CT-0" and n_slices is not None:
            return np.zeros(n_slices, dtype=np.int64)  # no findings, by the grade's definition
        return None

    unknown = sorted(set(masks) - {r["patient_id"] for r in out})
    if unknown:
        raise MsnetError(f"masks of studies not found among the CT-0 ... CT-4 folders: {', '.join(unknown[:5])}",
                         path=masks[unknown[0]], fix="restore the studies or remove the stray masks")
    return Found(out, slice_labels=slice_labels)
