"""The web page's study viewer, server side: a finished study kept for a while, served as PNG slices.

After a prediction the service keeps what the viewer needs in a :class:`ViewerStore` under a random
token, returned in the predict answer as ``viewer.token``:

    GET /v1/studies/{token}                        slice count and size, pixel spacing, z (mm) per slice,
                                                   slice scores, key slices, window presets, the CAM class
    GET /v1/studies/{token}/slices/{i}.png?window=lung|mediastinum|as_read
                                                   slice i through a window, as an 8-bit PNG (never raw HU)
    GET /v1/studies/{token}/slices/{i}.png?level=L&width=W
                                                   the same through any window (HU studies; what the
                                                   page asks for while window/level is dragged)
    GET /v1/studies/{token}/cam/{i}.png            Grad-CAM of slice i for the predicted class, an RGBA
                                                   heat map of the slice's size (computed on demand,
                                                   in the inference pool, then cached)

What is kept per study: the slices as int16 HU (or uint8 grey levels), the backbone features, the
slice scores and the Grad-CAM maps computed so far (uint8, at the model's input size). Nothing from
the DICOM headers is kept. The store holds at most ``max_studies`` studies and ``max_bytes`` in all;
the least recently used study goes first, and every study goes ``ttl_s`` seconds after it was
stored (expired studies are swept on every access and by a periodic task of the app). A study larger
than the whole budget is not kept (``viewer`` is then null).

>>> store = ViewerStore(max_studies=2, max_bytes=1 << 20, ttl_s=60)
>>> store.get("no-such-token") is None
True
"""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import Response

from msnet import preprocess as P
from msnet.inference.explain import cam_rgba, study_cam, study_scale, weighted_cam

log = logging.getLogger(__name__)

PRESETS = {"lung": P.LUNG, "mediastinum": P.MEDIASTINUM}
"""Display windows (level, width) in HU; ``as_read`` is the bundle's own input window(s)."""
AS_READ = "as_read"
CUSTOM = "custom"
LEVEL_RANGE_HU, WIDTH_RANGE_HU = (-1500.0, 3000.0), (1.0, 4000.0)
"""Bounds of a free window (level, width) the page may ask for."""
_TOKEN_BYTES = 18
_OVERHEAD = 4096  # bookkeeping per study, counted in its size


@dataclass
class ViewerStudy:
    """What the viewer needs of one finished study (no header data, no file paths)."""

    study_id: str
    slices: np.ndarray  # (l, H, W): int16 HU, or uint8 grey levels for kind "grey"
    kind: str
    spacing_mm: tuple[float, float, float]
    z_mm: list[float] | None
    features: Any  # torch.Tensor (l, d), float32 on the CPU
    target: int  # class index the Grad-CAM maps are computed for (the predicted class)
    target_name: str
    slice_scores: list[float]
    key_slices: list[dict]
    cam_size: int
    cams: dict[int, np.ndarray] = field(default_factory=dict)
    cam_scale: float | None = None  # the study's one Grad-CAM scale (explain.study_scale over the key slices)
    lungs: Any = None  # the lungs' LungStats when the model crops to them (found on the first Grad-CAM)
    crop: tuple[int, int, int, int] | None = None  # then the crop box (row0, row1, col0, col1)
    crop_known: bool = False
    token: str = ""
    expires: float = 0.0

    @property
    def n_slices(self) -> int:
        return int(self.slices.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes this study may hold at most: slices, features and a Grad-CAM map for every slice."""
        feats = int(self.features.numel() * self.features.element_size())
        return int(self.slices.nbytes) + feats + self.n_slices * self.cam_size * self.cam_size + _OVERHEAD

    def windows(self) -> list[str]:
        return [*PRESETS, AS_READ] if self.kind == "hu" else [AS_READ]


class ViewerStore:
    """An LRU of finished studies, bounded in count, bytes and time; thread-safe.

    ``clock`` is injectable for tests (seconds, monotonic).
    """

    def __init__(self, max_studies: int, max_bytes: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_studies, self.max_bytes, self.ttl_s = int(max_studies), int(max_bytes), float(ttl_s)
        self._clock = clock
        self._items: OrderedDict[str, ViewerStudy] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_studies > 0 and self.max_bytes > 0 and self.ttl_s > 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._items.values())

    def put(self, study: ViewerStudy) -> str | None:
        """Keep ``study`` under a new random token (returned); None when it cannot be kept."""
        size = study.nbytes
        if not self.enabled or size > self.max_bytes:
            if self.enabled:
                log.info("study %s: not kept for the viewer (%.0f MiB, budget %.0f MiB)", study.study_id,
                         size / 2**20, self.max_bytes / 2**20)
            return None
        study.token = secrets.token_urlsafe(_TOKEN_BYTES)
        with self._lock:
            now = self._clock()
            self._sweep(now)
            used = sum(s.nbytes for s in self._items.values())
            while self._items and (len(self._items) >= self.max_studies or used + size > self.max_bytes):
                _, old = self._items.popitem(last=False)
                used -= old.nbytes
                log.info("study %s: dropped from the viewer (least recently used)", old.study_id)
            study.expires = now + self.ttl_s
            self._items[study.token] = study
        return study.token

    def get(self, token: str) -> ViewerStudy | None:
        """The study kept under ``token`` (now the most recently used), or None (unknown or expired)."""
        with self._lock:
            self._sweep(self._clock())
            study = self._items.get(token)
            if study is not None:
                self._items.move_to_end(token)
            return study

    def sweep(self) -> int:
        """Drop expired studies; returns how many went."""
        with self._lock:
            return self._sweep(self._clock())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def expires_in(self, study: ViewerStudy) -> float:
        return max(0.0, study.expires - self._clock())

    def _sweep(self, now: float) -> int:
        gone = [t for t, s in self._items.items() if s.expires <= now]
        for t in gone:
            log.debug("study %s: viewer copy expired", self._items[t].study_id)
            del self._items[t]
        return len(gone)


# ------------------------------------------------------------------ building and describing


def viewer_study(prediction: Any, predictor: Any) -> ViewerStudy | None:
    """What the viewer keeps of a finished :class:`~msnet.inference.predictor.Prediction`
    (its ``extra`` must hold the volume and the features); None when they are missing."""
    extra = getattr(prediction, "extra", None) or {}
    vol, feats = extra.get("volume"), extra.get("features")
    if vol is None or feats is None or vol.hu.ndim != 3:
        return None
    if vol.kind == "hu":
        slices = np.clip(np.rint(vol.hu), -32768, 32767).astype(np.int16)
    else:
        slices = np.clip(np.rint(vol.hu), 0, 255).astype(np.uint8)
    z = [round(float(v), 3) for v in vol.z_mm] if vol.kind == "hu" and len(vol.z_mm) == len(slices) else None
    if z is not None and not all(np.isfinite(z)):
        z = None
    classes = list(predictor.classes)
    return ViewerStudy(
        study_id=prediction.study_id, slices=slices, kind=vol.kind,
        spacing_mm=tuple(float(s) for s in vol.spacing_mm), z_mm=z,
        features=feats.detach().float().cpu().clone(), target=classes.index(prediction.prediction),
        target_name=prediction.prediction, slice_scores=list(prediction.slice_scores),
        key_slices=list(prediction.key_slices), cam_size=int(predictor.encoder.spec.size))


def describe(store: ViewerStore, study: ViewerStudy, full: bool = False) -> dict:
    """The JSON the page needs to show ``study`` (``full``: with the slice scores and key slices)."""
    out = {"token": study.token, "n_slices": study.n_slices, "width": int(study.slices.shape[2]),
           "height": int(study.slices.shape[1]),
           "pixel_spacing_mm": [study.spacing_mm[1], study.spacing_mm[2]], "z_mm": study.z_mm,
           "windows": study.windows(), "cam_class": study.target_name,
           "presets": {k: list(v) for k, v in PRESETS.items()} if study.kind == "hu" else {},
           "expires_in_s": round(store.expires_in(study), 1)}
    if full:
        out.update(study_id=study.study_id, slice_scores=study.slice_scores, key_slices=study.key_slices)
    return out


# ------------------------------------------------------------------ rendering


def _png(array: np.ndarray) -> bytes:
    """uint8 (H, W), (H, W, 3) or (H, W, 4) -> PNG bytes (no text chunks, no metadata)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def slice_png(study: ViewerStudy, index: int, window: str, spec: P.PreprocessSpec,
              level_width: tuple[float, float] | None = None) -> bytes:
    """Slice ``index`` through a display window as PNG: grey for one window, RGB for the model's three.

    ``as_read`` shows the slice through the bundle's own input window(s), as the model reads it
    (before resizing); grey-level studies have only ``as_read``. ``level_width``: any window (HU).
    """
    one = study.slices[index : index + 1]
    if level_width is not None:
        unit = P.to_unit(one, study.kind, [level_width])[0]
    elif window == AS_READ:
        unit = P.to_unit(one, study.kind, spec.windows)[0]
    else:
        unit = P.to_unit(one, study.kind, [PRESETS[window]])[0]
    img = (unit.numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    return _png(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))


def model_crop(study: ViewerStudy, spec: P.PreprocessSpec) -> tuple[int, int, int, int] | None:
    """The in-plane box the model saw of every slice (its lung crop), or None (the whole slice); cached."""
    if not study.crop_known:
        if getattr(spec, "lung_crop", False) and study.kind == "hu":
            z = np.asarray(study.z_mm, float) if study.z_mm is not None else None
            stats = P.lung_stats(study.slices.astype(np.float32), study.spacing_mm, z)
            # keep the box, not the mask: the crop needs nothing else
            study.lungs = replace(stats, mask=np.zeros((1, 1, 1), bool), slice_area_mm2=np.zeros(0, np.float32))
            study.crop = P.lung_box(study.lungs, study.slices.shape)
        study.crop_known = True
    return study.crop


def _weighted_cam(study: ViewerStudy, index: int, predictor: Any) -> np.ndarray:
    spec = predictor.encoder.spec
    one = study.slices[index : index + 1].astype(np.float32)
    if model_crop(study, spec) is not None:
        one = P.lung_crop(one, study.lungs)  # the same box as the model's (preprocess.model_slices)
    spacing = (study.spacing_mm[1], study.spacing_mm[2]) if study.kind == "hu" else None
    every = None
    if getattr(predictor.bundle.backbone, "whole_study", False):  # a slab's map needs the slice's neighbours
        every = study.slices.astype(np.float32)
        if study.crop is not None:
            every = P.lung_crop(every, study.lungs)
    return weighted_cam(predictor, one[0], study.kind, study.features, index, study.target,
                        float(study.slice_scores[index]), spacing, study=every)


def compute_cam(study: ViewerStudy, index: int, predictor: Any) -> np.ndarray:
    """Grad-CAM (cam_size, cam_size) uint8 of slice ``index`` for the study's predicted class, on the
    slice as the model saw it (lung crop included), on the study's one scale and inside the lungs, as in
    the key-slice strip (:mod:`msnet.inference.explain`); cached. The first map asked for also computes
    the key slices' maps, which set the scale."""

    cached = study.cams.get(index)
    if cached is not None:
        return cached

    def as_uint8(weighted: np.ndarray) -> np.ndarray:
        return (study_cam(weighted, study.cam_scale) * 255.0 + 0.5).astype(np.uint8)

    if study.cam_scale is None:
        keys = [int(k["slice_index"]) for k in study.key_slices] or [index]
        weighted = {k: _weighted_cam(study, k, predictor) for k in keys}
        study.cam_scale = study_scale(list(weighted.values()))
        for k, w in weighted.items():
            study.cams[k] = as_uint8(w)
        if index in study.cams:
            return study.cams[index]
    out = as_uint8(_weighted_cam(study, index, predictor))
    study.cams[index] = out
    return out


_JET: np.ndarray | None = None  # the overlay's 256 RGBA colours, made on first use


def cam_png(study: ViewerStudy, cam: np.ndarray) -> bytes:
    """A Grad-CAM map as an RGBA heat map of the slice's size: jet colours, opacity rising smoothly with
    the value (:func:`msnet.inference.explain.cam_rgba`, as in the key-slice strip)."""
    global _JET
    from PIL import Image

    if _JET is None:
        _JET = (cam_rgba(np.arange(256) / 255.0, opacity=1.0) * 255.0 + 0.5).astype(np.uint8)
    h, w = study.slices.shape[1:]
    if study.crop is None:
        big = np.asarray(Image.fromarray(cam).resize((w, h), Image.BILINEAR))
    else:  # the map covers the model's crop box only: put it back where the box lies in the slice
        r0, r1, c0, c1 = study.crop
        part = np.asarray(Image.fromarray(cam).resize((c1 - c0, r1 - r0), Image.BILINEAR))
        big = np.zeros((h, w), np.uint8)
        sr0, sr1, sc0, sc1 = max(0, r0), min(h, r1), max(0, c0), min(w, c1)
        big[sr0:sr1, sc0:sc1] = part[sr0 - r0 : sr1 - r0, sc0 - c0 : sc1 - c0]
    return _png(_JET[big])


# ------------------------------------------------------------------ routes


class PngResponse(Response):
    media_type = "image/png"


def _png_response(data: bytes, store: ViewerStore, study: ViewerStudy) -> PngResponse:
    return PngResponse(data, media_type="image/png", headers={
        "Cache-Control": f"private, max-age={int(store.expires_in(study))}", "X-Content-Type-Options": "nosniff"})


def add_routes(app: FastAPI, check_key: Callable) -> None:
    """Register the viewer's routes on ``app`` (whose state holds ``viewer``, ``predictor``, ``pool``)."""
    errors = {404: {"description": "unknown or expired token, or no such slice"},
              422: {"description": "unknown window"}, 503: {"description": "queue full"},
              504: {"description": "timed out"}}

    def find(request: Request, token: str, index: int | None = None) -> ViewerStudy:
        study = request.app.state.viewer.get(token)
        if study is None:
            raise HTTPException(404, "unknown or expired viewer token: analyse the study again "
                                     f"(studies are kept {request.app.state.viewer.ttl_s / 60:g} min at most)")
        if index is not None and not 0 <= index < study.n_slices:
            raise HTTPException(404, f"no slice {index}: the study has {study.n_slices} slices (0-{study.n_slices - 1})")
        return study

    @app.get("/v1/studies/{token}", dependencies=[Depends(check_key)], responses=errors, tags=["viewer"])
    def viewer_info(request: Request, token: str) -> dict:
        """A finished study kept for the viewer: size, z (mm) per slice, scores, key slices, windows."""
        return describe(request.app.state.viewer, find(request, token), full=True)

    @app.get("/v1/studies/{token}/slices/{index}.png", dependencies=[Depends(check_key)], responses=errors,
             response_class=PngResponse, tags=["viewer"])
    def viewer_slice(request: Request, token: str, index: int, window: str = "lung", level: float | None = None,
                     width: float | None = None):
        """Slice ``index`` (canonical order, head first) through a window preset, or through any window
        given as ``level`` and ``width`` in HU, as a PNG."""
        study = find(request, token, index)
        level_width = None
        if level is not None or width is not None:
            if study.kind != "hu" or level is None or width is None:
                raise HTTPException(422, "a free window needs both level and width, and a study in HU")
            if not (LEVEL_RANGE_HU[0] <= level <= LEVEL_RANGE_HU[1] and WIDTH_RANGE_HU[0] <= width <= WIDTH_RANGE_HU[1]):
                raise HTTPException(422, f"window out of range: level {LEVEL_RANGE_HU[0]:g} to {LEVEL_RANGE_HU[1]:g} HU, "
                                         f"width {WIDTH_RANGE_HU[0]:g} to {WIDTH_RANGE_HU[1]:g} HU")
            level_width = (float(level), float(width))
        elif window not in study.windows():
            raise HTTPException(422, f"unknown window {window!r} for this study: use one of {', '.join(study.windows())}")
        data = slice_png(study, index, window, request.app.state.predictor.encoder.spec, level_width)
        return _png_response(data, request.app.state.viewer, study)

    @app.get("/v1/studies/{token}/cam/{index}.png", dependencies=[Depends(check_key)], responses=errors,
             response_class=PngResponse, tags=["viewer"])
    async def viewer_cam(request: Request, token: str, index: int):
        """Grad-CAM of slice ``index`` for the predicted class: an RGBA heat map to lay over the slice."""
        state = request.app.state
        study = find(request, token, index)
        if index not in study.cams:
            fut = state.pool.submit(lambda: compute_cam(study, index, state.predictor))
            if fut is None:
                raise HTTPException(503, "all workers are busy and the queue is full: retry later",
                                    headers={"Retry-After": "5"})
            try:
                await asyncio.wait_for(asyncio.wrap_future(fut), state.settings.timeout_s)
            except asyncio.TimeoutError as exc:
                raise HTTPException(504, f"Grad-CAM took longer than {state.settings.timeout_s:g} s") from exc
            except Exception as exc:
                log.exception("study %s: Grad-CAM of slice %d failed", study.study_id, index)
                raise HTTPException(500, f"Grad-CAM failed ({type(exc).__name__}); see the server log") from exc
        data = await asyncio.to_thread(cam_png, study, compute_cam(study, index, state.predictor))
        return _png_response(data, state.viewer, study)


async def sweep_forever(store: ViewerStore, every_s: float) -> None:
    """Drop expired studies every ``every_s`` seconds (the app runs this while it lives)."""
    while True:
        await asyncio.sleep(every_s)
        gone = store.sweep()
        if gone:
            log.debug("viewer: %d expired studies dropped", gone)
