"""Full fine-tuning of the CT-pretrained 2-D backbone on a CT cohort's slice labels: the backbone's weights
move, the slices are windowed as the weights declare, and the checkpoint serves with that window."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

import msnet
from msnet.config import load_config
from msnet.data.synthetic import synth_cohort
from msnet.models.astra import WINDOW
from msnet.stages.finetune import finetune
from msnet.stages.slice_model import load_slice_classifier, model_for

TINY = yaml.safe_load((Path(msnet.__file__).parent / "configs" / "tiny.yaml").read_text())


def test_full_fine_tuning_of_the_ct_native_backbone(tmp_path):
    synth_cohort(tmp_path / "data", n_patients=9, size=64, seed=5, slices=(12, 16))
    cfg_data = {**TINY, "run_dir": str(tmp_path / "run")}
    cfg_data["data"] = {**TINY.get("data", {}), "cohort": str(tmp_path / "data" / "cohort.csv"),
                        "slice_labels": str(tmp_path / "data" / "slice_labels.csv")}
    cfg_data["backbone"] = {"name": "astra", "pretrained": True, "freeze": 3}
    cfg_data["preprocess"] = {**TINY.get("preprocess", {}), "size": 64}
    cfg_data["finetune"] = {**TINY.get("finetune", {}), "mode": "full", "epochs": 1, "batch_size": 8,
                            "max_slices_per_patient": 3, "lr": 1e-3, "val_fraction": 0.34}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg_data))
    cfg = load_config(path)
    before = model_for(cfg, 3).backbone.state_dict()
    metrics = finetune(cfg)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["best_epoch"] in (1,)
    model = load_slice_classifier(cfg.run_path / "finetune" / "backbone.pt")
    after = model.backbone.state_dict()
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    frozen = [k for k in before if k.startswith("model.layer1.") and before[k].is_floating_point()]
    assert any(k.startswith("model.layer4.") for k in moved)  # the unfrozen stages were trained
    assert frozen and not any(k in moved for k in frozen if "running" not in k)  # freeze=3 kept layer1
    assert model.spec.windows == (tuple(float(v) for v in WINDOW),)  # served with the weights' window
