"""Stages 1-3 + evaluate on a tiny synthetic cohort (real DICOM written at run time)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import msnet
from msnet.config import load_config
from msnet.errors import MsnetError

TINY = yaml.safe_load((Path(msnet.__file__).parent / "configs" / "tiny.yaml").read_text())


def write_config(folder: Path, **sections) -> Path:
    data = json.loads(json.dumps(TINY))
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from msnet.data.synthetic import synth_cohort

    root = tmp_path_factory.mktemp("tiny")
    synth_cohort(root / "data", n_patients=12, size=64, seed=3, slices=(10, 16))
    return root


@pytest.fixture(scope="module")
def finetuned(cohort) -> Path:
    from msnet.stages.finetune import finetune

    cfg = load_config(write_config(cohort))
    finetune(cfg)
    return cohort


def test_finetune_writes_checkpoint_metrics_and_reuses(finetuned):
    from msnet.stages.finetune import finetune
    from msnet.stages.slice_model import load_slice_classifier

    out = finetuned / "run" / "finetune"
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert set(metrics["sensitivity"]) == {"COVID-19", "CAP", "NORMAL"}
    assert "| COVID-19 |" in metrics["table1"] and "Overall accuracy" in metrics["table1"]
    with open(out / "history.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 2
    assert (out / "config.yaml").exists() and (out / "versions.json").exists()
    assert not (out / "state.pt").exists()  # finished: no resume state left behind
    model = load_slice_classifier(out / "backbone.pt")
    assert model.classes == ["COVID-19", "CAP", "NORMAL"]
    before = (out / "backbone.pt").stat().st_mtime_ns
    again = finetune(load_config(finetuned / "config.yaml"))
    assert again["accuracy"] == metrics["accuracy"]
    assert (out / "backbone.pt").stat().st_mtime_ns == before  # reused, not retrained


def test_finetune_resumes_after_interruption(cohort, tmp_path, monkeypatch):
    import msnet.stages.finetune as ft

    root = tmp_path
    os.symlink(cohort / "data", root / "data")
    cfg = load_config(write_config(root, finetune={"epochs": 3}))
    calls = {"n": 0}
    real = ft.predict_slices

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ft, "predict_slices", flaky)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(cfg)
    state = root / "run" / "finetune" / "state.pt"
    assert state.exists()
    monkeypatch.setattr(ft, "predict_slices", real)
    import torch

    assert torch.load(state, weights_only=True)["epoch"] == 0  # epoch 1 finished before the interruption
    ft.finetune(cfg)
    with open(root / "run" / "finetune" / "history.csv") as fh:
        epochs = [int(r["epoch"]) for r in csv.DictReader(fh)]
    assert epochs == [1, 2, 3]


def test_extract_train_evaluate(finetuned):
    from msnet.data.cohorts import read_cohort
    from msnet.stages.evaluate import evaluate_run
    from msnet.stages.extract import extract, feature_dir
    from msnet.io import read_study
    from msnet.stages.train import train

    cfg = load_config(finetuned / "config.yaml")
    report = extract(cfg)
    assert report.n_failed == 0 and report.n_ok == 12
    fdir = feature_dir(cfg)
    rows = read_cohort(finetuned / "data" / "cohort.csv")
    first = rows[0]
    feats = np.load(fdir / f"{first['patient_id']}.npy")
    assert feats.shape == (read_study(first["path"]).n_slices, 1280)
    again = extract(cfg)
    assert again.n_cached == 12  # cache hit: nothing recomputed
    other = load_config(finetuned / "config.yaml", ["preprocess.size=48"])
    with pytest.raises(MsnetError, match="fine-tune again"):  # features the fine-tuned backbone never saw
        feature_dir(other)
    frozen = load_config(finetuned / "config.yaml", ["finetune.enabled=false"])
    assert feature_dir(load_config(finetuned / "config.yaml", ["finetune.enabled=false", "preprocess.size=48"])) \
        != feature_dir(frozen)  # preprocessing is part of the cache key

    results = train(cfg)
    assert set(results) == {"msnet", "mean"}
    for name in results:
        d = finetuned / "run" / "train" / name
        with open(d / "predictions.csv") as fh:
            preds = list(csv.DictReader(fh))
        assert {p["split"] for p in preds} == {"train", "val", "test"}
        probs = np.array([[float(p[f"p_{c}"]) for c in ("COVID-19", "CAP", "NORMAL")] for p in preds])
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
        assert (d / "model.pt").exists()
    report_md = evaluate_run(finetuned / "run")
    metrics = json.loads((finetuned / "run" / "evaluate" / "metrics.json").read_text())
    assert "accuracy" in metrics and report_md.exists()


def test_cross_validation_predicts_every_patient_once(finetuned):
    from msnet.stages.extract import extract
    from msnet.stages.train import train

    cfg = load_config(finetuned / "config.yaml", ["run_dir=run", "train.aggregators=[msnet]", "train.epochs=2"])
    extract(cfg)
    cfg.train.folds = 3
    train(cfg, overwrite=True)
    d = finetuned / "run" / "train"
    splits = json.loads((d / "splits.json").read_text())
    assert len(splits["splits"]) == 3
    tests = [p for s in splits["splits"] for p in s["test"]]
    assert len(tests) == len(set(tests)) == 12
    for s in splits["splits"]:
        assert not set(s["test"]) & set(s["train"]) and not set(s["test"]) & set(s["val"])
    with open(d / "msnet" / "predictions.csv") as fh:
        oof = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    assert sorted(r["patient_id"] for r in oof) == sorted(tests)
    assert all((d / "msnet" / f"model_fold{k}.pt").exists() for k in range(3))


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533", "-m", "msnet", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_two_process_extract_equals_single_process_and_finetune_is_valid(finetuned, tmp_path):
    from msnet.stages.extract import extract, feature_dir
    from msnet.stages.slice_model import load_slice_classifier

    single = load_config(finetuned / "config.yaml")
    extract(single)
    ref = feature_dir(single)

    os.symlink(finetuned / "data", tmp_path / "data")
    (tmp_path / "run").mkdir()
    os.symlink(finetuned / "run" / "finetune", tmp_path / "run" / "finetune")
    cfg_path = write_config(tmp_path)
    res = _torchrun(["extract", str(cfg_path)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    multi = feature_dir(load_config(cfg_path))
    assert multi.name == ref.name
    with open(multi / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        np.testing.assert_allclose(np.load(multi / r["file"]), np.load(ref / r["file"]), rtol=1e-4, atol=1e-4)

    ddp = tmp_path / "ddp"
    ddp.mkdir()
    os.symlink(finetuned / "data", ddp / "data")
    cfg_ddp = write_config(ddp, finetune={"epochs": 1})
    res = _torchrun(["finetune", str(cfg_ddp)], ddp)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((ddp / "run" / "finetune" / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n_train"] > 0
    model = load_slice_classifier(ddp / "run" / "finetune" / "backbone.pt")
    assert all(np.isfinite(p.detach().numpy()).all() for p in model.parameters())


def test_finetune_on_slice_images_with_held_out_test(tmp_path, shared_data):
    """UCSD layout: slice manifest from `msnet index`, JPEG re-encoding, --test on a held-out folder."""
    import shutil

    from msnet.data.cohorts import index_dataset
    from msnet.stages.finetune import finetune

    src = shared_data / "ucsd-covid-ct"
    root = tmp_path / "ucsd"
    for split, n in (("train", 12), ("val", 6)):
        for cls in ("CT_COVID", "CT_NonCOVID"):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((src / split / cls).iterdir())[:n]:
                shutil.copy(f, root / split / cls / f.name)
    index_dataset(root, tmp_path / "index")
    cfg = load_config(
        write_config(
            tmp_path,
            data={"slice_manifest": "index/slices.csv", "cohort": "", "slice_labels": "", "classes": ["COVID-19", "NON-COVID"], "reencode_jpeg": 75},
            preprocess={"size": 48},
            finetune={"epochs": 1, "val_fraction": 0.25},
        )
    )
    result = finetune(cfg, test_dir=root / "val")
    test = json.loads((tmp_path / "run" / "finetune" / "test" / "val" / "metrics.json").read_text())
    assert test["n"] == 12 and set(test) >= {"accuracy", "f1", "auc", "sensitivity", "by_format"}
    assert sum(v["n"] for v in test["by_format"].values()) == 12
    assert result["n_train"] + result["n_val"] == 24  # the val folder itself is never trained on
    # what `msnet finetune` prints: the test set's own figures and where they are, one line per format
    from msnet.stages.slice_report import summary

    text = summary(result, cfg.run_path / "finetune")
    assert f"12 images ({tmp_path / 'run' / 'finetune' / 'test' / 'val'})" in text
    assert f"accuracy {test['accuracy']:.3f}, F1 {test['f1']:.3f}, AUC {test['auc']:.3f}, ECE {test['ece']:.3f}" in text
    assert all(f"{k} {v['accuracy']:.3f} ({v['n']} images)" in text for k, v in test["by_format"].items())
    assert f"validation ({result['n_val']} images" in text and "cross-validation" not in text


def test_extract_on_onnx_int8_records_agreement_or_refuses(finetuned):
    """Extraction runs on ONNX Runtime through the same encoder; int8 is kept only where it agrees."""
    from msnet.stages.extract import extract, feature_dir

    base = load_config(finetuned / "config.yaml")
    cfg = load_config(finetuned / "config.yaml", ["extract.runtime=onnx", "extract.int8=true",
                                                  "extract.int8_min_cosine=0.0"])  # this barely trained backbone
    assert extract(cfg).n_ok == 12
    fdir = feature_dir(cfg)
    assert fdir != feature_dir(base)  # its own feature set
    meta = json.loads((fdir / "meta.json").read_text())
    agree = meta["int8_agreement"]
    assert meta["runtime"] == "onnx-int8" and agree["ok"] and agree["slices"] > 0
    assert -1.0 <= agree["cosine_min"] <= agree["cosine_mean"] <= 1.0
    assert (fdir / "onnx" / "backbone_int8.onnx").is_file()
    # after training, every aggregator's decisions on the held-out reference studies: int8 against fp32
    ref = agree["reference"]
    assert len(ref["patients"]) == agree["held_out_studies"] > 0
    assert all((fdir / ref["folder"] / f"{p}.npy").is_file() for p in ref["patients"])
    from msnet.stages.train import train

    cfg8 = load_config(finetuned / "config.yaml", ["extract.runtime=onnx", "extract.int8=true",
                                                   "extract.int8_min_cosine=0.0", "train.aggregators=[msnet]",
                                                   "train.epochs=30", "train.folds=1"])
    train(cfg8)
    info = json.loads((cfg8.run_path / "train" / "msnet" / "info.json").read_text())
    decisions = json.loads((fdir / "meta.json").read_text())["int8_agreement"]["decisions"]["msnet"]
    assert info["int8_decisions"] == decisions and decisions["studies"] == len(ref["patients"])
    assert decisions["identical"] == decisions["studies"]  # cosine ~1 here: the same decisions
    # fp32 reference features that no longer match the int8 ones, as a broken quantisation would give
    # (scaled, shifted or sign-flipped until the trained model decides otherwise): training stops with the fix
    import torch

    from msnet.inference.bundle import load_aggregator
    from msnet.stages.train import predict_proba

    model, _ = load_aggregator(cfg8.run_path / "train" / "msnet" / "model.pt")
    broken = 0
    for p in ref["patients"]:
        f = fdir / ref["folder"] / f"{p}.npy"
        a = np.load(f)
        decide = lambda x: int(predict_proba(model, [torch.from_numpy(np.ascontiguousarray(x, np.float32))]).argmax())
        for b in (-a, 50 * a, -50 * a, np.roll(a, 1, axis=1) * 50, np.roll(a, 7, axis=1) * -50):
            if decide(b) != decide(a):
                np.save(f, b)
                broken += 1
                break
    assert broken, "no corruption changed the decision"
    with pytest.raises(MsnetError, match="int8 features differs"):
        train(cfg8, overwrite=True)
    strict = load_config(finetuned / "config.yaml", ["extract.runtime=onnx", "extract.int8=true",
                                                     "extract.int8_min_cosine=1.0", "run_dir=run_strict"])
    (finetuned / "run_strict").mkdir()
    shutil.copytree(finetuned / "run" / "finetune", finetuned / "run_strict" / "finetune")
    with pytest.raises(MsnetError, match="int8 features disagree"):
        extract(strict, strict=True)


def test_mid_level_statistics_through_the_patient_pipeline(cohort, tmp_path):
    """backbone.pool_stages without fine-tuning: extraction, MS-Net, the bundle and predict all use the
    cut network's 384 features, in their own feature set."""
    from msnet.data.cohorts import read_cohort
    from msnet.inference.predictor import Predictor
    from msnet.stages.extract import extract, feature_dir
    from msnet.stages.run import build_bundle
    from msnet.stages.train import train

    folder = tmp_path / "pooled"
    folder.mkdir()
    shutil.copytree(cohort / "data", folder / "data")
    cfg = load_config(write_config(folder, finetune={"enabled": False}, backbone={"pool_stages": [4, 5]},
                                   train={"aggregators": ["msnet"], "epochs": 2}))
    plain = load_config(write_config(tmp_path, finetune={"enabled": False}))
    assert feature_dir(cfg) != feature_dir(plain)
    assert extract(cfg).n_ok == 12
    rows = read_cohort(folder / "data" / "cohort.csv")
    assert np.load(feature_dir(cfg) / f"{rows[0]['patient_id']}.npy").shape[1] == 2 * (80 + 112)
    train(cfg)
    bundle = build_bundle(cfg)
    card = json.loads((bundle / "metadata.json").read_text())
    assert card["backbone"]["n_features"] == 384 and "stages [4, 5]" in card["backbone"]["features"]
    result = Predictor(bundle).predict(rows[0]["path"])
    assert result.prediction in ("COVID-19", "CAP", "NORMAL")
    assert abs(sum(result.probabilities.values()) - 1.0) < 1e-4
