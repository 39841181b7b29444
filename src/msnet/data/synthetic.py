"""Synthetic chest CT cohort written as real DICOM series.

Each patient is a numerical phantom (body, fat, muscle, ribs, spine, mediastinum,
heart, liver, two lungs with vessels) rendered slice by slice with vectorised
numpy; anatomy and lesions are 3-D objects parametrised along the scan, so
neighbouring slices are coherent. The classes differ in what the lesions look
like and in where and on how many slices they lie:

- ``COVID-19``: 2-6 ground-glass foci (-700..-300 HU, 2.5-4.5 cm from top to
  bottom), bilateral, peripheral, posterior, lower-lobe predominant, some with
  crazy paving, mostly mild (one focus per lung in half of the lungs): a few
  separate runs of slices;
- ``CAP``: one consolidation (-100..+50 HU) with air bronchograms in one lobe
  of one lung, bounded by its fissures, 2-6 cm long: one run of a few slices;
- ``NORMAL``: none. Every class has the same findings that are not
  pneumonia: vessels, small solid or calcified nodules, dependent atelectasis.

Either way most slices of a patient are clean, as in real scans: a mean over all
slices dilutes the evidence that a few slices carry.

Acquisition nuisances (slice count, thickness, pixel spacing, noise, body
size, lung height, file naming, InstanceNumber direction) are drawn from random
streams that never see the class, so only the lesions separate the classes.
The slice spacing follows from the slice count and the lung height (230-290 mm),
so that lungs have an adult volume whatever the slice count.
Output is deterministic per seed and arguments (same bytes).

Layout::

    OUT/cohort.csv         patient_id,label,path,subset  (path relative to OUT)
    OUT/slice_labels.csv   patient_id,slice_index,label  (canonical order: 0 = most superior)
    OUT/<patient_id>/*.dcm one CT series per patient (file names NOT in slice order)
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from msnet.data.phantom import MIN_LESION_FRACTION, PatientPlan, Phantom, plan_cohort, rng_stream
from msnet.errors import MsnetError
from msnet.files import atomic_write_text, write_csv_atomic

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SYNTHETIC_MARKER = "synthetic.json"
"""Written beside a synthetic cohort's cohort.csv: models trained on it say so in every prediction."""


def _file_names(plan: PatientPlan, instance: list[int], rng: np.random.Generator) -> list[str]:
    """File names for canonical slices; never in slice order (the trap real data has)."""
    n = plan.n_slices
    for _ in range(100):
        if plan.naming == "textrank" and n >= 10:
            stem = "".join(rng.choice(list("0123456789ABCDEF"), 8))
            ranks = {v: k + 1 for k, v in enumerate(sorted(instance, key=str))}
            names = [f"{stem}-SYN_{ranks[v]}.dcm" for v in instance]
        elif plan.naming == "hex":
            names = [f"{rng.integers(0, 2**63):016x}.dcm" for _ in range(n)]
        else:
            names = [f"IM{v:06d}" for v in rng.choice(1_000_000, n, replace=False)]
        order = sorted(range(n), key=lambda j: names[j])
        if len(set(names)) == n and order != list(range(n)) and order != list(range(n))[::-1]:
            return names
    return names  # n < 3: any order is monotone


def _uid(plan: PatientPlan, key: str, size: int) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["msnet-synthetic", str(plan.seed), str(size), plan.patient_id,
                                          str(plan.n_slices), key]))


def write_patient(plan: PatientPlan, folder: Path, size: int) -> list[int]:
    """Write one patient's CT series into folder; returns its slice labels (canonical order)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():  # a previous cohort's files would mix into the series
        if old.is_file():
            old.unlink()
    n = plan.n_slices
    instance = [n - i if plan.instance_reversed else i + 1 for i in range(n)]
    names = _file_names(plan, instance, rng_stream(plan.seed, plan.index, 5))
    ps = plan.pixel_spacing_mm
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20200101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "msnet synthetic phantom"
    ds.StudyDescription = "Synthetic chest CT"
    ds.SeriesDescription = f"Synthetic chest {plan.thickness_mm:g} mm"
    ds.PatientName = plan.patient_id
    ds.PatientID = plan.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{plan.thickness_mm:g}"
    ds.SpacingBetweenSlices = f"{plan.spacing_mm:g}"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = _uid(plan, "study", size)
    ds.SeriesInstanceUID = _uid(plan, "series", size)
    ds.FrameOfReferenceUID = _uid(plan, "frame", size)
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [f"{ps:g}", f"{ps:g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    origin = -(size - 1) / 2.0 * ps
    phantom = Phantom(plan, size)
    labels = []
    for i in range(n):
        hu, lesion = phantom.render(i)
        labels.append(int(lesion.mean() >= MIN_LESION_FRACTION))
        z = round(plan.z_top_mm - i * plan.spacing_mm, 3)
        uid = _uid(plan, f"sop{i}", size)
        meta.MediaStorageSOPInstanceUID = uid
        ds.SOPInstanceUID = uid
        ds.InstanceNumber = instance[i]
        ds.ImagePositionPatient = [f"{origin:.3f}", f"{origin:.3f}", f"{z:.3f}"]
        ds.SliceLocation = f"{z:.3f}"
        stored = np.clip(np.rint(hu), -1024, 3071).astype(np.int16) + np.int16(1024)
        ds.PixelData = stored.astype("<i2").tobytes()
        ds.save_as(folder / names[i], enforce_file_format=True)
    return labels


def synth_cohort(out: Path, n_patients: int, size: int = 512, seed: int = 0, slices: tuple[int, int] = (60, 200),
                 classes: tuple[str, ...] = ("COVID-19", "CAP", "NORMAL"),
                 thickness_mm: tuple[float, float] = (1.0, 5.0),
                 split: tuple[float, float] = (0.2, 0.2)) -> Path:
    """Write a synthetic DICOM cohort under out; returns out/cohort.csv.

    ``split`` gives the val and test fractions per class (the rest is train).

    e.g. csv_path = synth_cohort(Path(tmp) / "syn", 3, size=64, slices=(6, 8))
    """
    out = Path(out)
    if size < 32:
        raise MsnetError(f"size {size} is too small for a phantom", fix="pass --size 32 or more")
    plans = plan_cohort(n_patients, size=size, seed=seed, slices=slices, classes=tuple(classes),
                        thickness_mm=thickness_mm, split=split)
    cohort_rows, slice_rows = [], []
    for plan in plans:
        labels = write_patient(plan, out / plan.patient_id, size)
        logger.debug("wrote %s: %d slices, %d with lesions", plan.patient_id, plan.n_slices, sum(labels))
        cohort_rows.append([plan.patient_id, plan.label, plan.patient_id, plan.subset])
        slice_rows.extend([plan.patient_id, i, lab] for i, lab in enumerate(labels))
    write_csv_atomic(out / "slice_labels.csv", ["patient_id", "slice_index", "label"], slice_rows)
    path = out / "cohort.csv"
    write_csv_atomic(path, ["patient_id", "label", "path", "subset"], cohort_rows)
    atomic_write_text(out / SYNTHETIC_MARKER, json.dumps(
        {"synthetic": True, "generator": "msnet.data.synthetic", "n_patients": n_patients, "size": size,
         "seed": seed, "slices": list(slices), "classes": list(classes)}, indent=2))
    logger.info("synthetic cohort: %d patients, %d slices in %s", len(plans), len(slice_rows), out)
    return path


def is_synthetic(cohort_csv: str | Path) -> bool:
    """True when the cohort beside ``cohort_csv`` was written by :func:`synth_cohort`."""
    return (Path(cohort_csv).parent / SYNTHETIC_MARKER).is_file()


def pixel_hash(folder: Path) -> str:
    """SHA-256 over every file of a folder tree (names and bytes), for determinism checks."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()
