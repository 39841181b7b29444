"""``msnet listen``: a DICOM C-STORE SCP that diagnoses every CT study it receives and stores SR + KOS back.

How a study flows::

    C-STORE (CT image, allowed calling AE title)  ->  SPOOL/<hash>-<n>/<k>.dcm   (raw, as received)
    no new instance for quiet_s seconds and no association still sending it  ->  queue
    one worker: read -> predict -> SR + Key Object Selection -> store (STOW-RS / C-STORE)
    -> one JSON line in the outcome log -> the study's received files are removed

Limits: at most ``max_studies`` studies are held at once (receiving, waiting or being diagnosed) and
``max_instances`` instances per study; beyond them a C-STORE answers 0xA700 (out of resources) and the
sender tries again later. Associations from calling AE titles not in ``allowed_aets`` are rejected
(when the list is empty, any calling AE title is accepted). The spool folder is private (0700) and
left-overs of an earlier run are removed at start.

SIGTERM (or SIGINT) drains: new associations stop, studies fully received are diagnosed and stored,
studies cut off in the middle (their sender got an abort or a refusal and will send them again) are
discarded and logged as such, then the process exits 0.

The outcome log holds, per study: time, StudyInstanceUID, calling AE title, instance count, status,
class, probabilities, key slice indices, objects stored, seconds and the error; never a patient's
name, id, birth date or accession number.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from msnet.errors import MsnetError
from msnet.service.pacs import StoreTargets, diagnose

log = logging.getLogger(__name__)

CT_STORAGE = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


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


@dataclass
class _Study:
    uid: str
    folder: Path
    calling_aet: str
    last_s: float
    n: int = 0
    senders: set = field(default_factory=set)
    interrupted: bool = False


class Listener:
    """The C-STORE SCP, its quiet-study scheduler and its single diagnosis worker.

    e.g. listener = Listener(predictor, "run/bundle", ListenerSettings(spool=Path("spool")))
    e.g. listener.serve_forever()  # until SIGTERM
    """

    def __init__(self, predictor, bundle: str | Path, settings: ListenerSettings):
        self.predictor = predictor
        self.bundle = Path(bundle)
        self.s = settings
        self.spool = Path(settings.spool)
        self.log_path = Path(settings.log_path) if settings.log_path else self.spool / "outcomes.jsonl"
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._receiving: dict[str, _Study] = {}
        self._queue: queue.Queue = queue.Queue()
        self._held = 0
        self._counter = 0
        self._stopping = False
        self._stop = threading.Event()
        self._ae = None
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open the spool and the port; start the scheduler and the worker. Returns at once."""
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
        log.info("listening as %s on %s:%d (%s); quiet after %.0f s; outcomes in %s", self.s.ae_title, self.s.host,
                 self.s.port, "calling AE titles " + ", ".join(self.s.allowed_aets) if self.s.allowed_aets
                 else "any calling AE title", self.s.quiet_s, self.log_path)

    def stop(self) -> None:
        """Drain: refuse new data, diagnose every study fully received, discard cut-off ones, wait."""
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
                self._finish(st, {"status": "discarded",
                                  "error": "listener stopped while the study was being received; it can be sent again"})
            else:
                self._queue.put(st)
        self._queue.put(None)
        for t in self._threads:
            t.join()
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
        stale = [p for p in self.spool.iterdir() if p.is_dir() and p.name.startswith("study-")]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        if stale:
            log.warning("removed %d partly received studies left by an earlier run", len(stale))
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
                self._counter += 1
                folder = self.spool / f"study-{hashlib.sha256(uid.encode()).hexdigest()[:16]}-{self._counter}"
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
                self._queue.put(st)

    # ------------------------------------------------------------ diagnosing

    def _work(self) -> None:
        while (st := self._queue.get()) is not None:
            t0 = time.perf_counter()
            outcome: dict = {}
            try:
                result, _ = diagnose(self.predictor, st.folder, self.bundle, study_id=st.uid,
                                     dicom_out=self.s.dicom_out, targets=self.s.targets)
                outcome = {"status": "ok", "prediction": result["prediction"],
                           "probabilities": result["probabilities"], "n_slices": result["n_slices"],
                           "key_slices": [k["slice_index"] for k in result["key_slices"]],
                           "stored": [t for t in (self.s.targets.url and "stow", self.s.targets.aet and "c-store") if t],
                           "warnings": len(result.get("warnings", []))}
            except MsnetError as exc:
                outcome = {"status": "failed", "error": str(exc)}
            except Exception as exc:  # one bad study never stops the listener
                log.exception("study failed unexpectedly")
                outcome = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            outcome["seconds"] = round(time.perf_counter() - t0, 3)
            self._finish(st, outcome)

    def _finish(self, st: _Study, outcome: dict) -> None:
        shutil.rmtree(st.folder, ignore_errors=True)
        with self._lock:
            self._held -= 1
        line = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "study_uid": st.uid,
                "calling_aet": st.calling_aet, "instances": st.n, **outcome}
        with self._log_lock, open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        if outcome.get("status") == "ok":
            log.info("study %s: %s", st.uid, outcome["prediction"])
        else:
            log.warning("study %s: %s: %s", st.uid, outcome.get("status"), outcome.get("error"))
