"""Where a DICOM file's pixel data lies: recorded by the one header parse, read back by the decode.

:func:`parse_header` is the only pydicom parse of a file. It opens the file itself and calls
``pydicom.dcmread(fh, stop_before_pixels=True, defer_size=DEFER_BYTES)``: pydicom stops at the
first top-level pixel data element ((7FE0,0008) Float Pixel Data, (7FE0,0009) Double Float Pixel
Data or (7FE0,0010) Pixel Data) and rewinds the file to the first byte of that element's tag, for
explicit and implicit VR, little and big endian alike; a file without pixel data is left at its
end. For Deflated Explicit VR Little Endian, pydicom inflates the data set into its own buffer
(``ds.buffer``) and the position is the one in that inflated copy.

Then 12 bytes are read from there: the element's tag, VR and length (explicit VR where they look
so, as pydicom reads a data set whose transfer syntax says implicit VR but whose elements are
explicit). Together with the encoding and the keywords that describe the pixels
(:data:`PIXEL_KEYWORDS`, with the transfer syntax) this is a :class:`PixelInfo`: small and
picklable, so it travels with each decode task to the worker processes.

The decode step never parses the header again: :func:`read_pixel_bytes` opens the file, seeks to
the recorded position, checks that the element header there is still the one recorded, and reads
the element's value only (a defined length: that many bytes at most, never more than the file
holds; encapsulated data of undefined length: from there to the end of the file). :func:`pixel_value`
checks the bytes (a length that runs past the end of the file, items cut short or broken) and
:func:`pixel_dataset` builds the minimal data set that pydicom's pixel API decodes: the recorded
keywords and that one element. Only when the header pass found no pixel data element is the file
searched for the tag's bytes (:func:`has_pixel_tag`, memory-mapped), to word the error.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Elements longer than this are not read while parsing (pydicom seeks past them and reads them
# only when asked): a falsified length in a header then costs no allocation.
DEFER_BYTES = 1 << 20
PIXEL_KEYWORDS = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
                  "PixelRepresentation", "PhotometricInterpretation", "NumberOfFrames", "PlanarConfiguration",
                  "ExtendedOffsetTable", "ExtendedOffsetTableLengths")
PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = {0x7FE00008: "OF", 0x7FE00009: "OD", PIXEL_DATA: "OB"}  # the VR where the file gives none
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_DEFLATED = "1.2.840.10008.1.2.1.99"
_ITEM, _SEQ_DELIMITER = 0xFFFEE000, 0xFFFEE0DD
PIXEL_INFO_ATTR = "msnet_pixel_info"  # the header's attribute that holds its PixelInfo
_META_START = 128 + 4  # after the preamble and "DICM" (pydicom refuses a file without them unless forced)


@dataclass(frozen=True)
class PixelInfo:
    """Where one file's pixel data element lies and what decoding it needs (see the module docstring).

    ``offset``: position of the element's tag, in the file (in the inflated data set for Deflated);
    ``tag`` None: the file has no pixel data element there. ``head``: the element's header bytes
    (tag, VR, length) as recorded. ``length`` None: undefined length (encapsulated).
    """

    offset: int
    tag: int | None = None
    vr: str = "OB"
    head: bytes = b""
    length: int | None = None
    implicit_vr: bool = False
    little_endian: bool = True
    transfer_syntax: str = ""
    keywords: dict[str, Any] = field(default_factory=dict)
    inflate_from: int | None = None  # Deflated: where the zlib stream starts in the file

    @property
    def value_offset(self) -> int:
        """Position of the element's value (just after its header)."""
        return self.offset + len(self.head)

    def keyword(self, name: str, default: Any = None) -> Any:
        """A recorded keyword's value, ``default`` when absent or empty."""
        value = self.keywords.get(name)
        return default if value in (None, "") else value

    def number(self, name: str, default: int) -> int:
        """A recorded keyword as an int, ``default`` when absent or not a number."""
        try:
            return int(self.keyword(name, default))
        except (TypeError, ValueError):
            return default


def pixel_info(ds) -> PixelInfo | None:
    """The PixelInfo that :func:`msnet.io.dicom.read_header` keeps with a header (in its
    ``msnet_pixel_info`` attribute), or None for a data set made another way."""
    return getattr(ds, PIXEL_INFO_ATTR, None)


def parse_header(path: str | Path):
    """The one parse of a file, up to its pixel data: (data set without pixel data, PixelInfo), or
    None when the file is not DICOM (or its header cannot be parsed)."""
    import pydicom

    try:
        with open(path, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(fh, stop_before_pixels=True, defer_size=DEFER_BYTES)
            info = _locate(fh, ds)
    except Exception:  # not DICOM, truncated header, unreadable: the caller decides
        return None
    return ds, info


def _locate(fh, ds) -> PixelInfo:
    """The PixelInfo of a data set that pydicom has just read up to its pixel data from ``fh``."""
    ts = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    implicit, little = ds.original_encoding
    implicit, little = bool(implicit), little is not False
    deflated = ts == _DEFLATED and getattr(ds, "buffer", None) is not None
    stream = ds.buffer if deflated else fh
    offset = stream.tell()
    head = stream.read(12)
    info = PixelInfo(offset=offset, implicit_vr=implicit, little_endian=little, transfer_syntax=ts,
                     keywords=_keywords(ds), inflate_from=_inflate_from(ds) if deflated else None)
    parsed = element_header(head, implicit, little)
    if parsed is None or parsed[0] not in _PIXEL_TAGS:
        return info
    tag, vr, size, length = parsed
    implicit_here = vr is None
    if implicit_here:  # the VR pydicom would give it
        wide = tag == PIXEL_DATA and length != _UNDEFINED and info.number("BitsAllocated", 16) > 8
        vr = "OW" if wide else _PIXEL_TAGS[tag]
    return replace(info, tag=tag, vr=vr, implicit_vr=implicit_here, head=head[:size],
                   length=None if length == _UNDEFINED else length)


def element_header(head: bytes, implicit: bool, little: bool) -> tuple[int, str | None, int, int] | None:
    r"""(tag, VR or None for implicit VR, header size, value length) of the element that ``head``
    starts with; None if ``head`` is too short.

    Explicit VR with a 4-byte length is recognised even where ``implicit`` says otherwise: pydicom
    reads a data set as explicit VR when its first element looks so, whatever the transfer syntax
    says. (Implicit VR bytes cannot look like that: the low bytes of an even length would have to
    spell one of these VRs, and each starts with an odd byte, "O", "S" or "U".)

    >>> element_header(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff", False, True)
    (2145386512, 'OB', 12, 4294967295)
    >>> element_header(b"\xe0\x7f\x10\x00OW\x00\x00\x00\x80\x00\x00", True, True)  # explicit, though implicit is said
    (2145386512, 'OW', 12, 32768)
    """
    if len(head) < 8:
        return None
    order = "<" if little else ">"
    group, element = struct.unpack_from(order + "HH", head)
    tag, vr = group << 16 | element, head[4:6]
    long_explicit = vr in _LONG_VRS and head[6:8] == b"\x00\x00"
    if not long_explicit and (implicit or not b"AA" <= vr <= b"ZZ"):  # pydicom reads an invalid VR as implicit
        return tag, None, 8, struct.unpack_from(order + "L", head, 4)[0]
    if vr in _LONG_VRS:
        return (tag, vr.decode(), 12, struct.unpack_from(order + "L", head, 8)[0]) if len(head) >= 12 else None
    return tag, vr.decode(), 8, struct.unpack_from(order + "H", head, 6)[0]


def _keywords(ds) -> dict[str, Any]:
    """The pixel keywords present in the header, as plain (picklable) Python values."""
    out: dict[str, Any] = {}
    for name in PIXEL_KEYWORDS:
        try:
            value = ds.get(name)
        except Exception:  # a value pydicom cannot convert: decoding then reports it missing
            continue
        if value is not None:
            out[name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    """pydicom's value types (IS, DSfloat, UID, MultiValue) as the built-in types they extend."""
    for kind in (bytes, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Sequence):
        return [_plain(v) for v in value]
    return str(value)


def _inflate_from(ds) -> int | None:
    """Where the deflated data set starts: after the preamble and the file meta group, whose length
    the group length element (12 bytes itself) gives."""
    length = ds.file_meta.get("FileMetaInformationGroupLength")
    return None if length is None else _META_START + 12 + int(length)


def read_pixel_bytes(path: str, info: PixelInfo) -> bytes:
    """The bytes of the pixel data element's value, read once from the recorded position (for an
    undefined length, up to the end of the file). Raises OSError when the file cannot be read and
    ValueError when the element is not where the header pass found it."""
    with open(path, "rb") as fh:
        if info.transfer_syntax == _DEFLATED:
            if info.inflate_from is None:
                raise ValueError("the deflated data set cannot be located (no file meta group length)")
            fh.seek(info.inflate_from)
            try:
                stream = io.BytesIO(zlib.decompress(fh.read(), -zlib.MAX_WBITS))
            except zlib.error as exc:
                raise ValueError(f"the deflated data set cannot be inflated ({exc})") from exc
            size = len(stream.getbuffer())
        else:
            stream, size = fh, os.fstat(fh.fileno()).st_size
        stream.seek(info.offset)
        if stream.read(len(info.head)) != info.head:
            raise ValueError("the pixel data element is not where the header pass found it (has the file changed?)")
        left = max(size - info.value_offset, 0)
        return stream.read(left if info.length is None else min(info.length, left))


def has_pixel_tag(path: str | Path) -> bool:
    """Whether the bytes of a (7FE0,0010) tag occur anywhere in the file: for the message when the
    header pass found no pixel data element (a byte search, no parse; memory-mapped, not read in)."""
    import mmap

    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return False
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(b"\xe0\x7f\x10\x00") >= 0 or data.find(b"\x7f\xe0\x00\x10") >= 0


def walk_items(data: bytes, little: bool = True) -> tuple[int | None, list[tuple[int, int]], str | None]:
    r"""Walk the items of encapsulated pixel data: (position of the sequence delimiter or None, the
    items as (start, end) of their values, why the walk stopped short or None).

    >>> walk_items(b"\xfe\xff\x00\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    (8, [(8, 8)], None)
    """
    order = "<" if little else ">"
    pos, items = 0, []
    while pos + 8 <= len(data):
        group, element, length = struct.unpack_from(order + "HHL", data, pos)
        tag = group << 16 | element
        if tag == _SEQ_DELIMITER:
            return pos, items, None
        if tag != _ITEM:
            return None, items, f"broken pixel data fragments (no item tag at byte {pos} of the pixel data)"
        if length == _UNDEFINED or pos + 8 + length > len(data):
            break
        items.append((pos + 8, pos + 8 + length))
        pos += 8 + length
    return None, items, "truncated: the file ends inside its pixel data"


def pixel_value(data: bytes, info: PixelInfo) -> tuple[bytes | None, str | None]:
    """The element's value from the bytes :func:`read_pixel_bytes` read: (value, None), or
    (None, why not) for no pixel data, a length past the end of the file, items cut short."""
    if info.tag is None:
        return None, "no pixel data"
    if info.length is not None:
        if len(data) < info.length:
            return None, (f"truncated: the pixel data declares {info.length} bytes, "
                          f"the file holds {len(data)} after it")
        return data, None
    end, _, problem = walk_items(data, info.little_endian)
    return (None, problem) if end is None else (data[:end], None)


def pixel_dataset(info: PixelInfo, value: bytes):
    """The minimal data set pydicom's pixel API decodes: the recorded keywords and one element."""
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = info.transfer_syntax
    for name, item in info.keywords.items():
        setattr(ds, name, item)
    ds.add(DataElement(info.tag, info.vr, value, is_undefined_length=info.length is None))
    ds.set_original_encoding(info.implicit_vr, info.little_endian, "iso8859")
    return ds
