"""HTTP service behind `msnet serve BUNDLE`: a JSON API and a web page that diagnose one uploaded study.

Routes::

    GET  /            the web page (static/index.html)
    GET  /health      status, model name, classes, limits
    POST /v1/predict  multipart field ``file``: a .zip of a DICOM study, a .nii/.nii.gz, or several
                      DICOM files (the field repeated); optional fields ``study_id`` (a pseudonym) and
                      ``series`` (a SeriesInstanceUID or an index, for a study of several series)
    GET  /docs        OpenAPI documentation (Swagger UI served from the installed package: works offline)
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
logged. A study over the read limits (slice size, voxels, NIfTI compression ratio; see
:class:`msnet.io.ReadLimits`) answers 413; a volume that fails the sanity checks (NaN, constant,
not HU) 422, and so does a study of a kind the model does not take (2-D pictures for a model trained on HU
volumes: the message says what it takes, as /health and the page do). An upload that stalls for ``read_timeout_s`` answers 408. Slow or idle
connections are handled in :mod:`msnet.service.connections` (header deadline, room-making
eviction, /health never refused).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from msnet import __version__
from msnet.errors import LimitError, MsnetError
from msnet.gates import KINDS
from msnet.inference.predictor import Predictor
from msnet.io import read_limits, set_read_limits
from msnet.service import viewer
from msnet.service.connections import ConnectionGuard, OverloadMiddleware
from msnet.service.settings import ServiceSettings
from msnet.service.uploads import clean_study_id, locate_study, receive_upload

__all__ = ["ServiceSettings", "InferencePool", "create_app", "make_server", "serve", "clean_study_id",
           "locate_study", "receive_upload", "is_exposed", "warn_if_exposed"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
UPLOAD_PREFIX = "msnet-upload-"
API_KEY_ENV = "MSNET_API_KEY"


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


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _run_study(app_state: Any, files: list[Path], work: Path, study_id: str, series: str | None = None) -> dict:
    """Worker-thread job: unpack, read (the ``series`` asked for, if any), predict, explain; images returned inline."""
    settings: ServiceSettings = app_state.settings
    study = locate_study(files, work, settings)
    try:
        prediction = app_state.predictor.predict(study, study_id=study_id, explain_dir=work / "explain",
                                                 top_k=settings.top_k, **({"series": series} if series else {}))
    except LimitError as exc:
        raise HTTPException(413, _public_message(exc, work)) from exc
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
                "series": {"type": "string", "description": "optional: the series to read (a SeriesInstanceUID or "
                           "an index), for a study of several series"},
            },
        }}},
    }
}
_ERRORS = {401: {"description": "API key missing or wrong"},
           408: {"description": "the upload stalled (no data for read_timeout_s)"},
           413: {"description": "upload, unzipped study or decoded volume over a limit"},
           422: {"description": "not a readable study, or a volume that fails the sanity checks (the reader's message)"},
           503: {"description": "queue full or too many connections; retry after the Retry-After header's seconds"},
           504: {"description": "timed out"}}


def create_app(bundle: str | Path | None, settings: ServiceSettings | None = None, *, predictor: Any = None,
               **overrides: Any) -> FastAPI:
    """The FastAPI app for one bundle; ``overrides`` replace fields of ``settings``.

    e.g. app = create_app("runs/cpu/bundle", max_upload_mb=200, workers=2)
    """

    settings = replace(settings or ServiceSettings(), **overrides)
    if not settings.api_key and os.environ.get(API_KEY_ENV):
        settings = replace(settings, api_key=os.environ[API_KEY_ENV])
    _apply_read_limits(settings)
    if predictor is None:

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
    app = FastAPI(title="msnet", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Chest CT study -> COVID-19 / CAP / NORMAL with key slices. "
                              "**Research use only — not for diagnosis.**")
    guard = ConnectionGuard(settings.max_connections, settings.header_timeout_s)
    app.add_middleware(OverloadMiddleware, guard=guard)
    app.state.settings, app.state.predictor, app.state.pool, app.state.guard = settings, predictor, pool, guard
    app.state.viewer = store
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _mount_docs(app)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

    @app.get("/health")
    def health() -> dict:
        """Service status, the model and its classes, the input it takes, and the limits in force."""
        return {"status": "ok", "model": meta.get("name", "msnet"), "classes": list(predictor.classes),
                "takes": KINDS.get(getattr(getattr(predictor, "spec", None), "kind", "hu"), KINDS["hu"]),
                "intended_use": meta.get("intended_use", "Research use only — not for diagnosis."),
                "auth_required": bool(settings.api_key), "max_upload_mb": settings.max_upload_mb,
                "workers": settings.workers, "busy": pool.busy, "capacity": pool.capacity,
                "timeout_s": settings.timeout_s, "connections": guard.stats()}

    @app.post("/v1/predict", dependencies=[Depends(_check_key)], openapi_extra=_UPLOAD_SCHEMA, responses=_ERRORS)
    async def predict(request: Request) -> JSONResponse:
        """Diagnose one study: the prediction JSON plus `images` (Grad-CAM strip, slice-score curve) as data URLs
        and `viewer` (the token of the study kept for /v1/studies/..., or null)."""
        return await _predict(request)

    viewer.add_routes(app, _check_key)
    return app


def _apply_read_limits(settings: ServiceSettings) -> None:
    """The read limits of the settings, for every read in this process (one service per process)."""

    given = {k: getattr(settings, k) for k in ("max_slice_pixels", "max_voxels", "max_compression_ratio")
             if getattr(settings, k) is not None}
    if given:
        set_read_limits(replace(read_limits(), **given))


def _mount_docs(app: FastAPI) -> None:
    """/docs: Swagger UI from the swagger-ui-bundle package's files, so it works without a network."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse

    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # the page says so instead of loading a CDN
        swagger_ui_path = None
    if swagger_ui_path:
        app.mount("/docs-static", StaticFiles(directory=swagger_ui_path), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        if not swagger_ui_path:
            return HTMLResponse("<p>Install swagger-ui-bundle for this page; the API is described at "
                                "<a href='/openapi.json'>/openapi.json</a>.</p>")
        return get_swagger_ui_html(openapi_url="/openapi.json", title="msnet API",
                                   swagger_js_url="/docs-static/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-static/swagger-ui.css",
                                   swagger_favicon_url="/docs-static/favicon-32x32.png")


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
            files, sid, series = await asyncio.wait_for(receive_upload(request, work / "upload", settings),
                                                        settings.timeout_s)
        except asyncio.TimeoutError as exc:
            raise HTTPException(504, f"upload took longer than {settings.timeout_s:g} s") from exc
        study_id = clean_study_id(sid)
        fut = pool.submit(lambda: _run_study(state, files, work, study_id, series),
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


class HideViewerTokens(logging.Filter):
    """Access-log filter: a viewer token in a logged path becomes ``<token>`` (the token is the key to a
    study's images; a log must not hand it on).

    >>> import logging
    >>> r = logging.LogRecord("uvicorn.access", 20, "", 0, '%s - "%s %s HTTP/%s" %d',
    ...                       ("127.0.0.1:5", "GET", "/v1/studies/AbC_1-x/slices/3.png?window=lung", "1.1", 200), None)
    >>> HideViewerTokens().filter(r), r.getMessage()
    (True, '127.0.0.1:5 - "GET /v1/studies/<token>/slices/3.png?window=lung HTTP/1.1" 200')
    """

    _TOKEN = re.compile(r"(/v1/studies/)[^/?#\s]+")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._TOKEN.sub(r"\1<token>", a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = self._TOKEN.sub(r"\1<token>", record.msg)
        return True


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """The uvicorn server for ``app`` with the guarded protocol (header deadline, connection limit); its
    access log never shows a viewer token (:class:`HideViewerTokens`).

    e.g. make_server(create_app("runs/cpu/bundle"), port=8000).run()
    """
    import uvicorn

    guard = app.state.guard
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=guard.protocol_class(),
                            limit_concurrency=None, timeout_keep_alive=5, timeout_graceful_shutdown=5)
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, HideViewerTokens) for f in access.filters):
        access.addFilter(HideViewerTokens())
    return uvicorn.Server(config)


def serve(bundle: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_upload_mb: float = 1024.0, workers: int = 1, timeout_s: float = 300.0, queue_size: int = 16,
          device: str = "auto", log_level: str = "info", **limits: Any) -> None:
    """Run the service with uvicorn until interrupted (``msnet serve``); ``limits`` are further
    :class:`ServiceSettings` fields (header_timeout_s, read_timeout_s, max_connections, read limits,
    viewer_studies, viewer_mb, viewer_ttl_s).

    e.g. serve("runs/cpu/bundle", port=8000)
    """
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    warn_if_exposed(host, api_key)
    settings = ServiceSettings(api_key=api_key, max_upload_mb=max_upload_mb, workers=workers,
                               timeout_s=timeout_s, queue_size=queue_size, device=device, **limits)
    app = create_app(bundle, settings)
    log.info("msnet service on http://%s:%d (workers %d, queue %d, upload limit %g MiB, %d connections, "
             "header timeout %g s)", host, port, workers, queue_size, max_upload_mb, settings.max_connections,
             settings.header_timeout_s)
    make_server(app, host, port, log_level).run()
