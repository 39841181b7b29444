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
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


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
    exported, the module itself is left as it was. A backbone that pools inside the lungs
    (``pool_lungs``) takes the images' lung weights (n, 1, size, size) as a second input,
    ``LUNG_INPUT``: the classical lung segmentation runs outside the graph (:func:`backbone_feed`)."""
    import copy

    from msnet.models.backbones import export_onnx

    if getattr(backbone, "whole_study", False):
        raise MsnetError(f"backbone {backbone.name!r} reads slabs of neighbouring slices; its ONNX export is not built",
                         fix="run it with the torch runtime, or train the bundle with a 2-D backbone (astra) to export it")
    module = copy.deepcopy(backbone).cpu().to(memory_format=torch.contiguous_format).float().eval()
    if getattr(backbone, "pool_lungs", False):
        return export_onnx(_LungPooled(module).eval(), (torch.randn(2, 3, size, size), torch.ones(2, 1, size, size)),
                           path, ["images", LUNG_INPUT], ["features"],
                           {"images": {0: "batch"}, LUNG_INPUT: {0: "batch"}, "features": {0: "batch"}})
    return export_onnx(module, (torch.randn(2, 3, size, size),), path, ["images"], ["features"],
                       {"images": {0: "batch"}, "features": {0: "batch"}})


def backbone_feed(names: list[str], images: np.ndarray, mean: float, std: float) -> dict[str, np.ndarray]:
    """The inputs of an exported backbone whose inputs are ``names``: the normalised ``images``
    (n, 3, S, S) and, where it pools inside the lungs, their lung weights
    (:func:`msnet.models.backbones.lung_weights`, by the first channel's ``mean`` and ``std``)."""
    feed = {names[0]: images}
    if LUNG_INPUT in names:
        from msnet.models.backbones import lung_weights

        feed[LUNG_INPUT] = lung_weights(torch.from_numpy(images), mean, std).numpy()
    return feed


def quantize_backbone(fp32: Path, out: Path, calibration: np.ndarray, mean: float, std: float,
                      batch: int = 8) -> Path:
    """Static int8 quantisation (QDQ, per-channel weights, MinMax calibration) of a backbone ONNX model
    on ``calibration``, preprocessed slices (n, 3, S, S) normalised by ``mean`` and ``std``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import onnx

    names = [i.name for i in onnx.load(str(fp32)).graph.input]  # the images (and the lung weights)

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
    return out


