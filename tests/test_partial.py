"""`msnet evaluate RUN --partial`: every trained aggregator on random contiguous sub-volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from msnet.config import load_config
from msnet.errors import MsnetError

CLASSES = ("COVID-19", "CAP", "NORMAL")
DIM = 16


def _features(rng: np.random.Generator, label: int, n: int) -> np.ndarray:
    """Slice features of one study: noise, plus a class pattern on a contiguous run of about a fifth
    of the slices (the lesions) for COVID-19 and CAP; NORMAL studies have none."""
    x = rng.normal(0.0, 1.0, (n, DIM)).astype(np.float32)
    if label < 2:
        k = max(2, n // 5)
        start = int(rng.integers(0, n - k + 1))
        x[start:start + k, label * 4:(label + 1) * 4] += 3.0
    return x


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A run folder with cached features (written here, as stage 2 would) and aggregators trained by
    stage 3 with 2-fold cross-validation."""
    from msnet.files import write_csv_atomic
    from msnet.stages.extract import MANIFEST_FIELDS, feature_dir, run_spec
    from msnet.stages.train import train

    root = tmp_path_factory.mktemp("partial")
    cfg_data = {
        "run_dir": "run", "device": "cpu",
        "data": {"cohort": "cohort.csv"},
        "backbone": {"name": "efficientnet_lite0", "pretrained": False},
        "finetune": {"enabled": False},
        "train": {"aggregators": ["msnet", "mean"], "epochs": 10, "batch_size": 8, "lr": 5e-3, "folds": 2},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(cfg_data))
    cfg = load_config(root / "config.yaml")
    fdir = feature_dir(cfg)
    fdir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        pid, label = f"S{i:03d}", i % 3
        np.save(fdir / f"{pid}.npy", _features(rng, label, int(rng.integers(12, 25))))
        rows.append({"patient_id": pid, "label": CLASSES[label], "subset": "", "path": pid, "n_slices": "",
                     "file": f"{pid}.npy", "study_hash": "", "status": "ok", "error": ""})
    write_csv_atomic(fdir / "manifest.csv", MANIFEST_FIELDS, rows)
    (fdir / "meta.json").write_text(json.dumps({"set_id": fdir.name, "backbone": "efficientnet_lite0",
                                                "preprocess": run_spec(cfg).to_dict(), "n_features": DIM}))
    train(cfg)
    return cfg.run_path


def test_partial_scans_table_plot_and_report(trained_run):
    from msnet.stages.evaluate import evaluate_run

    report = evaluate_run(trained_run, partial=True, partial_draws=3)
    out = trained_run / "evaluate"
    partial = json.loads((out / "partial.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert partial["fractions"] == [1.0, 0.75, 0.5, 0.25] and partial["draws"] == 3
    assert set(partial["by_aggregator"]) == {"msnet", "mean"} == set(metrics["by_aggregator"])
    for name, m in partial["by_aggregator"].items():
        assert m["n"] == 30  # every patient once, scored by the fold model that held it out
        # the whole study (100 %) reproduces stage 3's out-of-fold predictions
        assert m["accuracy"][0] == pytest.approx(metrics["by_aggregator"][name]["accuracy"])
        assert m["accuracy_sd"][0] == 0.0 and all(0.0 <= a <= 1.0 for a in m["accuracy"])
    msnet = partial["by_aggregator"]["msnet"]["accuracy"]
    assert msnet[0] >= 0.8  # the lesion slices are in every whole study
    assert msnet[3] < msnet[0] - 0.1  # a quarter of the slices often misses them
    assert (out / "partial.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text()
    assert "## Partial scans" in text and "| msnet |" in text and "partial.png" in text
    assert "25% of slices" in (out / "partial.md").read_text()


def test_partial_scans_are_seeded(trained_run):
    from msnet.stages.partial import partial_scans

    a = partial_scans(trained_run, fractions=(0.5,), draws=2, seed=3)
    b = partial_scans(trained_run, fractions=(0.5,), draws=2, seed=3)
    assert a == b and a["fractions"] == [0.5] and a["seed"] == 3


def test_cli_evaluate_partial(trained_run):
    from typer.testing import CliRunner

    from msnet.cli import app

    res = CliRunner().invoke(app, ["evaluate", str(trained_run), "--partial", "--draws", "2"])
    assert res.exit_code == 0, res.output
    assert "| model | 100% of slices | 75% of slices | 50% of slices | 25% of slices |" in res.output
    assert "| msnet |" in res.output and "report:" in res.output
    # the headline comparison is printed too: every trained model with its test accuracy
    metrics = json.loads((trained_run / "evaluate" / "metrics.json").read_text())
    for name, m in metrics["by_aggregator"].items():
        assert name in res.output and f"{100 * m['accuracy']:.1f}" in res.output


def test_partial_needs_checkpoints_and_features(tmp_path, trained_run):
    from msnet.stages.partial import partial_scans

    (tmp_path / "train" / "msnet").mkdir(parents=True)
    (tmp_path / "train" / "msnet" / "predictions.csv").write_text("patient_id,label,split\n")
    with pytest.raises(MsnetError, match="no trained aggregator checkpoints"):
        partial_scans(tmp_path)
    with pytest.raises(MsnetError, match="fractions"):
        partial_scans(trained_run, fractions=(0.0,))
