"""Cohort manifests: dataset layouts -> ``cohort.csv`` / ``slice_labels.csv`` / ``slices.csv``.

Nothing downstream reads a dataset's native layout; :func:`index_dataset` turns
it into manifests once. Layouts understood (detected in this order):

- **user CSV** (``labels_csv``): ``patient_id,label[,path][,subset]``; ``path``
  relative to the CSV's folder or to ROOT (the first that exists), or absolute;
  without ``path`` the study is looked up as ROOT/<patient_id>[.nii[.gz]] or
  ROOT/<class>/<patient_id>.
- **manifest** (ROOT/cohort.csv exists, e.g. a cohort from ``msnet synth``):
  re-indexed, i.e. every study is checked and ROOT/slice_labels.csv copied.
- **public layouts** of :mod:`msnet.data.layouts`, asked in this order: COVID-CT-MD
  (class folders ``COVID-19 Cases`` / ``... subjects`` with ``Index.csv`` and the slice-label
  arrays: :mod:`~msnet.data.layouts.covid_ct_md`), COVIDx CT (slice images, written as
  ``slices.csv``), MosMedData, CC-CCII and STOIC2021 (cohorts), and slice images in
  ROOT/<split>/<class>/ (``slices.csv``: :mod:`~msnet.data.layouts.slice_images`).
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msnet.data import layouts
from msnet.data.layouts import map_class, studies_in, study_id
from msnet.data.layouts.covid_ct_md import unused_label_files
from msnet.data.layouts.slice_images import group_by_paper, image_format, image_groups  # noqa: F401 - public here too
from msnet.errors import MsnetError
from msnet.files import write_csv_atomic

logger = logging.getLogger(__name__)



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


def detect_layout(root: Path, labels_csv: Path | None = None) -> str:
    """One of "user-csv", "manifest", a name of :mod:`msnet.data.layouts` ("covid-ct-md", "covidx-ct",
    "mosmeddata", "cc-ccii", "stoic2021", "slice-images"), "class-folders"."""
    root = Path(root)
    if labels_csv is not None:
        return "user-csv"
    if not root.is_dir():
        raise MsnetError("dataset folder not found", path=root, fix="pass the folder that holds the dataset")
    if (root / "cohort.csv").is_file():
        return "manifest"
    return layouts.detect(root) or "class-folders"


def _rows_class_folders(root: Path) -> list[dict]:
    rows = []
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir() and layouts.visible(d)):
        for p in studies_in(class_dir):
            rows.append({"patient_id": study_id(p), "label": map_class(class_dir.name), "path": p})
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


def _count_files(path: Path) -> int | None:
    if path.is_dir():
        return sum(1 for f in path.iterdir() if f.is_file() and layouts.visible(f))
    return None


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
    if found is not None and found.kind == "slices":
        apply_class_map(found.rows, class_map)
        return _write_slice_rows(layout, found.rows, out_dir, check, strict, group_by == "paper",
                                 tuple(found.columns))
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
    elif found is not None:
        rows, slice_fn, columns = found.rows, found.slice_labels, found.columns
    else:
        unused_label_files(root)
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
