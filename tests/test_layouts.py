"""Public dataset layouts, each as a small copy in the dataset's own layout built at run time from the
real scans in ../shared/data (renamed, re-encoded or converted; nothing downloaded)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import CAP002, COVID_CT_MD, DICOM_ZOO, NORMAL001, P001
from msnet.data.cohorts import index_dataset, read_cohort, read_slice_labels, read_slice_manifest
from msnet.errors import MsnetError
from msnet.io import read_study


def _ranges(labels: np.ndarray) -> list[tuple[int, int]]:
    idx = np.flatnonzero(labels)
    breaks = np.flatnonzero(np.diff(idx) > 1)
    return [(int(a), int(b)) for a, b in zip(np.r_[idx[0], idx[breaks + 1]], np.r_[idx[breaks], idx[-1]])]


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src, target_is_directory=src.is_dir())


@pytest.fixture(scope="module")
def cap002(shared_data):
    """cap002 read once: every 8th slice (17 slices, superior first) of a real CAP scan."""
    vol = read_study(CAP002)
    return vol.hu[::8].copy(), vol.spacing_mm, vol.z_mm[::8].copy()


def _png(hu: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip((hu + 1000) / 1400, 0, 1) * 255).astype(np.uint8)).save(path)


# --------------------------------------------------------------------------- COVID-CT-MD


def _ctmd(root: Path, names=("COVID-19 Cases", "Cap Cases", "Normal Cases"), label_files=True) -> Path:
    for name, study in zip(names, (P001, CAP002, NORMAL001)):
        _link(study, root / name / study.name)
    if label_files:
        for f in ("Index.csv", "Slice-level-labels-updated-1.npy"):
            _link(COVID_CT_MD / f, root / f)
    return root


def test_covid_ct_md_published_folder_names(shared_data, tmp_path):
    root = _ctmd(tmp_path / "COVID-CT-MD")
    report = index_dataset(root, tmp_path / "out", check=False)
    assert (report.layout, report.n_ok, report.n_failed) == ("covid-ct-md", 3, 0)
    rows = {r["patient_id"]: r["label"] for r in read_cohort(tmp_path / "out" / "cohort.csv")}
    assert rows == {"P001": "COVID-19", "cap002": "CAP", "normal001": "NORMAL"}
    labels = read_slice_labels(tmp_path / "out" / "slice_labels.csv")
    assert labels["P001"].sum() == 80 and _ranges(labels["P001"]) == [(26, 29), (32, 38), (46, 62), (72, 75), (77, 124)]
    assert _ranges(labels["cap002"]) == [(89, 118)]  # Index.csv row 55, not its Label Index 56
    assert labels["normal001"].size == 154 and labels["normal001"].sum() == 0


def test_covid_ct_md_label_files_never_dropped(shared_data, tmp_path):
    # class folders named otherwise: the label files would be ignored, so the index stops
    odd = _ctmd(tmp_path / "odd", names=("covid", "pneumonia", "healthy"))
    with pytest.raises(MsnetError, match="label files found.*Index.csv"):
        index_dataset(odd, tmp_path / "o1", check=False)
    assert not (tmp_path / "o1" / "cohort.csv").exists()
    # an array without Index.csv cannot be matched to patients
    no_index = _ctmd(tmp_path / "no_index", label_files=False)
    _link(COVID_CT_MD / "Slice-level-labels-updated-1.npy", no_index / "Slice-level-labels-updated-1.npy")
    with pytest.raises(MsnetError, match="no Index.csv"):
        index_dataset(no_index, tmp_path / "o2", check=False)
    # an array of another release (fewer rows than Index.csv)
    short = _ctmd(tmp_path / "short", label_files=False)
    _link(COVID_CT_MD / "Index.csv", short / "Index.csv")
    np.save(short / "Slice-level-labels.npy", np.load(COVID_CT_MD / "Slice-level-labels-updated-1.npy")[:60])
    with pytest.raises(MsnetError, match="60 rows but Index.csv lists 79"):
        index_dataset(short, tmp_path / "o3", check=False)


def test_run_without_slice_labels_says_why(tmp_path):
    with pytest.raises(MsnetError, match="only for a dataset with slice labels") as info:
        read_slice_labels(tmp_path / "cohort" / "slice_labels.csv")
    assert "infected_only=false" in str(info.value)


# --------------------------------------------------------------------------- COVIDx CT


def test_covidx_ct_lists_boxes_and_groups(cap002, tmp_path):
    hu = cap002[0]
    root = tmp_path / "covidxct"
    names = {"NCP_96_1328_0032.png": hu[8], "NCP_96_1328_0033.png": hu[9], "CP_7_3001_0010.png": hu[10],
             "Normal_3_300_0001.png": hu[1], "radiopaedia_40_86625_0_case18_15.png": hu[12]}
    for name, img in names.items():
        _png(img, root / "2A_images" / name)
    (root / "train_COVIDx_CT-2A.txt").write_text(
        "NCP_96_1328_0032.png 2 9 94 512 405\nNCP_96_1328_0033.png 2 9 90 512 400\nCP_7_3001_0010.png 1 0 40 500 470\n")
    (root / "val_COVIDx_CT-2A.txt").write_text("Normal_3_300_0001.png 0 12 60 498 430\n")
    (root / "test_COVIDx_CT-2A.txt").write_text("radiopaedia_40_86625_0_case18_15.png 2 0 0 512 512\n"
                                                 "gone_1_0001.png 0 0 0 512 512\n")
    report = index_dataset(root, tmp_path / "out")
    assert (report.layout, report.n_ok, report.n_failed) == ("covidx-ct", 5, 1)
    rows = {r["image_path"].name: r for r in read_slice_manifest(tmp_path / "out" / "slices.csv")}
    assert {n: (r["label"], r["subset"], r["group"]) for n, r in rows.items() if n != "gone_1_0001.png"} == {
        "NCP_96_1328_0032.png": ("COVID-19", "train", "patient:NCP_96"),
        "NCP_96_1328_0033.png": ("COVID-19", "train", "patient:NCP_96"),
        "CP_7_3001_0010.png": ("CAP", "train", "patient:CP_7"),
        "Normal_3_300_0001.png": ("NORMAL", "val", "patient:NORMAL_3"),
        "radiopaedia_40_86625_0_case18_15.png": ("COVID-19", "test", "scan:radiopaedia_40_86625_0_case18")}
    assert [rows["NCP_96_1328_0032.png"][k] for k in ("xmin", "ymin", "xmax", "ymax")] == ["9", "94", "512", "405"]
    assert rows["gone_1_0001.png"]["status"] == "failed" and "not found" in rows["gone_1_0001.png"]["error"]
    assert {r["format"] for n, r in rows.items() if n != "gone_1_0001.png"} == {"PNG"}
    mapped = index_dataset(root, tmp_path / "mapped", class_map={"Pneumonia": "OTHER"})
    assert {r["label"] for r in mapped.rows if r["source_class"] == "Pneumonia"} == {"OTHER"}
    (root / "train_COVIDx_CT-3A.txt").write_text("NCP_96_1328_0032.png 2 9 94 512 405\n")
    with pytest.raises(MsnetError, match="several COVIDx CT releases"):
        index_dataset(root, tmp_path / "two")


# --------------------------------------------------------------------------- MosMedData


def _flipped_nifti(src: Path, dst: Path) -> None:
    """The same volume stored with its slice axis reversed (the affine says so): same scan, other file order."""
    import nibabel as nib

    img = nib.load(str(src))
    data = np.asanyarray(img.dataobj)[:, :, ::-1]
    aff = img.affine.copy()
    aff[:3, 3] = img.affine[:3, :3] @ np.array([0, 0, data.shape[2] - 1]) + img.affine[:3, 3]
    aff[:3, 2] = -img.affine[:3, 2]
    nib.save(nib.Nifti1Image(data, aff, img.header), str(dst))


def test_mosmeddata_grades_masks_and_map(shared_data, tmp_path):
    import nibabel as nib

    ct = DICOM_ZOO / "totalsegmentator-example" / "example_ct.nii.gz"
    root = tmp_path / "MosMedData" / "studies"
    for grade, study in (("CT-0", "study_0001"), ("CT-1", "study_0255"), ("CT-2", "study_0300")):
        (root / grade).mkdir(parents=True)
        os.symlink(ct, root / grade / f"{study}.nii.gz")
    _flipped_nifti(ct, root / "CT-1" / "study_0256.nii.gz")
    img = nib.load(str(ct))
    mask = np.zeros(img.shape, np.uint8)
    mask[40:60, 30:50, 100:106] = 1  # file slices 100-105 of 112; RAS: near the head end
    masks = tmp_path / "MosMedData" / "masks"
    masks.mkdir()
    nib.save(nib.Nifti1Image(mask, img.affine), str(masks / "study_0255_mask.nii"))
    _flipped_nifti(masks / "study_0255_mask.nii", masks / "study_0256_mask.nii.gz")

    report = index_dataset(tmp_path / "MosMedData", tmp_path / "out")
    assert (report.layout, report.n_ok, report.n_failed) == ("mosmeddata", 4, 0)
    rows = {r["patient_id"]: r for r in read_cohort(tmp_path / "out" / "cohort.csv")}
    assert {p: (r["label"], r["source_class"]) for p, r in rows.items()} == {
        "study_0001": ("NORMAL", "CT-0"), "study_0255": ("COVID-19", "CT-1"),
        "study_0256": ("COVID-19", "CT-1"), "study_0300": ("COVID-19", "CT-2")}
    labels = read_slice_labels(tmp_path / "out" / "slice_labels.csv")
    assert set(labels) == {"study_0001", "study_0255", "study_0256"}  # CT-2 has no mask: no labels
    assert labels["study_0001"].size == 112 and labels["study_0001"].sum() == 0
    assert _ranges(labels["study_0255"]) == [(6, 11)]  # superior first: file slice 105 is index 6
    assert np.array_equal(labels["study_0256"], labels["study_0255"])  # the flipped file reads the same
    assert np.array_equal(read_study(root / "CT-1" / "study_0256.nii.gz").hu, read_study(ct).hu)

    mapped = index_dataset(tmp_path / "MosMedData", tmp_path / "mapped", check=False,
                           class_map={"CT-1": "mild", "ct-2": "moderate"})
    assert {r["patient_id"]: r["label"] for r in mapped.rows} == {
        "study_0001": "NORMAL", "study_0255": "mild", "study_0256": "mild", "study_0300": "moderate"}
    with pytest.raises(MsnetError, match="CT-9"):
        index_dataset(tmp_path / "MosMedData", tmp_path / "bad", check=False, class_map={"CT-9": "x"})
    nib.save(nib.Nifti1Image(mask, img.affine), str(masks / "study_0999_mask.nii.gz"))
    with pytest.raises(MsnetError, match="study_0999"):
        index_dataset(tmp_path / "MosMedData", tmp_path / "stray", check=False)


# --------------------------------------------------------------------------- CC-CCII


def test_cc_ccii_scans_per_patient(cap002, tmp_path):
    hu = cap002[0]
    root = tmp_path / "CC-CCII"
    for cls, patient, scan, first in (("NCP", "1", "1001", 0), ("NCP", "1", "1002", 4), ("CP", "7", "3001", 8),
                                      ("Normal", "3", "2001", 0)):
        for i in range(4):
            _png(hu[first + i], root / cls / patient / scan / f"{i}.png")
    (root / "CP" / "8").mkdir(parents=True)  # a patient folder with no scan: nothing to index
    report = index_dataset(root, tmp_path / "out")
    assert (report.layout, report.n_ok, report.n_failed) == ("cc-ccii", 4, 0)
    rows = {r["patient_id"]: r for r in read_cohort(tmp_path / "out" / "cohort.csv")}
    assert {p: (r["label"], r["group"]) for p, r in rows.items()} == {
        "NCP_1_1001": ("COVID-19", "NCP_1"), "NCP_1_1002": ("COVID-19", "NCP_1"),
        "CP_7_3001": ("CAP", "CP_7"), "Normal_3_2001": ("NORMAL", "Normal_3")}
    vol = read_study(rows["NCP_1_1002"]["path"])
    assert vol.n_slices == 4 and vol.kind == "grey"
    assert not (tmp_path / "out" / "slice_labels.csv").exists()


# --------------------------------------------------------------------------- STOIC2021


def _mha(hu: np.ndarray, spacing_mm, z_top: float, path: Path, head_first: bool) -> None:
    """A MetaImage of ``hu`` (superior first): stored feet-to-head (ITK's usual) or head-to-feet."""
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    dz, dy, dx = spacing_mm
    img = sitk.GetImageFromArray((hu if head_first else hu[::-1]).astype(np.int16))
    img.SetSpacing((dx, dy, dz))
    bottom = z_top - dz * (len(hu) - 1)
    img.SetOrigin((-200.0, -180.0, z_top if head_first else bottom))
    img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1) if head_first else (1, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(img, str(path), useCompression=True)


def test_stoic2021_metaimage(cap002, tmp_path):
    hu, spacing, z = cap002
    spacing = (spacing[0] * 8, spacing[1], spacing[2])
    root = tmp_path / "stoic2021-training"
    _mha(hu, spacing, float(z[0]), root / "data" / "mha" / "101.mha", head_first=False)
    _mha(hu, spacing, float(z[0]), root / "data" / "mha" / "202.mha", head_first=True)
    (root / "metadata").mkdir()
    with open(root / "metadata" / "reference.csv", "w", newline="") as f:
        csv.writer(f).writerows([["PatientID", "probCOVID", "probSevere"], [101, 1, 1], [202, 0, 0], [303, 1, 0]])
    report = index_dataset(root, tmp_path / "out")
    assert (report.layout, report.n_ok, report.n_failed) == ("stoic2021", 2, 1)
    rows = {r["patient_id"]: r for r in read_cohort(tmp_path / "out" / "cohort.csv")}
    assert {p: (r["label"], r["source_class"], r["severe"], r["status"]) for p, r in rows.items()} == {
        "101": ("COVID-19", "COVID", "1", "ok"), "202": ("NON-COVID", "negative", "0", "ok"),
        "303": ("COVID-19", "COVID", "0", "failed")}
    for pid in ("101", "202"):  # either storage order reads as the DICOM scan, superior first
        vol = read_study(rows[pid]["path"])
        assert vol.hu.shape == hu.shape and np.array_equal(vol.hu, np.round(hu))
        assert vol.z_mm[0] == pytest.approx(z[0]) and vol.z_mm[0] > vol.z_mm[-1]
        assert vol.spacing_mm == pytest.approx(spacing)
    mapped = index_dataset(root, tmp_path / "mapped", check=False, class_map={"negative": "CAP"})
    assert [r["label"] for r in mapped.rows] == ["COVID-19", "CAP", "COVID-19"]


def test_cli_index_map(shared_data, tmp_path):
    from typer.testing import CliRunner

    from msnet.cli import app

    root = tmp_path / "mm"
    (root / "CT-0").mkdir(parents=True)
    (root / "CT-3").mkdir()
    ct = DICOM_ZOO / "totalsegmentator-example" / "example_ct.nii.gz"
    os.symlink(ct, root / "CT-0" / "study_0002.nii.gz")
    os.symlink(ct, root / "CT-3" / "study_0700.nii.gz")
    result = CliRunner().invoke(app, ["index", str(root), "-o", str(tmp_path / "o"), "--no-check", "--map", "CT-3=severe"])
    assert result.exit_code == 0, result.output
    assert "layout mosmeddata: 2 ok" in result.output
    assert {r["patient_id"]: r["label"] for r in read_cohort(tmp_path / "o" / "cohort.csv")} == {
        "study_0002": "NORMAL", "study_0700": "severe"}
