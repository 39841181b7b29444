"""Models: slice backbones and patient-level aggregators, each made by name from its registry
(:func:`msnet.models.backbones.create`, :func:`msnet.models.aggregators.create`)."""

from msnet.errors import MsnetError
from msnet.models import astra, timm_backbones  # noqa: F401 (each registers its backbones)
from msnet.models.aggregators import AGGREGATORS
from msnet.models.backbones import known_backbones


def check_config(cfg) -> None:
    """The model names of a config (:class:`msnet.config.Config`) checked against the registries, before any
    stage runs: ``backbone.name`` and every ``train.aggregators`` entry (the config checks its own types and
    choices when it is built)."""
    if cfg.backbone.name not in known_backbones():
        raise MsnetError(f"config key 'backbone.name' is {cfg.backbone.name!r}, which is not a known backbone",
                         fix=f"use one of: {', '.join(known_backbones())}")
    unknown = [a for a in cfg.train.aggregators if a not in AGGREGATORS]
    if unknown:
        raise MsnetError(f"config key 'train.aggregators' names {', '.join(map(repr, unknown))}, not a known aggregator",
                         fix=f"use some of: {', '.join(AGGREGATORS)}")
