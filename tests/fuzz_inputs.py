"""Mutations of real DICOM and NIfTI bytes for the reader fuzz test (tests/test_fuzz.py) and its
longer run (benchmarks/fuzz_read.py).

A mutation is a list of operations ``(name, a, b)`` on a seed file's bytes, so that hypothesis
(or a seeded ``random.Random``) can draw it and shrink it:

- ``truncate``: cut the file at ``a`` (a fraction in 1/1000 of its length);
- ``flip``: set the byte at ``a`` (1/1000 of the length) to ``b``;
- ``field``: set header field number ``a`` (DICOM: Rows, Columns, BitsAllocated, ...; NIfTI: dim,
  datatype, vox_offset, scl_slope, ...) to the value number ``b`` of a list of hostile values;
- ``fragment``: set byte ``a`` (1/1000) of the pixel data (the JPEG fragment for compressed
  DICOM) to ``b``.

:func:`check_read` writes the result, reads it with ``read_study`` and checks the contract: only
MsnetError escapes; a returned volume is float32, finite and passes ``check_volume``; the
Python-side memory peak stays under a bound set by the read limits (which the fuzz lowers).
"""

from __future__ import annotations

import gzip
import struct
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
P001 = DATA / "covid-ct-md" / "Sample data" / "COVID-19 subjects" / "P001"
NIFTI_CT = DATA / "dicom-zoo" / "totalsegmentator-example" / "example_ct.nii.gz"

# limits for the fuzz: small, so that "bounded memory" is a tight, checkable statement
FUZZ_MAX_VOXELS = 1 << 22  # 16 MiB as float32
FUZZ_MAX_SLICE_PIXELS = 1024 * 1024
BYTES_PER_VOXEL_BOUND = 16  # stored values (<= 8 bytes) + float32 HU + masks, with room
PEAK_BOUND = BYTES_PER_VOXEL_BOUND * FUZZ_MAX_VOXELS + (64 << 20)

OPS = ("truncate", "flip", "field", "fragment")
_US = [0, 1, 2, 7, 8, 12, 16, 17, 32, 64, 255, 1024, 2048, 4096, 32767, 60000, 65535]
_DS = [b"0", b"NaN", b"inf", b"-inf", b"1e30", b"-1e30", b"1e-9", b"abc", b"", b"-1", b"1000"]
_IS = [b"0", b"1", b"2", b"-1", b"9999", b"65535", b"2147483647", b"x"]
_TS = [b"1.2.840.10008.1.2.4.70", b"1.2.840.10008.1.2.4.57", b"1.2.840.10008.1.2.4.50", b"1.2.840.10008.1.2.4.90",
       b"1.2.840.10008.1.2.4.80", b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2\x00", b"1.2.840.10008.1.2.5\x00",
       b"1.2.840.10008.1.2.2\x00"]
_U32 = [0, 1, 2, 3, 100, 1 << 16, 1 << 20, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFFFFF0]
_I16 = [-1, 0, 1, 2, 3, 4, 5, 7, 8, 512, 1024, 4096, 32767, -32768]
_F32 = [0.0, 1.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1e-30, 352.0, 1e9]
_DTYPES = [2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280, 1536, 128, 32, 2304, 0, 99]

# DICOM header fields (explicit VR little endian): tag bytes, kind
_DICOM_FIELDS = [(b"\x28\x00\x10\x00", "US"), (b"\x28\x00\x11\x00", "US"), (b"\x28\x00\x00\x01", "US"),
                 (b"\x28\x00\x01\x01", "US"), (b"\x28\x00\x03\x01", "US"), (b"\x28\x00\x02\x00", "US"),
                 (b"\x28\x00\x08\x00", "IS"), (b"\x28\x00\x53\x10", "DS"), (b"\x28\x00\x52\x10", "DS"),
                 (b"\x02\x00\x10\x00", "UI"), (b"\xe0\x7f\x10\x00", "PIXEL")]
# NIfTI-1 header fields: (offset, struct format, values)
_NIFTI_FIELDS = [(40 + 2 * k, "<h", _I16) for k in range(5)] + [
    (70, "<h", _DTYPES), (72, "<h", _I16), (108, "<f", _F32), (112, "<f", _F32), (116, "<f", _F32),
    (80, "<f", _F32), (84, "<f", _F32), (88, "<f", _F32), (252, "<h", _I16), (254, "<h", _I16),
    (280, "<f", _F32), (296, "<f", _F32)]


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    suffix: str
    kind: str  # "dicom" or "nifti"


def seeds() -> list[Seed]:
    """Real files: an uncompressed CT slice, a JPEG Lossless COVID-CT-MD slice, a real CT NIfTI crop."""
    import nibabel as nib

    img = nib.load(NIFTI_CT)
    crop = np.asarray(img.dataobj)[40:72, 30:62, 40:56].astype(np.int16)
    nii = nib.Nifti1Image(crop, img.affine)
    raw = nii.header.binaryblock + b"\x00" * 4 + crop.tobytes(order="F")
    return [Seed("ct_small", CT_SMALL.read_bytes(), ".dcm", "dicom"),
            Seed("jpeg_lossless", sorted(P001.glob("*.dcm"))[40].read_bytes(), ".dcm", "dicom"),
            Seed("nifti", raw, ".nii", "nifti"),
            Seed("nifti_gz", gzip.compress(raw, compresslevel=6), ".nii.gz", "nifti")]


def _at(data: bytes | bytearray, permille: int) -> int:
    return min(len(data) - 1, max(0, permille * len(data) // 1000))


def _pixel_start(raw: bytearray) -> int:
    at = raw.rfind(b"\xe0\x7f\x10\x00")
    return at + 12 if at >= 0 else len(raw) // 2


def _set_dicom_field(raw: bytearray, field: int, value: int) -> None:
    tag, kind = _DICOM_FIELDS[field % len(_DICOM_FIELDS)]
    at = raw.find(tag) if kind != "PIXEL" else raw.rfind(tag)
    if at < 0:
        return
    vr = bytes(raw[at + 4:at + 6])
    if kind == "PIXEL":  # the element's length, or the first item's length of encapsulated data
        struct.pack_into("<I", raw, at + 8, _U32[value % len(_U32)])
        item = raw.find(b"\xfe\xff\x00\xe0", at + 12)
        if item >= 0 and value % 2:
            struct.pack_into("<I", raw, item + 4, _U32[(value // 2) % len(_U32)])
        return
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return
    length = struct.unpack_from("<H", raw, at + 6)[0]
    start = at + 8
    if kind == "US" and length == 2:
        struct.pack_into("<H", raw, start, _US[value % len(_US)])
    elif kind in ("DS", "IS", "UI") and length:
        values = {"DS": _DS, "IS": _IS, "UI": _TS}[kind]
        text = values[value % len(values)][:length].ljust(length, b" " if kind != "UI" else b"\x00")
        raw[start:start + length] = text


def _set_nifti_field(raw: bytearray, field: int, value: int) -> None:
    offset, fmt, values = _NIFTI_FIELDS[field % len(_NIFTI_FIELDS)]
    struct.pack_into(fmt, raw, offset, values[value % len(values)])


def mutate(seed: Seed, ops: list[tuple[str, int, int]]) -> bytes:
    """Apply ``ops`` to the seed's bytes (for .nii.gz: header fields on the inner .nii, bytes on the gz)."""
    gz = seed.suffix == ".nii.gz"
    inner = bytearray(gzip.decompress(seed.data) if gz else seed.data)
    outer_ops = []
    for name, a, b in ops:
        if name == "field":
            (_set_nifti_field if seed.kind == "nifti" else _set_dicom_field)(inner, a, b)
        elif name == "fragment":
            start = 352 if seed.kind == "nifti" else _pixel_start(inner)
            if start < len(inner):
                inner[start + (len(inner) - start - 1) * (a % 1000) // 1000] = b % 256
        else:
            outer_ops.append((name, a, b))
    data = bytearray(gzip.compress(bytes(inner), compresslevel=6) if gz else inner)
    for name, a, b in outer_ops:
        if not data:
            break
        if name == "truncate":
            data = data[:_at(data, a % 1000)]
        elif name == "flip":
            data[_at(data, a % 1000)] = b % 256
    return bytes(data)


@dataclass
class Outcome:
    result: str  # "ok" or "refused"
    peak_bytes: int
    message: str = ""


def check_read(path: Path) -> Outcome:
    """Read ``path`` and check the contract (AssertionError, or any other exception, is a finding)."""
    from msnet.errors import MsnetError
    from msnet.io import check_volume, read_study

    tracemalloc.start()
    try:
        try:
            vol = read_study(path)
        except MsnetError as exc:
            return Outcome("refused", tracemalloc.get_traced_memory()[1], exc.problem)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert vol.hu.dtype == np.float32 and vol.hu.ndim == 3, (vol.hu.dtype, vol.hu.shape)
    assert vol.hu.shape[0] == vol.n_slices == len(vol.z_mm) >= 1
    assert np.isfinite(vol.hu).all(), "a returned volume holds NaN or infinite values"
    assert np.isfinite(vol.z_mm).all() and all(np.isfinite(vol.spacing_mm))
    check_volume(vol)  # a volume that fails the sanity checks is never returned (never predicted)
    return Outcome("ok", peak)
