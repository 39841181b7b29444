"""Typed configs: a wrong type or an unknown choice is refused when the config is built, naming the key
and what it may be, before any stage runs; model names are checked against the registries."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from typer.testing import CliRunner

from msnet.cli import app
from msnet.config import apply_overrides, Config, load_config, shipped_configs
from msnet.errors import MsnetError
from msnet.models import check_config
from msnet.models import backbones as B
from msnet.models.aggregators import AGGREGATORS, create as create_aggregator


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_is_well_typed(name):
    cfg = load_config(name)
    check_config(cfg)
    assert isinstance(cfg.train.epochs, int) and isinstance(cfg.finetune.lr, float)


@pytest.mark.parametrize("key, value, allowed", [
    ("train.epochs", "ten", "an integer"),
    ("train.epochs", 3.5, "an integer"),
    ("finetune.mode", "fulll", "'linear_probe'"),
    ("train.aggregators", "msnet", "a list"),
    ("extract.runtime", "onnxx", "'onnx'"),
    ("finetune.calibration", "both", "'cv'"),
    ("backbone.pretrained", "maybe", "true or false"),
    ("preprocess.windows", [["wide", 1500]], "a number"),
])
def test_a_bad_value_in_a_yaml_file_names_the_key_and_what_it_may_be(tmp_path, key, value, allowed):
    section, field = key.split(".")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({section: {field: value}}))
    with pytest.raises(MsnetError) as err:
        load_config(path)
    assert key in str(err.value) and allowed in str(err.value)


def test_numbers_as_yaml_reads_them_still_load(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("finetune:\n  lr: 3e-5\n  hflip: 1\n")  # a string and an int where floats are declared
    cfg = load_config(path)
    assert cfg.finetune.lr == pytest.approx(3e-5) and cfg.finetune.hflip == 1.0
    assert isinstance(cfg.finetune.hflip, float)


def test_a_section_that_is_not_a_mapping_is_refused():
    with pytest.raises(MsnetError, match="train"):
        apply_overrides(Config(), ["train=5"])


def test_unknown_model_names_are_refused_before_any_stage_runs(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "backbone": {"name": "efficientnet_lite9"}}))
    done = subprocess.run([sys.executable, "-m", "msnet", "run", str(path)], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "backbone.name" in done.stderr and "efficientnet_lite0" in done.stderr  # the fix names the known ones
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()  # nothing ran
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "train": {"aggregators": ["msnet", "maxx"]}}))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert isinstance(result.exception, MsnetError) and "'maxx'" in str(result.exception)
    assert not (tmp_path / "run").exists()


def test_a_new_backbone_is_one_registered_function():
    @B.register_backbone("tiny_test_net")
    def tiny(**kw):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        model.num_features = 4
        model.forward_features = model.forward
        return B.Backbone("tiny_test_net", model, 4, {"input_size": (3, 32, 32), "mean": (0.5,) * 3,
                                                    "std": (0.5,) * 3}, [["0"]])

    try:
        assert "tiny_test_net" in B.known_backbones()
        net = B.create("tiny_test_net")
        assert net.num_features == 4 and net.name == "tiny_test_net"
        with pytest.raises(RuntimeError, match="twice"):
            B.register_backbone("tiny_test_net")(tiny)
    finally:
        B._REGISTRY.pop("tiny_test_net", None)
    with pytest.raises(MsnetError, match="unknown backbone"):
        B.create("tiny_test_net")


def test_every_registered_aggregator_is_made_by_name():
    assert {"msnet", "mean", "max", "mil", "vote"} <= set(AGGREGATORS)
    for name in AGGREGATORS:
        model = create_aggregator(name, in_features=8, n_classes=3)
        assert model(torch.rand(2, 5, 8)).shape == (2, 3)
