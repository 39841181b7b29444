"""The FHIR R4 output (``--fhir-out``): a transaction Bundle of a DiagnosticReport, one Observation per
class and the model as Device, checked here with fhir.resources' R4B models (FHIR 4.3.0: the same
elements as R4 4.0.1 for these four resources; fhir.resources >= 7 is R5 at its top level)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import P001
from msnet.cli import app
from msnet.errors import MsnetError
from msnet.inference.dicom_out import ModelIdentity
from msnet.inference.writers import StudyContext, write_outputs
from msnet.inference.writers.fhir import fhir_bundle, validate_r4
from msnet.service.pacs import prepare_outputs

R4_REPORT_STATUS = {"registered", "partial", "preliminary", "final", "amended", "corrected", "appended", "cancelled",
                    "entered-in-error", "unknown"}  # FHIR R4 DiagnosticReport.status (fhir.resources does not check codes)
R4_OBSERVATION_STATUS = R4_REPORT_STATUS - {"partial", "appended"}
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "AccessionNumber",
               "ReferringPhysicianName", "InstitutionName", "PatientAddress")
MODEL = ModelIdentity("msnet-efficientnet_lite0-msnet", "0.1.0", "3f" * 32, "research on chest CT triage")


@pytest.fixture(scope="module")
def p001(shared_data):
    from msnet.io import read_study

    return read_study(P001)


def _prediction(vol, study_id="P001") -> dict:
    return {"study_id": study_id, "prediction": "CAP", "probabilities": {"COVID-19": 0.15, "CAP": 0.7, "NORMAL": 0.15},
            "n_slices": vol.n_slices, "key_slices": [{"slice_index": 60, "score": 0.9}, {"slice_index": 85, "score": 0.8}],
            "warnings": ["the lungs are partly outside the scan (apex missing)"], "model": {"name": MODEL.name}}


def _by_type(bundle: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in bundle["entry"]:
        out.setdefault(e["resource"]["resourceType"], []).append(e)
    return out


def test_the_bundle_is_valid_fhir_r4_and_says_what_the_prediction_says(p001, tmp_path):
    from fhir.resources.R4B import __fhir_version__, get_fhir_model_class

    pred = _prediction(p001)
    [path] = write_outputs(["fhir"], pred, StudyContext(p001, MODEL), tmp_path)
    assert path == tmp_path / "P001" / "msnet-fhir.json"
    bundle = json.loads(path.read_text())
    assert __fhir_version__ == "4.3.0"
    parsed = get_fhir_model_class("Bundle").model_validate(bundle)
    assert parsed.type == "transaction"
    for e in bundle["entry"]:  # each resource against its own R4B model (unknown elements are refused)
        get_fhir_model_class(e["resource"]["resourceType"]).model_validate(e["resource"])
    kinds = _by_type(bundle)
    assert sorted(kinds) == ["Device", "DiagnosticReport", "Observation"]
    [report], [device] = kinds["DiagnosticReport"], kinds["Device"]
    urls = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    assert len(urls) == len(bundle["entry"])

    r = report["resource"]
    assert r["status"] in R4_REPORT_STATUS and r["status"] != "final"  # nobody verified it
    observations = [urls[ref["reference"]] for ref in r["result"]]
    assert {o["code"]["coding"][0]["display"]: o["valueQuantity"]["value"] for o in observations} == {
        f"Probability of {c}": p for c, p in pred["probabilities"].items()}
    assert all(o["status"] in R4_OBSERVATION_STATUS and o["valueQuantity"]["system"] == "http://unitsofmeasure.org"
               for o in observations)
    assert {urls[o["device"]["reference"]]["resourceType"] for o in observations} == {"Device"}
    assert {(c["system"], c["code"]) for c in r["conclusionCode"][0]["coding"]} == {("http://snomed.info/sct", "385093006")}
    for text in (r["conclusion"], r["text"]["div"], device["resource"]["note"][0]["text"]):
        assert "research use only" in text.lower()
    assert "CAP" in r["conclusion"] and "0.700" in r["conclusion"] and "apex missing" in r["conclusion"]
    assert "60 (z" in r["conclusion"] and "85 (z" in r["conclusion"]  # key slices by index, as in the JSON and the SR
    assert {i["value"] for i in device["resource"]["identifier"]} == {MODEL.bundle_hash}
    assert device["resource"]["version"][0]["value"] == MODEL.version
    assert all(e["request"]["method"] == "PUT" and "?identifier=" in e["request"]["url"] for e in bundle["entry"])


def test_no_patient_data_only_the_pseudonymous_study_id(p001, tmp_path):
    header = p001.dicom_headers
    values = [str(header.get(k)) for k in IDENTIFYING if str(header.get(k, "") or "").strip()]
    assert values  # P001 has a PatientID: the test can fail
    [path] = write_outputs(["fhir"], _prediction(p001), StudyContext(p001, MODEL), tmp_path)
    text = path.read_text()
    assert not [v for v in values if v in text]
    kinds = _by_type(json.loads(text))
    assert "Patient" not in kinds and "subject" not in kinds["DiagnosticReport"][0]["resource"]
    ids = kinds["DiagnosticReport"][0]["resource"]["identifier"]
    assert {"system": "urn:msnet:study-id", "value": "P001"} in ids

    # a study named after its PatientID: the id is replaced by a hash, the name never written
    named = _prediction(p001, study_id=str(header.PatientID))
    [path] = write_outputs(["fhir"], named, StudyContext(p001, MODEL), tmp_path / "named")
    assert str(header.PatientID) not in path.read_text()


def test_the_same_result_twice_is_the_same_report(p001, tmp_path):
    """Conditional updates on stable identifiers: posting a result again replaces it, never duplicates it."""
    pred = _prediction(p001)
    a, b = fhir_bundle(pred, StudyContext(p001, MODEL)), fhir_bundle(pred, StudyContext(p001, MODEL))
    assert [e["request"]["url"] for e in a["entry"]] == [e["request"]["url"] for e in b["entry"]]
    assert [e["fullUrl"] for e in a["entry"]] == [e["fullUrl"] for e in b["entry"]]
    other = fhir_bundle(pred, StudyContext(p001, ModelIdentity(MODEL.name, "0.2.0", "a1" * 32)))
    assert other["entry"][-1]["request"]["url"] != a["entry"][-1]["request"]["url"]  # another model: another report


def test_invalid_resources_and_a_missing_package_are_clear_errors(p001, monkeypatch):
    bundle = fhir_bundle(_prediction(p001), StudyContext(p001, MODEL))
    bundle["entry"][-1]["resource"]["note"] = [{"text": "R5 has DiagnosticReport.note, R4 has not"}]
    with pytest.raises(MsnetError, match="do not validate"):
        validate_r4(bundle)
    with pytest.raises(MsnetError, match="not among the probabilities"):
        fhir_bundle({**_prediction(p001), "prediction": "TB"}, StudyContext(p001, MODEL))
    monkeypatch.setitem(sys.modules, "fhir.resources.R4B", None)  # as if not installed
    with pytest.raises(MsnetError, match=r"msnet\[fhir\]"):
        validate_r4(fhir_bundle(_prediction(p001), StudyContext(p001, MODEL)))
    with pytest.raises(MsnetError, match=r"msnet\[fhir\]"):  # --fhir-out: before any study is read
        prepare_outputs({"fhir": Path("fhir-out")})


def test_predict_fhir_out_writes_one_report_per_study(tiny_bundle, shared_data, tmp_path):
    from fhir.resources.R4B import get_fhir_model_class

    out = tmp_path / "fhir"
    res = CliRunner().invoke(app, ["predict", str(tiny_bundle), str(P001), "--json", "--fhir-out", str(out)])
    assert res.exit_code == 0, res.output
    [printed] = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    bundle = json.loads((out / "P001" / "msnet-fhir.json").read_text())
    get_fhir_model_class("Bundle").model_validate(bundle)
    kinds = _by_type(bundle)
    values = {o["resource"]["code"]["coding"][0]["display"].removeprefix("Probability of "):
              o["resource"]["valueQuantity"]["value"] for o in kinds["Observation"]}
    assert values == pytest.approx(printed["probabilities"], abs=1e-6)
    assert printed["prediction"] in kinds["DiagnosticReport"][0]["resource"]["conclusion"]
    assert [p.name for p in Path(out).rglob("*") if p.is_file()] == ["msnet-fhir.json"]  # no DICOM without --dicom-out


def test_listen_fhir_out_writes_a_report_per_received_study(tiny_bundle, shared_data, p001, tmp_path, monkeypatch):
    """``msnet listen --fhir-out`` hands the folder to the listener, whose worker calls pacs.diagnose with
    it for every study it receives (study id: the StudyInstanceUID; no DICOM kept without --dicom-out)."""
    from msnet.service import listener, pacs

    seen = {}
    monkeypatch.setattr(listener.Listener, "serve_forever", lambda self: seen.update(listener=self))
    out = tmp_path / "fhir"
    res = CliRunner().invoke(app, ["listen", str(tiny_bundle), "--spool", str(tmp_path / "spool"), "--fhir-out", str(out)])
    assert res.exit_code == 0, res.output
    served = seen["listener"]
    assert served.s.outputs == {"fhir": out}
    uid = str(p001.dicom_headers.StudyInstanceUID)
    result, kept = pacs.diagnose(served.predictor, P001, tiny_bundle, study_id=uid, dicom_out=served.s.dicom_out,
                                 outputs=served.s.outputs)
    assert kept == [] and [p.relative_to(out).as_posix() for p in out.rglob("*.json")] == [f"{uid}/msnet-fhir.json"]
    report = _by_type(json.loads((out / uid / "msnet-fhir.json").read_text()))["DiagnosticReport"][0]["resource"]
    assert {"system": "urn:msnet:study-id", "value": uid} in report["identifier"]
    assert f"msnet result: {result['prediction']}" in report["conclusion"]
