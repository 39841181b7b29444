"""CC-CCII (China Consortium of Chest CT Image Investigation): slice images per scan.

Layout as published (after unzipping): ``NCP/<patient>/<scan>/<slice>.png|jpg``, the same under
``CP/`` and ``Normal/``. NCP (novel coronavirus pneumonia) -> COVID-19, CP (common pneumonia) ->
CAP, Normal -> NORMAL: msnet's three classes. Every scan is a study (``patient_id`` =
``<class>_<patient>_<scan>``, the scan folder as ``path``, read as a grey-level image folder in the
natural order of the file names); ``group`` is the patient (``<class>_<patient>``), who may have
several scans. A patient folder that holds images itself is one scan.
"""

from __future__ import annotations

from pathlib import Path

from msnet.data.layouts import Found, child_dirs, visible
from msnet.errors import MsnetError

NAME = "cc-ccii"
CLASSES = {"ncp": "COVID-19", "cp": "CAP", "normal": "NORMAL"}
_IMAGES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def _class_dirs(root: Path) -> list[Path]:
    return [d for d in child_dirs(root) if d.name.lower() in CLASSES]


def detect(root: Path) -> bool:
    names = {d.name.lower() for d in _class_dirs(root)}
    return len(names) >= 2 and names != {"normal"} and bool(names & {"ncp", "cp"})


def _has_images(folder: Path) -> bool:
    return any(f.is_file() and visible(f) and f.suffix.lower() in _IMAGES for f in folder.iterdir())


def rows(root: Path) -> Found:
    out = []
    for cls in _class_dirs(root):
        for patient in child_dirs(cls):
            scans = [patient] if _has_images(patient) else [s for s in child_dirs(patient) if _has_images(s)]
            for scan in scans:
                pid = f"{cls.name}_{patient.name}" + ("" if scan == patient else f"_{scan.name}")
                out.append({"patient_id": pid, "label": CLASSES[cls.name.lower()], "source_class": cls.name,
                            "group": f"{cls.name}_{patient.name}", "path": scan})
    if not out:
        raise MsnetError("no scan folders with slice images under NCP/, CP/ or Normal/", path=root,
                         fix="unzip the dataset's archives so that NCP/<patient>/<scan>/ holds the images")
    return Found(out)
