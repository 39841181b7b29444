"""STOIC2021 (AP-HP, France): chest CT as MetaImage, with COVID-19 and severity labels.

Layout as published (the open training set): ``data/mha/<PatientID>.mha`` and
``metadata/reference.csv`` (``PatientID,probCOVID,probSevere``; 0/1 from RT-PCR and the outcome
at one month). probCOVID 1 -> ``COVID`` -> COVID-19, 0 -> ``negative`` -> NON-COVID (suspected
COVID-19 with a negative RT-PCR: neither msnet's CAP nor NORMAL; ``--map negative=...`` says
otherwise); ``severe`` keeps probSevere. The ``.mha`` files are read through SimpleITK.
"""

from __future__ import annotations

import csv
from pathlib import Path

from msnet.data.layouts import Found
from msnet.errors import MsnetError

NAME = "stoic2021"
CLASSES = {"1": ("COVID", "COVID-19"), "0": ("negative", "NON-COVID")}


def _reference(root: Path) -> Path | None:
    return next((p for p in (root / "metadata" / "reference.csv", root / "reference.csv") if p.is_file()), None)


def _mha_dir(root: Path) -> Path | None:
    return next((d for d in (root / "data" / "mha", root / "mha", root / "data", root)
                 if d.is_dir() and any(d.glob("*.mha"))), None)


def detect(root: Path) -> bool:
    return _reference(root) is not None or (root / "data" / "mha").is_dir()


def rows(root: Path) -> Found:
    ref, mha = _reference(root), _mha_dir(root)
    if ref is None:
        raise MsnetError("STOIC2021 scans without metadata/reference.csv: no labels", path=root,
                         fix="put the dataset's metadata/reference.csv beside data/")
    if mha is None:
        raise MsnetError("no .mha scans under data/mha", path=root, fix="download the scans into data/mha/")
    out = []
    with open(ref, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"PatientID", "probCOVID", "probSevere"} - set(reader.fieldnames or [])
        if missing:
            raise MsnetError(f"reference.csv lacks {', '.join(sorted(missing))}", path=ref,
                             fix="restore the dataset's metadata/reference.csv")
        for n, r in enumerate(reader, 2):
            pid, covid = (r["PatientID"] or "").strip(), (r["probCOVID"] or "").strip()
            if covid not in CLASSES:
                raise MsnetError(f"row {n}: probCOVID {covid!r} is not 0 or 1", path=ref,
                                 fix="restore the dataset's metadata/reference.csv")
            source, label = CLASSES[covid]
            out.append({"patient_id": pid, "label": label, "source_class": source, "path": mha / f"{pid}.mha",
                        "severe": (r["probSevere"] or "").strip()})
    return Found(out, columns=["severe"])
