"""msnet.io: real scans, every dicom-zoo file, NIfTI, images, series choice and slice sorting."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import CAP002, DICOM_ZOO, NORMAL001, P001, UCSD
from pydicom.data import get_testdata_file
from pydicom.pixels import pixel_array

from msnet.errors import MsnetError
from msnet.io import CTVolume, describe, read_study
from msnet.io.decode import _gdcm_direct, decode_file, decode_series, gdcm_direct_ok
from msnet.io.jpeg import LOSSLESS_DECODERS, lossless_direct
from msnet.io.pixeldata import parse_header, read_pixel_bytes

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
TS_SERIES = DICOM_ZOO / "totalsegmentator-example" / "example_ct_dicom"

# --------------------------------------------------------------------------- real scans

SCANS = {  # name: (folder, slices, pixel spacing mm, SliceLocation top, bottom)
    "P001": (P001, 148, 0.748, -52.1, -346.1),
    "cap002": (CAP002, 131, 0.631, -62.1, -322.1),
    "normal001": (NORMAL001, 154, 0.635, -24.5, -330.5),
}


@pytest.fixture(scope="module")
def scans(shared_data) -> dict[str, CTVolume]:
    return {name: read_study(folder) for name, (folder, *_rest) in SCANS.items()}


@pytest.mark.parametrize("name", list(SCANS))
def test_real_scan(scans, name):
    _, n, px, top, bottom = SCANS[name]
    vol = scans[name]
    assert vol.study_id == name and vol.kind == "hu" and vol.n_slices == n
    assert vol.hu.shape == (n, 512, 512) and vol.hu.dtype == np.float32
    assert vol.transfer_syntax == "1.2.840.10008.1.2.4.70" and vol.n_series == 1
    assert vol.spacing_mm[0] == pytest.approx(2.0)
    assert vol.spacing_mm[1] == pytest.approx(px, abs=5e-4) and vol.spacing_mm[2] == pytest.approx(px, abs=5e-4)
    np.testing.assert_allclose(np.diff(vol.z_mm), -2.0, atol=1e-3)  # strictly descending: superior first
    assert vol.z_mm[0] == pytest.approx(top, abs=0.05) and vol.z_mm[-1] == pytest.approx(bottom, abs=0.05)
    assert vol.hu.min() >= -1100 and 1000 <= vol.hu.max() <= 4000
    assert vol.warnings == []


def test_p001_order_matches_label_convention(scans, shared_data):
    """Slice i is InstanceNumber i+1 (data README trap 3), whatever the file names say."""
    headers = {}
    for f in P001.iterdir():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        headers[int(ds.InstanceNumber)] = (f, float(ds.SliceLocation))
    vol = scans["P001"]
    assert sorted(headers) == list(range(1, vol.n_slices + 1))
    np.testing.assert_allclose(vol.z_mm, [headers[i + 1][1] for i in range(vol.n_slices)], atol=1e-3)
    for i in (0, 77, vol.n_slices - 1):  # pixels too, decoded independently with pylibjpeg
        ds = pydicom.dcmread(headers[i + 1][0])
        ref = pixel_array(ds, decoding_plugin="pylibjpeg").astype(np.float32) + np.float32(ds.RescaleIntercept)
        np.testing.assert_array_equal(vol.hu[i], ref)


def test_describe_is_json(scans):
    info = describe(scans["cap002"])
    assert list(info) == ["study_id", "n_slices", "shape", "spacing_mm", "z_mm", "hu_min", "hu_max", "kind",
                          "transfer_syntax", "n_series", "warnings"]
    again = json.loads(json.dumps(info))
    assert again["shape"] == [131, 512, 512] and len(again["z_mm"]) == 131
    assert again["z_mm"][0] == pytest.approx(-62.1) and again["hu_min"] == -1024.0


# --------------------------------------------------------------------------- dicom-zoo

# Every DICOM/NIfTI file of the zoo: ("read", n_slices, shape, hu_min_floor, hu_max_ceiling) or ("error", text).
ZOO = {
    "covid19-ny-sbu/A046441/axial/19001111-045.dcm": ("read", 1, (512, 512), -1024, 4000),  # GE padding -2000
    "covid19-ny-sbu/A046441/axial/19010101-23.dcm": ("read", 1, (512, 512), -1124, 6000),  # Toshiba, bright metal
    "covid19-ny-sbu/A098752/axial/19001231-32.dcm": ("read", 1, (512, 512), -1124, 4000),
    "covid19-ny-sbu/A098752/axial/19010127-128.dcm": ("read", 1, (512, 512), -1024, 4000),
    "pydicom/CT_small.dcm": ("read", 1, (128, 128), -1024, 4000),
    "pydicom/693_J2KI.dcm": ("read", 1, (512, 512), -1124, 4000),
    "pydicom/J2K_pixelrep_mismatch.dcm": ("read", 1, (512, 512), -1124, 4000),
    "pydicom-data/693_J2KR.dcm": ("read", 1, (512, 512), -1024, 4000),
    "pydicom-data/693_UNCI.dcm": ("read", 1, (512, 512), -1124, 4000),
    "pydicom-data/693_UNCR.dcm": ("read", 1, (512, 512), -1024, 4000),
    "pydicom-data/bad_sequence.dcm": ("read", 1, (512, 512), -1024, 4000),
    "pydicom-data/eCT_Supplemental.dcm": ("read", 2, (512, 512), -1024, 4000),
    "pydicom-data/explicit_VR-UN.dcm": ("read", 1, (512, 512), -1024, 4000),
    "pylibjpeg-data/CT1_JLSN.dcm": ("read", 1, (512, 512), -1024, 4000),
    "pylibjpeg-data/ELSCINT1_JP2vsJ2K.dcm": ("read", 1, (512, 512), -1000, 4000),
    "pylibjpeg-data/MAROTECH_CT_JP2Lossy.dcm": ("error", "no CT image series"),  # a LOCALIZER only
    "pylibjpeg-data/TOSHIBA_J2K_OpenJPEGv2Regression.dcm": ("read", 1, (512, 512), -1124, 4000),
    "pylibjpeg-data/TOSHIBA_J2K_SIZ0_PixRep1.dcm": ("read", 1, (512, 512), -1124, 4000),
    # the next two decode to implausible values (by design of the files): read, with a warning
    "pylibjpeg-data/TOSHIBA_J2K_SIZ1_PixRep0.dcm": ("read", 1, (512, 512), 0, 65535),
    "pylibjpeg-data/JPEGLossless_1s_1f_i_16_16_bad.dcm": ("read", 1, (512, 512), -1124, 32767),
    "totalsegmentator-example/example_ct_dicom": ("read", 20, (512, 512), -1024, 4000),
    "totalsegmentator-example/example_ct.nii.gz": ("read", 112, (101, 122), -1124, 4000),
}


def test_zoo_table_covers_every_file(shared_data):
    found = {str(p.relative_to(DICOM_ZOO)) for p in DICOM_ZOO.rglob("*.dcm")} | {
        str(p.relative_to(DICOM_ZOO)) for p in DICOM_ZOO.rglob("*.nii.gz")}
    found.add("totalsegmentator-example/example_ct_dicom")
    assert found == set(ZOO)


@pytest.mark.parametrize("rel", sorted(ZOO))
def test_zoo_file(shared_data, rel):
    expected = ZOO[rel]
    if expected[0] == "error":
        with pytest.raises(MsnetError, match=expected[1]) as info:
            read_study(DICOM_ZOO / rel)
        assert Path(rel).name in str(info.value)
        return
    _, n, shape, lo, hi = expected
    vol = read_study(DICOM_ZOO / rel)
    assert vol.n_slices == n and vol.hu.shape[1:] == shape and vol.hu.dtype == np.float32
    assert lo <= vol.hu.min() < vol.hu.max() <= hi
    assert np.isfinite(vol.hu).all() and len(vol.z_mm) == n
    if vol.hu.max() > 4000:
        assert any("HU maximum" in w for w in vol.warnings)


def test_zoo_lossless_j2k_equals_uncompressed(shared_data):
    j2k = read_study(DICOM_ZOO / "pydicom-data" / "693_J2KR.dcm")
    unc = read_study(DICOM_ZOO / "pydicom-data" / "693_UNCR.dcm")
    assert j2k.transfer_syntax == "1.2.840.10008.1.2.4.90"
    np.testing.assert_array_equal(j2k.hu, unc.hu)


def test_zoo_padding_and_out_of_field_become_air(shared_data):
    ge = DICOM_ZOO / "covid19-ny-sbu" / "A046441" / "axial" / "19001111-045.dcm"
    raw = pydicom.dcmread(ge).pixel_array
    vol = read_study(ge)
    assert (raw == -2000).any() and (vol.hu[0][raw == -2000] == -1000).all()
    toshiba = DICOM_ZOO / "covid19-ny-sbu" / "A098752" / "axial" / "19001231-32.dcm"
    raw = pydicom.dcmread(toshiba).pixel_array
    vol = read_study(toshiba)
    assert (raw == -2048).any() and (vol.hu[0][raw == -2048] == -1000).all()
    inside = raw > -1000
    np.testing.assert_array_equal(vol.hu[0][inside], raw[inside].astype(np.float32))


def test_zoo_j2k_series(shared_data):
    vol = read_study(TS_SERIES)
    assert vol.n_slices == 20 and vol.transfer_syntax == "1.2.840.10008.1.2.4.90"
    np.testing.assert_allclose(np.diff(vol.z_mm), -2.0, atol=1e-3)
    assert vol.z_mm[0] == pytest.approx(-766.5) and vol.z_mm[-1] == pytest.approx(-804.5)
    assert vol.spacing_mm == pytest.approx((2.0, 0.9765625, 0.9765625))


def test_parallel_and_serial_decoding_agree(shared_data):
    files = sorted(TS_SERIES.iterdir())
    tasks = [(str(f), [(None, i, 1.0, -1024.0, None, None)], (512, 512), False) for i, f in enumerate(files)]
    ts = "1.2.840.10008.1.2.4.90"
    par, res_par, dec_par = decode_series(tasks, len(files), ts, parallel=True)
    ser, res_ser, _ = decode_series(tasks, len(files), ts, parallel=False)
    assert all(err is None for _, err in res_par + res_ser) and dec_par
    np.testing.assert_array_equal(par, ser)
    assert par.min() >= -1024 and par.std() > 100


@pytest.mark.parametrize("path", [DICOM_ZOO / "pydicom-data" / "bad_sequence.dcm", CAP002 / "IM0001.dcm",
                                  DICOM_ZOO / "pylibjpeg-data" / "JPEGLossless_1s_1f_i_16_16_bad.dcm"])
def test_gdcm_direct_matches_pylibjpeg(shared_data, path):
    ds = pydicom.dcmread(path)
    ref = pixel_array(ds, decoding_plugin="pylibjpeg")
    shape = (int(ds.Rows), int(ds.Columns))
    if gdcm_direct_ok(ds):  # unsigned 16-bit JPEG Lossless: GDCM reads the file without pydicom
        info = parse_header(path)[1]
        np.testing.assert_array_equal(_gdcm_direct(str(path), read_pixel_bytes(str(path), info), info, *shape), ref)
    arr, decoder, err = decode_file(str(path), shape if gdcm_direct_ok(ds) else None)
    direct = tuple(LOSSLESS_DECODERS)
    assert err is None and (decoder in direct if gdcm_direct_ok(ds) else decoder == "gdcm") and arr.dtype == ref.dtype
    for name in direct if gdcm_direct_ok(ds) else ():  # every direct decoder gives the same stored values
        info = parse_header(path)[1]
        np.testing.assert_array_equal(lossless_direct(str(path), read_pixel_bytes(str(path), info), info, *shape,
                                                      decoders=(name,))[0], ref)
    np.testing.assert_array_equal(arr, ref)
    wrong, decoder, err = decode_file(str(path), (7, 9))  # direct read refuses: falls back to pydicom
    assert err is None and decoder == "gdcm"
    np.testing.assert_array_equal(wrong, ref)


def test_enhanced_multiframe(shared_data):
    vol = read_study(DICOM_ZOO / "pydicom-data" / "eCT_Supplemental.dcm")
    ds = pydicom.dcmread(DICOM_ZOO / "pydicom-data" / "eCT_Supplemental.dcm")
    stored = ds.pixel_array
    assert "RescaleIntercept" not in ds  # only in the functional groups
    np.testing.assert_allclose(vol.z_mm, [-149.0, -159.0])  # frame 2 is the superior one
    # IOP -1\0\0\0\1\0: columns stored from the patient's left, flipped to patient left on image right
    np.testing.assert_array_equal(vol.hu[0], stored[1, :, ::-1].astype(np.float32) - 1024)
    np.testing.assert_array_equal(vol.hu[1], stored[0, :, ::-1].astype(np.float32) - 1024)
    assert any("columns reversed" in w for w in vol.warnings)
    assert vol.spacing_mm == pytest.approx((10.0, 0.388672, 0.388672))


def test_nifti_superior_first(shared_data):
    import nibabel as nib

    path = DICOM_ZOO / "totalsegmentator-example" / "example_ct.nii.gz"
    vol = read_study(path)
    img = nib.as_closest_canonical(nib.load(path))
    data = img.get_fdata(dtype=np.float32)
    assert vol.study_id == "example_ct" and vol.hu.shape == (112, 101, 122)
    np.testing.assert_allclose(np.diff(vol.z_mm), -3.0)
    assert vol.z_mm[0] == pytest.approx(img.affine[2, 3] + 3.0 * 111)
    for k in (0, 50, 111):  # slice k: top first, rows anterior->posterior, columns right->left
        expected = np.where(data[::-1, ::-1, 111 - k].T < -1124, -1000, data[::-1, ::-1, 111 - k].T)
        np.testing.assert_array_equal(vol.hu[k], expected)


# --------------------------------------------------------------------------- images


def test_png_that_is_jpeg(shared_data):
    from PIL import Image

    path = UCSD / "val" / "CT_COVID" / "2020.03.16.20035105-p6-64-1.png"
    with Image.open(path) as im:
        assert im.format == "JPEG"
        width, height = im.size
    vol = read_study(path)
    assert vol.kind == "grey" and vol.hu.shape == (1, height, width)
    assert 0 <= vol.hu.min() < vol.hu.max() <= 255 and vol.spacing_mm == (1.0, 1.0, 1.0)


def test_image_folder_natural_sort_and_resize(tmp_path):
    from PIL import Image

    for value in (10, 2, 1):
        Image.fromarray(np.full((20, 30), value, np.uint8)).save(tmp_path / f"img{value}.png")
    Image.fromarray(np.full((10, 10, 3), 50, np.uint8)).save(tmp_path / "img20.jpg")  # other size, RGB
    (tmp_path / "notes.txt").write_text("not an image")
    vol = read_study(tmp_path, study_id="imgs")
    assert vol.study_id == "imgs" and vol.kind == "grey" and vol.hu.shape == (4, 20, 30)
    assert [float(s.mean()) for s in vol.hu] == [1.0, 2.0, 10.0, 50.0]
    np.testing.assert_array_equal(vol.z_mm, [0, -1, -2, -3])
    assert any("resized" in w for w in vol.warnings) and any("not images" in w for w in vol.warnings)


# --------------------------------------------------------------------------- synthetic series


def write_series(folder: Path, z_values, series_uid: str = "1.2.3.4.100", names=None, localizer=False,
                 modality="CT", geometry=True, shift_y=0.0, coronal=False) -> None:
    """Copies of CT_small as one series; slice k holds value 100*k (stored) at z_values[k]."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, z in enumerate(z_values):
        ds = pydicom.dcmread(CT_SMALL)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = f"{series_uid}.{k + 1}"
        ds.InstanceNumber = k + 1
        ds.Modality = modality
        if localizer:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImagePositionPatient = [-158.1, -179.0 + shift_y * k, float(z)]
        if coronal:  # rows along x, columns along -z: normal along y
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
            ds.ImagePositionPatient = [-158.1, float(z), 0.0]
        ds.SliceLocation = float(z)
        if not geometry:
            del ds.ImagePositionPatient
            del ds.ImageOrientationPatient
        ds.PixelData = np.full((128, 128), 100 * k, np.int16).tobytes()
        name = names[k] if names else f"{series_uid}_{k}"
        ds.save_as(folder / name)


def test_sorting_uses_geometry_not_names(tmp_path):
    z = [10.0, 40.0, 20.0, 0.0, 30.0, 50.0]
    names = [f"{n:03d}" for n in random.Random(1).sample(range(100), len(z))]
    write_series(tmp_path, z, names=names)
    vol = read_study(tmp_path)
    np.testing.assert_allclose(vol.z_mm, [50, 40, 30, 20, 10, 0], atol=1e-3)
    order = np.argsort(z)[::-1]  # slice k holds stored value 100*k; RescaleIntercept is -1024
    np.testing.assert_array_equal(vol.hu[:, 0, 0], [100 * k - 1024 for k in order])
    assert vol.spacing_mm[0] == pytest.approx(10.0) and vol.warnings == []


def test_sorting_fallbacks_and_warnings(tmp_path):
    write_series(tmp_path / "loc", [0, 5, 10], geometry=False)
    vol = read_study(tmp_path / "loc")
    np.testing.assert_allclose(vol.z_mm, [10, 5, 0])
    assert any("SliceLocation" in w for w in vol.warnings)

    write_series(tmp_path / "gap", [0, 2, 4, 12, 14])
    assert any("gap" in w for w in read_study(tmp_path / "gap").warnings)

    write_series(tmp_path / "dup", [0, 2, 2, 4])
    assert any("duplicate" in w for w in read_study(tmp_path / "dup").warnings)

    write_series(tmp_path / "tilt", [0, 2, 4, 6], shift_y=0.1)  # 2.9 degrees: taken, with a warning
    assert any("gantry tilt: slice positions progress 2.9 degrees" in w for w in read_study(tmp_path / "tilt").warnings)
    write_series(tmp_path / "tilt26", [0, 2, 4, 6], shift_y=1.0)  # 26.6 degrees: refused
    with pytest.raises(MsnetError, match="gantry tilt of 26.6 degrees") as info:
        read_study(tmp_path / "tilt26")
    assert "without gantry tilt" in info.value.fix


def test_series_choice_and_override(tmp_path):
    write_series(tmp_path, [0, 2, 4, 6, 8], series_uid="1.2.3.4.1")  # the CT series, 5 slices
    write_series(tmp_path, [0, 3, 6], series_uid="1.2.3.4.2")  # a smaller CT series
    write_series(tmp_path, [0, 1, 2, 3, 4, 5, 6, 7], series_uid="1.2.3.4.3", localizer=True)  # more, but scout
    write_series(tmp_path, [0, 1, 2, 3, 4, 5, 6], series_uid="1.2.3.4.4", coronal=True)  # more, not axial
    (tmp_path / "DICOMDIR").write_bytes(b"ignored")
    (tmp_path / "readme.txt").write_text("not DICOM")
    vol = read_study(tmp_path)
    assert vol.series_uid == "1.2.3.4.1" and vol.n_slices == 5 and vol.n_series == 4
    assert any("4 series found" in w for w in vol.warnings)
    assert any("1 non-DICOM files skipped" in w for w in vol.warnings)
    by_uid = read_study(tmp_path, series="1.2.3.4.2")
    assert by_uid.n_slices == 3 and by_uid.series_uid == "1.2.3.4.2"
    by_index = read_study(tmp_path, series="1")  # sorted by (SeriesNumber, UID)
    assert by_index.series_uid == "1.2.3.4.2"
    assert read_study(tmp_path, series=2).n_slices == 8  # a scout, read because it was asked for
    coronal = read_study(tmp_path, series="1.2.3.4.4")  # 7 coronal slices of 128 rows from head to feet
    assert coronal.n_slices == 128 and any("coronal series: reoriented to axial" in w for w in coronal.warnings)
    assert coronal.sop_instance_uids is None
    with pytest.raises(MsnetError, match="the series asked for not found in this study") as info:
        read_study(tmp_path, series="9.9.9")
    assert "9.9.9" not in str(info.value) and "1.2.3.4" not in str(info.value)  # no UID in a message
    assert not any("1.2.3.4" in w for w in vol.warnings)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_guid_series_uid_groups(tmp_path):
    write_series(tmp_path, [0, 2, 4], series_uid="7afb0d48-ec01-4941-9a58-66d15cab76fb")
    vol = read_study(tmp_path)
    assert vol.series_uid == "7afb0d48-ec01-4941-9a58-66d15cab76fb" and vol.n_slices == 3


# --------------------------------------------------------------------------- bench


def test_bench_read_small_series(shared_data):
    from io import StringIO

    from rich.console import Console

    from msnet.bench import bench_read

    buffer = StringIO()
    result = bench_read(TS_SERIES, repeats=1, console=Console(file=buffer, width=120))
    assert result["equal"] is True and result["n_slices"] == 20 and result["decoder"] == "gdcm"
    assert result["ours_s"] > 0 and result["plain_s"] > 0
    assert result["ratio"] == pytest.approx(result["plain_s"] / result["ours_s"], rel=0.02)
    assert "speed-up plain/ours" in buffer.getvalue()


# --------------------------------------------------------------------------- each file parsed once


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                                  "image_dfl.dcm", "JPEG2000.dcm", "rtplan.dcm"])
def test_header_pass_stops_at_the_pixel_data_element(name):
    """Explicit and implicit VR, big endian, deflated, encapsulated, no pixel data: the recorded
    offset is the first byte of the (7FE0,0010) element, and the decode from there equals pydicom's."""
    import zlib

    path = get_testdata_file(name)
    full = pydicom.dcmread(path)
    ds, info = parse_header(path)
    raw = Path(path).read_bytes()
    if info.inflate_from is not None:  # Deflated: the offset is in the inflated data set
        raw = zlib.decompress(raw[info.inflate_from:], -zlib.MAX_WBITS)
    arr, _, err = decode_file(path, pixel=info)
    if "PixelData" not in full:
        assert info.tag is None and info.offset == len(raw) and (arr, err) == (None, "no pixel data")
        return
    tag = b"\x7f\xe0\x00\x10" if name == "MR_small_bigendian.dcm" else b"\xe0\x7f\x10\x00"
    assert raw[info.offset:info.offset + 4] == tag and "PixelData" not in ds
    assert info.length == (None if full["PixelData"].is_undefined_length else len(full.PixelData))
    assert info.implicit_vr == (name == "MR_small_implicit.dcm") and info.little_endian == (tag[0] == 0xE0)
    assert err is None
    np.testing.assert_array_equal(arr, full.pixel_array)
    assert arr.dtype == full.pixel_array.dtype


def test_header_pass_reads_explicit_vr_where_the_transfer_syntax_says_implicit(tmp_path):
    """pydicom parses a data set as explicit VR when it looks so, whatever the file meta says; the
    pixel data element is then read as explicit VR too."""
    raw = CT_SMALL.read_bytes()
    lying = raw.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2\x00\x00\x00", 1)
    assert lying != raw
    (tmp_path / "lying.dcm").write_bytes(lying)
    ds, info = parse_header(tmp_path / "lying.dcm")
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert (info.implicit_vr, info.vr, info.length) == (False, "OW", 128 * 128 * 2)
    np.testing.assert_array_equal(read_study(tmp_path / "lying.dcm").hu, read_study(CT_SMALL).hu)


def _count_parses(monkeypatch, log: Path) -> None:
    """Each pydicom parse of a file appends a line to ``log``: ``read_partial`` (what ``dcmread``
    runs) and any top-level ``read_dataset`` outside it (what ``pixel_array(path)`` runs). A file
    is used because the decode workers are forked processes: their parses count too."""
    import pydicom.filereader as reader

    real_partial, real_dataset = reader.read_partial, reader.read_dataset
    inside = []

    def note(kind: str, fp) -> None:
        with open(log, "a") as fh:
            fh.write(f"{kind}\t{getattr(fp, 'name', None) or '<stream>'}\n")

    def read_partial(fileobj, *args, **kwargs):
        note("parse", fileobj)
        inside.append(True)
        try:
            return real_partial(fileobj, *args, **kwargs)
        finally:
            inside.pop()

    def read_dataset(fp, *args, **kwargs):
        if kwargs.get("at_top_level", True) and not inside:
            note("parse", fp)
        return real_dataset(fp, *args, **kwargs)

    monkeypatch.setattr(reader, "read_partial", read_partial)
    monkeypatch.setattr(reader, "read_dataset", read_dataset)


def _plain_hu(files: list[Path]) -> np.ndarray:
    """The reference: pydicom's dcmread + pixel_array, x slope + intercept, superior slice first."""
    from msnet.io import AIR_HU, OUT_OF_FIELD_HU

    slices = []
    for f in files:
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.float32) * np.float32(ds.get("RescaleSlope", 1)) + np.float32(
            ds.get("RescaleIntercept", 0))
        slices.append((float(ds.ImagePositionPatient[2]), np.where(hu < OUT_OF_FIELD_HU, AIR_HU, hu)))
    return np.stack([hu for _, hu in sorted(slices, key=lambda s: -s[0])])


def _read_counting(monkeypatch, tmp_path: Path, study: Path) -> tuple[CTVolume, list[str]]:
    from collections import Counter

    from msnet.io import decode

    log = tmp_path / "parses.log"
    log.touch()
    _count_parses(monkeypatch, log)
    decode.shutdown_pool()  # the workers fork after the counters are in place
    try:
        vol = read_study(study)
    finally:
        decode.shutdown_pool(kill=True, wait_s=5)  # drop the counting workers
        monkeypatch.undo()
    return vol, Counter(log.read_text().splitlines())


def test_each_uncompressed_file_parsed_once(tmp_path, monkeypatch):
    """CT_small copies as one series (decoded in this process): one pydicom parse per file."""
    study = tmp_path / "study"
    study.mkdir()
    src = pydicom.dcmread(CT_SMALL)
    for k in range(5):
        ds = src.copy()
        ds.SOPInstanceUID = f"1.2.3.4.9.{k + 1}"
        ds.ImagePositionPatient = [0.0, 0.0, 3.0 * ((k * 2) % 5)]  # not in name order
        ds.RescaleIntercept = -1024 + 10 * k
        ds.PixelData = (src.pixel_array + 7 * k).astype(src.pixel_array.dtype).tobytes()
        ds.save_as(study / f"slice{k}.dcm")
    files = sorted(study.iterdir())
    ref = _plain_hu(files)
    vol, parses = _read_counting(monkeypatch, tmp_path, study)
    assert parses == {f"parse\t{f}": 1 for f in files}
    np.testing.assert_array_equal(vol.hu, ref)


def test_each_jpeg2000_file_parsed_once(tmp_path, monkeypatch, shared_data):
    """The 20-slice JPEG 2000 series, decoded by the worker processes: one pydicom parse per file."""
    files = sorted(TS_SERIES.iterdir())
    ref = _plain_hu(files)
    vol, parses = _read_counting(monkeypatch, tmp_path, TS_SERIES)
    assert vol.n_slices == 20 and parses == {f"parse\t{f}": 1 for f in files}
    np.testing.assert_array_equal(vol.hu, ref)
