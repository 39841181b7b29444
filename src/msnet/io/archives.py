"""Studies packed as zip archives: checked (size, count, ratio, member paths) before extraction."""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from msnet.errors import MsnetError


@contextmanager
def open_study(path: str | Path) -> Iterator[Path]:
    """Yield a readable study path; a .zip is extracted (checked) to a temp dir removed afterwards."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".zip":
        tmp = Path(tempfile.mkdtemp(prefix="msnet-study-"))
        try:
            safe_extract(path, tmp)
            entries = [p for p in tmp.iterdir() if not p.name.startswith("__MACOSX")]
            yield entries[0] if len(entries) == 1 and entries[0].suffix.lower() in (".nii", ".gz") else tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        yield path


class ZipLimitError(MsnetError):
    """A zip refused for its size, entry count or compression ratio (a possible zip bomb)."""


def check_zip(zip_path: Path, max_bytes: int = 4 << 30, max_files: int = 10000, max_ratio: float = 200.0) -> None:
    """Refuse a zip before extraction: ZipLimitError for size, count or ratio; MsnetError for a bad
    archive or a member path outside it (absolute, drive letter, ``..``)."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise MsnetError("not a valid zip archive", path=zip_path, fix="zip the study's folder again") from exc
    total = sum(i.file_size for i in infos)
    packed = sum(i.compress_size for i in infos) or 1
    if len(infos) > max_files:
        raise ZipLimitError(f"zip holds {len(infos)} entries (limit {max_files})", path=zip_path)
    if total > max_bytes:
        raise ZipLimitError(f"zip expands to {total >> 20} MiB (limit {max_bytes / (1 << 20):g} MiB)", path=zip_path)
    if total / packed > max_ratio:
        raise ZipLimitError(f"zip compression ratio {total / packed:.0f} is implausible for CT "
                            f"(limit {max_ratio:g}): refused as a possible zip bomb", path=zip_path)
    for info in infos:
        name = info.filename.replace("\\", "/")
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in name.split("/"):
            raise MsnetError(f"zip member {info.filename!r} points outside the archive", path=zip_path)


def safe_extract(zip_path: Path, dest: Path, max_bytes: int = 4 << 30, max_files: int = 10000, max_ratio: float = 200.0) -> None:
    """Extract a zip after :func:`check_zip`."""
    check_zip(zip_path, max_bytes, max_files, max_ratio)
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(dest)
