"""Uploads of the service: a multipart body streamed to disk under limits, and the study found in it."""

from __future__ import annotations

import asyncio
import re
import secrets
from pathlib import Path

from fastapi import HTTPException, Request

from msnet.errors import LimitError, MsnetError
from msnet.io.archives import ARCHIVE_SUFFIXES, safe_extract, study_in
from msnet.service.settings import ServiceSettings

_CHUNK_WRITE = 1 << 20


def _safe_name(name: str, index: int) -> str:
    """A client file name reduced to a harmless base name.

    >>> _safe_name("../../etc/passwd", 0)
    '0000_passwd'
    >>> _safe_name("C:\\\\scans\\\\ct 1.dcm", 3)
    '0003_ct_1.dcm'
    """
    base = re.split(r"[\\/]", name)[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip(".")[-120:]
    return f"{index:04d}_{base or 'file'}"


def clean_study_id(value: str | None) -> str:
    """The client's pseudonym made filesystem-safe, or a random one.

    >>> clean_study_id("case 7/b")
    'case_7_b'
    >>> clean_study_id(None).startswith("study-")
    True
    """
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", (value or "").strip()).strip("._")[:64]
    return text or f"study-{secrets.token_hex(4)}"


class _MultipartSink:
    """The multipart parser's callbacks: ``file`` parts are streamed to files in ``dest``, the
    ``study_id`` and ``series`` fields (at most 256 bytes each) are kept, anything else is dropped."""

    def __init__(self, dest: Path, max_files: int) -> None:
        self.dest, self.max_files = dest, max_files
        self.saved: list[Path] = []
        self.study_id = bytearray()
        self.series = bytearray()
        self.headers: dict[bytes, bytes] = {}
        self.field, self.value, self.name, self.out = b"", b"", None, None

    def callbacks(self) -> dict:
        return {"on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end}

    def on_part_begin(self) -> None:
        self.headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.field.lower()] = self.value
        self.field, self.value = b"", b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, disp = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.name = disp.get(b"name", b"").decode("utf-8", "replace")
        if self.name == "file" and b"filename" in disp:
            if len(self.saved) >= self.max_files:
                raise HTTPException(413, f"more than {self.max_files} files in one upload")
            path = self.dest / _safe_name(disp[b"filename"].decode("utf-8", "replace"), len(self.saved))
            self.saved.append(path)
            self.out = open(path, "wb", buffering=_CHUNK_WRITE)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.out is not None:
            self.out.write(data[start:end])
        elif self.name in ("study_id", "series"):
            kept = self.study_id if self.name == "study_id" else self.series
            kept.extend(data[start:end][: max(0, 256 - len(kept))])

    def on_part_end(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None


async def receive_upload(request: Request, dest: Path,
                         settings: ServiceSettings) -> tuple[list[Path], str | None, str | None]:
    """Stream a multipart body into ``dest``: (saved ``file`` parts, ``study_id`` field, ``series`` field: a
    SeriesInstanceUID or an index); 413 past the limit,
    408 when the body stalls, 422 for a body that is not a multipart upload."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"upload of {int(declared) >> 20} MiB is over the limit of {settings.max_upload_mb:g} MiB")
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise HTTPException(422, "send the study as multipart/form-data in the field `file`")
    sink = _MultipartSink(dest, settings.max_files)
    parser = MultipartParser(params[b"boundary"], sink.callbacks())
    received = 0
    stream = request.stream().__aiter__()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), settings.read_timeout_s)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError as exc:
                raise HTTPException(408, f"the upload stalled for {settings.read_timeout_s:g} s: send it again") from exc
            received += len(chunk)
            if received > limit:
                raise HTTPException(413, f"upload is over the limit of {settings.max_upload_mb:g} MiB")
            parser.write(chunk)
        parser.finalize()
    except HTTPException:
        raise
    except Exception as exc:  # malformed multipart body
        raise HTTPException(422, f"malformed multipart upload ({type(exc).__name__})") from exc
    finally:
        sink.on_part_end()
    series = sink.series.decode("utf-8", "replace").strip()
    return sink.saved, sink.study_id.decode("utf-8", "replace") or None, series or None


def locate_study(files: list[Path], work: Path, settings: ServiceSettings) -> Path:
    """The path to hand to :func:`msnet.io.open_study`: an extracted zip (its one volume file when that is
    all it holds, as ``open_study`` unpacks a zip), a single file, or the folder of uploaded files. The zip
    is extracted here, under the service's own limits (413 past them)."""
    if not files:
        raise HTTPException(422, "no file in the form field `file`: send a .zip, a .nii/.nii.gz or DICOM files")
    zips = [f for f in files if f.name.lower().endswith(ARCHIVE_SUFFIXES) or (len(files) == 1 and _magic(f) == b"PK\x03\x04")]
    if zips and len(files) > 1:
        raise HTTPException(422, "a zip must be sent alone: send one .zip of the study, or its DICOM files")
    if zips:
        out = work / "study"
        out.mkdir()
        try:
            safe_extract(files[0], out, max_bytes=int(settings.max_unzipped_mb * (1 << 20)),
                         max_files=settings.max_files, max_ratio=settings.max_ratio)
        except LimitError as exc:
            raise HTTPException(413, exc.problem) from exc
        except MsnetError as exc:
            raise HTTPException(422, exc.problem if exc.fix is None else f"{exc.problem}: {exc.fix}") from exc
        return study_in(out)
    return files[0] if len(files) == 1 else files[0].parent


def _magic(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(4)
