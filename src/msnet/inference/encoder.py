"""The one path from slices to features: :class:`SliceEncoder`.

``msnet extract`` (the features MS-Net is trained on), :class:`~msnet.inference.predictor.Predictor`
(the features it is served), ``msnet export`` (parity and int8 checks), ``msnet bench`` and the
explanations all use it, so training and serving cannot drift apart (tests/test_encoder.py proves
the parity).

An encoder is a :class:`~msnet.preprocess.PreprocessSpec` + a device + a dtype + a backbone that runs
in PyTorch (eager or compiled) or in ONNX Runtime (fp32 or int8). Preprocessing of the next batch runs
in a worker thread while the backbone works on the current one; on CUDA it runs on the device.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from msnet.device import channels_last
from msnet.errors import MsnetError
from msnet.inference.onnx import (
    BACKBONE_INT8_ONNX,
    BACKBONE_ONNX,
    backbone_feed,
    calibration_slabs,
    export_backbone,
    ort_session,
    quantize_backbone,
)
from msnet.preprocess import PreprocessSpec, model_slices

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RUNTIMES = ("torch", "onnx")


class SliceEncoder:
    """Slices (l, H, W) of HU or grey levels -> features (l, d), float32 on the CPU.

    >>> from msnet.models.backbones import create
    >>> bb = create("resnet18")
    >>> enc = SliceEncoder(PreprocessSpec(size=64, mean=bb.data_config["mean"], std=bb.data_config["std"]), bb)
    >>> enc.encode(np.zeros((5, 32, 32), np.float32)).shape
    torch.Size([5, 512])
    """

    def __init__(self, spec: PreprocessSpec, backbone: nn.Module | None = None, *, device: str | torch.device = "cpu",
                 dtype: str = "float32", runtime: str = "torch", onnx_model: str | Path | None = None,
                 batch_size: int = 16, compile: bool = False, threads: int | None = None) -> None:
        if dtype not in DTYPES:
            raise MsnetError(f"unknown feature dtype {dtype!r}", fix=f"use one of: {', '.join(DTYPES)}")
        if runtime not in RUNTIMES:
            raise MsnetError(f"unknown runtime {runtime!r}", fix="use torch or onnx")
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        self.runtime = runtime
        self.batch_size = int(batch_size)
        self.backbone = backbone
        self._autocast = DTYPES[dtype] != torch.float32
        if runtime == "torch":
            if backbone is None:
                raise MsnetError("the torch runtime needs a backbone module")
            backbone.eval().to(self.device)
            if not getattr(backbone, "whole_study", False):  # 3-D (slab) weights have no channels-last layout
                backbone.to(memory_format=torch.channels_last)
            self._run: Callable[[torch.Tensor], torch.Tensor] = torch.compile(backbone) if compile else backbone
        else:

            if onnx_model is None:
                raise MsnetError("the onnx runtime needs an ONNX model", fix="run `msnet export BUNDLE --onnx OUT` first")
            self.onnx_model = Path(onnx_model)
            self._session = ort_session(self.onnx_model, threads)
            self._inputs = [i.name for i in self._session.get_inputs()]

    @property
    def num_features(self) -> int:
        if self.runtime == "onnx":
            return int(self._session.get_outputs()[0].shape[-1])
        return int(self.backbone.num_features)

    @property
    def normalisation(self) -> tuple[float, float]:
        """The mean and standard deviation that normalise the first input channel."""
        return float(self.spec.mean[0]), float(self.spec.std[0])

    def to_onnx(self, folder: str | Path, int8: bool = False, calibration: np.ndarray | None = None,
                threads: int | None = None) -> "SliceEncoder":
        """The same encoder on ONNX Runtime: the backbone exported (and with ``int8`` statically quantised
        on ``calibration``, preprocessed input slices (n, 3, S, S)) into ``folder``."""

        if self.runtime != "torch":
            raise MsnetError("to_onnx needs a torch encoder")
        folder = Path(folder)
        fp32 = export_backbone(self.backbone, self.spec.size, folder / BACKBONE_ONNX)
        model = fp32
        if int8:
            if calibration is None or not len(calibration):
                raise MsnetError("int8 quantisation needs calibration slices")
            model = quantize_backbone(fp32, folder / BACKBONE_INT8_ONNX, calibration, *self.normalisation)
        return SliceEncoder(self.spec, runtime="onnx", onnx_model=model, batch_size=self.batch_size, threads=threads)

    def calibration_slices(self, volumes: list, n_slices: int = 96) -> np.ndarray:
        """Preprocessed slices (n, 3, S, S) spread evenly over ``volumes`` (CTVolume), for int8 calibration; for
        a slab network, slabs (m, 3, k, S, S) of k consecutive slices, about ``n_slices`` slices in all."""
        if getattr(self.backbone, "whole_study", False):

            k = int(self.backbone.model.k)
            return calibration_slabs(self.spec, volumes, max(2, -(-n_slices // k)), k)
        per = max(1, -(-n_slices // max(1, len(volumes))))
        out = []
        for vol in volumes:
            idx = np.unique(np.linspace(0, vol.n_slices - 1, min(per, vol.n_slices)).round().astype(int))
            out.append(self.spec.prepare(vol.hu[idx], vol.kind).numpy())
        return np.ascontiguousarray(np.concatenate(out)[:n_slices], dtype=np.float32)

    def describe(self) -> dict:
        """What produced the features (recorded next to cached features and in predictions)."""
        return {"runtime": self.runtime, "dtype": self.dtype, "device": self.device.type,
                "model": self.onnx_model.name if self.runtime == "onnx" else type(self.backbone).__name__,
                "preprocess": self.spec.to_dict()}

    def prepare(self, slices: np.ndarray | torch.Tensor, kind: str = "hu") -> torch.Tensor:
        """Backbone input (n, 3, S, S); on CUDA the windowing and resizing run on the device."""
        if self.device.type == "cuda" and isinstance(slices, np.ndarray):
            slices = torch.from_numpy(np.ascontiguousarray(slices)).to(self.device, non_blocking=True)
        return self.spec.prepare(slices, kind).contiguous()

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed input (n, 3, S, S) -> features (n, d), float32 on the CPU (the backbone alone)."""
        if self.runtime == "onnx":

            arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
            return torch.from_numpy(self._session.run(None, backbone_feed(self._inputs, arr, *self.normalisation))[0])
        x = channels_last(x, self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=DTYPES[self.dtype], enabled=self._autocast):
            return self._run(x).float().cpu()

    def batches(self, slices: np.ndarray, kind: str = "hu", timing: dict | None = None,
                ready: Callable[[int], None] | None = None) -> Iterator[torch.Tensor]:
        """Preprocessed batches, produced by a worker thread one step ahead of the consumer.

        ``ready(stop)``: called before slices ``[.., stop)`` are read; it blocks until they exist
        (slices still being decoded) or raises to end the batches."""
        q: queue.Queue = queue.Queue(maxsize=2)
        err: list[BaseException] = []
        stop = threading.Event()

        # a network that reads neighbouring slices together gets the study at once
        network = self.backbone if self.runtime == "torch" else self._session  # an ONNX slab network: SlabSession
        step = max(1, len(slices)) if getattr(network, "whole_study", False) else self.batch_size

        def work() -> None:
            try:
                for i in range(0, len(slices), step):
                    if stop.is_set():
                        return
                    if ready is not None:
                        ready(min(i + step, len(slices)))
                    t = time.perf_counter()
                    x = self.prepare(slices[i:i + step], kind)
                    if timing is not None:
                        timing["preprocess"] = timing.get("preprocess", 0.0) + time.perf_counter() - t
                    q.put(x)
            except BaseException as exc:  # surfaced in the consumer
                err.append(exc)
            finally:
                q.put(None)

        th = threading.Thread(target=work, daemon=True)
        th.start()
        try:
            while (x := q.get()) is not None:
                yield x
        finally:
            stop.set()
            while th.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    th.join(0.01)
        if err:
            raise err[0]

    def encode_volume(self, vol, timing: dict | None = None, lungs=None) -> torch.Tensor:
        """A CTVolume -> (l, d) features, with the spec's volume-level steps (the lung crop) applied."""

        return self.encode(model_slices(vol, self.spec, lungs), vol.kind, timing)

    def encode(self, slices: np.ndarray, kind: str = "hu", timing: dict | None = None,
               ready: Callable[[int], None] | None = None) -> torch.Tensor:
        """(l, H, W) slices -> (l, d) float32 features, preprocessing overlapped with the backbone;
        ``ready``: see :meth:`batches` (slices decoded while they are encoded)."""
        out = []
        for x in self.batches(slices, kind, timing, ready):
            t = time.perf_counter()
            out.append(self.embed(x))
            if timing is not None:
                timing["backbone"] = timing.get("backbone", 0.0) + time.perf_counter() - t
        if not out:
            raise MsnetError("no slices to encode")
        return torch.cat(out)
