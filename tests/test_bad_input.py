"""Bad input: every case raises MsnetError naming the file and the fix, never a bare traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import DICOM_ZOO
from pydicom.data import get_testdata_file
from pydicom.uid import UID

from msnet.errors import MsnetError
from msnet.io import read_study

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
J2KI = Path(get_testdata_file("693_J2KI.dcm"))  # JPEG 2000 CT slice

needs_data = pytest.mark.usefixtures("shared_data")  # the real scans beside the repository


def _series(folder: Path, n: int) -> list[Path]:
    """n valid CT_small copies 2 mm apart."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        ds = pydicom.dcmread(CT_SMALL)
        ds.SOPInstanceUID = f"1.2.3.4.5.{k + 1}"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
        paths.append(folder / f"slice{k}")
        ds.save_as(paths[-1])
    return paths


def _write_raw(ds, path: Path) -> None:
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset, write_file_meta_info

    with open(path, "wb") as raw:
        fp = DicomFileLike(raw)
        fp.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, ds)


def _raises(path: Path, *words: str, **kwargs) -> MsnetError:
    with pytest.raises(MsnetError) as info:
        read_study(path, **kwargs)
    err = info.value
    assert err.path is not None and err.fix, "the error names a file and a fix"
    for word in words:
        assert word in str(err)
    return err


def test_missing_path(tmp_path):
    _raises(tmp_path / "nope", "nope", "no such file")


def test_empty_folder(tmp_path):
    _raises(tmp_path, "empty folder", str(tmp_path))


def test_folder_without_dicom_or_images(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.bin").write_bytes(b"\x00" * 300)
    _raises(tmp_path, "no DICOM files or images")


@needs_data
def test_folder_with_nifti_points_to_it(tmp_path):
    shutil.copy(DICOM_ZOO / "totalsegmentator-example" / "example_ct.nii.gz", tmp_path / "ct.nii.gz")
    err = _raises(tmp_path, "no DICOM files")
    assert "ct.nii.gz" in err.fix


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    _raises(tmp_path / "empty.dcm", "empty.dcm", "not a DICOM")
    _raises(tmp_path, "no DICOM files")


def test_truncated_only_file_is_an_error(tmp_path):
    data = CT_SMALL.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 10000])
    _raises(tmp_path / "cut.dcm", "cut.dcm", "could be decoded")


def test_truncated_file_in_series_is_skipped_with_warning(tmp_path):
    paths = _series(tmp_path, 6)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) - 10000])
    vol = read_study(tmp_path)
    assert vol.n_slices == 5
    np.testing.assert_allclose(vol.z_mm, [10, 8, 6, 2, 0])
    assert any("slice2" in w and "skipped" in w for w in vol.warnings)
    assert any("gap" in w for w in vol.warnings)  # the missing slice leaves a 4 mm step


def test_file_without_pixel_data(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    _raises(tmp_path / "nopix.dcm", "nopix.dcm", "no pixel data")


def test_header_that_runs_past_its_pixel_data(tmp_path):
    """An element length that skips over the pixel data: the header pass ends without it, and the
    error says so rather than "no pixel data"."""
    import struct

    raw = bytearray(CT_SMALL.read_bytes())
    at = raw.find(b"\x43\x00\x4e\x10FL")  # (0043,104E), the last element before the pixel data
    raw[at + 4:at + 12] = b"UN\x00\x00" + struct.pack("<I", 0x7FFFFFF0)
    (tmp_path / "skip.dcm").write_bytes(bytes(raw))
    _raises(tmp_path / "skip.dcm", "skip.dcm", "no pixel data where the header ends", "header damaged")


def test_unknown_transfer_syntax(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    ds.file_meta.TransferSyntaxUID = UID("1.2.3.4.5.6.7")
    ds.save_as(tmp_path / "fake.dcm", enforce_file_format=True)
    err = _raises(tmp_path / "fake.dcm", "fake.dcm", "1.2.3.4.5.6.7")
    assert "gdcmconv" in err.fix


def test_undecodable_transfer_syntax_jpeg_xl(tmp_path):
    ds = pydicom.dcmread(J2KI)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.110")  # JPEG XL: no decoder installed
    _write_raw(ds, tmp_path / "jxl.dcm")  # pydicom refuses to write a syntax it does not know
    _raises(tmp_path / "jxl.dcm", "jxl.dcm", "1.2.840.10008.1.2.4.110")


def test_non_ct_modality_only(tmp_path):
    for k, path in enumerate(_series(tmp_path, 2)):
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.4")  # MR Image Storage
        ds.save_as(path)
    err = _raises(tmp_path, "no CT image series", "MR")
    assert str(tmp_path) in str(err)


def test_different_sizes_in_one_series(tmp_path):
    paths = _series(tmp_path, 3)
    ds = pydicom.dcmread(paths[0])
    ds.Rows, ds.Columns = 64, 256
    ds.save_as(paths[0])
    _raises(tmp_path, "different sizes")


def test_corrupt_nifti_is_wrapped(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    _raises(tmp_path / "bad.nii.gz", "bad.nii.gz", "NIfTI")


def test_unreadable_image_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    _raises(tmp_path / "x.png", "x.png")


def test_series_index_out_of_range(tmp_path):
    _series(tmp_path, 2)
    err = _raises(tmp_path, "not found", series=5)
    assert "[0] CT 2 slices" in str(err)
    # the error never shows identifying tags
    name = str(pydicom.dcmread(CT_SMALL).PatientName)
    assert name and name not in str(err)


def test_all_stored_values_become_finite_hu(tmp_path):
    """Sanity for the skipped-file path: remaining slices keep their own pixels."""
    paths = _series(tmp_path, 3)
    paths[2].write_bytes(b"")  # zero-byte file among good ones: skipped as non-DICOM
    vol = read_study(tmp_path)
    ref = pydicom.dcmread(CT_SMALL).pixel_array.astype(np.float32) - 1024
    assert vol.n_slices == 2 and any("non-DICOM" in w for w in vol.warnings)
    np.testing.assert_array_equal(vol.hu[0], np.where(ref < -1124, -1000, ref))


@needs_data
def test_truncated_file_in_compressed_series_parallel_path(tmp_path):
    """20 JPEG 2000 files: decoded by worker processes; the broken one is skipped, the rest kept."""
    src = DICOM_ZOO / "totalsegmentator-example" / "example_ct_dicom"
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    victim = sorted(tmp_path.iterdir())[5]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    whole = read_study(src)
    vol = read_study(tmp_path)
    assert vol.n_slices == 19 and any(victim.name in w and "skipped" in w for w in vol.warnings)
    kept = [i for i, z in enumerate(whole.z_mm) if np.any(np.isclose(vol.z_mm, z))]
    assert len(kept) == 19
    np.testing.assert_array_equal(vol.hu, whole.hu[kept])
