"""Predict a list of studies, writing each result as it finishes; a re-run skips finished studies.

``OUT/predictions.jsonl`` gets one JSON line per finished study (appended and flushed, so an
interruption keeps every finished study); ``predictions.csv``, ``predictions.json`` and
``status.csv`` are rewritten atomically after each study.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np

from msnet.errors import MsnetError
from msnet.inference.predictor import Predictor, gate, read_volume
from msnet.inference.writers.tables import JSONL, run_writers
from msnet.io.decode import worker_init

log = logging.getLogger(__name__)



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
            if rec.get("stored") is False:  # diagnosed, but its result still has to be stored: redo it
                done.pop(rec["study"], None)
            else:
                done[rec["study"]] = rec["prediction"]
    return done


def _write_tables(out: Path, classes: list[str], results: list[dict], status: list[dict]) -> None:
    for writer in run_writers():
        writer.finish(classes, results, status, out)


def _read(study, series=None) -> tuple:
    """(volume or None, read seconds, MsnetError or None, gate result or None), in this process."""
    try:
        return (*read_volume(study, series=series), None, None)
    except MsnetError as exc:
        return None, 0.0, exc, None


def _read_and_gate(study, series=None) -> tuple:
    """In a reader process: read a study and run the checks and lung gate on it; the HU travel back
    through a file in shared memory (mapped by the parent, no copy), the rest pickled."""
    try:
        vol, read_s = read_volume(study, series=series)
        checked = gate(vol)
    except MsnetError as exc:
        return None, 0.0, exc, None
    hu = np.ascontiguousarray(vol.hu, dtype=np.float32)
    folder = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    fd, name = tempfile.mkstemp(prefix="msnet-study-", suffix=".f32", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            hu.tofile(fh)
    except BaseException:
        os.unlink(name)
        raise
    return replace(vol, hu=np.empty((0,) + hu.shape[1:], np.float32)), read_s, None, checked, name, hu.shape


def _mapped(result: tuple) -> tuple:
    """A reader process's result with its HU mapped back (copy-on-write) and the file unlinked."""
    if len(result) == 4:
        return result
    vol, read_s, error, checked, name, shape = result
    try:
        hu = np.memmap(name, np.float32, mode="c", shape=shape)
    finally:
        os.unlink(name)
    return replace(vol, hu=hu.view(np.ndarray)), read_s, error, checked


def _reader_pool(readers: int) -> ProcessPoolExecutor:
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(readers, mp_context=multiprocessing.get_context(method), initializer=worker_init,
                               initargs=(os.getpid(),))


def _reads(studies: list, skip: set[str], prefetch: int, readers: int = 0, series=None) -> Iterator[tuple]:
    """(study, volume or None, read seconds, MsnetError or None, gate result or None) in order.

    ``prefetch`` > 0: up to that many studies are read ahead in a thread while the caller works on
    the current one. ``readers`` > 0: that many processes read studies ahead and run their checks
    and lung gate (the host work of a study, mostly single-threaded), each decoding its own files. A
    study whose reader process dies (a decoder crash) is read again here, with the crash-safe decode.
    """
    depth = max(prefetch, readers)
    if depth <= 0:
        for study in studies:
            yield (study, None, 0.0, None, None) if str(study) in skip else (study, *_read(study, series))
        return
    todo = [s for s in studies if str(s) not in skip]
    pool = _reader_pool(readers) if readers > 0 else ThreadPoolExecutor(1, thread_name_prefix="msnet-read")
    task = _read_and_gate if readers > 0 else _read
    ahead: dict[int, Future] = {}
    nxt = 0
    try:
        for study in studies:
            if str(study) in skip:
                yield study, None, 0.0, None, None
                continue
            while nxt < len(todo) and len(ahead) <= depth:
                ahead[nxt] = pool.submit(task, todo[nxt], series)
                nxt += 1
            try:
                result = _mapped(ahead.pop(min(ahead)).result())
            except BrokenProcessPool as exc:
                log.warning("a reader process died on %s (%s); reading it here", study, exc)
                pool.shutdown(wait=False, cancel_futures=True)
                _drop(ahead.values())
                pool, ahead, nxt = _reader_pool(readers), {}, todo.index(study) + 1
                result = _read(study, series)
            yield (study, *result)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        _drop(ahead.values())


def _drop(futures) -> None:
    """Studies read ahead and never used: their shared-memory files are removed."""
    for fut in futures:
        with contextlib.suppress(Exception):
            _mapped(fut.result())


def _store(on_study, volume, r: dict) -> str:
    """Run ``on_study`` (write and store the result); '' when done, else the error, naming the study and
    saying that its diagnosis was made and kept."""
    if on_study is None:
        return ""
    try:
        on_study(volume, r)
    except MsnetError as exc:
        text = (f"study {r['study_id']}: diagnosed ({r['prediction']}, kept in the output) but its result was "
                f"not stored: {exc}")
        log.debug("%s", text)
        return text
    return ""


def predict_many(bundle: Path | Predictor, studies: list[str | Path], out: Path | None = None,
                 explain_dir: Path | None = None, on_result=None, on_error=None, on_study=None,
                 prefetch: int | None = None,
                 readers: int | None = None, **predictor_kwargs) -> tuple[list[dict], list[dict]]:
    """Predict every study (paths or DICOMweb URLs); a bad one is recorded (status ``failed`` with the
    message) and skipped.

    Returns (prediction dicts, status rows). ``on_result(prediction_dict)`` is called as soon as a
    study is diagnosed (the CLI prints there); then ``on_study(volume, prediction_dict)`` runs (e.g.
    writing SR + KOS back to the PACS). A MsnetError there fails the study (status ``failed``, an
    error naming the study) but keeps its diagnosis: it is in the returned predictions, and in
    ``out`` marked ``"stored": false`` so that a re-run diagnoses and stores it again.
    ``on_error(status_row)`` is called as each study fails to be read, diagnosed or stored (the failure
    is not logged: the caller reports it once).
    With ``out``, studies a previous run finished are not redone. ``prefetch``: studies read ahead
    while the model works (default 1 on a GPU, where reading and the model use different hardware;
    0 on the CPU, where they would share the same cores). ``readers``: processes that read studies
    ahead and run their checks and lung gate (default on a GPU: half the host's cores, 2 to 8; there
    that host work, not the model, bounds the rate: benchmarks/gpu_from_files.py).
    """
    from rich.console import (
        Console,  # the bar on stderr: stdout keeps only the JSON lines of --json
    )
    from rich.progress import track

    predictor = bundle if isinstance(bundle, Predictor) else Predictor(bundle, **predictor_kwargs)
    gpu = predictor.device.type != "cpu"
    if prefetch is None:
        prefetch = 1 if gpu else 0
    if readers is None:
        readers = max(2, min(8, len(os.sched_getaffinity(0)) // 2)) if gpu and len(studies) > 1 else 0
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
    # one study at a time: each is read inside predict, streamed (decode overlapped with the backbone)
    inline = prefetch <= 0 and readers <= 0 and predictor.stream
    reads = ((s, None, 0.0, None, None) for s in studies) if inline else _reads(studies, set(done), prefetch, readers,
                                                                                predictor.series)
    for study, vol, read_s, error, checked in track(reads, total=len(studies), description="predicting", transient=True,
                                                    console=Console(stderr=True), disable=len(studies) < 2):
        key = str(study)
        if key in done:
            r = done[key]
        else:
            try:
                if error is not None:
                    raise error
                if inline:
                    pred = predictor.predict(study, explain_dir=explain_dir)
                else:
                    pred = predictor.predict_read(vol, read_s, explain_dir=explain_dir, checked=checked)
                del vol
                r = pred.to_dict()
                volume = pred.extra["volume"]
                del pred
            except MsnetError as exc:
                log.debug("%s", exc)
                status.append({"study": key, "study_id": key.rstrip("/").split("/")[-1].removesuffix(".zip"),
                               "status": "failed", "error": str(exc)})
                if on_error is not None:
                    on_error(status[-1])
                if out is not None:
                    _write_tables(out, predictor.classes, results, status)
                continue
            # the diagnosis is out (printed) before anything is stored: a failed store never loses it
            if on_result is not None:
                on_result(r)
            stored_error = _store(on_study, volume, r)
            del volume
            if out is not None:
                line = {"study": key, "prediction": r} | ({"stored": False} if stored_error else {})
                for writer in run_writers():
                    writer.add(line, out)
            results.append(r)
            status.append({"study": key, "study_id": r["study_id"], "status": "failed" if stored_error else "ok",
                           "error": stored_error})
            if stored_error and on_error is not None:
                on_error(status[-1])
            if out is not None:
                _write_tables(out, predictor.classes, results, status)
            continue
        results.append(r)
        status.append({"study": key, "study_id": r["study_id"], "status": "ok", "error": ""})
        if on_result is not None:
            on_result(r)
        if out is not None:
            _write_tables(out, predictor.classes, results, status)
    return results, status
