"""Diagnosis: :class:`Predictor` turns a study into a :class:`Prediction`.

A Predictor is a bundle's :class:`~msnet.inference.encoder.SliceEncoder` (slices -> features) plus its
aggregator (features -> logits and slice scores, one pass). Its output is one type, emitted alike by
``msnet predict --json``, the HTTP service and ``predictions.csv``; docs/prediction.schema.json
is its JSON Schema.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from msnet.errors import MsnetError
from msnet.inference.bundle import Bundle, read_bundle
from msnet.inference.encoder import SliceEncoder
from msnet.io import open_study

log = logging.getLogger(__name__)

TIMING_KEYS = ("read", "preprocess", "backbone", "aggregate", "total")


def _timing() -> dict[str, float]:
    return {k: 0.0 for k in TIMING_KEYS}


@dataclass
class Prediction:
    """One study's diagnosis (see docs/prediction.schema.json)."""

    study_id: str
    prediction: str
    probabilities: dict[str, float]
    n_slices: int
    key_slices: list[dict]
    slice_scores: list[float]
    timing_s: dict[str, float]
    warnings: list[str]
    model: dict
    explanation: dict | None = None
    ood_score: float | None = None
    """How far the study's slice features lie from the training features (msnet.inference.ood; None: the
    bundle has no description of them)."""
    ood_percentile: float | None = None
    """Percent of the training studies that score at or below ``ood_score``."""
    extra: dict = field(default_factory=dict, repr=False)
    """Not serialised: in-process results for callers that need them (e.g. features)."""

    def to_dict(self) -> dict:
        """The JSON object of docs/prediction.schema.json: the schema's fields only, copied as plain JSON
        values. ``extra`` (the volume, its DICOM header, the features) is never touched: a deep copy of it
        (``dataclasses.asdict``) cost a copy of the HU volume per study, and pydicom re-validated the header
        on the way, printing its values (UIDs) to the log."""
        d = {f.name: _plain(getattr(self, f.name), f.name) for f in fields(self) if f.name != "extra"}
        if d.get("explanation") is None:
            d.pop("explanation", None)
        return d

    @staticmethod
    def csv_header(classes: list[str]) -> list[str]:
        return ["study_id", "prediction", *[f"p_{c}" for c in classes], "n_slices", "key_slices", "total_s",
                "warnings"]

    def csv_row(self, classes: list[str]) -> list:
        return [self.study_id, self.prediction, *[self.probabilities[c] for c in classes], self.n_slices,
                " ".join(str(k["slice_index"]) for k in self.key_slices), f"{self.timing_s['total']:.3f}",
                " | ".join(self.warnings)]


def _plain(value, where: str):
    """A copy of ``value`` made of JSON types only (dict, list, str, int, float, bool, None); anything else
    (an array, a tensor, a DICOM element) is a programming error, never serialised by accident."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    raise TypeError(f"Prediction.{where} holds a {type(value).__name__}, which is not a JSON value")


def read_volume(study: str | Path, study_id: str | None = None, series: str | int | None = None):
    """A study (folder, file, .zip or DICOMweb study URL; :func:`msnet.io.open_study`) ->
    (:class:`~msnet.io.CTVolume`, seconds). ``series``: a SeriesInstanceUID or an index."""
    t0 = time.perf_counter()
    vol = open_study(study, series=series, study_id=study_id)
    return vol, time.perf_counter() - t0


def gate(vol) -> tuple[list[str], object]:
    """The checks before any diagnosis: NaN, constant or impossible HU and no lungs are refused
    (MsnetError); returns their warnings and the lung stats (None for grey-level images)."""
    from msnet.io import check_volume, rescale_hint
    from msnet.preprocess import check_lungs

    warnings = list(check_volume(replace(vol, warnings=[])).warnings)
    try:
        lungs = check_lungs(vol)
    except MsnetError as exc:  # no lungs in a volume without air: most often a missing RescaleIntercept
        hint = rescale_hint(vol)
        if hint is None:
            raise
        raise MsnetError(exc.problem, exc.path or vol.source, f"{hint}; otherwise {exc.fix}") from exc
    if lungs is not None:
        warnings += lungs.warnings
    return warnings, lungs


KEY_SLICE_GAP_MM = 10.0
"""Default least distance along z between two key slices (non-maximum suppression)."""


def pick_key_slices(scores: np.ndarray, top_k: int = 5, z_mm: np.ndarray | None = None,
                    min_gap_mm: float = KEY_SLICE_GAP_MM) -> np.ndarray:
    """Key slices: the highest-scoring slices, each at least ``min_gap_mm`` along z from every key slice
    chosen before it (greedy non-maximum suppression), so that they show different parts of the lungs
    rather than one finding five times. A slice with score 0 is never one; at least one is returned.
    ``z_mm``: the slices' positions (None, e.g. for grey-level image folders: no suppression).

    >>> pick_key_slices(np.array([0.1, 0.9, 1.0, 0.8, 0.0, 0.5]), 3, z_mm=np.array([0, -2, -4, -6, -8, -10.0]),
    ...                 min_gap_mm=4)
    array([2, 5, 0])
    """
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    want = max(1, min(int(top_k), int((scores > 0).sum())))
    if z_mm is None or len(z_mm) != len(scores) or not np.all(np.isfinite(z_mm)) or min_gap_mm <= 0:
        return order[:want]
    z = np.asarray(z_mm, dtype=np.float64)
    chosen: list[int] = []
    for i in order:
        if len(chosen) == want or (chosen and scores[i] <= 0):
            break
        if all(abs(z[i] - z[j]) >= min_gap_mm - 1e-6 for j in chosen):
            chosen.append(int(i))
    return np.asarray(chosen, dtype=np.int64)


class _Mirrored:
    """Slices flipped left-right, batch by batch as the encoder asks for them (no copy of the volume)."""

    def __init__(self, slices) -> None:
        self.slices = slices

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index):
        return np.ascontiguousarray(np.asarray(self.slices[index])[..., ::-1])


class _StreamEnded(Exception):
    """The streamed read ended before every slice was decoded (the read's result says why)."""


class Predictor:
    """Diagnose studies with a bundle.

    ``mirror`` (the default): every study is also seen flipped left-right and the two answers are
    averaged (probabilities and slice scores), so a scan and its mirror image get the same diagnosis;
    it costs a second backbone pass.

    e.g. p = Predictor("runs/cpu/bundle")
    e.g. p.predict("study_folder").prediction
    'COVID-19'
    """

    def __init__(self, bundle: str | Path | Bundle, device: str = "auto", runtime: str = "torch",
                 batch_size: int = 16, threads: int | None = None, compile: bool = False, int8: bool = False,
                 onnx_dir: str | Path | None = None, dtype: str | None = None, stream: bool = True, strict: bool = False,
                 key_slice_gap_mm: float = KEY_SLICE_GAP_MM, mirror: bool = True, series: str | int | None = None) -> None:
        from msnet.device import pick_device


        self.stream = bool(stream)
        self.strict = bool(strict)  # refuse a study whose OOD score is over the bundle's threshold
        self.mirror = bool(mirror)
        self.series = series  # the series to read of every study (a UID or an index); None: the rule of msnet.io
        self.key_slice_gap_mm = float(key_slice_gap_mm)
        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device(device)
        self.bundle = bundle if isinstance(bundle, Bundle) else read_bundle(bundle, self.device)
        self.classes = self.bundle.classes
        self.spec = self.bundle.spec
        self.aggregator = self.bundle.aggregator.to(self.device).eval()
        self.head = self.bundle.head
        onnx_model = None
        if runtime == "onnx":
            from msnet.inference.onnx import find_onnx

            onnx_model = find_onnx(self.bundle.path, onnx_dir, int8=int8)
        self.encoder = SliceEncoder(self.spec, self.bundle.backbone, device=self.device,
                                    dtype=dtype or self.bundle.feature_dtype, runtime=runtime,
                                    onnx_model=onnx_model, batch_size=batch_size, compile=compile, threads=threads)
        self.model_info = {"name": self.bundle.name, "bundle_sha256": self.bundle.sha256[:16],
                           "msnet_version": str(self.bundle.info["aggregator"].get("msnet_version", "")),
                           "runtime": runtime + ("-int8" if int8 and runtime == "onnx" else "")}

    @property
    def metadata(self) -> dict:
        return self.bundle.metadata

    @property
    def batch_size(self) -> int:
        return self.encoder.batch_size

    def with_encoder(self, encoder: SliceEncoder) -> "Predictor":
        """The same bundle and aggregator behind another encoder (e.g. ONNX int8 to compare against torch)."""
        other = object.__new__(Predictor)
        other.__dict__.update(self.__dict__)
        other.encoder = encoder
        other.model_info = {**self.model_info, "runtime": encoder.runtime}
        return other

    def features(self, hu: np.ndarray, kind: str = "hu", timing: dict | None = None) -> torch.Tensor:
        """(l, H, W) slices -> (l, d) features (what ``msnet extract`` caches for the same study)."""
        return self.encoder.encode(hu, kind, timing)

    def read(self, study: str | Path, study_id: str | None = None, series: str | int | None = None):
        """One study (folder, file, .zip or DICOMweb study URL) read to a :class:`~msnet.io.CTVolume`:
        (volume, seconds). Thread-safe: :func:`~msnet.inference.batch.predict_many` reads the next
        study this way while the model works on the current one."""
        return read_volume(study, study_id, self.series if series is None else series)

    def predict(self, study: str | Path, study_id: str | None = None, explain_dir: Path | None = None,
                top_k: int = 5, series: str | int | None = None) -> Prediction:
        """One study (folder, file, .zip or DICOMweb study URL) -> :class:`Prediction`; the volume read
        stays in ``prediction.extra["volume"]`` for callers that write results back as DICOM.

        Streamed (the default, ``stream=True``, unless the bundle crops to the lungs, which needs the
        whole volume first): the backbone starts on the first decoded slices while the rest are
        decoded; the checks and the lung gate run once the read is done, and their verdict comes
        before any answer (a refused study is refused as without streaming)."""
        series = self.series if series is None else series
        if self.stream and not self.spec.lung_crop:
            return self._predict_streamed(study, study_id, explain_dir, top_k, series)
        vol, read_s = self.read(study, study_id, series)
        return self.predict_read(vol, read_s, explain_dir=explain_dir, top_k=top_k)

    def _predict_streamed(self, study, study_id, explain_dir, top_k, series=None) -> Prediction:
        from msnet.io import StudyStream

        t0 = time.perf_counter()
        timing = _timing()

        def read() -> tuple:
            vol, read_s = read_volume(study, study_id, series)
            return vol, read_s, gate(vol)

        feats = None
        with StudyStream(read) as st:
            progress = st.started()
            if progress is not None:
                def ready(stop: int) -> None:
                    if progress.wait(stop) < stop or st.failed():
                        raise _StreamEnded

                try:
                    feats = self.encoder.encode(progress.hu, "hu", timing, ready=ready)
                except _StreamEnded:  # the read's result says why; the volume read is encoded below
                    pass
                except Exception:
                    st.close()  # the read's own error, if any, is the one to report
                    if not st.failed():
                        raise
            vol, read_s, checked = st.result()  # a refused study stops here, whatever the features
            if feats is not None and not st.rows_match(vol.hu):
                feats = None  # a file failed to decode, or was decoded again: encode the volume read
        timing["read"] = read_s
        result = self.predict_volume(vol, timing, explain_dir=explain_dir, top_k=top_k, checked=checked,
                                     feats=feats)
        result.timing_s["total"] = time.perf_counter() - t0
        return result

    def predict_read(self, vol, read_s: float, explain_dir: Path | None = None, top_k: int = 5,
                     checked: tuple | None = None) -> Prediction:
        """A volume :meth:`read` returned -> :class:`Prediction`, its read time counted in."""
        timing = _timing()
        timing["read"] = read_s
        result = self.predict_volume(vol, timing, explain_dir=explain_dir, top_k=top_k, checked=checked)
        result.timing_s["total"] = read_s + result.timing_s["total"]
        return result

    def predict_volume(self, vol, timing: dict | None = None, explain_dir: Path | None = None,
                       top_k: int = 5, checked: tuple | None = None, feats: torch.Tensor | None = None) -> Prediction:
        """A read :class:`~msnet.io.CTVolume` -> :class:`Prediction` (the volume is not changed).

        ``checked``: what :func:`gate` returned for this very volume (a reader process ran it), so it
        is not run again. ``feats``: the encoder's features of ``vol.hu`` (computed while it was
        decoded), with ``checked``; only for a bundle that does not crop to the lungs."""
        from msnet.gates import check_input_kind
        from msnet.preprocess import model_slices

        timing = dict(timing or _timing())
        t0 = time.perf_counter()
        warnings = list(vol.warnings)
        if self.metadata.get("warning"):
            warnings.insert(0, self.metadata["warning"])
        warnings += check_input_kind(vol, self.spec.kind)  # an HU model refuses pictures, before any work
        if feats is not None:
            if checked is None or self.spec.lung_crop or len(feats) != vol.n_slices:
                raise ValueError("feats need checked, a bundle without lung crop, and one row per slice")
            new_warnings, lungs = checked
            slices = vol.hu
        elif checked is None and self.device.type == "cuda" and not self.spec.lung_crop:
            # the checks run on the host while the GPU works: their verdict is awaited before any answer
            with ThreadPoolExecutor(1, thread_name_prefix="msnet-gate") as pool:
                pending = pool.submit(gate, vol)
                slices = vol.hu
                feats = self.encoder.encode(slices, vol.kind, timing)
                new_warnings, lungs = pending.result()
        else:
            new_warnings, lungs = checked if checked is not None else gate(vol)
            slices = model_slices(vol, self.spec, lungs)
            feats = self.encoder.encode(slices, vol.kind, timing)
        warnings += [w for w in new_warnings if w not in warnings]
        if not torch.isfinite(feats).all():
            raise MsnetError("the backbone produced non-finite features", vol.source,
                             "check the study's pixel values (msnet inspect)")
        ood_score, ood_percentile = self._ood(vol, feats, warnings)
        t = time.perf_counter()
        logits, scores = self._aggregate(feats)
        timing["aggregate"] = time.perf_counter() - t
        probs = torch.softmax(logits / self.bundle.temperature, dim=0).numpy().astype(np.float64)
        if self.mirror:  # pneumonia has no side: the study and its mirror image count alike
            feats_m = self.encoder.encode(_Mirrored(slices), vol.kind, timing)
            t = time.perf_counter()
            logits_m, scores_m = self._aggregate(feats_m)
            timing["aggregate"] += time.perf_counter() - t
            probs = (probs + torch.softmax(logits_m / self.bundle.temperature, dim=0).numpy().astype(np.float64)) / 2
            scores = (scores + scores_m) / 2
        pred = int(probs.argmax())
        if scores.max() > 0:
            scores = scores / scores.max()
        # key slices: the highest-scoring ones, spread along z; a slice that drove nothing (score 0) is never one
        z = np.asarray(vol.z_mm, dtype=np.float64) if vol.kind == "hu" and len(vol.z_mm) == len(scores) else None
        order = pick_key_slices(scores, top_k, z, self.key_slice_gap_mm)
        timing["total"] = time.perf_counter() - t0
        result = Prediction(
            study_id=vol.study_id, prediction=self.classes[pred],
            probabilities={c: round(float(p), 6) for c, p in zip(self.classes, probs)},
            n_slices=vol.n_slices,
            key_slices=[{"slice_index": int(i), "score": round(float(scores[i]), 6)} for i in order],
            slice_scores=[round(float(s), 6) for s in scores], timing_s=timing, warnings=warnings,
            model=dict(self.model_info), extra={"features": feats, "volume": vol},
            ood_score=ood_score, ood_percentile=ood_percentile,
        )
        if explain_dir is not None:
            from msnet.inference.explain import explain

            t = time.perf_counter()
            seen = vol if slices is vol.hu else replace(vol, hu=slices)  # what the model saw
            result.explanation = explain(self, seen, feats, pred, scores, order, Path(explain_dir))
            result.explanation["seconds"] = round(time.perf_counter() - t, 3)
        return result

    def _ood(self, vol, feats: torch.Tensor, warnings: list[str]) -> tuple[float | None, float | None]:
        """(OOD score, percentile) of a study's features; over the threshold: a warning, or with ``strict``
        a refusal (MsnetError)."""
        desc = self.bundle.ood
        if desc is None:
            return None, None
        score = desc.score(feats)
        pct = desc.percentile(score)
        if score > desc.threshold:
            said = (f"out of distribution: the study's slice features score {score:.3g} against the training "
                    f"data (threshold {desc.threshold:.3g}, above {pct:.0f}% of the training studies): it is "
                    "unlike anything the model was trained on, so its answer means little")
            if self.strict:
                raise MsnetError(f"study {vol.study_id}: {said}; refused (--strict)", vol.source,
                                 "check that it is a chest CT like the training data (msnet inspect), or drop --strict")
            warnings.append(said)
        return round(float(score), 6), pct

    def _aggregate(self, feats: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Logits (k,) and slice scores (l,) from one aggregator pass."""
        from msnet.models.aggregators import logits_and_scores

        logits, scores = logits_and_scores(self.aggregator, feats[None].to(self.device))
        return logits[0].float().cpu(), scores[0].float().cpu().numpy()
