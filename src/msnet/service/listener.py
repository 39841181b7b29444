"""``msnet listen``: a DICOM C-STORE SCP that diagnoses every CT study it receives and stores SR + KOS back.

How a study flows (every step on disk, so that a restart loses nothing that was fully received)::

    C-STORE (CT image, allowed calling AE title)  ->  SPOOL/study-<hash>-<id>/<k>.dcm   (raw, as received)
    no new instance for quiet_s seconds and no association still sending it
        ->  renamed SPOOL/queued-<hash>-<id>/ (+ study.json)   (complete: kept across restarts)
    one worker: read -> predict -> SR + Key Object Selection written to SPOOL/outbox/<hash>-<id>/
        (+ result.json) -> the received files are removed
    one sender: store the outbox's objects (STOW-RS / C-STORE); on failure try again later, waiting
        retry_s, then twice as long each time up to retry_max_s -> one JSON line in the outcome log
        per study stored (``ok``) and one when its first store fails (``pending``, with the diagnosis)

The objects' UIDs are derived from the study, the series and the bundle
(:func:`msnet.inference.dicom_out.result_uids`): a study sent twice, or a result stored again after
a timeout that in fact reached the archive, gives the same SR and KO, never a second pair.
:func:`spool_status` (``msnet listen --status``) says what is queued and what waits to be stored.

Limits: at most ``max_studies`` studies are held at once (receiving, waiting or being diagnosed) and
``max_instances`` instances per study; beyond them a C-STORE answers 0xA700 (out of resources) and the
sender tries again later. Associations from calling AE titles not in ``allowed_aets`` are rejected
(when the list is empty, any calling AE title is accepted). The spool folder is private (0700). At
start, studies an earlier run had fully received are diagnosed and results it had not stored are
sent; studies it was still receiving are removed (their sender was cut off and sends them again).

SIGTERM (or SIGINT) drains: new associations stop, studies fully received are diagnosed, each result
due is tried once more, studies cut off in the middle are discarded and logged as such, then the
process exits 0. Results that could not be stored stay in the outbox for the next start.

The outcome log holds, per study: time, StudyInstanceUID, calling AE title, instance count, status,
class, probabilities, key slice indices, objects stored, seconds and the error; never a patient's
name, id, birth date or accession number. The process log names a study only by its key, the first 16
hex digits of the SHA-256 of its StudyInstanceUID (as the spool folders do): no DICOM value is logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from msnet.errors import MsnetError
from msnet.files import atomic_write_text
from msnet.retry import Backoff
from msnet.service.pacs import StoreTargets, diagnose, store

log = logging.getLogger(__name__)

CT_STORAGE = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
OUTBOX = "outbox"
RESULT = "result.json"
STUDY = "study.json"


@dataclass(frozen=True)
class ListenerSettings:
    """Options of ``msnet listen``."""

    spool: Path
    ae_title: str = "MSNET"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_aets: tuple[str, ...] = ()
    quiet_s: float = 10.0
    max_studies: int = 8
    max_instances: int = 5000
    log_path: Path | None = None
    dicom_out: Path | None = None
    targets: StoreTargets = field(default_factory=StoreTargets)
    outputs: dict[str, Path] = field(default_factory=dict)
    """Other outputs written for every study, writer name -> folder (e.g. ``{"fhir": Path("fhir")}``)."""
    retry_s: float = 30.0
    """First wait before a failed store is tried again; doubled after each failure."""
    retry_max_s: float = 900.0
    """Longest wait between two tries of a failed store (results are kept and tried until stored)."""


@dataclass
class _Study:
    uid: str
    folder: Path
    calling_aet: str
    last_s: float
    n: int = 0
    senders: set = field(default_factory=set)
    interrupted: bool = False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def spool_status(spool: str | Path) -> dict:
    """What a listener's spool holds: studies received and waiting for their diagnosis (``queued``), and
    results waiting to be stored (``pending``: study UID, class, tries, last error, next try), oldest
    first. Reads only the spool: it works while the listener runs, and after it stopped.

    >>> spool_status("/no/such/spool")
    {'spool': '/no/such/spool', 'receiving': 0, 'queued': [], 'pending': []}
    """
    spool = Path(spool)
    queued, pending, receiving = [], [], 0
    if spool.is_dir():
        receiving = sum(1 for p in spool.iterdir() if p.is_dir() and p.name.startswith("study-"))
        for folder in sorted(spool.glob("queued-*")):
            meta = _read_json(folder / STUDY) or {}
            queued.append({"study_uid": meta.get("study_uid"), "instances": meta.get("instances"),
                           "received": meta.get("received")})
        items = [m for f in (spool / OUTBOX).glob("*") if f.is_dir() and (m := _read_json(f / RESULT)) is not None]
        for meta in sorted(items, key=lambda m: str(m.get("diagnosed", ""))):
            pending.append({k: meta.get(k) for k in ("study_uid", "prediction", "diagnosed", "attempts",
                                                     "last_error", "next_try")})
    return {"spool": str(spool), "receiving": receiving, "queued": queued, "pending": pending}


class Listener:
    """The C-STORE SCP, its quiet-study scheduler, its single diagnosis worker and its outbox sender.

    e.g. listener = Listener(predictor, "run/bundle", ListenerSettings(spool=Path("spool")))
    e.g. listener.serve_forever()  # until SIGTERM
    """

    def __init__(self, predictor, bundle: str | Path, settings: ListenerSettings):
        self.predictor = predictor
        self.bundle = Path(bundle)
        self.s = settings
        self.spool = Path(settings.spool)
        self.outbox = self.spool / OUTBOX
        self.log_path = Path(settings.log_path) if settings.log_path else self.spool / "outcomes.jsonl"
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._receiving: dict[str, _Study] = {}
        self._queue: queue.Queue = queue.Queue()
        self._held = 0
        self._stopping = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ae = None
        self._threads: list[threading.Thread] = []
        self._sender: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open the spool and the port; start the scheduler, the worker and the sender. Returns at once."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.sop_class import Verification

        self._open_spool()
        ae = AE(ae_title=self.s.ae_title)
        for uid in CT_STORAGE:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        if self.s.allowed_aets:
            ae.require_calling_aet = list(self.s.allowed_aets)
        ae.maximum_associations = max(2, self.s.max_studies)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_CLOSE, self._on_close)]
        try:
            ae.start_server((self.s.host, self.s.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise MsnetError(f"cannot listen on {self.s.host}:{self.s.port} ({exc.strerror or exc})",
                             fix="choose another --port, or stop what holds this one") from exc
        self._ae = ae
        for name, target in (("scheduler", self._schedule), ("worker", self._work)):
            t = threading.Thread(target=target, name=f"msnet-listen-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self._sender = threading.Thread(target=self._send_loop, name="msnet-listen-sender", daemon=True)
        self._sender.start()
        log.info("listening as %s on %s:%d (%s); quiet after %.0f s; outcomes in %s", self.s.ae_title, self.s.host,
                 self.s.port, "calling AE titles " + ", ".join(self.s.allowed_aets) if self.s.allowed_aets
                 else "any calling AE title", self.s.quiet_s, self.log_path)

    def stop(self) -> None:
        """Drain: refuse new data, diagnose every study fully received, discard cut-off ones, try each
        result due once more, wait. Results not stored stay in the outbox for the next start."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            sending = {uid for uid, st in self._receiving.items() if st.senders}
        if self._ae is not None:
            self._ae.shutdown()  # aborts associations still open: their senders know to send again
        self._stop.set()
        with self._lock:
            studies, self._receiving = list(self._receiving.values()), {}
        for st in studies:
            if st.uid in sending or st.senders or st.interrupted:
                self._discard(st)
            else:
                self._queue.put(self._queued(st))
        self._queue.put(None)
        for t in self._threads:
            t.join()
        self._wake.set()
        if self._sender is not None:
            self._sender.join()
        left = len(spool_status(self.spool)["pending"])
        if left:
            log.warning("%d results not stored yet: they stay in %s and are sent after the next start", left,
                        self.outbox)
        log.info("listener stopped")

    def serve_forever(self) -> None:
        """Start, run until SIGTERM or SIGINT, then drain (see :meth:`stop`)."""
        stop = threading.Event()
        old = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            stop.wait()
            log.info("stopping: finishing the studies already received")
            self.stop()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    # ------------------------------------------------------------ receiving

    def _open_spool(self) -> None:
        self.spool.mkdir(parents=True, exist_ok=True)
        os.chmod(self.spool, 0o700)
        self.outbox.mkdir(mode=0o700, exist_ok=True)
        stale = [p for p in self.spool.iterdir() if p.is_dir() and p.name.startswith(("study-", ".outbox-"))]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        if stale:
            log.warning("removed %d partly received studies left by an earlier run", len(stale))
        for folder in sorted(self.spool.glob("queued-*")):
            meta = _read_json(folder / STUDY)
            if meta is None:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            self._held += 1
            self._queue.put(_Study(str(meta["study_uid"]), folder, str(meta.get("calling_aet", "")), 0.0,
                                   int(meta.get("instances", 0))))
        pending = sum(1 for _ in self.outbox.glob(f"*/{RESULT}"))
        if self._held or pending:
            log.info("from an earlier run: %d studies to diagnose, %d results to store", self._held, pending)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

    def _on_store(self, event) -> int:
        try:
            ds = event.dataset
            uid = str(ds.get("StudyInstanceUID", "") or "")
        except Exception:  # undecodable data set: the sender is told, nothing is kept
            return CANNOT_UNDERSTAND
        if not uid:
            return CANNOT_UNDERSTAND
        now = time.monotonic()
        sender = id(event.assoc)
        with self._lock:
            st = self._receiving.get(uid)
            if self._stopping:
                if st is not None:
                    st.interrupted = True
                return OUT_OF_RESOURCES
            if st is None:
                if self._held >= self.s.max_studies:
                    log.warning("study refused: %d studies already held (--max-studies)", self._held)
                    return OUT_OF_RESOURCES
                folder = self.spool / f"study-{_key(uid)}-{uuid.uuid4().hex[:8]}"
                folder.mkdir(mode=0o700)
                st = _Study(uid, folder, str(event.assoc.requestor.ae_title).strip(), now)
                self._receiving[uid] = st
                self._held += 1
            if st.n >= self.s.max_instances:
                st.interrupted = True
                return OUT_OF_RESOURCES
            st.n += 1
            k, st.last_s = st.n, now
            st.senders.add(sender)
        with open(st.folder / f"{k:06d}.dcm", "wb") as fh:
            fh.write(event.encoded_dataset())
        with self._lock:
            st.last_s = time.monotonic()
        return 0x0000

    def _on_close(self, event) -> None:
        sender = id(event.assoc)
        with self._lock:
            for st in self._receiving.values():
                if sender in st.senders:
                    st.senders.discard(sender)
                    if self._stopping:
                        st.interrupted = True

    def _queued(self, st: _Study) -> _Study:
        """A fully received study, marked so on disk (it survives a restart from here on)."""
        atomic_write_text(st.folder / STUDY, json.dumps({"study_uid": st.uid, "calling_aet": st.calling_aet,
                                                         "instances": st.n, "received": _now()}))
        folder = st.folder.with_name("queued-" + st.folder.name.removeprefix("study-"))
        os.replace(st.folder, folder)
        st.folder = folder
        return st

    def _schedule(self) -> None:
        tick = min(1.0, max(0.1, self.s.quiet_s / 4))
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                ready = [st for st in self._receiving.values()
                         if not st.senders and now - st.last_s >= self.s.quiet_s]
                for st in ready:
                    del self._receiving[st.uid]
            for st in ready:
                self._queue.put(self._queued(st))

    # ------------------------------------------------------------ diagnosing

    def _work(self) -> None:
        while (st := self._queue.get()) is not None:
            t0 = time.perf_counter()
            try:
                self._diagnose(st, t0)
            except MsnetError as exc:
                self._finish(st, {"status": "failed", "error": str(exc), "seconds": _since(t0)})
            except Exception as exc:  # one bad study never stops the listener
                log.exception("study failed unexpectedly")
                self._finish(st, {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "seconds": _since(t0)})

    def _diagnose(self, st: _Study, t0: float) -> None:
        """Diagnose a queued study; its result goes to the outbox (or, with nowhere to store it, straight
        to the outcome log); then its received files are removed."""
        if not self.s.targets:
            result, _ = diagnose(self.predictor, st.folder, self.bundle, study_id=_key(st.uid), dicom_out=self.s.dicom_out,
                                 outputs=self.s.outputs)
            self._finish(st, {**_summary(result), "stored": [], "seconds": _since(t0)})
            return
        tmp = Path(tempfile.mkdtemp(prefix=".outbox-", dir=self.spool))
        try:
            result, files = diagnose(self.predictor, st.folder, self.bundle, study_id=_key(st.uid), dicom_out=tmp / "files",
                                     outputs=self.s.outputs)
            if self.s.dicom_out is not None:
                for f in files:
                    target = Path(self.s.dicom_out) / f.parent.name / f.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(f, target)
            meta = {"study_uid": st.uid, "calling_aet": st.calling_aet, "instances": st.n,
                    "diagnosed": _now(), **_summary(result), "seconds": _since(t0),
                    "files": [str(f.relative_to(tmp)) for f in files], "attempts": 0, "last_error": None,
                    "next_try": time.time()}
            atomic_write_text(tmp / RESULT, json.dumps(meta))
            os.replace(tmp, self.outbox / st.folder.name.removeprefix("queued-"))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(st.folder, ignore_errors=True)
        with self._lock:
            self._held -= 1
        self._wake.set()

    # ------------------------------------------------------------ storing

    def _send_loop(self) -> None:
        while True:
            stopping = self._stop.is_set() and not any(t.is_alive() for t in self._threads)
            self._send_due()
            if stopping:
                return
            self._wake.wait(1.0)
            self._wake.clear()

    def _send_due(self) -> None:
        """Try every outbox item whose next try is due, oldest first."""
        items = [(m, f) for f in self.outbox.glob("*") if f.is_dir() and (m := _read_json(f / RESULT)) is not None]
        for meta, folder in sorted(items, key=lambda x: x[0].get("diagnosed", "")):
            if float(meta.get("next_try", 0)) <= time.time():
                self._send(meta, folder)

    def _send(self, meta: dict, folder: Path) -> None:
        files = [folder / f for f in meta.get("files", [])]
        try:
            store(files, self.s.targets)
        except Exception as exc:  # the archive is down or refuses: keep the result, try again later
            meta["attempts"] = int(meta.get("attempts", 0)) + 1
            wait = Backoff(self.s.retry_s, self.s.retry_max_s).delay(meta["attempts"])
            meta["last_error"] = str(exc) if isinstance(exc, MsnetError) else f"{type(exc).__name__}: {exc}"
            meta["next_try"] = time.time() + wait
            atomic_write_text(folder / RESULT, json.dumps(meta))
            log.warning("study %s: result not stored (try %d), next try in %.0f s: %s", _key(meta["study_uid"]),
                        meta["attempts"], wait, meta["last_error"])
            if meta["attempts"] == 1:
                self._log({**_line(meta), "status": "pending", "error": meta["last_error"]})
            return
        self._log({**_line(meta), "status": "ok", "attempts": int(meta.get("attempts", 0)) + 1,
                   "stored": self._stored_kinds()})
        shutil.rmtree(folder, ignore_errors=True)

    def _stored_kinds(self) -> list[str]:
        return [t for t in (self.s.targets.url and "stow", self.s.targets.aet and "c-store") if t]

    # ------------------------------------------------------------ outcomes

    def _discard(self, st: _Study) -> None:
        self._finish(st, {"status": "discarded",
                          "error": "listener stopped while the study was being received; it can be sent again"})

    def _finish(self, st: _Study, outcome: dict) -> None:
        """A study that leaves without a result to store: its files go, one outcome line."""
        shutil.rmtree(st.folder, ignore_errors=True)
        with self._lock:
            self._held -= 1
        self._log({"study_uid": st.uid, "calling_aet": st.calling_aet, "instances": st.n, **outcome})

    def _log(self, line: dict) -> None:
        line = {"time": _now(), **line}
        with self._log_lock, open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        if line.get("status") == "ok":
            log.info("study %s: %s", _key(line["study_uid"]), line.get("prediction"))
        else:
            log.warning("study %s: %s: %s", _key(line["study_uid"]), line.get("status"), line.get("error"))


def _key(uid: str) -> str:
    """A study's name in the process log and the spool: not its UID (no DICOM value is logged)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:16]


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)


def _summary(result: dict) -> dict:
    return {"status": "ok", "prediction": result["prediction"], "probabilities": result["probabilities"],
            "n_slices": result["n_slices"], "key_slices": [k["slice_index"] for k in result["key_slices"]],
            "warnings": len(result.get("warnings", []))}


def _line(meta: dict) -> dict:
    """An outbox item's outcome line: the study and its diagnosis (no file names, no patient data)."""
    keys = ("study_uid", "calling_aet", "instances", "prediction", "probabilities", "n_slices", "key_slices",
            "warnings", "seconds")
    return {k: meta[k] for k in keys if k in meta}
