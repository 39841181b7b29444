"""evaluate_run on run folders built in tmp_path (the training stage's file contract)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msnet.errors import MsnetError
from msnet.stages.evaluate import evaluate_run, format_console_table, headline_table

CLASSES = ("COVID-19", "CAP", "NORMAL")
FIELDS = ["patient_id", "label", "subset", "split", "fold", "prediction"] + [f"p_{c}" for c in CLASSES]


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _write_model(run: Path, name: str, rows: list[dict], n_params: int, history: list[dict] | None = None) -> None:
    folder = run / "train" / name
    _write_csv(folder / "predictions.csv", FIELDS, rows)
    info = {"aggregator": name, "backbone": "resnet18", "features": "abc123", "n_parameters": n_params}
    (folder / "info.json").write_text(json.dumps(info))
    if history is not None:
        _write_csv(folder / "history.csv", ["fold", "epoch", "train_loss", "val_loss", "val_accuracy"], history)


def _fake_model_rows(rng: np.random.Generator, n: int, signal: float) -> list[dict]:
    """Two-fold CV: every patient is test once (its fold), train in the other fold."""
    labels = rng.integers(0, 3, n)
    rows = []
    for i, y in enumerate(labels):
        test_fold = i % 2
        for fold in (0, 1):
            p = rng.dirichlet([1.0, 1.0, 1.0])
            p[y] += signal
            p /= p.sum()
            split = "test" if fold == test_fold else ("val" if i % 5 == 0 else "train")
            rows.append(
                {
                    "patient_id": f"P{i:03d}",
                    "label": CLASSES[y],
                    "subset": "test" if i < n - 10 else "external",
                    "split": split,
                    "fold": fold,
                    "prediction": CLASSES[int(np.argmax(p))],
                    **{f"p_{c}": f"{v:.6f}" for c, v in zip(CLASSES, p)},
                }
            )
    return rows


def _history(rng: np.random.Generator, epochs: int = 6) -> list[dict]:
    return [
        {
            "fold": fold,
            "epoch": e,
            "train_loss": 1.1 * 0.8**e + 0.01 * rng.random(),
            "val_loss": 1.1 * 0.85**e + 0.02 * rng.random(),
            "val_accuracy": min(1.0, 0.4 + 0.08 * e),
        }
        for fold in (0, 1)
        for e in range(epochs)
    ]


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    _write_model(run, "mean", _fake_model_rows(rng, 80, signal=0.3), 99, _history(rng))
    _write_model(run, "msnet", _fake_model_rows(rng, 80, signal=0.7), 123456, _history(rng))
    table1 = "| COVID-19 sens. | CAP sens. | NORMAL sens. | accuracy |\n|---|---|---|---|\n| 1 | 2 | 3 | 4 |"
    (run / "finetune").mkdir()
    (run / "finetune" / "metrics.json").write_text(json.dumps({"accuracy": 0.9, "table1": table1}))
    evaluate_run(run)
    return run


def _accuracy_from_csv(path: Path) -> float:
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    assert len(rows) == 80  # one out-of-fold row per patient
    return float(np.mean([r["label"] == r["prediction"] for r in rows]))


def test_metrics_json_top_level_is_msnet(fake_run: Path) -> None:
    metrics = json.loads((fake_run / "evaluate" / "metrics.json").read_text())
    assert metrics["aggregator"] == "msnet"
    assert set(metrics["by_aggregator"]) == {"msnet", "mean"}
    expected = _accuracy_from_csv(fake_run / "train" / "msnet" / "predictions.csv")
    assert metrics["accuracy"] == pytest.approx(expected)
    mean_acc = _accuracy_from_csv(fake_run / "train" / "mean" / "predictions.csv")
    assert metrics["by_aggregator"]["mean"]["accuracy"] == pytest.approx(mean_acc)
    assert metrics["n"] == 80
    lo, hi = metrics["ci"]["accuracy"]
    assert lo <= metrics["accuracy"] <= hi
    assert set(metrics["sensitivity"]) == set(CLASSES)
    assert metrics["f1"] == metrics["macro_f1"] and metrics["auc"] == metrics["macro_auc"]
    assert set(metrics["fold_accuracy"]) == {"0", "1"}
    assert "| external |" in metrics["table3"] and "| test |" in metrics["table3"]
    for key in ("ece", "brier"):  # calibration of the (temperature-scaled) test probabilities
        assert 0.0 <= metrics[key] <= 2.0 and 0.0 <= metrics["by_aggregator"]["mean"][key] <= 2.0


def test_predictions_csv_concatenates_test_rows(fake_run: Path) -> None:
    with (fake_run / "evaluate" / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 160
    assert {r["aggregator"] for r in rows} == {"msnet", "mean"}
    assert {r["split"] for r in rows} == {"test"}
    assert "p_NORMAL" in rows[0]


def test_report_names_both_models_and_links_plots(fake_run: Path) -> None:
    out = fake_run / "evaluate"
    report = (out / "report.md").read_text()
    assert "| **msnet** |" in report and "| mean |" in report
    assert "123,456" in report  # parameter count of msnet
    assert "Table 3" in report and "Table 1" in report and "| 1 | 2 | 3 | 4 |" in report
    for png in [
        "confusion_matrix_msnet.png",
        "confusion_matrix_mean.png",
        "roc_msnet.png",
        "roc_mean.png",
        "training_curves.png",
        "comparison.png",
        "reliability.png",
    ]:
        assert f"]({png})" in report
        path = out / png
        with Image.open(path) as img:
            assert img.format == "PNG"
            assert img.size[0] > 200 and img.size[1] > 200
        assert path.stat().st_size > 5000
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_headline_table_and_console(fake_run: Path) -> None:
    metrics = json.loads((fake_run / "evaluate" / "metrics.json").read_text())
    lines = headline_table(metrics).splitlines()
    assert len(lines) == 4  # header, rule, two models
    assert lines[2].startswith("| **msnet** | resnet18 | abc123 |")
    acc = metrics["by_aggregator"]["mean"]["accuracy"]
    assert f"{100 * acc:.1f} [" in lines[3]
    table = format_console_table(metrics)
    assert table.row_count == 2


def test_table3_hand_made(tmp_path: Path) -> None:
    def row(pid: str, label: str, pred: str, subset: str) -> dict:
        p = {c: 0.8 if c == pred else 0.1 for c in CLASSES}
        return {"patient_id": pid, "label": label, "subset": subset, "split": "test", "fold": 0,
                "prediction": pred, **{f"p_{c}": p[c] for c in CLASSES}}

    rows = [
        row("a", "COVID-19", "COVID-19", "test"),
        row("b", "COVID-19", "CAP", "test"),
        row("c", "CAP", "CAP", "test"),
        row("d", "NORMAL", "NORMAL", "test"),
        row("e", "NORMAL", "COVID-19", "ext"),
        row("f", "COVID-19", "COVID-19", "ext"),
        {**row("g", "CAP", "CAP", "test"), "split": "train"},  # not counted
    ]
    _write_model(tmp_path, "mean", rows, 10)
    evaluate_run(tmp_path, n_boot=50)
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert metrics["aggregator"] == "mean"  # no msnet: the first model is primary
    lines = metrics["table3"].splitlines()
    assert lines[2] == "| test | 1/2 | 1/1 | 1/1 | 75.0% (3/4) |"
    assert lines[3] == "| ext | 1/1 | 0/0 | 0/1 | 50.0% (1/2) |"
    assert lines[4] == "| **All** | 2/3 | 1/1 | 1/2 | 66.7% (4/6) |"
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["confusion_matrix"] == [[2, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert not (tmp_path / "evaluate" / "training_curves.png").exists()  # no history.csv


def test_repeated_test_patient_is_ensembled(tmp_path: Path) -> None:
    base = {"label": "CAP", "subset": "test", "split": "test", "prediction": "CAP"}
    rows = [
        {**base, "patient_id": "x", "fold": 0, "p_COVID-19": 0.6, "p_CAP": 0.3, "p_NORMAL": 0.1},
        {**base, "patient_id": "x", "fold": 1, "p_COVID-19": 0.0, "p_CAP": 0.9, "p_NORMAL": 0.1},
        {**base, "patient_id": "y", "fold": 0, "label": "NORMAL", "prediction": "NORMAL",
         "p_COVID-19": 0.1, "p_CAP": 0.1, "p_NORMAL": 0.8},
    ]
    _write_model(tmp_path, "msnet", rows, 10)
    evaluate_run(tmp_path, n_boot=50)
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert metrics["n"] == 2  # patients, not rows
    assert metrics["accuracy"] == 1.0  # x: mean probabilities favour CAP


def test_missing_train_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(MsnetError, match="msnet train CONFIG"):
        evaluate_run(tmp_path)


def test_bad_predictions_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "train" / "msnet" / "predictions.csv"
    _write_csv(path, ["patient_id", "label", "p_A", "p_B"], [{"patient_id": "a", "label": "A", "p_A": 1, "p_B": 0}])
    with pytest.raises(MsnetError, match="missing columns") as info:
        evaluate_run(tmp_path)
    assert str(path) in str(info.value)


def test_no_test_rows_is_an_error(tmp_path: Path) -> None:
    rows = _fake_model_rows(np.random.default_rng(1), 6, 0.5)
    rows = [{**r, "split": "train"} for r in rows]
    _write_model(tmp_path, "msnet", rows, 10)
    with pytest.raises(MsnetError, match="split=test"):
        evaluate_run(tmp_path)
