"""JPEG frames of DICOM files: marker checks, and the direct decode of single-frame JPEG Lossless.

Every frame a decoder sees has passed :func:`jpeg_problem` (start and end markers, segment lengths, a
frame header of the declared size): some decoders abort the whole process or fill in missing rows on
a broken stream.

Direct path (:func:`gdcm_direct_ok`: single-frame unsigned 16-bit grey JPEG Lossless, the common
CT case): the pixel data bytes read once must tile the file exactly and hold one sound frame
(:func:`_direct_frame`); then the decoders of :data:`LOSSLESS_DECODERS` are tried in turn, fastest
first, those not installed skipped. Each result must be (Rows, Columns) uint16, or the next is tried;
:func:`msnet.io.decode.decode_file` falls back to pydicom's pixel API after them.

Per slice of P001 (512 x 512, 12 bits, one thread; ``msnet bench decoders``, identical stored values
checked against pydicom + pylibjpeg): imagecodecs' libjpeg-turbo 3 (``jpeg8_decode``, lossless since
libjpeg-turbo 3.0) about 1.9 ms, imagecodecs' LJPEG codec 3.7 ms, GDCM reading the file 4.4 ms,
pylibjpeg-libjpeg 11 ms.
"""

from __future__ import annotations

import functools

import numpy as np

from msnet.io.pixeldata import PIXEL_DATA, PixelInfo, walk_items

_GDCM_DIRECT_SYNTAXES = ("1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70")  # JPEG Lossless
# JPEG (baseline, extended, lossless), JPEG-LS, JPEG 2000 and HTJ2K: every frame ends with FF D9
# (EOI / EOC), a pair that cannot occur inside the entropy-coded data
_EOI_SYNTAXES = {f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70, 80, 81, 90, 91, 201, 202, 203)}
_EOI = b"\xff\xd9"




_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_SYNTAXES = {f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70)}


def jpeg_problem(frame: bytes, rows: int, cols: int) -> str | None:
    r"""Why a JPEG frame's marker structure is unusable (None if it is sound up to its scan).

    Start-of-image, segment lengths inside the frame, a frame header (SOF) before the scan whose
    size matches Rows x Columns, and an end-of-image marker at the end. A decoder never sees a
    stream that fails this (GDCM aborts the whole process on some broken streams).

    >>> jpeg_problem(b"\xff\xd8\xff\xd9", 2, 2)
    'no JPEG frame header (SOF) before the scan'
    """
    if frame[:2] != b"\xff\xd8":
        return "the frame does not start with a JPEG start-of-image marker"
    if _EOI not in frame[-8:]:
        return "truncated pixel data: no end-of-image marker"
    pos, sof = 2, None
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            return "broken JPEG marker structure"
        marker = frame[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0xD9:
            break
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = int.from_bytes(frame[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > len(frame):
            return "broken JPEG segment length"
        if marker in _SOF and length >= 8:
            sof = (int.from_bytes(frame[pos + 5:pos + 7], "big"), int.from_bytes(frame[pos + 7:pos + 9], "big"),
                   frame[pos + 9], frame[pos + 4])
        if marker == 0xDA:
            if sof is None:
                break
            height, width, components, precision = sof
            if (height, width) != (rows, cols):
                return f"the JPEG frame is {width} x {height} pixels, the header says {cols} x {rows}"
            if not 1 <= components <= 4 or not 2 <= precision <= 16:
                return f"implausible JPEG frame header ({components} components, {precision} bits)"
            return None
        pos += 2 + length
    return "no JPEG frame header (SOF) before the scan"


def _direct_frame(data: bytes, info: PixelInfo, rows: int, cols: int) -> tuple[bytes, str | None]:
    """For the direct path, on the pixel data bytes read once: (the JPEG frame, None), or (b"", why not).
    The (7FE0,0010) OB element must be encapsulated with items that tile the rest of the file exactly
    (basic offset table, one JPEG frame, sequence delimiter at the end of the file), and the frame sound."""
    encapsulated = info.tag == PIXEL_DATA and info.length is None and info.vr == "OB"
    if not encapsulated or info.implicit_vr or not info.little_endian:
        return b"", "no encapsulated pixel data"
    end, items, problem = walk_items(data)
    if end is None:
        return b"", problem or "broken pixel data items"
    if data[end + 4:] != b"\x00\x00\x00\x00" or len(items) < 2:  # delimiter of length 0, then the end of the file
        return b"", "broken pixel data items"
    frame = b"".join(data[start:stop] for start, stop in items[1:])
    problem = jpeg_problem(frame, rows, cols)
    return (b"", problem) if problem else (frame, None)


def _frames_problem(value: bytes, info: PixelInfo) -> str | None:
    """Why the encapsulated frames are incomplete (missing frames, no end-of-image marker), or None."""
    ts = info.transfer_syntax
    if ts not in _EOI_SYNTAXES or info.tag != PIXEL_DATA:
        return None
    from pydicom.encaps import generate_frames

    n, found = info.number("NumberOfFrames", 1), 0
    rows, cols = info.number("Rows", 0), info.number("Columns", 0)
    try:
        for frame in generate_frames(value, number_of_frames=n):
            if _EOI not in frame[-8:]:
                return f"truncated pixel data: frame {found} has no end-of-image marker"
            problem = jpeg_problem(frame, rows, cols) if ts in _JPEG_SYNTAXES else None
            if problem:
                return f"frame {found}: {problem}"
            found += 1
    except Exception as exc:  # broken item tags, a frame count the fragments do not match
        return f"broken pixel data fragments ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if found < n:
        return f"truncated pixel data: {found} of {n} frames present"
    return None


def gdcm_direct_ok(ds) -> bool:
    """Single-frame unsigned 16-bit grey JPEG Lossless: GDCM reads the file itself (no pydicom pass)."""
    ts = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
    return (ts in _GDCM_DIRECT_SYNTAXES and int(ds.get("SamplesPerPixel", 1)) == 1
            and int(ds.get("BitsAllocated", 0)) == 16 and int(ds.get("PixelRepresentation", 1)) == 0
            and int(ds.get("NumberOfFrames") or 1) == 1)


def _gdcm_direct(path: str, data: bytes, info: PixelInfo, rows: int, cols: int) -> np.ndarray:
    """GDCM opens the file itself and decodes it straight into a buffer (no str round trip, no
    pydicom pass), once the pixel data bytes (``data``, read from ``info``) pass the checks."""
    frame, problem = _direct_frame(data, info, rows, cols)
    if problem:
        raise ValueError(problem)
    return _gdcm_region(path, frame, rows, cols)


def _gdcm_region(path: str, frame: bytes, rows: int, cols: int) -> np.ndarray:
    """GDCM's ImageRegionReader on the file (the checked ``frame`` is not used: GDCM reads the file)."""
    import gdcm

    gdcm.Trace.WarningOff()
    gdcm.Trace.ErrorOff()
    reader = gdcm.ImageRegionReader()
    reader.SetFileName(path)
    if not reader.ReadInformation():
        raise ValueError("GDCM could not read the file")
    dims = gdcm.ImageHelper.GetDimensionsValue(reader.GetFile())
    pixel_format = gdcm.ImageHelper.GetPixelFormatValue(reader.GetFile())
    if tuple(dims)[:2] != (cols, rows) or pixel_format.GetScalarType() != gdcm.PixelFormat.UINT16:
        raise ValueError("unexpected size or pixel format")
    box = gdcm.BoxRegion()
    box.SetDomain(0, cols - 1, 0, rows - 1, 0, 0)
    reader.SetRegion(box)
    buf = bytearray(reader.ComputeBufferLength())
    if len(buf) != rows * cols * 2 or not reader.ReadIntoBuffer(buf):
        raise ValueError("GDCM could not decode the pixel data")
    return np.frombuffer(buf, np.uint16).reshape(rows, cols)



def _imagecodecs(codec: str):
    def decode(path: str, frame: bytes, rows: int, cols: int) -> np.ndarray:
        import imagecodecs

        arr = getattr(imagecodecs, f"{codec}_decode")(frame)
        if arr.shape != (rows, cols) or arr.dtype != np.uint16:
            raise ValueError(f"unexpected {arr.dtype} array of shape {arr.shape}")
        return arr
    return decode


@functools.lru_cache(maxsize=None)
def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


LOSSLESS_DECODERS = {"imagecodecs-jpeg8": (_imagecodecs("jpeg8"), "imagecodecs"),
                     "imagecodecs-ljpeg": (_imagecodecs("ljpeg"), "imagecodecs"),
                     "gdcm-region": (_gdcm_region, "gdcm")}
"""name -> (decode(path, frame, rows, cols), module it needs): the direct decoders, fastest first."""


def lossless_direct(path: str, data: bytes, info: PixelInfo, rows: int, cols: int,
                    decoders: tuple[str, ...] | None = None) -> tuple[np.ndarray, str]:
    """(stored values, decoder) of a single-frame JPEG Lossless file whose pixel data bytes are ``data``:
    the frame checked once, then ``decoders`` (default: every installed one of :data:`LOSSLESS_DECODERS`)
    in turn. ValueError when the frame fails its checks or no decoder reads it."""
    frame, problem = _direct_frame(data, info, rows, cols)
    if problem:
        raise ValueError(problem)
    errors = []
    for name in decoders or tuple(LOSSLESS_DECODERS):
        decode, module = LOSSLESS_DECODERS[name]
        if not _installed(module):
            continue
        try:
            return decode(path, frame, rows, cols), name
        except Exception as exc:  # the next decoder, then pydicom's pixel API
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    raise ValueError("; ".join(errors) or "no direct JPEG Lossless decoder installed")
