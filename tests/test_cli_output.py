"""What the command line prints: every error once, a JSON line per study with --json (the failed ones as
error objects of docs/prediction.schema.json), help without type tags, the shipped configs named."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
from typer.testing import CliRunner

import msnet
from msnet.bench import temp_bundle
from msnet.cli import app
from msnet.inference.export import synthetic_studies

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "prediction.schema.json").read_text())


def test_predict_reports_a_failed_study_once(tmp_path):
    bundle = temp_bundle("cpu", tmp_path / "bundle", size=64)
    good = synthetic_studies(tmp_path / "s", n=1, size=64, slices=(10, 10), seed=2)[0]
    bad = tmp_path / "not_a_study"
    bad.mkdir()
    (bad / "notes.txt").write_text("not a scan")
    runner = CliRunner()

    result = runner.invoke(app, ["predict", str(bundle), str(good), str(bad), "--json", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    lines = [json.loads(ln) for ln in result.stdout.splitlines()]
    assert len(lines) == 2
    for obj in lines:
        jsonschema.validate(obj, SCHEMA)
    assert "prediction" in lines[0] and lines[0]["n_slices"] == 10
    assert lines[1]["status"] == "failed" and lines[1]["study_id"] == "not_a_study"
    assert "no DICOM files or images" in lines[1]["error"] and "not_a_study" in lines[1]["error"]
    assert "no DICOM files or images" not in result.stderr  # said once, on stdout

    plain = runner.invoke(app, ["predict", str(bundle), str(bad), "--device", "cpu"])
    assert plain.exit_code == 1
    assert " ".join(plain.output.split()).count("no DICOM files or images") == 1, plain.output


def test_index_lists_a_failed_study_once(tmp_path):
    root = tmp_path / "cohort"
    (root / "covid" / "p1").mkdir(parents=True)
    (root / "covid" / "p1" / "x.dcm").write_text("not DICOM")
    result = CliRunner().invoke(app, ["index", str(root), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert " ".join(result.output.split()).count("no DICOM files or images") == 1, result.output


def test_help_has_no_type_tags_and_names_the_configs():
    runner = CliRunner()
    shipped = sorted(p.stem for p in (Path(msnet.__file__).parent / "configs").glob("*.yaml"))
    for args in (["index", "--help"], ["predict", "--help"], ["run", "--help"], ["listen", "--help"]):
        out = runner.invoke(app, args, env={"COLUMNS": "200"}).output
        assert "<bool>" not in out and "<list[" not in out and "<str>" not in out, out
    out = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output
    assert "--overwrite" in out and "PATH" not in out.split("--overwrite")[1].split("\n")[0]  # a flag: no value
    assert all(name in out for name in shipped) and len(shipped) >= 5, out
    assert "PATH" in runner.invoke(app, ["index", "--help"], env={"COLUMNS": "200"}).output  # -o takes a folder
