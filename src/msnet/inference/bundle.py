"""Checkpoints and the model bundle: one writer, one reader, one schema.

A *bundle* is one folder holding everything ``msnet predict`` needs::

    bundle/metadata.json   model card (schema_version, classes, input, training data, metrics, intended use)
    bundle/backbone.pt     backbone weights (+ the fine-tuned slice head), the PreprocessSpec, classes
    bundle/aggregator.pt   MS-Net (or a baseline) weights and config, the PreprocessSpec of its features
    bundle/config.yaml     the run's resolved config
    bundle/ood.pt          the description of the training features the OOD score is measured against
    bundle/onnx/           optional ONNX models written by ``msnet export``

Checkpoints hold only tensors and plain values and are read with ``torch.load(weights_only=True)``: a
bundle cannot run code. The PreprocessSpec is stored with the backbone; the aggregator records the
spec of the features it was trained on, and :func:`read_bundle` refuses a bundle where the two differ.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from msnet import __version__
from msnet.config import pooling
from msnet.errors import MsnetError
from msnet.files import atomic_torch_save, file_hash, read_csv_rows, umask_mode
from msnet.inference.ood import FeatureDescription
from msnet.preprocess import PreprocessSpec

__all__ = ["Bundle", "FeatureDescription", "PreprocessSpec", "SCHEMA_VERSION", "checkpoint_info", "load_aggregator", "load_backbone",
           "model_card", "read_bundle", "save_aggregator", "save_backbone", "write_bundle"]

SCHEMA_VERSION = 1
SYNTHETIC_WARNING = ("this model was trained on synthetic phantoms only (msnet synth / msnet demo): its "
                     "answers on real CT mean nothing")
BACKBONE = "backbone.pt"
AGGREGATOR = "aggregator.pt"
CARD = "metadata.json"
OOD = "ood.pt"
INTENDED_USE = (
    "Research use only. Not a medical device; not to be used for diagnosis or to guide "
    "patient care. Trained on the cohort described under training_data."
)


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """A checkpoint as a dict, loaded without running code; a clear error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise MsnetError(f"{what} not found", path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MsnetError(f"cannot load {what} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})", path,
                         "rebuild it with this version of msnet (checkpoints may hold only tensors and plain values)") from exc
    if not isinstance(ckpt, dict) or ckpt.get("schema") != SCHEMA_VERSION:
        found = ckpt.get("schema") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise MsnetError(f"{what} has schema {found!r}, this msnet reads schema {SCHEMA_VERSION}", path,
                         "rebuild it with this version of msnet")
    return ckpt


# ------------------------------------------------------------------ backbone


def save_backbone(path: str | Path, backbone: nn.Module, spec: PreprocessSpec, classes: list[str] | None = None,
                  head: nn.Linear | None = None, extra: dict | None = None) -> None:
    """Write a backbone checkpoint (``head``: the fine-tuned slice classifier's last layer)."""
    atomic_torch_save({
        "schema": SCHEMA_VERSION, "kind": "backbone", "backbone": backbone.name,
        **backbone.pooling,
        "state_dict": backbone.state_dict(), "head": None if head is None else head.state_dict(),
        "classes": list(classes or []), "preprocess": spec.to_dict(), "msnet_version": __version__,
        "provenance": dict(getattr(backbone, "provenance", {}) or {}),
        **(extra or {}),
    }, path)


def load_backbone(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, nn.Linear | None, PreprocessSpec, dict]:
    """(backbone, slice head or None, PreprocessSpec, checkpoint metadata) from :func:`save_backbone`'s file."""
    from msnet.models.backbones import create

    ckpt = load_checkpoint(path, "backbone checkpoint")
    backbone = create(ckpt["backbone"], pretrained=False, **pooling(ckpt))
    backbone.load_state_dict(ckpt["state_dict"])
    backbone.provenance = dict(ckpt.get("provenance") or {})
    head = None
    if ckpt.get("head") is not None:
        w = ckpt["head"]["weight"]
        head = nn.Linear(w.shape[1], w.shape[0])
        head.load_state_dict(ckpt["head"])
        head.to(device).eval()
    spec = PreprocessSpec.from_dict(ckpt["preprocess"], str(path))
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "head")}
    return backbone.to(device).eval(), head, spec, meta


# ------------------------------------------------------------------ aggregator


def save_aggregator(path: str | Path, model: nn.Module, name: str, classes: list[str], spec: PreprocessSpec,
                    extra: dict | None = None) -> None:
    """Write an aggregator checkpoint; ``spec`` is the preprocessing of the features it was trained on."""
    config = dict(getattr(model, "config", {}))
    atomic_torch_save({
        "schema": SCHEMA_VERSION, "kind": "aggregator", "aggregator": name, "config": config,
        "in_features": int(config.get("in_features", 0)), "classes": list(classes),
        "state_dict": model.state_dict(), "preprocess": spec.to_dict(), "msnet_version": __version__,
        **(extra or {}),
    }, path)


def load_aggregator(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(aggregator in eval mode, checkpoint metadata) from :func:`save_aggregator`'s file."""
    from msnet.models.aggregators import create

    ckpt = load_checkpoint(path, "aggregator checkpoint")
    model = create(ckpt["aggregator"], **ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model.to(device).eval(), meta


# ------------------------------------------------------------------ bundle


@dataclass
class Bundle:
    """A loaded bundle: the pieces a Predictor is made of."""

    path: Path
    spec: PreprocessSpec
    classes: list[str]
    backbone: nn.Module
    head: nn.Linear | None
    aggregator: nn.Module
    metadata: dict
    feature_dtype: str = "float32"
    temperature: float = 1.0
    info: dict = field(default_factory=dict)
    ood: FeatureDescription | None = None
    """The training features' description (None for a bundle written without features, e.g. by a benchmark)."""

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", self.path.name))

    @property
    def sha256(self) -> str:
        return bundle_sha256(self.path)


def bundle_sha256(path: str | Path) -> str:
    """Hash of a bundle's weights (backbone + aggregator checkpoints): which model made a prediction."""
    h = hashlib.sha256()
    for f in (BACKBONE, AGGREGATOR):
        h.update(file_hash(Path(path) / f).encode())
    return h.hexdigest()


def read_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load and check a bundle folder."""
    path = Path(path)
    if not (path / CARD).is_file():
        raise MsnetError("not a model bundle (no metadata.json)", path,
                         "pass the bundle folder written by `msnet run` (RUN/bundle)")
    try:
        card = json.loads((path / CARD).read_text())
    except (OSError, ValueError) as exc:
        raise MsnetError(f"unreadable model card ({exc})", path / CARD, "rebuild the bundle with `msnet run`") from exc
    if card.get("schema_version") != SCHEMA_VERSION:
        raise MsnetError(f"model card has schema_version {card.get('schema_version')!r}, this msnet reads "
                         f"{SCHEMA_VERSION}", path / CARD, "rebuild the bundle with this version of msnet")
    backbone, head, spec, bmeta = load_backbone(path / BACKBONE, device)
    aggregator, ameta = load_aggregator(path / AGGREGATOR, device)
    agg_spec = PreprocessSpec.from_dict(ameta["preprocess"], str(path / AGGREGATOR))
    if agg_spec != spec:
        raise MsnetError(f"the aggregator was trained on features preprocessed as {agg_spec.to_dict()}, but the "
                         f"backbone preprocesses as {spec.to_dict()}", path,
                         "rebuild the bundle from one run (`msnet run CONFIG`) so both halves match")
    if ameta["in_features"] != backbone.num_features:
        raise MsnetError(f"the aggregator expects {ameta['in_features']} features, the backbone gives "
                         f"{backbone.num_features}", path, "rebuild the bundle from one run")
    if head is not None and list(bmeta.get("classes", [])) != list(ameta["classes"]):
        head = None  # a slice head of other classes (e.g. a 2-class slice model) cannot explain these classes
    ood = None
    if (path / OOD).is_file():
        state = load_checkpoint(path / OOD, "OOD description")
        try:
            ood = FeatureDescription.from_state(state)
        except (KeyError, ValueError, AttributeError) as exc:
            raise MsnetError(f"unreadable OOD description ({exc})", path / OOD, "rebuild the bundle with `msnet bundle`") from exc
        if ood.mean.shape[0] != backbone.num_features:
            raise MsnetError(f"the OOD description has {ood.mean.shape[0]} features, the backbone gives "
                             f"{backbone.num_features}", path / OOD, "rebuild the bundle from one run")
    return Bundle(path=path, spec=spec, classes=list(ameta["classes"]), backbone=backbone, head=head,
                  aggregator=aggregator, metadata=card, feature_dtype=str(ameta.get("feature_dtype", "float32")),
                  temperature=float(ameta.get("temperature", 1.0)), info={"backbone": bmeta, "aggregator": ameta},
                  ood=ood)


def describe_training_features(fdir: str | Path, method: str = "knn") -> FeatureDescription | None:
    """The OOD description of a run's extracted features (``RUN/features/<set>``: manifest.csv and
    ``<study>.npy``): every study that is not a test study, :data:`~msnet.inference.ood.SLICES_PER_STUDY`
    evenly spaced slices of each (read from memory-mapped files). None with fewer than 2 such studies."""
    import numpy as np

    from msnet.inference.ood import SLICES_PER_STUDY

    fdir = Path(fdir)
    manifest = fdir / "manifest.csv"
    if not manifest.is_file():
        return None
    feats = {}
    for r in read_csv_rows(manifest):
        f = fdir / r.get("file", "")
        if r.get("status") == "ok" and r.get("subset", "") != "test" and f.is_file():
            a = np.load(f, mmap_mode="r", allow_pickle=False)
            rows = np.unique(np.linspace(0, len(a) - 1, num=min(len(a), SLICES_PER_STUDY)).round().astype(int))
            feats[r["patient_id"]] = np.asarray(a[rows], dtype=np.float32) if len(a) else np.zeros((0, 1), np.float32)
    return FeatureDescription.fit(feats, method=method) if len(feats) >= 2 else None


def model_card(spec: PreprocessSpec, classes: list[str], backbone: dict, aggregator: dict, training_data: dict,
               metrics: dict, versions: dict, name: str) -> dict:
    """The bundle's metadata.json (MONAI-bundle style)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "task": "patient-level chest CT classification",
        "classes": list(classes),
        "input": {
            "modality": "CT",
            "format": "hounsfield" if spec.kind == "hu" else "grey levels",
            "slices": "axial, any count, canonical order superior to inferior",
            "windows_hu": [{"level": lv, "width": wd} for lv, wd in spec.windows],
            "channels": "one window replicated to three" if len(spec.windows) == 1 else "one window per channel",
            "size": spec.size,
            "preprocess": spec.to_dict(),
        } | ({"orientation": "display (rows anterior to posterior, patient right on image left); the backbone "
                             "turns each slice to the RAS plane its weights learned"}
             if backbone.get("plane") == "ras" else {}),
        "backbone": backbone,
        "aggregator": aggregator,
        "training_data": training_data,
        "metrics": metrics,
        "intended_use": INTENDED_USE,
        "versions": versions,
    } | ({"warning": SYNTHETIC_WARNING} if training_data.get("synthetic") else {})


def write_bundle(out: str | Path, backbone_ckpt: Path, aggregator_ckpt: Path, card: dict,
                 config_yaml: str = "", ood: FeatureDescription | None = None) -> Path:
    """Assemble a bundle folder atomically (a temp folder renamed into place); returns its path.
    ``ood``: the training features' description (:func:`describe_training_features`), summarised in the card."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        shutil.copyfile(backbone_ckpt, tmp / BACKBONE)
        shutil.copyfile(aggregator_ckpt, tmp / AGGREGATOR)
        if config_yaml:
            (tmp / "config.yaml").write_text(config_yaml)
        if ood is not None:
            atomic_torch_save(ood.to_state(), tmp / OOD)  # its "schema" is the checkpoints' (1)
            card = {**card, "ood": ood.summary()}
        (tmp / CARD).write_text(json.dumps(card, indent=2))
        tmp.chmod(umask_mode(0o777))
        read_bundle(tmp)  # never leave a bundle that cannot be read back
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """A checkpoint's metadata without its weights (for cards and reports)."""
    ckpt = load_checkpoint(path)
    return {k: v for k, v in ckpt.items() if k not in ("state_dict", "head")}
