"""HTTP service behind `msnet serve BUNDLE`: a JSON API and a web page that diagnose one uploaded study.

Routes::

    GET  /            the web page (static/index.html)
    GET  /health      status, model name, classes, limits
    POST /v1/predict  multipart field ``file``: a .zip of a DICOM study, a .nii/.nii.gz, or several
                      DICOM files (the field repeated); optional field ``study_id`` (a pseudonym)
    GET  /docs        OpenAPI documentation
    GET  /v1/studies/{token}[/slices/{i}.png | /cam/{i}.png]
                      the page's study viewer: a finished study kept for a while (see service/viewer.py)

Hardening (see docs/service.md): the request body is streamed to a per-request temp dir and cut
off at ``max_upload_mb`` (413); zip archives are checked before extraction (too large, too many
files or an implausible compression ratio: 413; members outside the archive: 422); anything
that is not a study answers 422 with the reader's message; inference runs in a bounded pool of
``workers`` threads with ``queue_size`` waiting places (503 when full); a request that takes
longer than ``timeout_s`` answers 504; with an API key, /v1/* needs the ``X-API-Key`` header
(401). The temp dir is removed when the request ends, whatever happens (after the worker
finishes, when a timed-out inference is still running). Only the study's pseudonymous id is
logged.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from msnet import __version__
from msnet.errors import MsnetError
from msnet.service import viewer

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
UPLOAD_PREFIX = "msnet-upload-"
API_KEY_ENV = "MSNET_API_KEY"
_NIFTI = (".nii", ".nii.gz")
_CHUNK_WRITE = 1 << 20


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and options of the service (``msnet serve`` flags).

    >>> ServiceSettings(workers=2).capacity
    18
    """

    api_key: str | None = None
    max_upload_mb: float = 1024.0  # request body
    workers: int = 1  # inferences running at once
    queue_size: int = 16  # requests waiting for a worker; more answer 503
    timeout_s: float = 300.0  # whole request: upload + queue + inference; 504 past it
    max_unzipped_mb: float = 4096.0  # total uncompressed size of a zip
    max_files: int = 10000  # files in a zip or in one upload
    max_ratio: float = 200.0  # uncompressed / compressed size of a zip
    top_k: int = 5  # key slices returned
    viewer_studies: int = 8  # finished studies kept for the page's viewer (0: no viewer)
    viewer_mb: float = 512.0  # memory for them in all; least recently used go first
    viewer_ttl_s: float = 1800.0  # each is dropped this long after its prediction
    device: str = "auto"
    tmp_dir: str | None = None  # where per-request temp dirs go (default: the system temp dir)

    @property
    def capacity(self) -> int:
        return self.workers + self.queue_size

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * (1 << 20))


# ------------------------------------------------------------------ worker pool


class InferencePool:
    """A fixed number of worker threads and a bounded number of waiting jobs.

    >>> pool = InferencePool(workers=1, queue_size=0)
    >>> pool.submit(lambda: 42).result()
    42
    >>> pool.shutdown()
    """

    def __init__(self, workers: int, queue_size: int):
        if workers < 1 or queue_size < 0:
            raise MsnetError(f"workers={workers}, queue_size={queue_size}", fix="use workers >= 1 and queue_size >= 0")
        self.capacity = workers + queue_size
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="msnet-infer")
        self._busy = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    @property
    def busy(self) -> int:
        """Jobs running or waiting."""
        return self._busy

    def full(self) -> bool:
        return self._busy >= self.capacity

    def submit(self, fn: Callable[[], Any], cleanup: Callable[[], None] | None = None) -> Future | None:
        """Queue ``fn``; None when the pool is full. ``cleanup`` runs once the job is over (run or cancelled)."""
        with self._lock:
            if self._busy >= self.capacity:
                return None
            self._busy += 1
        fut = self._executor.submit(fn)

        def done(_: Future) -> None:
            try:
                if cleanup is not None:
                    cleanup()
            finally:
                with self._lock:
                    self._busy -= 1
                    self._idle.notify_all()

        fut.add_done_callback(done)
        return fut

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job runs or waits (True) or the timeout passes (False)."""
        with self._lock:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------ uploads


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


async def receive_upload(request: Request, dest: Path, settings: ServiceSettings) -> tuple[list[Path], str | None]:
    """Stream a multipart body into ``dest``: (saved ``file`` parts, ``study_id`` field); 413 past the limit."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"upload of {int(declared) >> 20} MiB is over the limit of {settings.max_upload_mb:g} MiB")
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise HTTPException(422, "send the study as multipart/form-data in the field `file`")

    saved: list[Path] = []
    state: dict[str, Any] = {"headers": {}, "field": b"", "value": b"", "out": None, "name": None}
    study_id = bytearray()

    def on_part_begin() -> None:
        state["headers"] = {}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        state["name"] = name
        if name == "file" and b"filename" in disp:
            if len(saved) >= settings.max_files:
                raise HTTPException(413, f"more than {settings.max_files} files in one upload")
            path = dest / _safe_name(disp[b"filename"].decode("utf-8", "replace"), len(saved))
            saved.append(path)
            state["out"] = open(path, "wb", buffering=_CHUNK_WRITE)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["out"] is not None:
            state["out"].write(data[start:end])
        elif state["name"] == "study_id" and len(study_id) < 256:
            study_id.extend(data[start:end][: 256 - len(study_id)])

    def on_part_end() -> None:
        if state["out"] is not None:
            state["out"].close()
            state["out"] = None

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end})
    received = 0
    try:
        async for chunk in request.stream():
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
        if state["out"] is not None:
            state["out"].close()
    return saved, study_id.decode("utf-8", "replace") or None


def locate_study(files: list[Path], work: Path, settings: ServiceSettings) -> Path:
    """The path to hand to the reader: an extracted zip, a NIfTI file or the folder of uploaded files."""
    from msnet.io.archives import ZipLimitError, safe_extract

    if not files:
        raise HTTPException(422, "no file in the form field `file`: send a .zip, a .nii/.nii.gz or DICOM files")
    zips = [f for f in files if f.name.lower().endswith(".zip") or (len(files) == 1 and _magic(f) == b"PK\x03\x04")]
    if zips and len(files) > 1:
        raise HTTPException(422, "a zip must be sent alone: send one .zip of the study, or its DICOM files")
    if zips:
        out = work / "study"
        out.mkdir()
        try:
            safe_extract(files[0], out, max_bytes=int(settings.max_unzipped_mb * (1 << 20)),
                         max_files=settings.max_files, max_ratio=settings.max_ratio)
        except ZipLimitError as exc:
            raise HTTPException(413, exc.problem) from exc
        except MsnetError as exc:
            raise HTTPException(422, exc.problem if exc.fix is None else f"{exc.problem}: {exc.fix}") from exc
        members = [p for p in out.rglob("*") if p.is_file() and "__MACOSX" not in p.parts and not p.name.startswith(".")]
        nifti = [p for p in members if p.name.lower().endswith(_NIFTI)]
        return nifti[0] if len(members) == 1 and nifti else out
    return files[0] if len(files) == 1 else files[0].parent


def _magic(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(4)


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _run_study(app_state: Any, files: list[Path], work: Path, study_id: str) -> dict:
    """Worker-thread job: unpack, read, predict, explain; images returned inline."""
    settings: ServiceSettings = app_state.settings
    study = locate_study(files, work, settings)
    try:
        prediction = app_state.predictor.predict(study, study_id=study_id, explain_dir=work / "explain",
                                                 top_k=settings.top_k)
    except MsnetError as exc:
        raise HTTPException(422, _public_message(exc, work)) from exc
    result = prediction.to_dict()
    result["viewer"] = _keep_for_viewer(app_state, prediction)
    paths = result.pop("explanation", None) or {}
    result["images"] = {k.removesuffix("_png"): _data_url(Path(v)) for k, v in paths.items() if k.endswith("_png")}
    return result


def _keep_for_viewer(app_state: Any, prediction: Any) -> dict | None:
    """Keep the finished study for the page's viewer; its description (with the token) or None."""
    kept = viewer.viewer_study(prediction, app_state.predictor)
    if kept is None or app_state.viewer.put(kept) is None:
        return None
    return viewer.describe(app_state.viewer, kept)


def _public_message(exc: MsnetError, work: Path) -> str:
    """The reader's message with the server's temp paths replaced by upload-relative names."""
    text = str(exc)
    for folder in (work / "upload", work / "study", work):
        text = text.replace(str(folder) + os.sep, "").replace(str(folder), "upload")
    return re.sub(r"\b\d{4}_(?=\S)", "", text)


# ------------------------------------------------------------------ app


def _check_key(request: Request) -> None:
    expected = request.app.state.settings.api_key
    if expected and not hmac.compare_digest(request.headers.get("x-api-key", "").encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong API key: send it in the X-API-Key header",
                            headers={"WWW-Authenticate": "X-API-Key"})


_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["file"],
            "properties": {
                "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                         "description": "a .zip of one DICOM study, a .nii/.nii.gz, or several DICOM files"},
                "study_id": {"type": "string", "description": "optional pseudonym echoed back (never a name or MRN)"},
            },
        }}},
    }
}
_ERRORS = {401: {"description": "API key missing or wrong"}, 413: {"description": "upload or unzipped study too large"},
           422: {"description": "not a readable study (the reader's message)"}, 503: {"description": "queue full"},
           504: {"description": "timed out"}}


def create_app(bundle: str | Path | None, settings: ServiceSettings | None = None, *, predictor: Any = None,
               **overrides: Any) -> FastAPI:
    """The FastAPI app for one bundle; ``overrides`` replace fields of ``settings``.

    e.g. app = create_app("runs/cpu/bundle", max_upload_mb=200, workers=2)
    """
    settings = replace(settings or ServiceSettings(), **overrides)
    if not settings.api_key and os.environ.get(API_KEY_ENV):
        settings = replace(settings, api_key=os.environ[API_KEY_ENV])
    if predictor is None:
        from msnet.inference.predictor import Predictor

        if bundle is None:
            raise MsnetError("no bundle given", fix="pass the bundle folder written by `msnet run` (RUN/bundle)")
        predictor = Predictor(bundle, device=settings.device)
    pool = InferencePool(settings.workers, settings.queue_size)
    store = viewer.ViewerStore(settings.viewer_studies, int(settings.viewer_mb * (1 << 20)), settings.viewer_ttl_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        sweeper = asyncio.create_task(viewer.sweep_forever(store, min(60.0, max(settings.viewer_ttl_s / 4, 1.0))))
        yield
        sweeper.cancel()
        store.clear()
        pool.shutdown()

    meta = getattr(predictor, "metadata", {}) or {}
    app = FastAPI(title="msnet", version=__version__, lifespan=lifespan,
                  description="Chest CT study -> COVID-19 / CAP / NORMAL with key slices. "
                              "**Research use only — not for diagnosis.**")
    app.state.settings, app.state.predictor, app.state.pool = settings, predictor, pool
    app.state.viewer = store
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

    @app.get("/health")
    def health() -> dict:
        """Service status, the model and its classes, and the limits in force."""
        return {"status": "ok", "model": meta.get("name", "msnet"), "classes": list(predictor.classes),
                "intended_use": meta.get("intended_use", "Research use only — not for diagnosis."),
                "auth_required": bool(settings.api_key), "max_upload_mb": settings.max_upload_mb,
                "workers": settings.workers, "busy": pool.busy, "capacity": pool.capacity,
                "timeout_s": settings.timeout_s}

    @app.post("/v1/predict", dependencies=[Depends(_check_key)], openapi_extra=_UPLOAD_SCHEMA, responses=_ERRORS)
    async def predict(request: Request) -> JSONResponse:
        """Diagnose one study: the prediction JSON plus `images` (Grad-CAM strip, slice-score curve) as data URLs
        and `viewer` (the token of the study kept for /v1/studies/..., or null)."""
        return await _predict(request)

    viewer.add_routes(app, _check_key)
    return app


async def _predict(request: Request) -> JSONResponse:
    state = request.app.state
    settings: ServiceSettings = state.settings
    pool: InferencePool = state.pool
    if pool.full():
        raise HTTPException(503, "all workers are busy and the queue is full: retry later", headers={"Retry-After": "5"})
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=UPLOAD_PREFIX, dir=settings.tmp_dir))
    handed_off = False
    study_id = "?"
    try:
        (work / "upload").mkdir()
        try:
            files, sid = await asyncio.wait_for(receive_upload(request, work / "upload", settings), settings.timeout_s)
        except asyncio.TimeoutError as exc:
            raise HTTPException(504, f"upload took longer than {settings.timeout_s:g} s") from exc
        study_id = clean_study_id(sid)
        fut = pool.submit(lambda: _run_study(state, files, work, study_id),
                          cleanup=lambda: shutil.rmtree(work, ignore_errors=True))
        if fut is None:
            raise HTTPException(503, "all workers are busy and the queue is full: retry later", headers={"Retry-After": "5"})
        handed_off = True
        remaining = max(settings.timeout_s - (time.perf_counter() - t0), 0.001)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(fut), remaining)
        except asyncio.TimeoutError as exc:
            raise HTTPException(504, f"the study was not analysed within {settings.timeout_s:g} s: "
                                     "retry later or ask for a longer --timeout") from exc
        except HTTPException:
            raise
        except Exception as exc:
            log.exception("study %s: inference failed", study_id)
            raise HTTPException(500, f"inference failed ({type(exc).__name__}); see the server log") from exc
        log.info("study %s: %s (%d slices) in %.2f s", study_id, result["prediction"], result["n_slices"],
                 time.perf_counter() - t0)
        return JSONResponse(result)
    except HTTPException as exc:
        log.info("study %s: refused with %d", study_id, exc.status_code)  # the detail may name uploaded files
        raise
    finally:
        if not handed_off:
            shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ serve


def is_exposed(host: str) -> bool:
    """True when ``host`` is not a loopback address.

    >>> is_exposed("127.0.0.1"), is_exposed("localhost"), is_exposed("0.0.0.0")
    (False, False, True)
    """
    if host in ("localhost", "ip6-localhost"):
        return False
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return True


def warn_if_exposed(host: str, api_key: str | None) -> bool:
    """Log a warning (and return True) when binding beyond loopback without an API key."""
    if is_exposed(host) and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can upload studies; "
                    "pass --api-key or set %s", host, API_KEY_ENV)
        return True
    return False


def serve(bundle: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_upload_mb: float = 1024.0, workers: int = 1, timeout_s: float = 300.0, queue_size: int = 16,
          device: str = "auto", log_level: str = "info", viewer_studies: int = 8, viewer_mb: float = 512.0,
          viewer_ttl_s: float = 1800.0) -> None:
    """Run the service with uvicorn until interrupted (``msnet serve``).

    e.g. serve("runs/cpu/bundle", port=8000)
    """
    import uvicorn

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    warn_if_exposed(host, api_key)
    settings = ServiceSettings(api_key=api_key, max_upload_mb=max_upload_mb, workers=workers,
                               timeout_s=timeout_s, queue_size=queue_size, device=device)
    settings = replace(settings, viewer_studies=viewer_studies, viewer_mb=viewer_mb, viewer_ttl_s=viewer_ttl_s)
    app = create_app(bundle, settings)
    log.info("msnet service on http://%s:%d (workers %d, queue %d, upload limit %g MiB)", host, port, workers,
             queue_size, max_upload_mb)
    uvicorn.run(app, host=host, port=port, log_level=log_level, limit_concurrency=settings.capacity + 32,
                timeout_graceful_shutdown=5)
