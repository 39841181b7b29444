"""Synthetic cohort: real DICOM, coherent labels, planted traps, determinism, no class leaks."""

from __future__ import annotations

import csv
import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from msnet.data.cohorts import read_cohort, read_slice_labels
from msnet.errors import MsnetError
from msnet.data.phantom import CONSOLIDATION_HU, GGO_HU, Phantom, plan_cohort
from msnet.data.synthetic import pixel_hash, synth_cohort

SIZE, SEED, SLICES = 64, 3, (12, 18)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "cohort"
    synth_cohort(out, 6, size=SIZE, seed=SEED, slices=SLICES)
    return out


def _headers(folder: Path) -> list[tuple[str, pydicom.Dataset]]:
    return [(f.name, pydicom.dcmread(f, stop_before_pixels=True)) for f in sorted(folder.iterdir())]


def test_manifests_match_files(cohort):
    rows = read_cohort(cohort / "cohort.csv")
    assert Counter(r["label"] for r in rows) == {"COVID-19": 2, "CAP": 2, "NORMAL": 2}
    assert [r["patient_id"] for r in rows] == [f"SYN{i:04d}" for i in range(1, 7)]
    with open(cohort / "cohort.csv", newline="") as f:
        raw = list(csv.DictReader(f))
    assert all(not Path(r["path"]).is_absolute() for r in raw)  # relative to OUT
    labels = read_slice_labels(cohort / "slice_labels.csv")
    for r in rows:
        n_files = len(list(r["path"].iterdir()))
        assert SLICES[0] <= n_files <= SLICES[1]
        assert labels[r["patient_id"]].size == n_files
        if r["label"] == "NORMAL":
            assert labels[r["patient_id"]].sum() == 0
        else:
            assert labels[r["patient_id"]].sum() >= 2


def test_dicom_headers_are_valid_ct(cohort):
    names, ds = _headers(cohort / "SYN0001")[0]
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID):
        assert UID(uid).is_valid
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert (ds.PixelRepresentation, ds.BitsAllocated, ds.BitsStored) == (1, 16, 16)
    assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
    assert str(ds.PatientName) == ds.PatientID == "SYN0001"
    assert float(ds.SliceLocation) == float(ds.ImagePositionPatient[2])
    sops = {h.SOPInstanceUID for _, h in _headers(cohort / "SYN0002")}
    assert len(sops) == len(list((cohort / "SYN0002").iterdir()))


def test_traps_names_and_instance_numbers(cohort):
    directions = set()
    for folder in sorted(p for p in cohort.iterdir() if p.is_dir()):
        heads = _headers(folder)  # sorted by file name
        z = np.array([float(h.ImagePositionPatient[2]) for _, h in heads])
        d = np.diff(z)
        assert not (np.all(d > 0) or np.all(d < 0)), f"{folder.name}: file names follow slice order"
        inst = np.array([int(h.InstanceNumber) for _, h in heads])
        assert sorted(inst) == list(range(1, len(inst) + 1))
        directions.add(np.sign(np.corrcoef(inst, z)[0, 1]))
    assert directions == {-1.0, 1.0}  # InstanceNumber runs with z in some patients, against it in others


def test_round_trip_through_reader_and_index(cohort, tmp_path):
    from msnet.data.cohorts import index_dataset
    from msnet.io import read_study

    report = index_dataset(cohort, tmp_path / "idx")
    assert (report.layout, report.n_ok, report.n_failed) == ("manifest", 6, 0)
    labels = read_slice_labels(tmp_path / "idx" / "slice_labels.csv")
    assert labels.keys() == read_slice_labels(cohort / "slice_labels.csv").keys()
    plans = {p.patient_id: p for p in plan_cohort(6, size=SIZE, seed=SEED, slices=SLICES)}
    for row in read_cohort(tmp_path / "idx" / "cohort.csv"):
        vol = read_study(row["path"], study_id=row["patient_id"])
        lab = labels[row["patient_id"]]
        assert vol.n_slices == lab.size
        assert np.all(np.diff(vol.z_mm) < 0)  # canonical: superior -> inferior
        plan = plans[row["patient_id"]]
        assert vol.hu.shape[1:] == (SIZE, SIZE)
        assert vol.spacing_mm[1] == pytest.approx(plan.pixel_spacing_mm, rel=1e-3)
        phantom = Phantom(plan, SIZE)
        lesion_hu = []
        for i in range(vol.n_slices):
            hu, mask = phantom.render(i)
            # same slice, same pixels: order and orientation survive writing and reading
            assert np.abs(vol.hu[i] - np.clip(np.rint(hu), -1024, 3071)).max() <= 0.5
            assert bool(mask.any()) == bool(lab[i])
            lesion_hu.append(vol.hu[i][mask])
        if lab.any():  # over the whole lesion: at its tips a few pixels are mostly the vessels and septa crossing it
            lo, hi = GGO_HU if plan.label == "COVID-19" else CONSOLIDATION_HU
            assert lo <= float(np.median(np.concatenate(lesion_hu))) <= hi
        if plan.label == "NORMAL":
            assert lab.sum() == 0


def test_lesion_side_and_texture_by_class():
    plans = plan_cohort(30, size=64, seed=5, slices=(40, 60))
    for p in plans:
        sides = {les.side for les in p.lesions}
        if p.label == "COVID-19":  # multifocal, bilateral, peripheral ground glass
            assert sides == {-1, 1} and all(les.kind == "ggo" and les.rho >= 0.65 for les in p.lesions)
            assert 2 <= len(p.lesions) <= 6  # one to three foci per lung
        elif p.label == "CAP":  # one consolidation, bounded by a lobe
            assert len(p.lesions) == 1 and p.lesions[0].kind == "consolidation" and p.lesions[0].lobe
        else:
            assert p.lesions == []


def _lesion_slices(plan, size=64) -> np.ndarray:
    ph = Phantom(plan, size)
    return np.array([ph.render(i)[1].sum() for i in range(plan.n_slices)])


def test_classes_differ_in_where_and_how_many_slices_carry_lesions():
    """COVID-19: foci in both lungs over more slices than CAP's, more in the lower lungs; CAP: one contiguous run;
    in both, most slices are clean."""
    plans = [p for p in plan_cohort(24, size=64, seed=7, slices=(50, 70)) if p.label != "NORMAL"]
    cover = {"COVID-19": [], "CAP": []}
    lower = upper = 0
    for p in plans:
        area = _lesion_slices(p)
        labels = area > 0
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, labels.astype(int), 0])))[::2]
        assert runs.max() >= 3  # a lesion spans several neighbouring slices
        cover[p.label].append(labels.sum() / p.n_slices)
        if p.label == "CAP":
            assert len(runs) == 1, runs  # one consolidation: one contiguous run
        else:
            u = Phantom(p, 64).u
            lower += area[u > 0.5].sum()
            upper += area[u <= 0.5].sum()
    assert np.mean(cover["COVID-19"]) > 1.5 * np.mean(cover["CAP"])  # foci in both lungs: more slices
    assert max(max(v) for v in cover.values()) < 0.5  # yet the evidence lies on a few slices: most are clean
    assert lower > 1.5 * upper  # lower-lobe predominant


def test_distractors_in_every_class_and_never_labelled():
    plans = plan_cohort(60, size=64, seed=4, slices=(40, 60))
    swapped = plan_cohort(60, size=64, seed=4, slices=(40, 60), classes=("NORMAL", "COVID-19", "CAP"))
    assert [(p.nodules, p.bands) for p in plans] == [(p.nodules, p.bands) for p in swapped]  # blind to the class
    for c in ("COVID-19", "CAP", "NORMAL"):
        assert any(p.nodules for p in plans if p.label == c) and any(p.bands for p in plans if p.label == c)
    p = next(p for p in plans if p.label == "NORMAL" and any(n.diameter_mm > 7 for n in p.nodules) and p.bands)
    ph = Phantom(p, 64)
    slices = [ph.render(i) for i in range(p.n_slices)]
    assert not any(mask.any() for _, mask in slices)  # nodules and atelectasis are no lesions
    dense_in_lung = [(hu > -600).sum() for hu, _ in slices]
    clean = Phantom(dataclasses.replace(p, nodules=[], bands=[]), 64)
    dense_clean = [(hu > -600).sum() for hu, _ in (clean.render(i) for i in range(p.n_slices))]
    assert sum(dense_in_lung) > sum(dense_clean)  # yet they show


def test_deterministic_per_seed(tmp_path):
    a = synth_cohort(tmp_path / "a", 3, size=32, seed=11, slices=(4, 6)).parent
    b = synth_cohort(tmp_path / "b", 3, size=32, seed=11, slices=(4, 6)).parent
    c = synth_cohort(tmp_path / "c", 3, size=32, seed=12, slices=(4, 6)).parent
    assert pixel_hash(a) == pixel_hash(b)
    assert pixel_hash(a) != pixel_hash(c)
    # rewriting into the same folder replaces the old series instead of mixing files
    synth_cohort(tmp_path / "a", 3, size=32, seed=12, slices=(4, 6))
    assert pixel_hash(tmp_path / "a") == pixel_hash(c)


def test_nuisances_do_not_depend_on_class():
    n = 60
    plans = plan_cohort(n, size=256, seed=2, slices=(40, 80))
    swapped = plan_cohort(n, size=256, seed=2, slices=(40, 80), classes=("NORMAL", "COVID-19", "CAP"))
    assert [p.label for p in plans] != [p.label for p in swapped]
    keys = ("n_slices", "thickness_mm", "spacing_mm", "pixel_spacing_mm", "noise_hu", "body_fraction",
            "instance_reversed", "naming", "nodules", "bands")
    for p, q in zip(plans, swapped):
        assert [getattr(p, k) for k in keys] == [getattr(q, k) for k in keys]
    # and per class the distributions look alike
    by = {c: [p for p in plans if p.label == c] for c in ("COVID-19", "CAP", "NORMAL")}
    assert {c: len(v) for c, v in by.items()} == {"COVID-19": 20, "CAP": 20, "NORMAL": 20}
    for key, spread in (("n_slices", 40.0), ("noise_hu", 30.0), ("thickness_mm", 4.0)):
        means = [np.mean([getattr(p, key) for p in v]) for v in by.values()]
        assert max(means) - min(means) < 0.35 * spread, (key, means)
    for p in plans:
        assert 40 <= p.n_slices <= 80 and 10 <= p.noise_hu <= 40
        assert 1.0 <= p.thickness_mm <= 5.0
        lung_mm = (p.n_slices - 1) * p.spacing_mm * (p.lung_base_t - p.lung_apex_t)  # apex to base
        assert 225.0 <= lung_mm <= 295.0, lung_mm  # adult lungs whatever the slice count
        assert 0.6 * 2 <= p.pixel_spacing_mm <= 0.9 * 2  # scaled for 256 px
    subsets = Counter((p.label, p.subset) for p in plans)
    for c in by:
        assert (subsets[(c, "train")], subsets[(c, "val")], subsets[(c, "test")]) == (12, 4, 4)


def test_bad_arguments_raise_project_error(tmp_path):
    with pytest.raises(MsnetError):
        synth_cohort(tmp_path, 0, size=64)
    with pytest.raises(MsnetError):
        plan_cohort(3, slices=(10, 5))
