"""Hostile input (issue 11): every bad input built here at run time from real data; each case
asserts its exact outcome (MsnetError / LimitError and its words, CLI exit code, warnings)."""

from __future__ import annotations

import io
import json
import logging
import shutil
import signal
import struct
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import COVID_CT_MD, DICOM_ZOO, P001
from pydicom.data import get_testdata_file

from msnet.errors import LimitError, MsnetError
from msnet.io import ReadLimits, read_study, set_read_limits

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
NIFTI_CT = DICOM_ZOO / "totalsegmentator-example" / "example_ct.nii.gz"
P001_FILES = sorted(P001.glob("*.dcm"))
MB = 1 << 20

needs_data = pytest.mark.usefixtures("shared_data")  # the real scans beside the repository


def _refused(path: Path, *words: str, error=MsnetError) -> MsnetError:
    with pytest.raises(error) as info:
        read_study(path)
    err = info.value
    assert err.path is not None and err.fix, "the error names the study and a fix"
    assert str(path) in str(err)
    for word in words:
        assert word in str(err), str(err)
    return err


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the console entry point (as `msnet ARGS`): exit code, stdout, stderr."""
    from msnet.cli import main

    monkeypatch.setattr(sys, "argv", ["msnet", *args])
    old = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as info:
            main()
    finally:
        signal.signal(signal.SIGTERM, old)
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out, out.err


def _ct_data() -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(NIFTI_CT)
    return np.asarray(img.dataobj).astype(np.float32), img.affine


def _save_nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def _small_dicom(path: Path, **tags) -> Path:
    ds = pydicom.dcmread(CT_SMALL)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path)
    return path


# ------------------------------------------------------------------ 1. NaN / inf voxels


@needs_data
@pytest.mark.parametrize("kind", ["some-nan", "all-nan", "+inf", "-inf"])
def test_nan_and_inf_nifti_refused(tmp_path, kind):
    data, affine = _ct_data()
    if kind == "some-nan":
        data[10:20, 10:20, 50] = np.nan
    elif kind == "all-nan":
        data[:] = np.nan
    else:
        data[5, 5, 5] = np.inf if kind == "+inf" else -np.inf  # -inf must not become "air"
    path = _save_nifti(tmp_path / "ct.nii", data, affine)
    err = _refused(path, "NaN or infinite", "never diagnosed")
    expected = {"some-nan": 100, "all-nan": data.size, "+inf": 1, "-inf": 1}[kind]
    assert err.problem.startswith(f"{expected} of {data.size} voxels")


def test_nan_rescale_in_dicom_refused(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    ds["RescaleIntercept"].value = "NaN"
    ds.save_as(tmp_path / "nan.dcm")
    _refused(tmp_path / "nan.dcm", "RescaleIntercept nan", "finite")


@needs_data
def test_cli_inspect_never_prints_nan(tmp_path, monkeypatch, capsys):
    data, affine = _ct_data()
    data[:, :, 3] = np.nan
    path = _save_nifti(tmp_path / "nan.nii", data, affine)
    code, out, err = _cli(monkeypatch, capsys, "inspect", str(path), "--json")
    assert code == 2 and out == ""
    assert "NaN or infinite" in err and "nan.nii" in err and "Traceback" not in err


def test_json_output_refuses_nan():
    from msnet.cli import _json

    assert json.loads(_json({"p": 0.5})) == {"p": 0.5}
    with pytest.raises(MsnetError, match="NaN or infinite"):
        _json({"probabilities": {"COVID-19": float("nan")}})


# ------------------------------------------------------------------ 7. slope 0, constant, not HU


def test_rescale_slope_zero_refused(tmp_path):
    _small_dicom(tmp_path / "s0.dcm", RescaleSlope=0)
    _refused(tmp_path / "s0.dcm", "RescaleSlope 0", "other than 0")


@pytest.mark.parametrize("slope, intercept, words", [
    (1e-6, -1024, ["near-constant"]),  # every pixel within a fraction of a HU
    (1, 5000, ["no voxel below", "not a CT in HU"]),  # no air, no tissue: wrong intercept
    (100, -1024, ["beyond any CT scale"]),
])
def test_values_that_cannot_be_ct_refused(tmp_path, slope, intercept, words):
    _small_dicom(tmp_path / "x.dcm", RescaleSlope=slope, RescaleIntercept=intercept)
    _refused(tmp_path / "x.dcm", *words)


def test_constant_and_all_air_volumes_refused(tmp_path):
    _refused(_save_nifti(tmp_path / "zero.nii", np.zeros((32, 32, 8), np.int16)), "same value (0 HU)")
    rng = np.random.default_rng(0)
    air = rng.uniform(-1024, -950, (32, 32, 8)).astype(np.float32)  # varied, but nothing denser than air
    _refused(_save_nifti(tmp_path / "air.nii", air), "every voxel is air")


def test_missing_intercept_warns_no_air(tmp_path):
    _small_dicom(tmp_path / "raw.dcm", RescaleIntercept=0)  # stored values read as HU: no air left
    vol = read_study(tmp_path / "raw.dcm")
    assert any(w.startswith("no air in the volume") for w in vol.warnings), vol.warnings


def test_blank_image_refused(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((40, 40), 7, np.uint8)).save(tmp_path / "blank.png")
    _refused(tmp_path / "blank.png", "same value (7 grey levels)")


@needs_data
def test_real_scans_pass_the_checks():
    for study in (P001, DICOM_ZOO / "totalsegmentator-example" / "example_ct_dicom", NIFTI_CT):
        vol = read_study(study)
        assert np.isfinite(vol.hu).all() and not any("HU" in w for w in vol.warnings), vol.warnings


# ------------------------------------------------------------------ 2. truncated JPEG Lossless


def _cut(src: Path, dst: Path, fraction: float = 0.6) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def _fragment_cut(src: Path, dst: Path, fraction: float = 0.6) -> Path:
    """The file's structure intact (delimiters, item lengths), but the JPEG stream itself cut short."""
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(src)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: int(len(frame) * fraction)]])
    ds.save_as(dst)
    return dst


@needs_data
def test_truncated_jpeg_lossless_file_refused_on_both_paths(tmp_path):
    from msnet.io.decode import decode_file, gdcm_direct_ok

    src = P001_FILES[40]
    assert gdcm_direct_ok(pydicom.dcmread(src, stop_before_pixels=True))  # the GDCM direct path applies
    cut = _cut(src, tmp_path / "cut.dcm")
    for direct in ((512, 512), None):
        arr, _, err = decode_file(str(cut), direct)
        assert arr is None and "truncated" in err
    _refused(cut, "no slice could be decoded", "truncated")


@needs_data
def test_cut_jpeg_stream_is_not_filled_in(tmp_path):
    """pylibjpeg decodes a cut stream without an error (the missing rows become a constant); the
    reader refuses it for the missing end-of-image marker, on the GDCM direct and pydicom paths."""
    from pydicom.pixels import pixel_array

    from msnet.io.decode import decode_file

    cut = _fragment_cut(P001_FILES[40], tmp_path / "frag.dcm")
    filled = pixel_array(pydicom.dcmread(cut), decoding_plugin="pylibjpeg")  # no error from the decoder
    assert filled.shape == (512, 512)
    for direct in ((512, 512), None):
        arr, _, err = decode_file(str(cut), direct)
        assert arr is None and "no end-of-image marker" in err


@needs_data
@pytest.mark.parametrize("n_files", [4, 9])  # 9: decoded by the worker processes
def test_truncated_slice_skipped_with_warning(tmp_path, n_files):
    picked = P001_FILES[40:40 + n_files]
    good = tmp_path / "good"
    good.mkdir()
    for f in picked[1:]:
        shutil.copy(f, good / f.name)
    mixed = tmp_path / "mixed"
    shutil.copytree(good, mixed)
    _cut(picked[0], mixed / picked[0].name)
    vol, ref = read_study(mixed), read_study(good)
    assert vol.n_slices == n_files - 1
    assert any(w.startswith(f"{picked[0].name}: skipped") and "truncated" in w for w in vol.warnings), vol.warnings
    np.testing.assert_array_equal(vol.hu, ref.hu)


# ------------------------------------------------------------------ 3. memory and limits


def _peak_mb(fn) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / MB


@needs_data
@pytest.mark.parametrize("size", [60000, 20000])
def test_huge_declared_jpeg_lossless_refused_before_allocating(tmp_path, size):
    ds = pydicom.dcmread(P001_FILES[40])
    ds.Rows = ds.Columns = size  # 263 KB of data that claims 60000 x 60000 pixels
    ds.save_as(tmp_path / "huge.dcm")

    def read():
        _refused(tmp_path / "huge.dcm", f"{size} x {size}", "MSNET_MAX_SLICE_PIXELS", error=LimitError)

    assert _peak_mb(read) < 32


@needs_data
def test_jpeg_lossless_too_small_for_its_header_skipped(tmp_path):
    ds = pydicom.dcmread(P001_FILES[40])
    ds.Rows = ds.Columns = 2000  # under the slice limit, but 2000 x 2000 samples need >= 500 kB at 1 bit each
    ds.save_as(tmp_path / "short.dcm")
    assert _peak_mb(lambda: _refused(tmp_path / "short.dcm", "holds only")) < 32


def test_nifti_decompression_bomb_refused(tmp_path):
    path = _save_nifti(tmp_path / "bomb.nii.gz", np.zeros((2048, 2048, 64), np.int16))  # 512 MiB of voxels
    assert path.stat().st_size < 4 * MB
    assert _peak_mb(lambda: _refused(path, "would expand to", "ratio", error=LimitError)) < 32


def test_nifti_falsified_shape_refused(tmp_path):
    import nibabel as nib

    path = _save_nifti(tmp_path / "ct.nii", np.zeros((16, 16, 4), np.int16) - 1000)
    img = nib.load(path)
    hdr = img.header.copy()
    hdr.set_data_shape((30000, 30000, 4))
    raw = bytearray(path.read_bytes())
    raw[: 348] = hdr.binaryblock
    path.write_bytes(bytes(raw))
    assert _peak_mb(lambda: _refused(path, "30000 x 30000", error=LimitError)) < 32
    hdr.set_data_shape((16, 16, 40))  # within the limits, but more than the file holds
    raw[: 348] = hdr.binaryblock
    path.write_bytes(bytes(raw))
    _refused(path, "truncated", "declares 20480 bytes")


def test_limits_from_environment_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("MSNET_MAX_VOXELS", "10000")
    _refused(CT_SMALL, "16384 voxels", "limit of 10000", "MSNET_MAX_VOXELS", error=LimitError)
    monkeypatch.setenv("MSNET_MAX_VOXELS", "many")
    with pytest.raises(MsnetError, match="MSNET_MAX_VOXELS='many' is not a positive number"):
        read_study(CT_SMALL)
    monkeypatch.delenv("MSNET_MAX_VOXELS")
    set_read_limits(ReadLimits(max_slice_pixels=100 * 100))
    try:
        _refused(CT_SMALL, "128 x 128", error=LimitError)
    finally:
        set_read_limits(None)
    assert read_study(CT_SMALL).n_slices == 1


# ------------------------------------------------------------------ 5. corrupt zips


def _zip_of(files: list[Path], method=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for f in files:
            zf.write(f, f"study/{f.name}")
    return buf.getvalue()


def _corrupt(data: bytes, how: str) -> bytes:
    raw = bytearray(data)
    central = raw.find(b"PK\x01\x02")  # first member's central directory entry
    if how == "crc":
        raw[14] ^= 0xFF
        raw[central + 16] ^= 0xFF
    elif how == "size":  # falsified uncompressed size (local header and central directory)
        struct.pack_into("<I", raw, 22, 100)
        struct.pack_into("<I", raw, central + 24, 100)
    elif how == "data":
        name_len = struct.unpack_from("<H", raw, 26)[0]
        raw[30 + name_len + 100] ^= 0xFF
    elif how == "encrypted":
        struct.pack_into("<H", raw, central + 8, 1)
    return bytes(raw)


@needs_data
@pytest.mark.parametrize("how, words", [("crc", "Bad CRC-32"), ("size", "Bad CRC-32"), ("data", "corrupt zip member"),
                                        ("encrypted", "encrypted")])
def test_corrupt_zip_member(tmp_path, monkeypatch, capsys, how, words):
    from msnet.io import open_study

    path = tmp_path / "case.zip"
    path.write_bytes(_corrupt(_zip_of(P001_FILES[:3]), how))
    with pytest.raises(MsnetError) as info:
        open_study(path)
    err = info.value
    assert err.path == str(path) and words in str(err) and P001_FILES[0].name in str(err)
    assert "zip the study's folder again" in err.fix
    code, out, err_text = _cli(monkeypatch, capsys, "inspect", str(path))
    assert code == 2 and "corrupt zip member" in err_text and "Traceback" not in err_text


@needs_data
def test_inspect_accepts_zip_and_nested_zip_message(tmp_path, monkeypatch, capsys):
    zpath = tmp_path / "case7.zip"
    zpath.write_bytes(_zip_of(P001_FILES[:3]))
    code, out, _ = _cli(monkeypatch, capsys, "inspect", str(zpath), "--json")
    info = json.loads(out)
    assert code == 0 and info["study_id"] == "case7" and info["n_slices"] == 3

    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(zpath, "inner.zip")
    code, _, err = _cli(monkeypatch, capsys, "inspect", str(outer))
    assert code == 2 and "holds another zip (inner.zip)" in err and "msnet-study-" not in err

    notes = tmp_path / "notes.zip"  # a zip of something that is not a study: the message names the zip
    with zipfile.ZipFile(notes, "w") as zf:
        zf.writestr("folder/readme.txt", "no images here")
    code, _, err = _cli(monkeypatch, capsys, "inspect", str(notes))
    assert code == 2 and f"{notes}" in err and "msnet-study-" not in err


# ------------------------------------------------------------------ 8. msnet index


def _md_root(tmp_path: Path) -> Path:
    """A COVID-CT-MD layout: the real P001 (linked) with the dataset's Index.csv and label array."""
    root = tmp_path / "md"
    (root / "COVID-19 subjects").mkdir(parents=True)
    (root / "COVID-19 subjects" / "P001").symlink_to(P001, target_is_directory=True)
    shutil.copy(COVID_CT_MD / "Index.csv", root / "Index.csv")
    shutil.copy(COVID_CT_MD / "Slice-level-labels-updated-1.npy", root / "Slice-level-labels-updated-1.npy")
    return root


@needs_data
def test_index_corrupt_label_array(tmp_path, monkeypatch, capsys):
    root = _md_root(tmp_path)
    npy = root / "Slice-level-labels-updated-1.npy"
    npy.write_bytes(npy.read_bytes()[:100])
    code, _, err = _cli(monkeypatch, capsys, "index", str(root), "-o", str(tmp_path / "out"), "--no-check")
    assert code == 2 and "cannot read the slice-label array" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "cohort.csv").exists()


@needs_data
def test_index_csv_wrong_columns_fails(tmp_path, monkeypatch, capsys):
    root = _md_root(tmp_path)
    lines = (root / "Index.csv").read_text().splitlines()
    (root / "Index.csv").write_text("\n".join(["Label Index,Diagnosis,Relative Path,Patient"] + lines[1:]) + "\n")
    code, _, err = _cli(monkeypatch, capsys, "index", str(root), "-o", str(tmp_path / "out"), "--no-check")
    assert code == 2 and "no 'Folder/ID' column" in err and "Index.csv" in err
    # the dataset's own file still works (labels for P001 written)
    shutil.copy(COVID_CT_MD / "Index.csv", root / "Index.csv")
    code, out, _ = _cli(monkeypatch, capsys, "index", str(root), "-o", str(tmp_path / "out"), "--no-check")
    assert code == 0 and (tmp_path / "out" / "slice_labels.csv").is_file()


@needs_data
def test_index_output_is_a_file_checked_before_reading(tmp_path, monkeypatch, capsys):
    import msnet.io

    def no_read(*args, **kwargs):
        raise AssertionError("a study was read before the output path was checked")

    monkeypatch.setattr(msnet.io, "read_study", no_read)
    root = _md_root(tmp_path)
    (tmp_path / "taken.csv").write_text("x")
    for out in (tmp_path / "taken.csv", tmp_path / "taken.csv" / "sub"):
        code, _, err = _cli(monkeypatch, capsys, "index", str(root), "-o", str(out))
        assert code == 2 and "existing file, not a folder" in err and "taken.csv" in err


def test_index_failure_lines_name_the_study_once():
    from msnet.data.cohorts import IndexReport

    err = str(MsnetError("cannot read NIfTI", path="data/bad.nii", fix="check it"))
    report = IndexReport(layout="class-folders", rows=[{"patient_id": "bad", "status": "failed", "error": err}])
    assert "  failed data/bad.nii: cannot read NIfTI. Fix: check it" in report.summary().splitlines()


# ------------------------------------------------------------------ 10. smaller items


def test_symlink_outside_the_study_warns(tmp_path):
    study, elsewhere = tmp_path / "study", tmp_path / "elsewhere"
    study.mkdir()
    elsewhere.mkdir()
    for k in range(3):
        _small_dicom(elsewhere / f"s{k}.dcm" if k == 2 else study / f"s{k}.dcm", SOPInstanceUID=f"1.2.3.{k}",
                     ImagePositionPatient=[0.0, 0.0, 2.0 * k])
    (study / "link.dcm").symlink_to(elsewhere / "s2.dcm")
    vol = read_study(study)
    assert vol.n_slices == 3
    assert any(w.startswith("1 files are links to places outside the study folder (link.dcm)") for w in vol.warnings)
    (study / "link.dcm").unlink()
    (study / "inner").mkdir()
    shutil.move(str(elsewhere / "s2.dcm"), study / "inner" / "real.dcm")
    (study / "link.dcm").symlink_to(study / "inner" / "real.dcm")  # a link inside the folder: no warning
    assert not any("links" in w for w in read_study(study).warnings)


@needs_data
def test_pydicom_log_lines_silenced(tmp_path, caplog, capfd):
    """Files that make pydicom log (excess pixel padding; a header element longer than the file)
    read without a pydicom log line or anything on stderr."""
    from pydicom.pixels import pixel_array

    _small_dicom(tmp_path / "pad.dcm", Rows=127)
    raw = bytearray(CT_SMALL.read_bytes())
    at = raw.find(b"\x08\x00\x30\x10LO")  # (0008,1030) Study Description: give it a huge length
    raw[at + 4:at + 8] = b"UN\x00\x00"
    raw[at + 8:at + 12] = struct.pack("<I", 0x7FFFFFF0)
    (tmp_path / "huge.dcm").write_bytes(bytes(raw))
    with caplog.at_level(logging.DEBUG, logger="pydicom"):
        pixel_array(pydicom.dcmread(tmp_path / "pad.dcm"))  # pydicom itself does log for this file
        assert any(r.name.startswith("pydicom") for r in caplog.records)
        caplog.clear()
        capfd.readouterr()
        assert read_study(tmp_path / "pad.dcm").hu.shape == (1, 127, 128)
        with pytest.raises(MsnetError):
            read_study(tmp_path / "huge.dcm")
        read_study(P001_FILES[40])
        with pytest.raises(MsnetError):
            read_study(_cut(P001_FILES[40], tmp_path / "cut.dcm"))
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
    assert capfd.readouterr().err == ""


@needs_data
def test_a_decoder_crash_takes_down_a_worker_not_the_reader(tmp_path, monkeypatch, caplog):
    """GDCM aborts the whole process on some broken JPEG streams. Compressed files are decoded in
    worker processes; when one dies, the series is decoded again here without GDCM."""
    import os

    from msnet.io import decode

    for f in P001_FILES[40:43]:
        shutil.copy(f, tmp_path / f.name)
    victim = P001_FILES[41].name
    real = decode.decode_file

    def crashing(path, direct=None, safe=False, pixel=None):
        if path.endswith(victim) and not safe:
            os.kill(os.getpid(), signal.SIGKILL)  # what an abort() inside a C decoder does to its process
        return real(path, direct, safe, pixel)

    decode.shutdown_pool()  # the workers fork from here and now, with the crashing decoder
    monkeypatch.setattr(decode, "decode_file", crashing)
    try:
        with caplog.at_level(logging.WARNING, logger="msnet.io.decode"):
            vol = read_study(tmp_path)
    finally:
        decode.shutdown_pool(kill=True, wait_s=5)
    assert vol.n_slices == 3 and vol.warnings == []
    assert any("a decode worker died" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    np.testing.assert_array_equal(vol.hu, read_study(tmp_path).hu)
