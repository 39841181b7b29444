"""Writing files so that an interruption never leaves half of one: temp file beside the target, then
rename. Finished files get the modes the umask gives (``mkstemp`` alone would leave them 0600).

>>> import tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
>>> atomic_write_text(p, "hi"); p.read_text()
'hi'
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def umask_mode(base: int = 0o666) -> int:
    """The mode a new file (``base`` 0o666) or folder (0o777) gets under the current umask."""
    return base & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temp file name beside ``path``; on success give it the umask's modes and rename it
    to ``path``, else remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it into place."""
    with atomic_path(path) as tmp:
        write(Path(tmp))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file, then rename: an interruption never leaves half a checkpoint.

    Saved through a file object, so the archive inside is named the same whatever the temp file's name:
    the same object gives the same bytes (and the same file hash, the feature cache's key).
    """
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def write_csv_atomic(path: str | Path, header: list[str], rows: list) -> None:
    """Write a CSV atomically (rows: lists or dicts keyed by the header)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for row in rows:
            w.writerow([row.get(k, "") for k in header] if isinstance(row, dict) else row)


def read_csv_rows(path: str | Path) -> list[dict]:
    """Rows of a CSV with a header; [] when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
