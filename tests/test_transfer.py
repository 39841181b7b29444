"""`finetune --test` on a cohort whose classes differ from the model's: infection scores and their AUCs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from msnet.errors import MsnetError
from msnet.stages.transfer import infection_metrics, normal_class


def _patient(label, scores, labels=None):
    return {"label": label, "scores": np.asarray(scores, float), "slice_labels": None if labels is None else np.asarray(labels)}


def test_infection_aucs_on_known_cases():
    # infected slices score highest, normal patients lowest, unlabelled slices of COVID patients in between
    pats = [_patient("COVID-19", [0.9, 0.5, 0.8, 0.4], [1, 0, 1, 0]),
            _patient("CAP", [0.3, 0.7], [0, 1]),
            _patient("NORMAL", [0.1, 0.2, 0.35], [1, 1, 1]),  # a normal patient's slice labels count for nothing
            _patient("COVID-19", [0.99, 0.99])]  # no slice labels: left out
    m = infection_metrics(pats)
    assert m["infection_auc_vs_normal"] == 1.0
    assert m["infection_auc_within_patients"] == 1.0
    assert (m["n_infected_slices"], m["n_normal_patient_slices"], m["n_unlabelled_slices"]) == (3, 3, 3)
    assert (m["n_labelled_patients"], m["n_normal_patients"], m["n_patients_without_slice_labels"]) == (2, 1, 1)
    # a model that scores normal lungs as infected: AUC 0 against normal patients
    flipped = [_patient("COVID-19", [0.2, 0.6], [1, 0]), _patient("NORMAL", [0.8, 0.9])]
    m = infection_metrics(flipped)
    assert m["infection_auc_vs_normal"] == 0.0 and m["infection_auc_within_patients"] == 0.0
    # ties count half; nothing to compare against gives None
    m = infection_metrics([_patient("CAP", [0.5, 0.5], [1, 0])])
    assert m["infection_auc_within_patients"] == 0.5 and m["infection_auc_vs_normal"] is None


def test_normal_class_of_the_model():
    assert normal_class(["COVID-19", "NON-COVID"]) == "NON-COVID"
    assert normal_class(["COVID", "NonCOVID"]) == "NonCOVID"
    assert normal_class(["COVID-19", "CAP", "NORMAL"]) == "NORMAL"
    assert normal_class(["COVID-19", "HEALTHY"], configured="HEALTHY") == "HEALTHY"
    with pytest.raises(MsnetError, match="no NORMAL or NON-COVID class"):
        normal_class(["COVID-19", "CAP"])


@pytest.fixture(scope="module")
def run_and_cohort(tiny_bundle, tmp_path_factory) -> tuple[Path, Path]:
    """The shared tiny run (its slice model knows COVID-19 / CAP / NORMAL) and a cohort labelled
    COVID / NORMAL with slice labels: classes the model does not have."""
    from msnet.data.synthetic import synth_cohort

    cohort = tmp_path_factory.mktemp("transfer") / "cohort"
    synth_cohort(cohort, n_patients=6, size=128, seed=32, slices=(12, 16), classes=("COVID", "NORMAL"))
    return tiny_bundle.parent.parent, cohort


def test_finetune_test_scores_a_cohort_with_other_classes(run_and_cohort):
    from typer.testing import CliRunner

    from msnet.cli import app
    from msnet.data.cohorts import read_slice_labels

    root, cohort_dir = run_and_cohort
    res = CliRunner().invoke(app, ["finetune", str(root / "config.yaml"), "--test", str(cohort_dir)])
    assert res.exit_code == 0, res.output
    m = json.loads((root / "run" / "finetune" / "test" / cohort_dir.name / "metrics.json").read_text())
    assert m["classes"] == ["COVID-19", "CAP", "NORMAL"] and m["normal_class"] == "NORMAL"
    assert m["cohort_classes"] == ["COVID", "NORMAL"]
    labels = read_slice_labels(cohort_dir / "slice_labels.csv")
    with open(cohort_dir / "cohort.csv") as fh:
        cohort = {r["patient_id"]: r["label"] for r in csv.DictReader(fh)}
    n_infected = sum(int(v.sum()) for p, v in labels.items() if cohort[p] != "NORMAL")
    assert m["n_infected_slices"] == n_infected > 0
    assert m["n_normal_patients"] == 3 and m["n"] == sum(len(v) for v in labels.values())
    # the model learnt lesions, not patients: infected slices score above normal lungs
    assert m["infection_auc_vs_normal"] > 0.8
    assert m["infection_auc_within_patients"] > 0.75
    with open(root / "run" / "finetune" / "test" / cohort_dir.name / "slice_scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == m["n"] and {r["patient_id"] for r in rows} == set(cohort)
    assert all(0.0 <= float(r["infection_score"]) <= 1.0 for r in rows)
    from PIL import Image

    with Image.open(root / "run" / "finetune" / "test" / cohort_dir.name / "slice_scores.png") as im:
        assert im.height > im.width / 3  # one panel per patient, stacked
    # the summary printed names both AUCs and the results folder; --json prints the whole result
    assert f"the {n_infected} labelled infected slices" in res.output
    assert f"{m['infection_auc_vs_normal']:.3f}" in res.output and f"{m['infection_auc_within_patients']:.3f}" in res.output
    assert str(root / "run" / "finetune" / "test" / cohort_dir.name) in res.output
    res = CliRunner().invoke(app, ["finetune", str(root / "config.yaml"), "--test", str(cohort_dir), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["test"]["infection_auc_vs_normal"] == m["infection_auc_vs_normal"]


def test_misaligned_slice_labels_are_refused(run_and_cohort, tmp_path):
    import shutil

    from msnet.config import load_config
    from msnet.stages.finetune import test as finetune_test

    root, cohort_dir = run_and_cohort
    cohort = tmp_path / "cohort"
    shutil.copytree(cohort_dir, cohort)
    with open(cohort / "slice_labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    first = rows[0]["patient_id"]
    last = max(int(r["slice_index"]) for r in rows if r["patient_id"] == first)
    rows = [r for r in rows if not (r["patient_id"] == first and int(r["slice_index"]) == last)]
    with open(cohort / "slice_labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["patient_id", "slice_index", "label"])
        w.writeheader()
        w.writerows(rows)
    cfg = load_config(root / "config.yaml")
    with pytest.raises(MsnetError, match=f"patient {first}: {last} slice labels for {last + 1} slices"):
        finetune_test(cfg, cohort)


def test_scoring_crops_to_the_lungs_when_the_model_was_trained_so(run_and_cohort):
    """A model trained on lung-cropped slices (spec.lung_crop) is scored on lung-cropped slices too."""
    import dataclasses
    from types import SimpleNamespace

    import torch

    from msnet.config import Config
    from msnet.data.cohorts import read_cohort, read_slice_labels
    from msnet.preprocess import PreprocessSpec
    from msnet.stages.ct_eval import score_test_cohort

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x):
            self.seen.append(x.clone())
            return torch.zeros(x.shape[0], 4)

    _, cohort_dir = run_and_cohort
    rows = read_cohort(cohort_dir / "cohort.csv", only_ok=True)[:2]
    labels = read_slice_labels(cohort_dir / "slice_labels.csv")
    air = {}
    for crop in (False, True):
        spec = dataclasses.replace(PreprocessSpec(size=64), lung_crop=crop)
        recorder = Recorder()
        model = SimpleNamespace(classes=["COVID-19", "NORMAL"], spec=spec, backbone=recorder,
                                fc=torch.nn.Linear(4, 2), temperature=1.0)
        metrics = score_test_cohort(Config(), model, cohort_dir, rows, labels)
        x = torch.cat(recorder.seen)
        # the darkest input value is air (-1000 HU and below): outside the body unless cropped away
        air[crop] = float((x <= x.min() + 0.05).float().mean())
        assert metrics["n"] == sum(len(labels[r["patient_id"]]) for r in rows)
    # both lungs' box (the mask keeps both lungs below the carina) still cuts away a third of the air
    assert air[True] < 0.8 * air[False], air


def test_cli_run_reuses_finished_stages_and_prints_the_headline_table(run_and_cohort):
    from typer.testing import CliRunner

    from msnet.cli import app

    root, _ = run_and_cohort
    trained = [root / "run" / "finetune" / "backbone.pt", *sorted((root / "run" / "train").glob("*/*.pt"))]
    before = [p.stat().st_mtime_ns for p in trained]
    res = CliRunner().invoke(app, ["run", str(root / "config.yaml")])
    assert res.exit_code == 0, res.output
    metrics = json.loads((root / "run" / "evaluate" / "metrics.json").read_text())
    assert "msnet" in res.stdout and f"{100 * metrics['accuracy']:.1f}" in res.stdout
    assert f"report: {root / 'run' / 'evaluate' / 'report.md'}" in res.stdout
    assert len(trained) > 1 and [p.stat().st_mtime_ns for p in trained] == before  # finished stages are reused
