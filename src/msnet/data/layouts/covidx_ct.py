"""COVIDx CT (COVID-Net): PNG slices of many public CT collections, with label lists.

Layout as published (Kaggle ``hgunraj/covidxct``): one image folder (``2A_images/``, ``3A_images/`` ...)
and ``train_COVIDx_CT-<release>.txt``, ``val_...``, ``test_...`` beside it. Each list line is
``<file name> <class> <xmin> <ymin> <xmax> <ymax>``: class 0 normal, 1 pneumonia (CAP), 2 COVID-19; the
box is the body's bounding box in pixels. ``msnet index`` writes ``slices.csv`` with the split as
``subset``, the box as ``xmin ymin xmax ymax`` and the scan as ``group``: for CNCB names
(``NCP_96_1328_0032.png``: class, patient, scan, slice) the patient, else the file name without its
trailing slice number.
"""

from __future__ import annotations

import re
from pathlib import Path

from msnet.data.layouts import Found, child_dirs
from msnet.errors import MsnetError

NAME = "covidx-ct"
CLASSES = {"0": ("Normal", "NORMAL"), "1": ("Pneumonia", "CAP"), "2": ("COVID-19", "COVID-19")}
_LIST = re.compile(r"^(train|val|test)_COVIDx[_-]?CT-?(\w*)\.txt$", re.I)
_CNCB = re.compile(r"^(NCP|CP|Normal)_(\d+)_", re.I)
_SLICE = re.compile(r"[_-]\d+$")


def _lists(root: Path) -> dict[str, list[Path]]:
    """release -> its label lists."""
    out: dict[str, list[Path]] = {}
    for f in sorted(root.iterdir()) if root.is_dir() else []:
        m = _LIST.match(f.name)
        if m and f.is_file():
            out.setdefault(m.group(2).upper(), []).append(f)
    return out


def detect(root: Path) -> bool:
    return bool(_lists(root))


def group_of(name: str) -> str:
    """The source a slice belongs to, for grouped folds.

    >>> group_of("NCP_96_1328_0032.png"), group_of("radiopaedia_40_86625_0_case18_15.png")
    ('patient:NCP_96', 'scan:radiopaedia_40_86625_0_case18')
    """
    stem = Path(name).stem
    m = _CNCB.match(stem)
    if m:
        return f"patient:{m.group(1).upper()}_{m.group(2)}"
    return f"scan:{_SLICE.sub('', stem)}"


def _image_dir(root: Path, release: str, first: str) -> Path:
    named = [d for d in child_dirs(root) if d.name.upper() == f"{release}_IMAGES"]
    others = [d for d in child_dirs(root) if d.name.lower().endswith("images")]
    hit = next((d for d in named + others + [root] if (d / first).is_file()), None)
    if hit is None:
        raise MsnetError(f"the images of COVIDx CT {release or ''} are not beside its label lists "
                         f"(looked for {first})", path=root,
                         fix=f"unpack the image archive into {root}/{release or '<release>'}_images")
    return hit


def rows(root: Path) -> Found:
    lists = _lists(root)
    if len(lists) > 1:
        raise MsnetError(f"label lists of several COVIDx CT releases ({', '.join(sorted(lists))})", path=root,
                         fix="index one release at a time: keep only its train/val/test lists beside its images")
    (release, files), = lists.items()
    out, images = [], None
    for f in files:
        subset = _LIST.match(f.name).group(1).lower()  # type: ignore[union-attr]
        for n, line in enumerate(f.read_text(encoding="utf-8-sig").splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6 or parts[1] not in CLASSES or not all(p.lstrip("-").isdigit() for p in parts[2:]):
                raise MsnetError(f"line {n} is not '<file> <class 0/1/2> <xmin> <ymin> <xmax> <ymax>': {line[:80]!r}",
                                 path=f, fix="restore the list from the dataset")
            images = images or _image_dir(root, release, parts[0])
            source, label = CLASSES[parts[1]]
            out.append({"image_path": images / parts[0], "label": label, "source_class": source, "subset": subset,
                        "group": group_of(parts[0]), **dict(zip(("xmin", "ymin", "xmax", "ymax"), parts[2:]))})
    if not out:
        raise MsnetError("the COVIDx CT label lists are empty", path=root, fix="restore them from the dataset")
    return Found(out, kind="slices", columns=["xmin", "ymin", "xmax", "ymax"])
