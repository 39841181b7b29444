"""Stage 2: backbone features of every slice of every study, cached on disk.

Output: ``RUN/features/<set_id>/<study_id>.npy`` (l, d) float32 in canonical
slice order, ``manifest.csv`` (one row per study, with status/error) and
``meta.json``. The cache key of a study is backbone checkpoint hash +
preprocessing config + study content hash: changing any of them recomputes,
nothing else does.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from msnet import device as D
from msnet import preprocess as P
from msnet.files import write_csv_atomic
from msnet.config import Config, save_run_info
from msnet.files import atomic_path, atomic_write_text, file_hash
from msnet.errors import MsnetError

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
    return None, f"{b.name}|pretrained={b.pretrained}|weights={file_hash(weights) if weights else ''}"


def feature_set_id(backbone_key: str, preprocess: dict) -> str:
    blob = json.dumps({"backbone": backbone_key, "preprocess": preprocess}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_backbone(cfg: Config, device: torch.device) -> nn.Module:
    from msnet.models.backbones import create
    from msnet.stages.finetune import load_slice_classifier

    ckpt, _ = backbone_source(cfg)
    if ckpt is not None:
        return load_slice_classifier(ckpt, device).backbone.eval()
    b = cfg.backbone
    return create(b.name, pretrained=b.pretrained, weights=cfg.resolve(b.weights) if b.weights else None).to(device).eval()


def feature_dir(cfg: Config) -> Path:
    """Folder of the feature set the config describes (stage 3 reads it)."""
    _, key = backbone_source(cfg)
    return cfg.run_path / "features" / feature_set_id(key, asdict(cfg.preprocess))


@torch.inference_mode()
def volume_features(
    backbone: nn.Module,
    slices: np.ndarray,
    kind: str,
    windows,
    size: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    channels_last: bool = True,
) -> np.ndarray:
    """(l, H, W) HU or grey slices -> (l, d) float32 pooled backbone features."""
    cfg = backbone.data_config
    feats = []
    for i in range(0, len(slices), batch_size):
        x = P.prepare(slices[i : i + batch_size], kind, windows, size, cfg["mean"], cfg["std"]).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats.append(backbone(x).float().cpu())
    return torch.cat(feats).numpy().astype(np.float32)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, arr)


def read_manifest(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write_manifest(path: Path, rows: list[dict]) -> None:
    write_csv_atomic(path, MANIFEST_FIELDS, rows)


def extract(cfg: Config, overwrite: bool = False, strict: bool = False) -> ExtractReport:
    """Run stage 2 for every study of the cohort; resumable, per-study errors recorded."""
    from rich.progress import Progress

    from msnet.data.cohorts import read_cohort
    from msnet.device import pick_device
    from msnet.io import read_study

    rank, world = D.init_from_env()
    if not cfg.data.cohort:
        raise MsnetError("the config names no data.cohort", fix="run `msnet index ROOT -o OUT` and set data.cohort")
    rows = read_cohort(cfg.resolve(cfg.data.cohort))
    _, key = backbone_source(cfg)
    set_id = feature_set_id(key, asdict(cfg.preprocess))
    out = cfg.run_path / "features" / set_id
    out.mkdir(parents=True, exist_ok=True)
    if D.is_main():
        save_run_info(cfg, out, "extract")
    previous = {r["patient_id"]: r for r in read_manifest(out / "manifest.csv")}
    device = pick_device(cfg.device)
    backbone = None
    report = ExtractReport(out)
    mine = rows[rank::world]
    done: list[dict] = []
    with Progress(disable=not D.is_main(), transient=True) as progress:
        task = progress.add_task("extracting features", total=len(mine))
        for r in mine:
            pid = r["patient_id"]
            rec = {k: r.get(k, "") for k in ("patient_id", "label", "subset", "path")}
            rec.update(file=f"{pid}.npy", status="ok", error="")
            try:
                if r.get("status", "ok") not in ("", "ok"):
                    raise MsnetError(f"study was marked failed by the index: {r.get('error', '')}", path=r["path"])
                shash = study_hash(r["path"])
                prev = previous.get(pid)
                if (
                    not overwrite
                    and prev
                    and prev.get("status") == "ok"
                    and prev.get("study_hash") == shash
                    and (out / rec["file"]).is_file()
                ):
                    rec.update(n_slices=prev["n_slices"], study_hash=shash)
                    report.n_cached += 1
                else:
                    if backbone is None:
                        backbone = load_backbone(cfg, device)
                        if cfg.extract.channels_last:
                            backbone = backbone.to(memory_format=torch.channels_last)
                    vol = read_study(r["path"], study_id=pid)
                    feats = volume_features(
                        backbone, vol.hu, vol.kind, cfg.preprocess.windows, cfg.preprocess.size,
                        cfg.extract.batch_size, device, cfg.extract.channels_last,
                    )
                    _save_npy(out / rec["file"], feats)
                    rec.update(n_slices=vol.n_slices, study_hash=shash)
                report.n_ok += 1
            except MsnetError as exc:
                if strict:
                    raise
                rec.update(status="failed", error=str(exc), n_slices="", study_hash="")
                report.n_failed += 1
                report.failures.append(f"{pid}: {exc}")
                log.error("%s: %s", pid, exc)
            done.append(rec)
            progress.advance(task)
    if world > 1:
        _write_manifest(out / f"manifest.rank{rank}.csv", done)
        D.barrier()
        if D.is_main():
            done = []
            for k in range(world):
                part = out / f"manifest.rank{k}.csv"
                done += read_manifest(part)
                part.unlink()
            order = {r["patient_id"]: i for i, r in enumerate(rows)}
            done.sort(key=lambda r: order[r["patient_id"]])
            report.n_ok = sum(r["status"] == "ok" for r in done)
            report.n_failed = len(done) - report.n_ok
        D.barrier()
    if D.is_main():
        _write_manifest(out / "manifest.csv", done)
        dim = next((int(np.load(out / r["file"], mmap_mode="r").shape[1]) for r in done if r["status"] == "ok"), None)
        meta = {
            "set_id": set_id,
            "backbone": cfg.backbone.name,
            "backbone_key": key,
            "preprocess": asdict(cfg.preprocess),
            "classes": list(cfg.data.classes),
            "n_features": dim,
            "n_studies": len(done),
        }
        atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
        atomic_write_text(cfg.run_path / "features" / "latest.json", json.dumps({"set_id": set_id}))
    return report
