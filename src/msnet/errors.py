"""The project's one error type.

Every bad input raises :class:`MsnetError` with a message that names the file,
the problem and, where there is one, the fix. The CLI prints the message (no
traceback) and exits with code 2; the service answers 4xx with it.
"""

from __future__ import annotations

from pathlib import Path


class MsnetError(Exception):
    """A problem with the user's input, named with its file and fix.

    >>> str(MsnetError("no DICOM files found", path="/data/x", fix="point to the series folder"))
    '/data/x: no DICOM files found. Fix: point to the series folder'
    """

    def __init__(self, message: str, path: str | Path | None = None, fix: str | None = None):
        self.problem = message
        self.path = None if path is None else str(path)
        self.fix = fix
        text = message if self.path is None else f"{self.path}: {message}"
        if fix:
            text = f"{text.rstrip('.')}. Fix: {fix}"
        super().__init__(text)

    def __reduce__(self):  # from a worker process: problem, path and fix survive the trip
        return type(self), (self.problem, self.path, self.fix)


class LimitError(MsnetError):
    """An input over a configured size limit (a study too large, a possible decompression bomb).

    The service answers 413 for it; everything else that is wrong with an input is a 422.
    """
