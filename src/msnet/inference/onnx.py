"""ONNX Runtime sessions, ONNX export of a backbone, static int8 quantisation, and where a bundle's
ONNX models are (``msnet export``, :mod:`msnet.inference.export`, writes them).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from msnet.errors import MsnetError
from msnet.models.astra import slab_layout
from msnet.models.backbones import export_onnx, lung_weights

log = logging.getLogger(__name__)

BACKBONE_ONNX = "backbone.onnx"
AGGREGATOR_ONNX = "aggregator.onnx"
BACKBONE_INT8_ONNX = "backbone_int8.onnx"
LUNG_INPUT = "lung_weights"


# ------------------------------------------------------------------ sessions


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
        raise MsnetError("onnxruntime is not installed", fix="pip install onnxruntime") from exc
    return ort


def ort_session(path: str | Path, threads: int | None = None, spinning: bool | None = None):
    """An ONNX Runtime CPU session: all graph optimisations, ``threads`` intra-op threads (default torch's).

    Spinning of idle worker threads is off by default (``MSNET_ORT_SPINNING=1`` turns it on): the
    preprocessing thread and PyTorch's own pool share the cores, and spinning threads starve them.

    e.g. s = ort_session("bundle/onnx/backbone.onnx")
    """
    ort = _ort()
    path = Path(path)
    if not path.is_file():
        raise MsnetError("ONNX model not found", path, "run `msnet export BUNDLE --onnx OUT` first")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.enable_mem_pattern = False  # ~30 % less peak memory with varying batch sizes, same speed
    if spinning is None:
        spinning = os.environ.get("MSNET_ORT_SPINNING", "0") == "1"
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    slab = session.get_modelmeta().custom_metadata_map.get(SLAB_KEY)
    if slab:  # an exported slab network: takes slices through SlabSession
        return SlabSession(session, *(int(v) for v in slab.split(",")))
    return session


ONNX_RECORD = "onnx.json"


def find_onnx(bundle: str | Path, onnx_dir: str | Path | None = None, int8: bool = False) -> Path:
    """The backbone ONNX model for a bundle: in ``onnx_dir`` when given, else where ``msnet export``
    recorded it (``BUNDLE/onnx.json``), else ``BUNDLE/onnx/``; a clear error naming where it looked."""
    bundle = Path(bundle)
    name = BACKBONE_INT8_ONNX if int8 else BACKBONE_ONNX
    places = []
    if onnx_dir is not None:
        places.append(Path(onnx_dir))
    else:
        record = bundle / ONNX_RECORD
        if record.is_file():
            try:
                places.append(Path(json.loads(record.read_text())["out"]))
            except (ValueError, KeyError, OSError):
                pass
        places += [bundle / "onnx", bundle]
    for folder in places:
        if (folder / name).is_file():
            return folder / name
    looked = " and ".join(str(p) for p in dict.fromkeys(places))
    fix = (f"run `msnet export {bundle} --onnx DIR{' --int8' if int8 else ''}` first, or pass --onnx-dir DIR")
    raise MsnetError(f"no {name} found (looked in {looked})", bundle, fix)


class _LungPooled(torch.nn.Module):
    """A backbone that pools inside the lungs, with the lung weights as a second input."""

    def __init__(self, backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor, lungs: torch.Tensor) -> torch.Tensor:
        return self.backbone.pool(self.backbone.forward_maps(images), lungs=lungs)


def export_backbone(backbone, size: int, path: str | Path) -> Path:
    """A backbone as ONNX: images (n, 3, size, size) -> features (n, d), dynamic n; a copy in fp32 is
    exported, the module itself is left as it was. A slab network: :func:`export_slab_backbone`. A backbone that pools inside the lungs
    (``pool_lungs``) takes the images' lung weights (n, 1, size, size) as a second input,
    ``LUNG_INPUT``: the classical lung segmentation runs outside the graph (:func:`backbone_feed`)."""
    import copy

    if getattr(backbone, "whole_study", False):
        return export_slab_backbone(backbone, size, path)
    module = copy.deepcopy(backbone).cpu().to(memory_format=torch.contiguous_format).float().eval()
    if getattr(backbone, "pool_lungs", False):
        return export_onnx(_LungPooled(module).eval(), (torch.randn(2, 3, size, size), torch.ones(2, 1, size, size)),
                           path, ["images", LUNG_INPUT], ["features"],
                           {"images": {0: "batch"}, LUNG_INPUT: {0: "batch"}, "features": {0: "batch"}})
    return export_onnx(module, (torch.randn(2, 3, size, size),), path, ["images"], ["features"],
                       {"images": {0: "batch"}, "features": {0: "batch"}})


SLAB_KEY = "msnet_slab"
"""Metadata key of an exported slab network: "k,stride,chunk" (:class:`SlabSession` reads it)."""


class _SlabPooled(torch.nn.Module):
    def __init__(self, net) -> None:
        super().__init__()
        self.net = net

    def forward(self, slabs: torch.Tensor) -> torch.Tensor:
        return self.net.pool_slabs(slabs)


def export_slab_backbone(backbone, size: int, path: str | Path) -> Path:
    """A slab backbone (``astra_slab``) as ONNX: the 3-D network on slabs of a fixed length k,
    ``slabs`` (m, 3, k, size, size) -> features (m, d), dynamic m. Laying a study's slices out as slabs
    and giving each slice its nearest slab's features stay outside the graph (plain indexing):
    :func:`ort_session` wraps such a model in a :class:`SlabSession`, which takes slices as the
    other backbones' models do. k, the stride and the chunk are written into the model's metadata."""
    import copy

    import onnx

    net = copy.deepcopy(backbone.model).cpu().float().eval()
    path = export_onnx(_SlabPooled(net).eval(), (torch.rand(2, 3, net.k, size, size),), path, ["slabs"], ["features"],
                       {"slabs": {0: "slabs"}, "features": {0: "slabs"}})
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {SLAB_KEY: f"{net.k},{net.stride},{net.chunk}"})
    onnx.save(model, str(path))
    return path


class SlabSession:
    """An ONNX Runtime session of an exported slab network that takes a study's preprocessed slices
    (n, 3, S, S), in order, as input ``images``, like the exported 2-D backbones: the slices laid out as
    slabs (:func:`msnet.models.astra.slab_layout`), ``chunk`` slabs a run, each slice given its nearest
    slab's features. ``whole_study``: the encoder feeds it a study at once."""

    whole_study = True

    def __init__(self, session, k: int, stride: int, chunk: int) -> None:
        self.session, self.k, self.stride, self.chunk = session, int(k), int(stride), max(1, int(chunk))
        self._input = session.get_inputs()[0]

    def get_inputs(self) -> list:
        from types import SimpleNamespace

        shape = self._input.shape
        return [SimpleNamespace(name="images", shape=[shape[0], shape[1], shape[3], shape[4]], type=self._input.type)]

    def get_outputs(self) -> list:
        return self.session.get_outputs()

    def get_modelmeta(self):
        return self.session.get_modelmeta()

    def slab_input(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slabs (m, 3, k, S, S), nearest slab of each slice (n,)) of preprocessed slices."""

        slabs, nearest = slab_layout(torch.from_numpy(np.ascontiguousarray(images)), self.k, self.stride)
        return np.ascontiguousarray(slabs.numpy(), dtype=np.float32), nearest.numpy()

    def run(self, output_names, feed: dict) -> list[np.ndarray]:
        slabs, nearest = self.slab_input(feed["images"])
        name = self._input.name
        pooled = np.concatenate([self.session.run(output_names, {name: slabs[i:i + self.chunk]})[0]
                                 for i in range(0, len(slabs), self.chunk)])
        return [pooled[nearest]]


def backbone_feed(names: list[str], images: np.ndarray, mean: float, std: float) -> dict[str, np.ndarray]:
    """The inputs of an exported backbone whose inputs are ``names``: the normalised ``images``
    (n, 3, S, S) and, where it pools inside the lungs, their lung weights
    (:func:`msnet.models.backbones.lung_weights`, by the first channel's ``mean`` and ``std``)."""
    feed = {names[0]: images}
    if LUNG_INPUT in names:

        feed[LUNG_INPUT] = lung_weights(torch.from_numpy(images), mean, std).numpy()
    return feed


def quantize_backbone(fp32: Path, out: Path, calibration: np.ndarray, mean: float, std: float,
                      batch: int = 8) -> Path:
    """Static int8 quantisation (QDQ, per-channel weights, MinMax calibration) of a backbone ONNX model
    on ``calibration``, preprocessed slices (n, 3, S, S) normalised by ``mean`` and ``std``; for an
    exported slab network, slabs (m, 3, k, S, S) of consecutive slices (:func:`calibration_slabs`).
    The slab network's metadata is carried over."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = onnx.load(str(fp32))
    names = [i.name for i in source.graph.input]  # the images (and the lung weights), or the slabs
    props = {p.key: p.value for p in source.metadata_props}
    if SLAB_KEY in props and calibration.ndim != 5:
        raise MsnetError("a slab network is calibrated on slabs (m, 3, k, S, S) of consecutive slices",
                         fix="pass calibration_slabs(...) as the calibration")
    if SLAB_KEY in props:
        batch = max(1, batch // 4)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = (backbone_feed(names, calibration[i:i + batch], mean, std)
                            for i in range(0, len(calibration), batch))

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="msnet-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        except Exception as exc:  # pre-processing is an optimisation only
            log.warning("quantisation pre-processing skipped (%s)", exc)
            shutil.copyfile(fp32, pre)
        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.WARNING))  # the quantiser logs one INFO line per tensor
        try:
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            extra_options={"CalibTensorRangeSymmetric": False})
        finally:
            root.setLevel(level)
    if props:
        model = onnx.load(str(out))
        onnx.helper.set_model_props(model, props)
        onnx.save(model, str(out))
    return out


def calibration_slabs(spec, volumes: list, n_slabs: int, k: int) -> np.ndarray:
    """Slabs (m, 3, k, S, S) of ``k`` consecutive preprocessed slices, laid out as the slab network takes
    them, spread evenly over ``volumes`` (CTVolume): int8 calibration of an exported slab network."""

    per = max(1, -(-n_slabs // max(1, len(volumes))))
    out = []
    for vol in volumes:
        for start in np.unique(np.linspace(0, max(0, vol.n_slices - k), per).round().astype(int)):
            x = spec.prepare(vol.hu[start:start + k], vol.kind)
            out.append(slab_layout(x, k, k)[0][:1].numpy())  # one slab of these k slices
    return np.ascontiguousarray(np.concatenate(out)[:n_slabs], dtype=np.float32)


