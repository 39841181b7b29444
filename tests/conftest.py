"""Shared fixtures: the real public CT data beside the repository (../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

import msnet

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
COVID_CT_MD = SHARED_DATA / "covid-ct-md"
SAMPLE = COVID_CT_MD / "Sample data"
P001 = SAMPLE / "COVID-19 subjects" / "P001"
CAP002 = SAMPLE / "Cap subjects" / "cap002"
NORMAL001 = SAMPLE / "Normal subjects" / "normal001"
DICOM_ZOO = SHARED_DATA / "dicom-zoo"
UCSD = SHARED_DATA / "ucsd-covid-ct"
SHIPPED_TINY = Path(msnet.__file__).parent / "configs" / "tiny.yaml"


def require_system_tool(present: bool, what: str) -> None:
    """A Debian package the tests need (chromium, Orthanc, dcmtk): skipped on a developer's machine without
    it, a failure in CI, which installs it (.ci/run): a missing piece must fail CI, not vanish from it."""
    if present:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing, but .ci/run installs it")
    pytest.skip(what)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is missing (it lies beside the repository)")
    return SHARED_DATA


TINY_CONFIG = {**yaml.safe_load(SHIPPED_TINY.read_text()), "preprocess": {"size": 112},
               "backbone": {"name": "efficientnet_lite0", "pretrained": True, "freeze": 0},
               "finetune": {"epochs": 8, "batch_size": 16, "lr": 5e-4, "max_slices_per_patient": 8,
                            "normal_slices_per_patient": 6},
               "train": {"aggregators": ["msnet"], "epochs": 40, "batch_size": 4, "lr": 1e-3}}
"""The tiny shipped config, with enough training that the bundle learns the synthetic lesions."""


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A complete model bundle trained on a small synthetic cohort (60 patients of 10-16 slices, 112 px, ~1 min):
    enough patients that the backbone learns the lesions rather than the patients..

    The cohort is at ``bundle/../../data`` (cohort.csv, slice_labels.csv)."""
    from msnet.config import load_config
    from msnet.stages.run import run_pipeline
    from msnet.data.synthetic import synth_cohort

    root = tmp_path_factory.mktemp("bundle")
    synth_cohort(root / "data", n_patients=60, size=128, seed=5, slices=(10, 16))
    (root / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    cfg = load_config(root / "config.yaml")
    run_pipeline(cfg)
    return cfg.run_path / "bundle"
