"""Stage 2: backbone features of every slice of every study, cached on disk.

Output: ``RUN/features/<set_id>/<study_id>.npy`` (l, d) float32 in canonical
slice order, ``manifest.csv`` (one row per study, with status/error) and
``meta.json``. The cache key of a study is backbone checkpoint hash +
preprocessing config + study content hash: changing any of them recomputes,
nothing else does.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from msnet import device as D
from msnet import preprocess as P
from msnet.config import Config, save_run_info
from msnet.data.cohorts import read_cohort
from msnet.device import pick_device
from msnet.errors import MsnetError
from msnet.files import (
    atomic_path,
    atomic_write_text,
    file_hash,
    read_csv_rows,
    write_csv_atomic,
)
from msnet.inference.bundle import checkpoint_info, load_backbone
from msnet.inference.encoder import SliceEncoder
from msnet.io import read_study
from msnet.models.backbones import create
from msnet.progress import track
from msnet.stages.slice_model import spec_for

log = logging.getLogger(__name__)

MANIFEST_FIELDS = ["patient_id", "label", "subset", "path", "n_slices", "file", "study_hash", "status", "error"]


@dataclass
class ExtractReport:
    out_dir: Path
    n_ok: int = 0
    n_cached: int = 0
    n_failed: int = 0
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"features in {self.out_dir}: {self.n_ok} studies ok ({self.n_cached} reused), {self.n_failed} failed"
        return "\n".join([text] + [f"  failed: {f}" for f in self.failures])


def study_hash(path: str | Path) -> str:
    """sha256 over a study's files (relative names and bytes), independent of where it lies."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        h.update(file_hash(f).encode())
    return h.hexdigest()


def backbone_source(cfg: Config) -> tuple[Path | None, str]:
    """The backbone checkpoint stage 2 uses and its cache-key part."""
    if cfg.finetune.enabled:
        ckpt = cfg.run_path / "finetune" / "backbone.pt"
        if not ckpt.is_file():
            raise MsnetError("no fine-tuned backbone", path=ckpt, fix="run `msnet finetune CONFIG` first (or set finetune.enabled=false)")
        return ckpt, file_hash(ckpt)
    b = cfg.backbone
    weights = cfg.resolve(b.weights) if b.weights else None
    key = f"{b.name}|pretrained={b.pretrained}|weights={file_hash(weights) if weights else ''}"
    flags = "".join(f"|{k}" if on is True else f"|{k}={on}"  # |pool_lungs ... |slab=[8, 8]
                    for k, on in b.pooling().items() if k != "pool_stages" and on)
    return None, key + (f"|pool_stages={sorted(set(b.pool_stages))}" if b.pool_stages else "") + flags


def feature_set_id(backbone_key: str, spec: dict, dtype: str = "float32", runtime: str = "torch") -> str:
    key = {"backbone": backbone_key, "preprocess": spec, "dtype": dtype}
    if runtime != "torch":  # the torch set keeps the id it always had
        key["runtime"] = runtime
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def runtime_key(cfg: Config) -> str:
    """torch, onnx or onnx-int8: how the run's features are computed."""
    e = cfg.extract
    if e.runtime not in ("torch", "onnx"):
        raise MsnetError(f"unknown extract.runtime {e.runtime!r}", fix="use torch or onnx")
    if e.int8 and e.runtime != "onnx":
        raise MsnetError("extract.int8 needs extract.runtime=onnx", fix="--set extract.runtime=onnx")
    return "torch" if e.runtime == "torch" else ("onnx-int8" if e.int8 else "onnx")


INT8_CHECK_STUDIES = 8
"""Held-out studies whose int8 features are compared with fp32 (features, and after training the decisions)."""
INT8_REFERENCE = "int8_reference"


def onnx_encoder(cfg: Config, torch_encoder: SliceEncoder, rows: list[dict], folder: Path) -> tuple[SliceEncoder, dict]:
    """The run's encoder on ONNX Runtime. For int8: calibrated on training studies, then checked against
    fp32 on held-out studies (per-slice cosine of the features); refused below extract.int8_min_cosine.
    Their fp32 features are kept: ``msnet train`` then requires every aggregator's decisions on them to
    equal its decisions on their int8 features."""

    if not cfg.extract.int8:
        return torch_encoder.to_onnx(folder), {}
    ok = [r for r in rows if r.get("status", "ok") in ("", "ok")]
    train = [r for r in ok if r.get("subset", "train") in ("", "train")] or ok
    held = [r for r in ok if r.get("subset", "") not in ("", "train")] or ok[-max(1, len(ok) // 10):]

    def pick(rs: list[dict], k: int) -> list[dict]:  # k rows spread evenly
        return [rs[i] for i in np.unique(np.linspace(0, len(rs) - 1, min(k, len(rs))).round().astype(int))]

    calib = torch_encoder.calibration_slices([read_study(r["path"]) for r in pick(train, 12)], 96)
    q = torch_encoder.to_onnx(folder, int8=True, calibration=calib)
    cos, reference = [], []
    for r in pick(held, INT8_CHECK_STUDIES):
        vol = read_study(r["path"])
        a, b = torch_encoder.encode_volume(vol), q.encode_volume(vol)
        cos.append(torch.nn.functional.cosine_similarity(a, b, dim=1).numpy())
        # fp32 features kept, so that `msnet train` can check the aggregators' decisions on them too
        _save_npy(folder / INT8_REFERENCE / f"{r['patient_id']}.npy", a.numpy())
        reference.append(r["patient_id"])
    c = np.concatenate(cos)
    agreement = {"held_out_studies": len(cos), "slices": int(c.size), "cosine_min": float(c.min()),
                 "cosine_mean": float(c.mean()), "threshold": cfg.extract.int8_min_cosine,
                 "ok": bool(c.min() >= cfg.extract.int8_min_cosine),
                 "reference": {"folder": f"{folder.name}/{INT8_REFERENCE}", "patients": reference}}
    atomic_write_text(folder / "int8_agreement.json", json.dumps(agreement, indent=2))
    if not agreement["ok"]:
        raise MsnetError(f"int8 features disagree with fp32 (per-slice cosine down to {c.min():.4f}, "
                         f"threshold {cfg.extract.int8_min_cosine})", folder / "int8_agreement.json",
                         "extract with --set extract.int8=false (ONNX fp32) or the torch runtime")
    return q, agreement


def load_encoder(cfg: Config, device: torch.device | str = "cpu") -> SliceEncoder:
    """The run's SliceEncoder: the fine-tuned backbone (with its stored spec) or the configured one."""

    ckpt, _ = backbone_source(cfg)
    if ckpt is not None:
        backbone, _, spec, _ = load_backbone(ckpt, device)
    else:
        b = cfg.backbone
        backbone = create(b.name, pretrained=b.pretrained, weights=cfg.resolve(b.weights) if b.weights else None,
                          **b.pooling())
        spec = spec_for(cfg, backbone)
    return SliceEncoder(spec, backbone, device=device, dtype=cfg.extract.dtype, batch_size=cfg.extract.batch_size)


def run_spec(cfg: Config) -> P.PreprocessSpec:
    """The spec the run's features are made with, without loading weights."""

    ckpt, _ = backbone_source(cfg)
    if ckpt is None:
        return spec_for(cfg, create(cfg.backbone.name, pretrained=False))

    spec = P.PreprocessSpec.from_dict(checkpoint_info(ckpt)["preprocess"], str(ckpt))
    wanted = (tuple(tuple(float(v) for v in w) for w in cfg.preprocess.windows), int(cfg.preprocess.size))
    if (spec.windows, spec.size) != wanted:
        raise MsnetError(f"the fine-tuned backbone was trained with windows {list(map(list, spec.windows))} at "
                         f"{spec.size} px, the config asks for {list(map(list, wanted[0]))} at {wanted[1]} px", ckpt,
                         "fine-tune again with this preprocessing (`msnet finetune CONFIG --overwrite`) or restore "
                         "the config's preprocess section")
    return spec


def feature_dir(cfg: Config) -> Path:
    """Folder of the feature set the config describes (stage 3 reads it)."""
    _, key = backbone_source(cfg)
    return cfg.run_path / "features" / feature_set_id(key, run_spec(cfg).to_dict(), cfg.extract.dtype, runtime_key(cfg))


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, arr)


def _write_manifest(path: Path, rows: list[dict]) -> None:
    write_csv_atomic(path, MANIFEST_FIELDS, rows)


class _Extractor:
    """One study at a time: reuse its cached features when its content and the encoder are unchanged."""

    def __init__(self, cfg: Config, out: Path, overwrite: bool, rows: list[dict]) -> None:
        self.cfg, self.out, self.overwrite, self.rows = cfg, out, overwrite, rows
        self.previous = {r["patient_id"]: r for r in read_csv_rows(out / "manifest.csv")}
        self.device = pick_device(cfg.device)
        self.encoder: SliceEncoder | None = None
        self.int8_agreement: dict = {}

    def _encoder(self) -> SliceEncoder:
        if self.encoder is None:
            self.encoder = load_encoder(self.cfg, self.device)
            if self.cfg.extract.runtime == "onnx":
                self.encoder, self.int8_agreement = onnx_encoder(self.cfg, self.encoder, self.rows, self.out / "onnx")
        return self.encoder

    def __call__(self, row: dict, report: ExtractReport) -> dict:
        pid = row["patient_id"]
        rec = {k: row.get(k, "") for k in ("patient_id", "label", "subset", "path")}
        rec.update(file=f"{pid}.npy", status="ok", error="")
        if row.get("status", "ok") not in ("", "ok"):
            raise MsnetError(f"study was marked failed by the index: {row.get('error', '')}", path=row["path"])
        shash = study_hash(row["path"])
        prev = self.previous.get(pid) or {}
        if (not self.overwrite and prev.get("status") == "ok" and prev.get("study_hash") == shash
                and (self.out / rec["file"]).is_file()):
            report.n_cached += 1
            return {**rec, "n_slices": prev["n_slices"], "study_hash": shash}
        encoder = self._encoder()
        vol = read_study(row["path"], study_id=pid)
        _save_npy(self.out / rec["file"], encoder.encode_volume(vol).numpy())
        return {**rec, "n_slices": vol.n_slices, "study_hash": shash}


def _gather_ranks(out: Path, done: list[dict], rows: list[dict], rank: int, world: int) -> list[dict]:
    """torchrun: every rank writes its part of the manifest; rank 0 merges them in cohort order."""
    _write_manifest(out / f"manifest.rank{rank}.csv", done)
    D.barrier()
    if D.is_main():
        done = []
        for k in range(world):
            part = out / f"manifest.rank{k}.csv"
            done += read_csv_rows(part)
            part.unlink()
        order = {r["patient_id"]: i for i, r in enumerate(rows)}
        done.sort(key=lambda r: order[r["patient_id"]])
    D.barrier()
    return done


def extract(cfg: Config, overwrite: bool = False, strict: bool = False) -> ExtractReport:
    """Run stage 2 for every study of the cohort; resumable, per-study errors recorded."""

    rank, world = D.init_from_env()
    if not cfg.data.cohort:
        raise MsnetError("the config names no data.cohort", fix="run `msnet index ROOT -o OUT` and set data.cohort")
    rows = read_cohort(cfg.resolve(cfg.data.cohort))
    _, key = backbone_source(cfg)
    spec = run_spec(cfg)
    set_id = feature_set_id(key, spec.to_dict(), cfg.extract.dtype, runtime_key(cfg))
    out = cfg.run_path / "features" / set_id
    out.mkdir(parents=True, exist_ok=True)
    if D.is_main():
        save_run_info(cfg, out, "extract")
    one = _Extractor(cfg, out, overwrite, rows)
    report = ExtractReport(out)
    done: list[dict] = []
    for r in track(rows[rank::world], "extracting features", unit="studies", enabled=D.is_main()):
        try:
            done.append(one(r, report))
        except MsnetError as exc:
            if strict:
                raise
            done.append({**{k: r.get(k, "") for k in ("patient_id", "label", "subset", "path")},
                         "file": f"{r['patient_id']}.npy", "status": "failed", "error": str(exc)})
            report.failures.append(str(exc))
            log.debug("%s", exc)  # listed once, in the report's summary
    if world > 1:
        done = _gather_ranks(out, done, rows, rank, world)
    report.n_ok = sum(r["status"] == "ok" for r in done)
    report.n_failed = len(done) - report.n_ok
    if D.is_main():
        previous_meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
        _write_manifest(out / "manifest.csv", done)
        dim = next((int(np.load(out / r["file"], mmap_mode="r").shape[1]) for r in done if r["status"] == "ok"), None)
        meta = {"set_id": set_id, "backbone": cfg.backbone.name, "backbone_key": key, "preprocess": spec.to_dict(),
                "feature_dtype": cfg.extract.dtype, "runtime": runtime_key(cfg),
                "encoder": one.encoder.describe() if one.encoder else previous_meta.get("encoder"),
                "int8_agreement": one.int8_agreement or previous_meta.get("int8_agreement"),
                "classes": list(cfg.data.classes), "n_features": dim, "n_studies": len(done)}
        atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
        atomic_write_text(cfg.run_path / "features" / "latest.json", json.dumps({"set_id": set_id}))
    return report
