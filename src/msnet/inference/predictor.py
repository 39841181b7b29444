"""Inference: the model bundle, :class:`Predictor`, key slices and Grad-CAM explanations.

A *bundle* is one folder holding everything `msnet predict` needs::

    bundle/metadata.json   model card: classes, windows, input, training data, metrics, intended use
    bundle/backbone.pt     slice backbone (+ its fine-tuned slice head), preprocessing
    bundle/aggregator.pt   MS-Net (or a baseline) weights and config
    bundle/config.yaml     the run's resolved config
    bundle/onnx/           optional ONNX models written by `msnet export`
"""

from __future__ import annotations

import json
import logging
import queue
import re
import shutil
import tempfile
import threading
import time
import zipfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from msnet import preprocess as P
from msnet.config import Config
from msnet.files import atomic_torch_save, atomic_write_text
from msnet.errors import MsnetError

log = logging.getLogger(__name__)

INTENDED_USE = (
    "Research use only. Not a medical device; not to be used for diagnosis or to guide "
    "patient care. Trained on the cohort described under training_data."
)


# ------------------------------------------------------------------ bundle


def build_bundle(cfg: Config, aggregator: str = "msnet", out: Path | None = None) -> Path:
    """Collect backbone, aggregator, config and a model card into ``RUN/bundle``."""
    import yaml

    from msnet.config import versions
    from msnet.stages.extract import backbone_source, feature_dir

    run = cfg.run_path
    out = Path(out) if out else run / "bundle"
    adir = run / "train" / aggregator
    candidates = [adir / "model.pt"] + sorted(adir.glob("model_fold*.pt"))
    agg_ckpt = next((p for p in candidates if p.is_file()), None)
    if agg_ckpt is None:
        raise MsnetError(f"no trained {aggregator!r} model", path=adir, fix="run `msnet train CONFIG` first")
    tmp = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None, prefix=".bundle."))
    try:
        ckpt_path, _ = backbone_source(cfg)
        if ckpt_path is not None:
            shutil.copyfile(ckpt_path, tmp / "backbone.pt")
        else:
            from msnet.stages.extract import load_backbone

            bb = load_backbone(cfg, torch.device("cpu"))
            atomic_torch_save(
                {"backbone": cfg.backbone.name, "backbone_state_dict": bb.state_dict(), "data_config": dict(bb.data_config),
                 "classes": list(cfg.data.classes), "preprocess": asdict(cfg.preprocess)},
                tmp / "backbone.pt",
            )
        shutil.copyfile(agg_ckpt, tmp / "aggregator.pt")
        (tmp / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
        metrics_file = run / "evaluate" / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        ft_file = run / "finetune" / "metrics.json"
        ft = json.loads(ft_file.read_text()) if ft_file.exists() else {}
        agg = torch.load(agg_ckpt, map_location="cpu", weights_only=False)
        by_agg = metrics.get("by_aggregator", {}).get(aggregator, metrics)
        fmeta_file = feature_dir(cfg) / "meta.json"
        fmeta = json.loads(fmeta_file.read_text()) if fmeta_file.exists() else {}
        card = {
            "name": f"msnet-{cfg.backbone.name}-{aggregator}",
            "task": "patient-level chest CT classification",
            "classes": list(cfg.data.classes),
            "input": {
                "modality": "CT",
                "format": "hounsfield",
                "slices": "axial, any count, canonical order superior to inferior",
                "windows_hu": [{"level": lv, "width": wd} for lv, wd in cfg.preprocess.windows],
                "channels": "one window replicated to three" if len(cfg.preprocess.windows) == 1 else "one window per channel",
                "size": cfg.preprocess.size,
            },
            "backbone": {"name": cfg.backbone.name, "fine_tuned": ckpt_path is not None, "n_features": agg["in_features"]},
            "aggregator": {"name": aggregator, "config": agg["config"], "fold": agg.get("fold", 0)},
            "training_data": {
                "cohort": str(cfg.resolve(cfg.data.cohort)) if cfg.data.cohort else "",
                "n_studies": fmeta.get("n_studies"),
                "feature_set": agg.get("feature_set"),
            },
            "metrics": {
                "patient_level_test": {k: by_agg.get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "sensitivity") if k in by_agg},
                "slice_level_val": {k: ft.get(k) for k in ("accuracy", "sensitivity") if k in ft},
            },
            "intended_use": INTENDED_USE,
            "versions": versions(),
        }
        (tmp / "metadata.json").write_text(json.dumps(card, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------ predictor


def _load_backbone_ckpt(path: Path):
    from msnet.models.backbones import SliceClassifier, create

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    backbone = create(ckpt["backbone"], pretrained=False)
    head = None
    if "state_dict" in ckpt:  # fine-tuned SliceClassifier
        clf = SliceClassifier(backbone, len(ckpt["classes"]))
        clf.load_state_dict(ckpt["state_dict"])
        head = clf.fc
    else:
        backbone.load_state_dict(ckpt["backbone_state_dict"])
    return ckpt, backbone.eval(), head


class Predictor:
    """Diagnose studies with a bundle.

    >>> p = Predictor("runs/cpu/bundle")  # doctest: +SKIP
    >>> p.predict("study_folder")["prediction"]  # doctest: +SKIP
    'COVID-19'
    """

    def __init__(self, bundle: str | Path, device: str = "auto", runtime: str = "torch",
                 batch_size: int = 16, threads: int | None = None, compile: bool = False, int8: bool = False):
        from msnet.models.aggregators import create
        from msnet.device import pick_device

        self.bundle = Path(bundle)
        if not (self.bundle / "metadata.json").is_file():
            raise MsnetError("not a model bundle (no metadata.json)", path=self.bundle,
                             fix="pass the bundle folder written by `msnet run` / `msnet train` (RUN/bundle)")
        if threads:
            torch.set_num_threads(threads)
        self.metadata = json.loads((self.bundle / "metadata.json").read_text())
        self.device = pick_device(device)
        self.runtime = runtime
        self.batch_size = batch_size
        ckpt, self.backbone, self.head = _load_backbone_ckpt(self.bundle / "backbone.pt")
        self.preprocess = ckpt["preprocess"]
        self.data_config = ckpt["data_config"]
        agg = torch.load(self.bundle / "aggregator.pt", map_location="cpu", weights_only=False)
        self.classes = list(agg["classes"])
        self.aggregator = create(agg["aggregator"], **agg["config"])
        self.aggregator.load_state_dict(agg["state_dict"])
        self.aggregator.eval()
        self.backbone.to(self.device)
        self.aggregator.to(self.device)
        self.autocast = self.device.type == "cuda"
        if self.device.type == "cuda" or runtime == "torch":
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self._backbone_fn = self._torch_backbone
        if compile:
            self._compiled = torch.compile(self.backbone)
            self._backbone_fn = self._compiled_backbone
        if runtime == "onnx":
            from msnet.inference.onnx import onnx_backbone_fn

            self._backbone_fn = onnx_backbone_fn(self.bundle, int8=int8)
        elif runtime != "torch":
            raise MsnetError(f"unknown runtime {runtime!r}", fix="use torch or onnx")

    # -- stages
    def _torch_backbone(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            return self.backbone(x).float().cpu()

    def _compiled_backbone(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            return self._compiled(x).float().cpu()

    def _batches(self, hu: np.ndarray, kind: str, timing: dict) -> Iterator[torch.Tensor]:
        """Preprocessed batches, produced by a worker thread one step ahead of the backbone."""
        q: queue.Queue = queue.Queue(maxsize=2)
        pp, size = self.preprocess, self.preprocess["size"]
        mean, std = self.data_config["mean"], self.data_config["std"]
        err: list[BaseException] = []

        def work():
            try:
                for i in range(0, len(hu), self.batch_size):
                    t = time.perf_counter()
                    chunk = hu[i : i + self.batch_size]
                    if self.device.type == "cuda":  # window + resize on the GPU: the CPU would be the bottleneck
                        chunk = torch.from_numpy(np.ascontiguousarray(chunk)).to(self.device, non_blocking=True)
                    x = P.prepare(chunk, kind, pp["windows"], size, mean, std).contiguous()
                    timing["preprocess"] += time.perf_counter() - t
                    q.put(x)
            except BaseException as exc:  # surfaced in the consumer
                err.append(exc)
            finally:
                q.put(None)

        th = threading.Thread(target=work, daemon=True)
        th.start()
        while (x := q.get()) is not None:
            yield x
        th.join()
        if err:
            raise err[0]

    @torch.inference_mode()
    def features(self, hu: np.ndarray, kind: str = "hu", timing: dict | None = None) -> torch.Tensor:
        """(l, H, W) slices -> (l, d) backbone features, preprocessing overlapped with the backbone."""
        timing = timing if timing is not None else {"preprocess": 0.0, "backbone": 0.0}
        out = []
        for x in self._batches(hu, kind, timing):
            t = time.perf_counter()
            out.append(self._backbone_fn(x))
            timing["backbone"] += time.perf_counter() - t
        return torch.cat(out)

    def predict(self, study: str | Path, study_id: str | None = None, explain_dir: Path | None = None, top_k: int = 5) -> dict:
        """One study -> the prediction object of DESIGN.md (plus `explanation` paths with `explain_dir`)."""
        from msnet.io import read_study
        from msnet.io.archives import open_study

        t0 = time.perf_counter()
        timing = {"read": 0.0, "preprocess": 0.0, "backbone": 0.0, "aggregate": 0.0, "total": 0.0}
        with open_study(study) as path:
            vol = read_study(path, study_id=study_id or Path(study).name.removesuffix(".zip"))
        timing["read"] = time.perf_counter() - t0
        result = self.predict_volume(vol, timing, explain_dir=explain_dir, top_k=top_k)
        # the diagnosis's own time; drawing explanations is reported under explanation.seconds
        timing["total"] = time.perf_counter() - t0 - result.get("explanation", {}).get("seconds", 0.0)
        return result

    def predict_volume(self, vol, timing: dict | None = None, explain_dir: Path | None = None, top_k: int = 5) -> dict:
        timing = timing or {"read": 0.0, "preprocess": 0.0, "backbone": 0.0, "aggregate": 0.0, "total": 0.0}
        t0 = time.perf_counter()
        if self.preprocess.get("windows") and vol.kind == "grey":
            vol.warnings.append("grey-level images, not HU: windowing skipped")
        feats = self.features(vol.hu, vol.kind, timing)
        t = time.perf_counter()
        with torch.inference_mode():
            x = feats[None].to(self.device)
            probs = torch.softmax(self.aggregator(x).float(), dim=1)[0].cpu().numpy()
            scores = self.aggregator.slice_scores(x)[0].float().cpu().numpy()
        timing["aggregate"] = time.perf_counter() - t
        if scores.max() > 0:
            scores = scores / scores.max()
        pred = int(probs.argmax())
        # key slices: the highest-scoring ones; a slice that drove nothing (score 0) is never one
        order = np.argsort(-scores, kind="stable")[: max(1, min(top_k, int((scores > 0).sum())))]
        result = {
            "study_id": vol.study_id,
            "prediction": self.classes[pred],
            "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, probs)},
            "n_slices": vol.n_slices,
            "key_slices": [{"slice_index": int(i), "score": round(float(scores[i]), 6)} for i in order],
            "timing_s": timing,
            "warnings": list(vol.warnings),
        }
        if timing.get("total", 0.0) == 0.0:
            timing["total"] = time.perf_counter() - t0
        result["slice_scores"] = [round(float(s), 6) for s in scores]
        if explain_dir is not None:
            from msnet.inference.explain import explain

            t = time.perf_counter()
            result["explanation"] = explain(self, vol, feats, pred, scores, order, Path(explain_dir))
            result["explanation"]["seconds"] = time.perf_counter() - t
        return result


def predict_many(bundle: Path, studies: list[Path], out: Path | None = None, explain_dir: Path | None = None,
                 runtime: str = "torch", device: str = "auto", int8: bool = False) -> tuple[list[dict], list[dict]]:
    """Predict every study; bad ones are recorded and skipped. Returns (results, status rows)."""
    import csv
    import io as _io

    from rich.progress import track

    predictor = Predictor(bundle, device=device, runtime=runtime, int8=int8)
    results, status = [], []
    for study in track(studies, description="predicting", transient=True, disable=len(studies) < 2):
        try:
            r = predictor.predict(study, explain_dir=explain_dir)
            r.pop("slice_scores", None)
            results.append(r)
            status.append({"study": str(study), "study_id": r["study_id"], "status": "ok", "error": ""})
        except MsnetError as exc:
            log.error("%s", exc)
            status.append({"study": str(study), "study_id": Path(study).name, "status": "failed", "error": str(exc)})
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        classes = predictor.classes
        buf = _io.StringIO()
        w = csv.writer(buf)
        w.writerow(["study_id", "prediction", *[f"p_{c}" for c in classes], "n_slices", "key_slices", "total_s"])
        for r in results:
            w.writerow([r["study_id"], r["prediction"], *[r["probabilities"][c] for c in classes], r["n_slices"],
                        " ".join(str(k["slice_index"]) for k in r["key_slices"]), f"{r['timing_s']['total']:.3f}"])
        atomic_write_text(out / "predictions.csv", buf.getvalue())
        buf = _io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["study", "study_id", "status", "error"])
        w.writeheader()
        w.writerows(status)
        atomic_write_text(out / "status.csv", buf.getvalue())
        atomic_write_text(out / "predictions.json", json.dumps(results, indent=2))
    return results, status
