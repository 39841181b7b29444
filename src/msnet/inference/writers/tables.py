"""The run's tables, as registered run writers: what ``predict --out DIR`` (and the batch code under it)
writes for the whole run rather than for one study.

- ``jsonl``: one JSON line per finished study, appended and flushed to disk at once, so an
  interruption keeps every finished study and a re-run skips them (``predictions.jsonl``);
- ``csv``: ``predictions.csv`` (one row per study, :meth:`Prediction.csv_row`), ``predictions.json``
  and ``status.csv`` (every study, failed ones with their error), rewritten atomically after each study.

A new run-level output is one more class decorated with :func:`register_run_writer`.

>>> sorted(RUN_WRITERS)
['csv', 'jsonl']
"""

from __future__ import annotations

import json
import os
from abc import ABC
from pathlib import Path
from typing import ClassVar

from msnet.errors import MsnetError
from msnet.files import atomic_write_text, write_csv_atomic
from msnet.inference.predictor import Prediction

JSONL = "predictions.jsonl"


class RunWriter(ABC):
    """One kind of run-level output: ``add`` after each finished study (its JSON record), ``finish`` with
    every result and status so far (called after each study, so the files are whole at any time)."""

    name: ClassVar[str]

    def add(self, record: dict, out: Path) -> None:
        """One finished study's record (``{"study": ..., "prediction": {...}}``)."""

    def finish(self, classes: list[str], results: list[dict], status: list[dict], out: Path) -> None:
        """Every result and status of the run so far."""


RUN_WRITERS: dict[str, RunWriter] = {}


def register_run_writer(cls: type[RunWriter]) -> type[RunWriter]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if cls.name in RUN_WRITERS:
        raise ValueError(f"two run writers named {cls.name!r}")
    RUN_WRITERS[cls.name] = cls()
    return cls


def run_writers(names: tuple[str, ...] = ("jsonl", "csv")) -> list[RunWriter]:
    """The run writers ``names``, in that order; a clear error for an unknown one."""
    unknown = [n for n in names if n not in RUN_WRITERS]
    if unknown:
        raise MsnetError(f"no run output named {', '.join(unknown)}", fix=f"use some of {', '.join(RUN_WRITERS)}")
    return [RUN_WRITERS[n] for n in names]


@register_run_writer
class JsonLines(RunWriter):
    name = "jsonl"

    def add(self, record: dict, out: Path) -> None:
        with open(Path(out) / JSONL, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


@register_run_writer
class Tables(RunWriter):
    name = "csv"

    def finish(self, classes: list[str], results: list[dict], status: list[dict], out: Path) -> None:
        out = Path(out)
        rows = [Prediction(**{k: v for k, v in r.items() if k != "explanation"}).csv_row(classes) for r in results]
        write_csv_atomic(out / "predictions.csv", Prediction.csv_header(classes), rows)
        write_csv_atomic(out / "status.csv", ["study", "study_id", "status", "error"], status)
        atomic_write_text(out / "predictions.json", json.dumps(results, indent=2, allow_nan=False))
