"""Configuration: one dataclass per stage, loaded from YAML with CLI overrides.

>>> cfg = Config()
>>> cfg = apply_overrides(cfg, ["train.epochs=3", "backbone.name=resnet18"])
>>> (cfg.train.epochs, cfg.backbone.name)
(3, 'resnet18')
"""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from msnet import CLASSES
from msnet.errors import MsnetError
from msnet.files import atomic_write_text


@dataclass
class DataConfig:
    cohort: str = ""
    """cohort.csv (patient_id,label,path[,subset]); paths relative to it."""
    slice_labels: str = ""
    """slice_labels.csv (patient_id,slice_index,label) for stage 1."""
    slice_manifest: str = ""
    """Slice-image manifest (slices.csv of `msnet index` on a UCSD-style folder) for stage 1."""
    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    normal_class: str = "NORMAL"
    """Class whose slices are all sampled (others: only their infected slices)."""
    reencode_jpeg: int = 0
    """Slice images: re-encode every image as JPEG of this quality after resizing,
    so that no class can be told by its file format (0 = off)."""


@dataclass
class PreprocessConfig:
    size: int = 224
    windows: list[list[float]] = field(default_factory=lambda: [[-600.0, 1500.0]])
    """HU windows as [level, width]; one window is replicated to three channels
    (the paper), three windows become three channels."""
    lung_crop: bool = False
    """Crop every slice to the lungs' bounding box (classical HU lung mask, one box per volume) before resizing."""
    base_size: int = 0
    """> 0: every slice (image or HU) goes through base_size x base_size (antialiased) before `size`, so
    images of every source resolution carry the same detail (0 = off). Stored with the weights."""


@dataclass
class BackboneConfig:
    name: str = "efficientnet_lite0"
    pretrained: bool = True
    weights: str = ""
    freeze: int = 0
    pool_stages: list[int] = field(default_factory=list)
    """Empty: features are the last feature map's average. Else the mean and standard deviation of
    every channel of these stages' outputs (stem = 0; efficientnet_lite: blocks.i is stage i + 1),
    concatenated, and the network ends at the last of them: mid-level texture statistics."""
    pool_lungs: bool = False
    """With pool_stages: the same statistics inside each image's 2-D lung mask too
    (``msnet.preprocess.grey_lung_mask`` of the image the network sees), after the whole image's."""
    pool_covariance: bool = False
    """With pool_stages: every map's channel covariance (signed square roots of the entries on and
    above its diagonal) instead of the standard deviation alone: second-order texture statistics."""
    slab: list[int] = field(default_factory=list)
    """astra_slab only: [k, stride], the 3-D network over k neighbouring slices, one slab every stride
    slices (empty: 8 slices every 8); each slice takes the features of the nearest slab's centre."""

    def pooling(self) -> dict:
        """The pooling keywords of ``msnet.models.backbones.create``."""
        return pooling(self)


def pooling(source: Any) -> dict:
    """The pooling keywords of ``msnet.models.backbones.create`` (``pool_stages``, ``pool_lungs``,
    ``pool_covariance``, ``slab``) read from a :class:`BackboneConfig`, a backbone or a backbone checkpoint's
    dict; what ``source`` lacks is off. The one place that names them: configs, backbones and
    checkpoints all pass through here."""
    get = source.get if isinstance(source, dict) else (lambda key, default: getattr(source, key, default))
    return {"pool_stages": [int(k) for k in get("pool_stages", None) or ()],
            "pool_lungs": bool(get("pool_lungs", False)),
            "pool_covariance": bool(get("pool_covariance", False)),
            "slab": [int(k) for k in get("slab", None) or ()]}


@dataclass
class FinetuneConfig:
    enabled: bool = True
    mode: Literal["full", "linear_probe", "lp_ft"] = "full"
    """full: train backbone and head together; linear_probe: the backbone stays as loaded and only
    the head is fitted (L2 logistic regression on its pooled features); lp_ft: the linear probe
    first, then full fine-tuning starting from that head (Kumar et al. 2022)."""
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-5
    """Learning rate of the head (and of the backbone unless backbone_lr_scale says otherwise)."""
    backbone_lr_scale: float = 1.0
    """Backbone learning rate = lr * backbone_lr_scale."""
    probe_c: float = 0.1
    """Inverse L2 strength of the linear probe (as scikit-learn's C, on standardised features)."""
    probe_refit: bool = False
    """linear_probe only: once its temperature is fitted on the selection images, fit the probe again on
    the training and selection images together (a probe selects nothing, so no image need be held back
    from it); the temperature is kept."""
    probe_scale: Literal["overall", "feature"] = "overall"
    """How the probe standardises features: overall (one standard deviation for all: no feature of tiny
    variance gets a large weight for fine-tuning to start from) or feature (each its own, as
    scikit-learn's StandardScaler: for features of unequal scales, such as pool_stages')."""
    weight_decay: float = 0.0
    class_weights: bool = True
    hflip: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    crop_scale: float = 1.0
    """Random resized crop: keep between this fraction and all of the image's area (1 = off)."""
    rotate: float = 0.0
    """Random rotation up to this many degrees either way (0 = off)."""
    jpeg_quality: list[int] = field(default_factory=list)
    """Random JPEG re-encoding: [low, high] quality range, applied with probability jpeg_prob
    (empty = off); gives every class the codec's artefacts at varying strength."""
    jpeg_prob: float = 0.0
    downscale: float = 1.0
    """Random resize: shrink to between this fraction and all of the size and back (1 = off)."""
    freeze_bn: bool = False
    """Batch-norm layers keep their (ImageNet) running statistics while fine-tuning."""
    ema: float = 0.0
    """Exponential moving average of the weights (decay per step; 0 = off); validated and saved."""
    tta: bool = False
    """Test-time augmentation: every prediction (selection, calibration, CV, --test) averages the
    probabilities of the slice and its mirror image."""
    calibration: Literal["select", "cv"] = "select"
    """Where the slice classifier's temperature is fitted: `select` (the model-selection images) or `cv`
    (the out-of-fold predictions of `--cv`: every train image, each from a model that never saw its
    source; `--cv` is run first where they are missing)."""
    ensemble: bool = False
    """--test averages the calibrated probabilities of the model and of the `--cv` fold models."""
    infected_only: bool = True
    """Paper: only infected slices of COVID-19/CAP patients carry their class."""
    clean_slices_normal: bool = False
    """CT cohorts (linear_probe): a slice of an infected patient that carries no infection label is trained
    on as the normal class (the head learns infected against clean slices, not one patient against another)."""
    normal_slices_per_patient: int = 0
    """Slices sampled from each NORMAL patient (0 = all)."""
    max_slices_per_patient: int = 0
    """Cap on slices per patient and class (0 = no cap); keeps CPU runs short."""
    val_fraction: float = 0.2
    """Patients held out for validation when the cohort has no `val` subset."""
    folds: int = 0
    """Slice manifests: hold out one of this many source-grouped, stratified folds of `train` for
    model selection (0 = a random val_fraction of the images); `msnet finetune --cv` runs all folds."""
    early_stopping: int = 0
    """Stop after this many epochs without validation improvement (0 = off)."""
    seed: int = 0


@dataclass
class ExtractConfig:
    batch_size: int = 32
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Feature dtype: float32, or bfloat16 (autocast; served the same way by the bundle)."""
    runtime: Literal["torch", "onnx"] = "torch"
    """torch, or onnx (ONNX Runtime on the CPU; the backbone is exported next to the features)."""
    int8: bool = False
    """With runtime onnx: a statically quantised backbone, used only if its features agree with fp32
    (cosine >= int8_min_cosine on held-out studies; figures in the feature set's meta.json)."""
    int8_min_cosine: float = 0.999


@dataclass
class TrainConfig:
    aggregators: list[str] = field(default_factory=lambda: ["msnet"])
    """Names from the aggregator registry (checked by :func:`msnet.models.check_config`)."""
    epochs: int = 100
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    class_weights: bool = True
    crop_prob: float = 0.5
    """Probability of a random contiguous crop of the slice sequence (partial scans)."""
    crop_min_fraction: float = 0.5
    folds: int = 0
    """Patient-level stratified k-fold CV (0 = use the cohort's subsets)."""
    val_fraction: float = 0.2
    seed: int = 0


@dataclass
class Config:
    run_dir: str = "runs/msnet"
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str = ""
    """Folder of the YAML file (relative data paths resolve against it)."""

    @property
    def run_path(self) -> Path:
        return self.resolve(self.run_dir)

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        if not p.is_absolute() and self.source:
            p = Path(self.source) / p
        return p


def _describe(tp) -> str:
    """A type annotation in words, for error messages."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is not None and type(None) in args:
        return " or ".join(_describe(a) for a in args)
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a text"}.get(
        getattr(tp, "__name__", str(tp)), str(tp))


def _checked(value: Any, tp, key: str) -> Any:
    """``value`` as the annotation ``tp`` asks (an int taken as a float, YAML's ``3e-5`` string as a number),
    or a :class:`MsnetError` naming ``key``, the value and what it may be."""
    origin, args = get_origin(tp), get_args(tp)

    def bad() -> MsnetError:
        return MsnetError(f"config key '{key}' is {value!r}, which is not {_describe(tp)}",
                          fix=f"set {key} to {_describe(tp)}")

    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise bad()
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [_checked(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:  # YAML reads `3e-5` (no dot) as a string
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    return value


def _build(cls, data: dict[str, Any], where: str):
    if data is not None and not isinstance(data, dict):
        raise MsnetError(f"config section '{where.rstrip('.') or 'top level'}' is {data!r}, not a mapping of keys",
                         fix="write it as `key: value` lines")
    known = {f.name: f for f in fields(cls)}
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in known:
            raise MsnetError(
                f"unknown config key '{where}{key}'",
                fix=f"use one of: {', '.join(known)}",
            )
        f = known[key]
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            kwargs[key] = _build(f.default_factory, value, f"{where}{key}.")
        else:
            kwargs[key] = _checked(value, hints[key], f"{where}{key}")
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` overrides (values parsed as YAML)."""
    data = asdict(cfg)
    for item in overrides:
        if "=" not in item:
            raise MsnetError(f"override '{item}' is not of the form key=value", fix="e.g. --set train.epochs=10")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], dict):
                raise MsnetError(f"unknown config section '{part}' in override '{item}'")
            node = node[part]
        if parts[-1] not in node:
            raise MsnetError(f"unknown config key '{key}' in override '{item}'", fix=f"use one of: {', '.join(node)}")
        node[parts[-1]] = _parse_value(value)
    return config_from_dict(data)


def shipped_configs() -> list[str]:
    """Names of the configs that ship with msnet (``msnet/configs/*.yaml``)."""
    return sorted(p.stem for p in (Path(__file__).parent / "configs").glob("*.yaml"))


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (a file, or the name of a shipped one: `paper`, `cpu`, `ucsd`, `tiny`).

    Relative paths inside a config file resolve against the file's folder; those of a
    shipped config (loaded by name) against the working directory.
    """
    p = Path(path)
    shipped = not p.is_file() and str(path) in shipped_configs()  # `ucsd` may also be a data folder
    if shipped:  # a shipped config by name: relative paths resolve against the working directory
        p = Path(__file__).parent / "configs" / f"{path}.yaml"
    if not p.is_file():
        raise MsnetError("config file not found", path=p,
                         fix=f"pass a YAML file, or the name of a shipped one: {', '.join(shipped_configs())}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise MsnetError(f"not valid YAML ({exc})", path=p) from exc
    cfg = config_from_dict(data)
    if not cfg.source:
        cfg.source = str(Path.cwd() if shipped else p.resolve().parent)
    return apply_overrides(cfg, overrides or [])


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("msnet", "torch", "torchvision", "timm", "numpy", "pydicom", "onnxruntime"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def save_run_info(cfg: Config, folder: Path, stage: str) -> None:
    """Save the resolved config and package versions next to a stage's outputs."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))
    atomic_write_text(folder / "versions.json", json.dumps({"stage": stage, **versions()}, indent=2))
