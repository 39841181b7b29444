"""Slice images in split and class folders: ROOT/<split>/<class>/*.png|jpg (split = train/val/test).

Written as ``slices.csv`` (``image_path,label,subset,group,format,status,error``). ``format`` is the
encoding found in the file's bytes (PNG/JPEG/...), not its extension (:func:`image_format`): in UCSD
COVID-CT every train JPEG is non-COVID, a shortcut a model can learn. ``group`` is the image's source
(patient id from ``meta/*.csv``, else the figure or numbering run its file name gives:
:func:`image_groups`; with ``group_by="paper"`` those joined by the paper they name:
:func:`group_by_paper`) for grouped splits. ``CT_COVID`` -> ``COVID-19``, ``CT_NonCOVID`` -> ``NON-COVID``.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from msnet.data.layouts import Found, map_class, visible

NAME = "slice-images"
SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
          "test": "test", "testing": "test"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def split_dirs(root: Path) -> list[Path]:
    splits = [d for d in root.iterdir() if d.is_dir() and d.name.lower() in SPLITS]
    for s in splits:
        for c in s.iterdir():
            if c.is_dir() and any(f.suffix.lower() in IMAGE_EXT for f in c.iterdir()):
                return splits
    return []


def detect(root: Path) -> bool:
    return bool(split_dirs(root))


def image_format(path: Path) -> str:
    """Encoded format of an image file from its first bytes ("PNG", "JPEG", ... or "unknown")."""
    with open(path, "rb") as f:
        head = f.read(12)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    return "unknown"


def _meta_patients(root: Path) -> dict[str, str]:
    """File name -> patient id from a UCSD-style ``meta/*MetaInfo*.csv`` under ``root`` (empty if none)."""
    out: dict[str, str] = {}
    for meta in sorted((root / "meta").glob("*.csv")) if (root / "meta").is_dir() else []:
        with open(meta, newline="", encoding="utf-8-sig", errors="replace") as fh:
            for r in csv.DictReader(fh):
                name, pid = (r.get("File name") or "").strip(), (r.get("Patient ID") or "").strip()
                if name and pid:
                    out[name] = pid
    return out


def image_groups(names: list[str], patients: dict[str, str] | None = None) -> list[str]:
    """A source group for each image file name of one class folder, for grouped splits.

    A name listed in ``patients`` (a meta CSV) takes its patient id; ``<n>%<k>.<ext>`` names share
    the group ``<n>`` (crops of one figure); purely numeric names form one group per run of
    consecutive numbers (images numbered together come from one source); any other name is its
    own group.

    >>> image_groups(["35%0.jpg", "35%1.jpg", "2138.png", "2139.png", "2141.png", "a.png"])
    ['fig:35', 'fig:35', 'run:2138', 'run:2138', 'run:2141', 'file:a.png']
    >>> image_groups(["x.png"], {"x.png": "Patient 7"})
    ['patient:Patient 7']
    """
    patients = patients or {}
    numbers = sorted({int(Path(n).stem) for n in names if Path(n).stem.isdigit()})
    run_of: dict[int, int] = {}
    for k in numbers:
        run_of[k] = run_of[k - 1] if k - 1 in run_of else k
    out = []
    for n in names:
        stem = Path(n).stem
        if n in patients:
            out.append(f"patient:{patients[n]}")
        elif "%" in stem and stem.split("%", 1)[0]:
            out.append(f"fig:{stem.split('%', 1)[0]}")
        elif stem.isdigit():
            out.append(f"run:{run_of[int(stem)]}")
        else:
            out.append(f"file:{n}")
    return out


def group_by_paper(rows: list[dict]) -> list[dict]:
    """Slice-image manifest rows with their ``group`` joined by paper, as ``msnet index --group-by
    paper`` writes them: within each subset and label, every image whose file name starts with a
    paper's id (the part before ``-p<page>``, ``%`` or ``_``, as in ``2020.02.25.20021568-p23-100.png``)
    joins that paper's group, and groups that share a paper (or a patient shown in two papers) become
    one, named after its first paper. A paper's figure style (size, coding, window) then never lies
    on both sides of a fold.

    >>> rows = [{"image_path": n, "label": "C", "subset": "train", "group": f"C/{g}"} for n, g in
    ...         [("A-p1-1.png", "file:A-p1-1.png"), ("A-p2-7.png", "patient:P1"), ("B_f1.png", "file:B_f1.png"),
    ...          ("C-p3-1.png", "patient:P1")]]
    >>> [r["group"] for r in group_by_paper(rows)]
    ['C/paper:A', 'C/paper:A', 'C/paper:B', 'C/paper:A']
    """
    out = [dict(r) for r in rows]
    buckets: dict[tuple, list[dict]] = {}
    for r in out:
        buckets.setdefault((r.get("subset"), r["label"]), []).append(r)
    for (_, label), bucket in buckets.items():
        prefix = f"{label}/"  # a manifest's group is "<label>/<source>"
        merged = _merge_papers([Path(r["image_path"]).name for r in bucket],
                               [str(r["group"]).removeprefix(prefix) for r in bucket])
        for r, group in zip(bucket, merged):
            r["group"] = prefix + group
    return out


def _merge_papers(names: list[str], groups: list[str]) -> list[str]:
    """``groups`` with every name's group joined to its paper's (:func:`group_by_paper`); a merged
    group is named after its first paper."""
    parent: dict[str, str] = {}

    def root(g: str) -> str:
        while parent.get(g, g) != g:
            g = parent[g]
        return g

    for name, group in zip(names, groups):
        paper, *rest = re.split(r"-p\d|%|_", Path(name).stem)
        if rest and paper:
            keep, drop = sorted((root(f"paper:{paper}"), root(group)), key=lambda g: (not g.startswith("paper:"), g))
            if keep != drop:
                parent[drop] = keep
    return [root(g) for g in groups]


def rows(root: Path) -> Found:
    out = []
    patients = _meta_patients(root)
    for split in sorted(split_dirs(root)):
        for class_dir in sorted(d for d in split.iterdir() if d.is_dir() and visible(d)):
            files = [f for f in sorted(class_dir.iterdir())
                     if f.is_file() and visible(f) and f.suffix.lower() in IMAGE_EXT]
            label = map_class(class_dir.name)
            for f, group in zip(files, image_groups([f.name for f in files], patients)):
                out.append({"image_path": f, "label": label, "subset": SPLITS[split.name.lower()],
                             "group": f"{label}/{group}"})
    return Found(out, kind="slices")
