"""Predict a list of studies, writing each result as it finishes; a re-run skips finished studies.

``OUT/predictions.jsonl`` gets one JSON line per finished study (appended and flushed, so an
interruption keeps every finished study); ``predictions.csv``, ``predictions.json`` and
``status.csv`` are rewritten atomically after each study.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from msnet.errors import MsnetError
from msnet.files import atomic_write_text, write_csv_atomic
from msnet.inference.predictor import Prediction, Predictor

log = logging.getLogger(__name__)

JSONL = "predictions.jsonl"


def _finished(out: Path) -> dict[str, dict]:
    """study path -> prediction dict of the studies a previous run finished (a torn last line is ignored)."""
    done: dict[str, dict] = {}
    path = out / JSONL
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "study" in rec and "prediction" in rec:
            done[rec["study"]] = rec["prediction"]
    return done


def _append_line(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _write_tables(out: Path, classes: list[str], results: list[dict], status: list[dict]) -> None:
    rows = [Prediction(**{k: v for k, v in r.items() if k != "explanation"}).csv_row(classes) for r in results]
    write_csv_atomic(out / "predictions.csv", Prediction.csv_header(classes), rows)
    write_csv_atomic(out / "status.csv", ["study", "study_id", "status", "error"], status)
    atomic_write_text(out / "predictions.json", json.dumps(results, indent=2, allow_nan=False))


def _reads(predictor: Predictor, studies: list, skip: set[str], prefetch: int) -> Iterator[tuple]:
    """(study, volume or None, read seconds, MsnetError or None) in order; with ``prefetch`` > 0, up to
    that many studies are read ahead in a thread while the caller works on the current one."""
    def read(study):
        try:
            return (*predictor.read(study), None)
        except MsnetError as exc:
            return None, 0.0, exc

    if prefetch <= 0:
        for study in studies:
            yield (study, None, 0.0, None) if str(study) in skip else (study, *read(study))
        return
    todo = [s for s in studies if str(s) not in skip]
    with ThreadPoolExecutor(1, thread_name_prefix="msnet-read") as pool:
        ahead: dict[int, Future] = {}
        nxt = 0
        for study in studies:
            if str(study) in skip:
                yield study, None, 0.0, None
                continue
            while nxt < len(todo) and len(ahead) <= prefetch:
                ahead[nxt] = pool.submit(read, todo[nxt])
                nxt += 1
            k = min(ahead)
            yield (study, *ahead.pop(k).result())


def predict_many(bundle: Path | Predictor, studies: list[str | Path], out: Path | None = None,
                 explain_dir: Path | None = None, on_result=None, on_study=None, prefetch: int | None = None,
                 **predictor_kwargs) -> tuple[list[dict], list[dict]]:
    """Predict every study (paths or DICOMweb URLs); a bad one is recorded (status ``failed`` with the
    message) and skipped.

    Returns (prediction dicts, status rows). ``on_study(volume, prediction_dict)`` runs for each study
    before it counts as done (e.g. writing SR + KOS back to the PACS; a MsnetError there fails the
    study); ``on_result(prediction_dict)`` is called as each study finishes (the CLI prints there).
    With ``out``, studies a previous run finished are not redone. ``prefetch``: studies read ahead
    while the model works (default 1 on a GPU, where reading and the model use different hardware;
    0 on the CPU, where they would share the same cores).
    """
    from rich.progress import track

    predictor = bundle if isinstance(bundle, Predictor) else Predictor(bundle, **predictor_kwargs)
    if prefetch is None:
        prefetch = 0 if predictor.device.type == "cpu" else 1
    done: dict[str, dict] = {}
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise MsnetError("--out must be a folder", out, "pass a folder name (it is created)")
        out.mkdir(parents=True, exist_ok=True)
        done = _finished(out)
        if done:
            log.info("%d of %d studies already done in %s: skipped", sum(str(s) in done for s in studies),
                     len(studies), out)
    results, status = [], []
    reads = _reads(predictor, studies, set(done), prefetch)
    for study, vol, read_s, error in track(reads, total=len(studies), description="predicting", transient=True,
                                           disable=len(studies) < 2):
        key = str(study)
        if key in done:
            r = done[key]
        else:
            try:
                if error is not None:
                    raise error
                pred = predictor.predict_read(vol, read_s, explain_dir=explain_dir)
                del vol
                r = pred.to_dict()
                if on_study is not None:
                    on_study(pred.extra["volume"], r)
                del pred
            except MsnetError as exc:
                log.error("%s", exc)
                status.append({"study": key, "study_id": key.rstrip("/").split("/")[-1].removesuffix(".zip"),
                               "status": "failed", "error": str(exc)})
                if out is not None:
                    _write_tables(out, predictor.classes, results, status)
                continue
            if out is not None:
                _append_line(out / JSONL, json.dumps({"study": key, "prediction": r}, allow_nan=False))
        results.append(r)
        status.append({"study": key, "study_id": r["study_id"], "status": "ok", "error": ""})
        if on_result is not None:
            on_result(r)
        if out is not None:
            _write_tables(out, predictor.classes, results, status)
    return results, status
