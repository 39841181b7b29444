"""Cohort manifests: dataset layouts -> ``cohort.csv`` / ``slice_labels.csv`` / ``slices.csv``.

Nothing downstream reads a dataset's native layout; :func:`index_dataset` turns
it into manifests once. Layouts understood (detected in this order):

- **user CSV** (``labels_csv``): ``patient_id,label[,path][,subset]``; ``path``
  relative to the CSV's folder or to ROOT (the first that exists), or absolute;
  without ``path`` the study is looked up as ROOT/<patient_id>[.nii[.gz]] or
  ROOT/<class>/<patient_id>.
- **manifest** (ROOT/cohort.csv exists, e.g. a cohort from ``msnet synth``):
  re-indexed, i.e. every study is checked and ROOT/slice_labels.csv copied.
- **COVID-CT-MD**: class folders named ``<class> subjects`` (the repository's sample,
  optionally under ``Sample data/``) or ``<class> cases`` (the published full dataset:
  ``COVID-19 Cases``, ``Cap Cases``, ``Normal Cases``), with ``Index.csv`` and
  ``Slice-level-labels-updated-1.npy`` (else ``Slice-level-labels.npy``) in ROOT, the
  class folders' folder or its parent. The label arrays are indexed by the 0-based *row
  position* in Index.csv (its ``Label Index`` column skips 43 and is wrong from P044 on);
  labels run head to feet, i.e. canonical order. Normal patients get all-zero slice
  labels. Label files that cannot be used (an array without Index.csv, an array whose
  rows do not match Index.csv, or either file beside class folders not recognised as
  COVID-CT-MD's) stop the index with an error instead of being dropped.
- **public layouts** of :mod:`msnet.data.layouts`: COVIDx CT (slice images, written as
  ``slices.csv``), MosMedData, CC-CCII and STOIC2021 (cohorts).
- **slice images**: ROOT/<split>/<class>/*.png|jpg (split = train/val/test) ->
  ``slices.csv`` (``image_path,label,subset,group,format,status,error``). ``format`` is
  the encoding found in the file's bytes (PNG/JPEG/...), not its extension: in
  UCSD COVID-CT every train JPEG is non-COVID, a shortcut a model can learn.
  ``group`` is the image's source (patient id from ``meta/*.csv``, else the figure
  or numbering run its file name gives: :func:`image_groups`; with ``group_by="paper"`` those
  joined by the paper they name: :func:`group_by_paper`) for grouped splits.
  ``CT_COVID`` -> ``COVID-19``, ``CT_NonCOVID`` -> ``NON-COVID``.
- **class folders**: ROOT/<class>/<patient>, a patient being a DICOM folder, a
  .nii/.nii.gz file or an image folder.

Class names map case-insensitively (covid, covid-19, covid19 -> COVID-19; cap,
pneumonia -> CAP; normal -> NORMAL); unknown names are kept as given.

Paths in written manifests are **relative to the manifest's folder when the
study lies inside it, absolute otherwise**; the readers here resolve both.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msnet.data import layouts
from msnet.errors import MsnetError
from msnet.files import write_csv_atomic

logger = logging.getLogger(__name__)

_CLASS_ALIASES = {
    "covid": "COVID-19", "covid-19": "COVID-19", "covid19": "COVID-19", "covid_19": "COVID-19",
    "ct_covid": "COVID-19", "cap": "CAP", "pneumonia": "CAP", "normal": "NORMAL",
    "ct_noncovid": "NON-COVID", "noncovid": "NON-COVID", "non-covid": "NON-COVID",
}
_SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
           "test": "test", "testing": "test"}
_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
_MD_CLASS_DIRS = {f"{name} {kind}": label for name, label in (("covid-19", "COVID-19"), ("cap", "CAP"),
                                                               ("normal", "NORMAL"))
                  for kind in ("subjects", "cases")}  # the sample's names and the published dataset's
_MD_LABEL_FILES = ("Index.csv", "Slice-level-labels-updated-1.npy", "Slice-level-labels.npy")
_MD_INDEX_COLUMNS = ("Label Index", "Diagnosis", "Relative Path", "Folder/ID")
_MD_INDEX_ID = "Folder/ID"


def map_class(name: str) -> str:
    """Canonical class name for a folder or label name.

    >>> map_class("Covid19"), map_class("Cap subjects"), map_class("Tumour")
    ('COVID-19', 'CAP', 'Tumour')
    """
    key = re.sub(r"[\s_]+(subjects|cases|patients)$", "", name.strip(), flags=re.I).lower()
    return _CLASS_ALIASES.get(key, _CLASS_ALIASES.get(key.replace(" ", ""), name.strip()))


@dataclass
class IndexReport:
    """What :func:`index_dataset` did."""

    layout: str
    n_ok: int = 0
    n_failed: int = 0
    outputs: list[Path] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        """Human-readable summary: counts, failures, files written."""
        lines = [f"layout {self.layout}: {self.n_ok} ok, {self.n_failed} failed"]
        for row in self.rows:
            if row.get("status") == "failed":
                name, error = str(row.get("patient_id") or row.get("image_path")), str(row.get("error", ""))
                # the error starts with the study's path, which names the study already
                lines.append(f"  failed {error}" if name in error.split(": ", 1)[0] else f"  failed {name}: {error}")
        lines += [f"  wrote {p}" for p in self.outputs]
        return "\n".join(lines)


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise MsnetError("manifest not found", path=path, fix="build it with `msnet index ROOT -o OUT`")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in required if c not in fields]
        if missing:
            raise MsnetError(f"missing column(s) {', '.join(missing)} (has {', '.join(fields) or 'none'})",
                             path=path, fix=f"give the CSV a header with {', '.join(required)}")
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


def _abs(path: Path) -> Path:
    """Absolute, normalised path that keeps symlinks (a linked study stays where the user put it)."""
    return Path(os.path.normpath(os.path.abspath(Path(path).expanduser())))


def _resolve(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return _abs(p if p.is_absolute() else Path(base) / p)


def _rel(path: Path, base: Path) -> str:
    """Path relative to base when inside it, else absolute."""
    path, base = _abs(path), _abs(base)
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def read_cohort(path: Path, only_ok: bool = False) -> list[dict]:
    """Rows of a cohort manifest; ``path`` resolved to an absolute Path.

    Relative paths are taken relative to the manifest's folder. Rows with
    status "failed" are kept unless ``only_ok``.

    e.g. rows = read_cohort("out/cohort.csv")
    e.g. rows[0]["patient_id"], rows[0]["path"].is_absolute()
    ('SYN0001', True)
    """
    path = Path(path)
    rows = _read_csv(path, ("patient_id", "label", "path"))
    for row in rows:
        row["path"] = _resolve(row["path"], _abs(path).parent)
    if only_ok:
        rows = [r for r in rows if r.get("status", "ok") in ("", "ok")]
    return rows


def read_slice_labels(path: Path) -> dict[str, np.ndarray]:
    """patient_id -> int array of slice labels indexed by canonical slice_index."""
    path = Path(path)
    if not path.is_file():
        raise MsnetError("slice-label manifest not found", path=path,
                         fix="`msnet index` writes slice_labels.csv only for a dataset with slice labels (COVID-CT-MD, "
                             "MosMedData with masks, a synthetic cohort); for one without, fine-tune on every slice "
                             "with its patient's label: --set data.slice_labels= --set finetune.infected_only=false")
    grouped: dict[str, dict[int, int]] = {}
    for row in _read_csv(path, ("patient_id", "slice_index", "label")):
        try:
            grouped.setdefault(row["patient_id"], {})[int(row["slice_index"])] = int(row["label"])
        except ValueError as exc:
            raise MsnetError(f"non-integer slice_index/label in row {row}", path=path,
                             fix="slice_index and label must be integers") from exc
    out = {}
    for pid, d in grouped.items():
        if sorted(d) != list(range(len(d))):
            raise MsnetError(f"slice indices of {pid} are not 0..{len(d) - 1}", path=path,
                             fix="list every slice of the study once, in canonical order")
        out[pid] = np.array([d[i] for i in range(len(d))], dtype=np.int64)
    return out


def read_slice_manifest(path: Path, only_ok: bool = False) -> list[dict]:
    """Rows of a slice-image manifest (slices.csv); ``image_path`` resolved to an absolute Path."""
    path = Path(path)
    rows = _read_csv(path, ("image_path", "label"))
    for row in rows:
        row["image_path"] = _resolve(row["image_path"], _abs(path).parent)
    if only_ok:
        rows = [r for r in rows if r.get("status", "ok") in ("", "ok")]
    return rows


# --------------------------------------------------------------------------- layouts


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith((".nii", ".nii.gz"))


def _study_id(p: Path) -> str:
    name = p.name
    for ext in (".nii.gz", ".nii", ".dcm"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _patients_in(class_dir: Path) -> list[Path]:
    """Studies inside a class folder: sub-folders, NIfTI files and single DICOM files."""
    out = []
    for p in sorted(class_dir.iterdir()):
        if not _visible(p):
            continue
        if p.is_dir() or _is_nifti(p) or p.suffix.lower() == ".dcm":
            out.append(p)
        else:
            logger.debug("skipping %s: not a study folder or volume file", p)
    return out


def _md_class(name: str) -> str | None:
    """COVID-CT-MD class of a folder name ("Cap Cases", "COVID-19 subjects"), or None."""
    return _MD_CLASS_DIRS.get(" ".join(name.lower().split()))


def _md_base(root: Path) -> Path | None:
    """The folder holding the COVID-CT-MD class folders, or None."""
    for base in (root, root / "Sample data"):
        if base.is_dir() and any((base / d).is_dir() for d in os.listdir(base) if _md_class(d)):
            return base
    return None


def _unused_label_files(root: Path) -> None:
    """COVID-CT-MD label files in ``root`` whose class folders were not recognised: an error, not a silent drop."""
    found = [n for n in _MD_LABEL_FILES if (root / n).is_file()]
    if found:
        folders = ", ".join(sorted(d.name for d in root.iterdir() if d.is_dir() and _visible(d))) or "none"
        raise MsnetError(f"COVID-CT-MD label files found ({', '.join(found)}) but no COVID-CT-MD class folders "
                         f"(folders: {folders}); the slice labels would be dropped", path=root,
                         fix="name the class folders as the dataset does ('COVID-19 Cases', 'Cap Cases', "
                             "'Normal Cases' or '... subjects'), or move the label files out of the folder")


def _image_split_dirs(root: Path) -> list[Path]:
    splits = [d for d in root.iterdir() if d.is_dir() and d.name.lower() in _SPLITS]
    for s in splits:
        for c in s.iterdir():
            if c.is_dir() and any(f.suffix.lower() in _IMAGE_EXT for f in c.iterdir()):
                return splits
    return []


def detect_layout(root: Path, labels_csv: Path | None = None) -> str:
    """One of "user-csv", "manifest", "covid-ct-md", a name of :mod:`msnet.data.layouts`
    ("covidx-ct", "mosmeddata", "cc-ccii", "stoic2021"), "slice-images", "class-folders"."""
    root = Path(root)
    if labels_csv is not None:
        return "user-csv"
    if not root.is_dir():
        raise MsnetError("dataset folder not found", path=root, fix="pass the folder that holds the dataset")
    if (root / "cohort.csv").is_file():
        return "manifest"
    if _md_base(root) is not None:
        return "covid-ct-md"
    public = layouts.detect(root)
    if public is not None:
        return public
    if _image_split_dirs(root):
        return "slice-images"
    return "class-folders"


def _rows_class_folders(root: Path) -> list[dict]:
    rows = []
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir() and _visible(d)):
        for p in _patients_in(class_dir):
            rows.append({"patient_id": _study_id(p), "label": map_class(class_dir.name), "path": p})
    if not rows:
        raise MsnetError("no class folders with studies found", path=root,
                         fix="lay the data out as ROOT/<class>/<patient> or pass --labels CSV")
    return rows


def _rows_user_csv(root: Path, labels_csv: Path) -> list[dict]:
    labels_csv = Path(labels_csv)
    rows = []
    for r in _read_csv(labels_csv, ("patient_id", "label")):
        pid = r["patient_id"]
        if r.get("path"):
            cands = [_resolve(r["path"], _abs(labels_csv).parent), _resolve(r["path"], _abs(root))]
        else:
            cands = [Path(root) / pid, Path(root) / f"{pid}.nii.gz", Path(root) / f"{pid}.nii"]
            if Path(root).is_dir():
                cands += [d / pid for d in Path(root).iterdir() if d.is_dir()]
        path = next((c for c in cands if c.exists()), cands[-1] if r.get("path") else cands[0])
        row = {"patient_id": pid, "label": map_class(r["label"]), "path": path}
        if r.get("subset"):
            row["subset"] = r["subset"]
        rows.append(row)
    return rows


def _rows_manifest(root: Path) -> tuple[list[dict], dict[str, np.ndarray] | None]:
    rows = []
    for r in read_cohort(root / "cohort.csv"):
        row = {k: v for k, v in r.items() if k not in ("status", "error")}
        rows.append(row)
    sl = root / "slice_labels.csv"
    return rows, (read_slice_labels(sl) if sl.is_file() else None)


def _md_label_rows(root: Path, base: Path) -> tuple[dict[str, int], np.ndarray | None]:
    """COVID-CT-MD: patient id -> row position in Index.csv, and the slice-label array."""
    folders = [root, base, base.parent]
    index_csv = next((d / "Index.csv" for d in folders if (d / "Index.csv").is_file()), None)
    arrays = [d / n for n in _MD_LABEL_FILES[1:] for d in folders if (d / n).is_file()]
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
        if _MD_INDEX_ID not in fields:
            raise MsnetError(f"Index.csv has no {_MD_INDEX_ID!r} column (columns: {', '.join(fields) or 'none'}): "
                             "the COVID/CAP slice labels cannot be matched to patients", path=index_csv,
                             fix=f"restore the dataset's Index.csv (columns {', '.join(_MD_INDEX_COLUMNS)})")
        for pos, row in enumerate(reader):  # row POSITION, not the Label Index column
            pid = ({(k or "").strip(): v for k, v in row.items()}.get(_MD_INDEX_ID) or "").strip()
            if pid:
                positions[pid] = pos
    npy = None
    for name in ("Slice-level-labels-updated-1.npy", "Slice-level-labels.npy"):
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


def _rows_covid_ct_md(root: Path) -> tuple[list[dict], dict]:
    base = _md_base(root)
    if base is None:
        raise MsnetError("not a COVID-CT-MD folder (no class folders such as 'COVID-19 Cases')", root,
                         "point to the dataset's root or its 'Sample data' folder")
    rows = []
    for d in sorted(base.iterdir()):
        if d.is_dir() and _md_class(d.name):
            for p in _patients_in(d):
                rows.append({"patient_id": _study_id(p), "label": _md_class(d.name), "path": p})
    positions, npy = _md_label_rows(root, base)
    return rows, {"positions": positions, "npy": npy}


def _md_slice_labels(row: dict, n_slices: int | None, info: dict) -> np.ndarray | None:
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


def _count_files(path: Path) -> int | None:
    if path.is_dir():
        return sum(1 for f in path.iterdir() if f.is_file() and _visible(f))
    return None


# --------------------------------------------------------------------------- slice images


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


def _rows_slice_images(root: Path) -> list[dict]:
    rows = []
    patients = _meta_patients(root)
    for split in sorted(_image_split_dirs(root)):
        for class_dir in sorted(d for d in split.iterdir() if d.is_dir() and _visible(d)):
            files = [f for f in sorted(class_dir.iterdir())
                     if f.is_file() and _visible(f) and f.suffix.lower() in _IMAGE_EXT]
            label = map_class(class_dir.name)
            for f, group in zip(files, image_groups([f.name for f in files], patients)):
                rows.append({"image_path": f, "label": label, "subset": _SPLITS[split.name.lower()],
                             "group": f"{label}/{group}"})
    return rows


def _write_slice_rows(layout: str, rows: list[dict], out_dir: Path, check: bool, strict: bool, by_paper: bool,
                      columns: tuple[str, ...] = ()) -> IndexReport:
    """Check every image (decodable, its format), then write ``slices.csv``."""
    report = IndexReport(layout=layout)
    for row in rows:
        f = row["image_path"]
        row.update(format=image_format(f) if f.is_file() else "unknown", status="ok", error="")
        if not f.is_file():
            err = MsnetError("image listed but not found", path=f, fix="restore the file or its list entry")
            if strict:
                raise err
            row.update(status="failed", error=str(err))
        elif check:
            try:
                from PIL import Image

                with Image.open(f) as im:
                    im.verify()
            except Exception as exc:  # noqa: BLE001 - any decoder error marks the image failed
                err = MsnetError(f"cannot decode image ({exc})", path=f, fix="remove or replace the file")
                if strict:
                    raise err from exc
                row.update(status="failed", error=str(err))
        ext = f.suffix.lower().lstrip(".").replace("jpg", "jpeg").upper()
        if row["format"] not in ("unknown", ext):
            logger.debug("%s: extension says %s but content is %s", f.name, ext, row["format"])
        report.rows.append(row)
    if by_paper:
        report.rows = group_by_paper(report.rows)
    out = Path(out_dir) / "slices.csv"
    header = ["image_path", "label", "subset", "group"] + (["source_class"] if any("source_class" in r for r in rows)
                                                           else []) + list(columns) + ["format", "status", "error"]
    write_csv_atomic(out, header, [{**r, "image_path": _rel(r["image_path"], out_dir)} for r in report.rows])
    report.outputs.append(out)
    report.n_failed = sum(r["status"] == "failed" for r in report.rows)
    report.n_ok = len(report.rows) - report.n_failed
    mismatched = sum(1 for r in report.rows
                     if r["format"] != r["image_path"].suffix.lower().lstrip(".").replace("jpg", "jpeg").upper())
    if mismatched:
        logger.warning("%d images are encoded in another format than their extension says", mismatched)
    return report


def apply_class_map(rows: list[dict], class_map: dict[str, str] | None) -> None:
    """Override rows' labels in place: ``class_map`` takes a dataset's own class name (``source_class``,
    else the label found) to a class, case-insensitively; a name that matches no row is an error.

    >>> rows = [{"label": "NORMAL", "source_class": "CT-0"}, {"label": "COVID-19", "source_class": "CT-1"}]
    >>> apply_class_map(rows, {"ct-1": "mild"}); [r["label"] for r in rows]
    ['NORMAL', 'mild']
    """
    if not class_map:
        return
    wanted = {k.strip().lower(): v.strip() for k, v in class_map.items()}
    used = set()
    for row in rows:
        for key in (str(row.get("source_class", "")), row["label"]):
            if key.lower() in wanted:
                row["label"] = wanted[key.lower()]
                used.add(key.lower())
                break
    unused = [k for k in class_map if k.strip().lower() not in used]
    if unused:
        names = sorted({str(r.get("source_class") or r["label"]) for r in rows})
        raise MsnetError(f"--map names class(es) the dataset does not have: {', '.join(unused)}",
                         fix=f"map one of {', '.join(names)}")


# --------------------------------------------------------------------------- main entry


def index_dataset(root: Path, out_dir: Path, labels_csv: Path | None = None, strict: bool = False,
                  check: bool = True, group_by: str = "source", class_map: dict[str, str] | None = None) -> IndexReport:
    """Detect root's layout and write out_dir/cohort.csv (+ slice_labels.csv) or out_dir/slices.csv.

    With ``check`` every study is read with :func:`msnet.io.read_study`; a study
    that fails gets status "failed" and its error text, and the run goes on
    (``strict`` re-raises at the first failure). ``group_by`` (slice images only): ``source`` (a
    patient, a figure, a numbering run: :func:`image_groups`) or ``paper`` (those joined by the paper
    whose id starts the file name: :func:`group_by_paper`). ``class_map`` overrides the class of a
    dataset's own class name (:func:`apply_class_map`), e.g. ``{"CT-1": "mild"}`` for MosMedData.

    e.g. report = index_dataset("data/covid-ct-md", "out")
    e.g. report.n_ok, report.n_failed
    (3, 0)
    """
    root, out_dir = Path(root), Path(out_dir)
    if group_by not in ("source", "paper"):
        raise MsnetError(f"unknown grouping {group_by!r}", fix="use --group-by source or --group-by paper")
    _check_out_dir(out_dir)
    layout = detect_layout(root, labels_csv)
    logger.info("indexing %s as %s", root, layout)
    found = layouts.rows(layout, root) if layout in layouts.names() else None
    if layout == "slice-images" or (found is not None and found.kind == "slices"):
        rows = _rows_slice_images(root) if found is None else found.rows
        apply_class_map(rows, class_map)
        return _write_slice_rows(layout, rows, out_dir, check, strict, group_by == "paper",
                                 tuple(found.columns) if found else ())
    if group_by != "source":
        raise MsnetError(f"--group-by {group_by} applies to slice images; {root} is a {layout} cohort, grouped by patient",
                         fix="leave --group-by out")
    slice_fn = None
    columns: list[str] = []
    if layout == "user-csv":
        rows = _rows_user_csv(root, labels_csv)  # type: ignore[arg-type]
    elif layout == "manifest":
        rows, given = _rows_manifest(root)
        if given is not None:
            slice_fn = functools.partial(_given_slice_labels, given)
    elif layout == "covid-ct-md":
        rows, md_info = _rows_covid_ct_md(root)
        slice_fn = functools.partial(_md_slice_labels, info=md_info)
    elif found is not None:
        rows, slice_fn, columns = found.rows, found.slice_labels, found.columns
    else:
        _unused_label_files(root)
        rows = _rows_class_folders(root)
    apply_class_map(rows, class_map)
    ids = [r["patient_id"] for r in rows]
    dups = sorted({i for i in ids if ids.count(i) > 1})
    if dups:
        raise MsnetError(f"patient ids occur more than once: {', '.join(dups[:5])}", path=root,
                         fix="give every study a unique folder/file name or patient_id")

    report = IndexReport(layout=layout)
    slice_rows: list[list] = []
    for row in rows:
        row.update(status="ok", error="")
        n_slices = None
        if check:
            n_slices = _check_study(row, strict)
        elif not row["path"].exists():
            row.update(status="failed", error=str(MsnetError("study not found", path=row["path"])))
        if row["status"] == "ok" and slice_fn is not None:
            labels = slice_fn(row, n_slices if n_slices is not None else _count_files(row["path"]))
            if isinstance(labels, str):  # a mismatch is a failure of this study
                row.update(status="failed", error=str(MsnetError(labels, path=row["path"])))
                if strict:
                    raise MsnetError(labels, path=row["path"])
            elif labels is not None:
                slice_rows.extend([row["patient_id"], i, int(v)] for i, v in enumerate(labels))
        report.rows.append(row)

    report.n_failed = sum(r["status"] == "failed" for r in report.rows)
    report.n_ok = len(report.rows) - report.n_failed
    header = ["patient_id", "label", "path"] + [c for c in ("subset", "group", "source_class")
                                                if any(r.get(c) for r in rows)]
    header += columns + ["status", "error"]
    out = out_dir / "cohort.csv"
    write_csv_atomic(out, header, [{**r, "path": _rel(r["path"], out_dir)} for r in report.rows])
    report.outputs.append(out)
    if slice_rows:
        sl = out_dir / "slice_labels.csv"
        write_csv_atomic(sl, ["patient_id", "slice_index", "label"], slice_rows)
        report.outputs.append(sl)
    logger.info("%d ok, %d failed", report.n_ok, report.n_failed)
    return report


def _check_out_dir(out_dir: Path) -> None:
    """The output folder is usable (created if missing) before any study is read."""
    bad = next((p for p in [out_dir, *out_dir.parents] if p.exists() and not p.is_dir()), None)
    if bad is not None:
        raise MsnetError("the output path is an existing file, not a folder", path=bad,
                         fix="pass a folder for -o (the manifests cohort.csv / slice_labels.csv are written into it)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MsnetError(f"cannot create the output folder ({exc.strerror or exc})", path=out_dir,
                         fix="pass a folder you can write to") from exc
    if not os.access(out_dir, os.W_OK):
        raise MsnetError("the output folder is not writable", path=out_dir, fix="pass a folder you can write to")


def _check_study(row: dict, strict: bool) -> int | None:
    """Read the study; on failure mark the row (or raise when strict). Returns the slice count."""
    from msnet.io import read_study

    try:
        vol = read_study(row["path"], study_id=row["patient_id"])
        return int(vol.n_slices)
    except Exception as exc:  # noqa: BLE001 - recorded per study; strict re-raises
        if strict:
            raise
        err = exc if isinstance(exc, MsnetError) else MsnetError(f"cannot read study ({type(exc).__name__}: {exc})",
                                                                path=row["path"])
        logger.debug("study %s failed: %s", row["patient_id"], err)  # listed once, in the summary
        row.update(status="failed", error=str(err))
        return None


def _given_slice_labels(given: dict[str, np.ndarray], row: dict, n_slices: int | None):
    """A re-indexed manifest's slice labels of one study, None when it has none, or an error text."""
    lab = given.get(row["patient_id"])
    if lab is None:
        return None
    if n_slices is not None and lab.size != n_slices:
        return (f"slice_labels.csv has {lab.size} labels for {row['patient_id']} "
                f"but the study has {n_slices} slices")
    return lab
