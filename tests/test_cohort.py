"""Dataset layouts -> manifests; readers; failures recorded per study."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import COVID_CT_MD, UCSD
from msnet.data.cohorts import (index_dataset, map_class, read_cohort, read_slice_labels, read_slice_manifest,
                          write_csv_atomic)
from msnet.errors import MsnetError
from msnet.data.synthetic import synth_cohort



def _ranges(labels: np.ndarray) -> list[tuple[int, int]]:
    idx = np.flatnonzero(labels)
    breaks = np.flatnonzero(np.diff(idx) > 1)
    starts, ends = np.r_[idx[0], idx[breaks + 1]], np.r_[idx[breaks], idx[-1]]
    return [(int(a), int(b)) for a, b in zip(starts, ends)]


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort") / "syn"
    synth_cohort(out, 3, size=32, seed=4, slices=(5, 7))
    return out


def test_map_class():
    assert [map_class(n) for n in ("covid", "COVID-19", "Covid19", "cap", "Pneumonia", "NORMAL", "CT_COVID",
                                   "CT_NonCOVID", "Cap subjects", "fibrosis")] == [
        "COVID-19", "COVID-19", "COVID-19", "CAP", "CAP", "NORMAL", "COVID-19", "NON-COVID", "CAP", "fibrosis"]


def test_covid_ct_md_slice_labels(shared_data, tmp_path):
    report = index_dataset(COVID_CT_MD, tmp_path)
    assert (report.layout, report.n_ok, report.n_failed) == ("covid-ct-md", 3, 0)
    rows = {r["patient_id"]: r for r in read_cohort(tmp_path / "cohort.csv")}
    assert {k: r["label"] for k, r in rows.items()} == {"P001": "COVID-19", "cap002": "CAP", "normal001": "NORMAL"}
    assert all(r["path"].is_dir() and r["status"] == "ok" for r in rows.values())
    labels = read_slice_labels(tmp_path / "slice_labels.csv")
    assert labels["P001"].size == 148 and labels["P001"].sum() == 80
    assert _ranges(labels["P001"]) == [(26, 29), (32, 38), (46, 62), (72, 75), (77, 124)]
    assert labels["cap002"].size == 131 and _ranges(labels["cap002"]) == [(89, 118)]  # row 55, not 56
    assert labels["normal001"].size == 154 and labels["normal001"].sum() == 0
    # without reading the studies the slice count comes from the file count: same labels
    quick = index_dataset(COVID_CT_MD, tmp_path / "quick", check=False)
    assert quick.n_ok == 3
    again = read_slice_labels(tmp_path / "quick" / "slice_labels.csv")
    assert all(np.array_equal(again[k], labels[k]) for k in labels)


def _class_root(syn: Path, tmp_path: Path) -> Path:
    root = tmp_path / "classes"
    names = {"COVID-19": "covid", "CAP": "Pneumonia", "NORMAL": "normal"}
    for r in read_cohort(syn / "cohort.csv"):
        (root / names[r["label"]]).mkdir(parents=True, exist_ok=True)
        (root / names[r["label"]] / f"case_{r['patient_id']}").symlink_to(r["path"], target_is_directory=True)
    (root / "normal" / "empty01").mkdir()  # fails: nothing to read
    (root / "Pneumonia" / "junk01").mkdir()
    (root / "Pneumonia" / "junk01" / "a.dcm").write_text("not a DICOM file")
    (root / "normal" / "README.txt").write_text("ignored: not a study")
    return root


def test_class_folders_record_failures_and_go_on(syn, tmp_path):
    root = _class_root(syn, tmp_path)
    out = tmp_path / "out"
    report = index_dataset(root, out)
    assert (report.layout, report.n_ok, report.n_failed) == ("class-folders", 3, 2)
    rows = {r["patient_id"]: r for r in read_cohort(out / "cohort.csv")}
    assert set(rows) == {"case_SYN0001", "case_SYN0002", "case_SYN0003", "empty01", "junk01"}
    assert rows["junk01"]["label"] == "CAP" and rows["empty01"]["label"] == "NORMAL"
    for pid in ("empty01", "junk01"):
        assert rows[pid]["status"] == "failed" and str(rows[pid]["path"]) in rows[pid]["error"]
    assert {rows[p]["status"] for p in rows if p.startswith("case_")} == {"ok"}
    assert not (out / "slice_labels.csv").exists()
    assert "empty01" in report.summary() and "2 failed" in report.summary()
    assert sorted(r["patient_id"] for r in read_cohort(out / "cohort.csv", only_ok=True)) == sorted(
        p for p in rows if p.startswith("case_"))
    with pytest.raises(MsnetError):
        index_dataset(root, tmp_path / "strict", strict=True)


def test_cli_index_exits_non_zero_on_failures(syn, tmp_path):
    from typer.testing import CliRunner

    from msnet.cli import app

    root = _class_root(syn, tmp_path)
    result = CliRunner().invoke(app, ["index", str(root), "-o", str(tmp_path / "cli")])
    assert result.exit_code == 1, result.output
    assert (tmp_path / "cli" / "cohort.csv").is_file()


def test_user_csv_paths_relative_to_csv_or_root(syn, tmp_path):
    csv_dir = tmp_path / "meta"
    csv_dir.mkdir()
    labels = csv_dir / "labels.csv"
    write_csv_atomic(labels, ["patient_id", "label", "path", "subset"], [
        ["a", "covid", "../data/SYN0001", "train"],  # relative to the CSV
        ["b", "normal", "SYN0002", "test"],  # relative to ROOT
        ["c", "cap", "missing_folder", "val"],
    ])
    (tmp_path / "data").symlink_to(syn, target_is_directory=True)
    report = index_dataset(tmp_path / "data", tmp_path / "out", labels_csv=labels)
    assert (report.layout, report.n_ok, report.n_failed) == ("user-csv", 2, 1)
    rows = {r["patient_id"]: r for r in read_cohort(tmp_path / "out" / "cohort.csv")}
    assert {k: (r["label"], r["subset"], r["status"]) for k, r in rows.items()} == {
        "a": ("COVID-19", "train", "ok"), "b": ("NORMAL", "test", "ok"), "c": ("CAP", "val", "failed")}
    assert rows["a"]["path"].resolve() == (syn / "SYN0001").resolve()


def test_manifest_reindex_checks_slice_counts(syn, tmp_path):
    root = tmp_path / "copy"
    root.mkdir()
    for r in read_cohort(syn / "cohort.csv"):
        (root / r["patient_id"]).symlink_to(r["path"], target_is_directory=True)
    (root / "cohort.csv").write_text((syn / "cohort.csv").read_text())
    lines = (syn / "slice_labels.csv").read_text().splitlines()
    dropped = [ln for ln in lines if not ln.startswith("SYN0002,")] + [
        ln for ln in lines if ln.startswith("SYN0002,")][:-1]  # one slice short
    (root / "slice_labels.csv").write_text("\n".join(dropped) + "\n")
    report = index_dataset(root, root)  # in place: paths stay relative
    assert (report.n_ok, report.n_failed) == (2, 1)
    with open(root / "cohort.csv", newline="") as f:
        raw = {r["patient_id"]: r for r in csv.DictReader(f)}
    assert raw["SYN0001"]["path"] == "SYN0001" and raw["SYN0001"]["subset"] == "train"
    assert raw["SYN0002"]["status"] == "failed" and "slices" in raw["SYN0002"]["error"]
    labels = read_slice_labels(root / "slice_labels.csv")
    assert set(labels) == {"SYN0001", "SYN0003"}
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]


def test_ucsd_slice_manifest(shared_data, tmp_path):
    report = index_dataset(UCSD, tmp_path)
    assert (report.layout, report.n_ok, report.n_failed) == ("slice-images", 543, 0)
    assert not (tmp_path / "cohort.csv").exists()
    rows = read_slice_manifest(tmp_path / "slices.csv")
    counts = Counter((r["subset"], r["label"]) for r in rows)
    assert counts == {("train", "COVID-19"): 191, ("train", "NON-COVID"): 234,
                      ("val", "COVID-19"): 60, ("val", "NON-COVID"): 58}
    assert all(r["image_path"].is_file() for r in rows)
    fake_png = [r for r in rows if r["image_path"].suffix == ".png" and r["format"] == "JPEG"]
    assert len(fake_png) == 32 and {(r["subset"], r["label"]) for r in fake_png} == {("val", "COVID-19")}
    train_jpeg = {r["label"] for r in rows if r["subset"] == "train" and r["format"] == "JPEG"}
    assert train_jpeg == {"NON-COVID"}  # the compression shortcut is visible in the manifest


def test_readers_reject_bad_manifests(tmp_path):
    bad = tmp_path / "slice_labels.csv"
    bad.write_text("patient_id,slice_index,label\nA,0,1\nA,2,0\n")
    with pytest.raises(MsnetError, match="0..1"):
        read_slice_labels(bad)
    nocol = tmp_path / "cohort.csv"
    nocol.write_text("patient_id,label\nA,CAP\n")
    with pytest.raises(MsnetError, match="path"):
        read_cohort(nocol)
    with pytest.raises(MsnetError, match="msnet index"):
        read_cohort(tmp_path / "missing.csv")
    with pytest.raises(MsnetError):
        index_dataset(tmp_path / "nope", tmp_path / "out")
