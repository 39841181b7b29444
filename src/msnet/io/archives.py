"""Studies packed as zip archives: checked (size, count, ratio, member paths) before extraction.

A damaged archive (bad CRC, a falsified size or offset, an unknown compression method, an
encrypted member) raises MsnetError naming the zip and the member, never a traceback; the
extraction never writes more than the sizes checked beforehand (``zipfile`` stops each member at
its declared size and checks its CRC).
"""

from __future__ import annotations

import errno
import re
import shutil
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from msnet.errors import LimitError, MsnetError
from msnet.io.readers import ARCHIVE_SUFFIXES, is_volume_file

_REZIP = "zip the study's folder again (the archive is damaged)"


@contextmanager
def unpacked(path: str | Path) -> Iterator[Path]:
    """Yield a readable study path; a .zip is extracted (checked) to a temp dir removed afterwards.
    :func:`msnet.io.open_study` reads through it; call that, not this.

    Errors raised while the study is read name the zip and the member, never the temp dir.

    e.g. with unpacked("case7.zip") as study: ...
    """
    path = Path(path)
    if not (path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)):
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="msnet-study-"))
    try:
        safe_extract(path, tmp)
        entries = [p for p in tmp.iterdir() if not p.name.startswith(("__MACOSX", "."))]
        inner = [p.name for p in entries if p.is_file() and p.suffix.lower() == ".zip"]
        if inner and len(inner) == len(entries):
            raise MsnetError(f"the zip holds another zip ({inner[0]}), not a study", path,
                             "unzip the outer archive and pass the inner one, or zip the study's folder itself")
        study = study_in(tmp)
        try:
            yield study
        except MsnetError as exc:
            raise _renamed(exc, tmp, path) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def study_in(folder: Path) -> Path:
    """What an extracted archive holds: its one volume file (a .nii.gz, an .mha) when that is all it
    holds, else the folder (a DICOM series, images)."""
    members = [p for p in folder.rglob("*") if p.is_file() and "__MACOSX" not in p.parts and not p.name.startswith(".")]
    return members[0] if len(members) == 1 and is_volume_file(members[0]) else folder


def _renamed(exc: MsnetError, tmp: Path, zip_path: Path) -> MsnetError:
    """The same error with the temp dir replaced by the zip's own name (``case7.zip/...``)."""

    def fix(text: str | None) -> str | None:
        if text is None:
            return None
        return text.replace(str(tmp) + "/", f"{zip_path}/").replace(str(tmp), str(zip_path))

    new = type(exc)(fix(exc.problem) or "", fix(exc.path), fix(exc.fix))
    return new


class ZipLimitError(LimitError):
    """A zip refused for its size, entry count or compression ratio (a possible zip bomb)."""


def check_zip(zip_path: Path, max_bytes: int = 4 << 30, max_files: int = 10000, max_ratio: float = 200.0) -> None:
    """Refuse a zip before extraction: ZipLimitError for size, count or ratio; MsnetError for a bad
    archive or a member path outside it (absolute, drive letter, ``..``)."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
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
    """Extract a zip after :func:`check_zip`; a damaged member raises MsnetError naming it."""
    check_zip(zip_path, max_bytes, max_files, max_ratio)
    member = "?"
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                member = info.filename
                zf.extract(info, dest)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, RuntimeError) and "encrypted" in text:
            text = "the member is encrypted"
        raise MsnetError(f"corrupt zip member {member!r} ({type(exc).__name__}: {text})", zip_path, _REZIP) from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the server's disk, not the upload
        raise MsnetError(f"zip member {member!r} cannot be extracted ({type(exc).__name__}: {exc.strerror or exc})",
                         zip_path, _REZIP) from exc
