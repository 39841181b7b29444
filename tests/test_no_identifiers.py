"""No identifier in any log (issue 27, item 6): a real scan (cap002, whose UIDs are invalid GUID strings)
with planted patient values and a second series is diagnosed by the CLI (with --verbose), the HTTP
service and the DICOM listener; nothing they log, print or warn holds any UID or identifying value of
the input."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pydicom
import pytest

from conftest import CAP002, REPO
from ct_cases import IDENTIFIERS

TESTS = Path(__file__).resolve().parent
INVALID_SERIES_UID = "7afb0d48-ec01-4941-9a58-66d15cab76fb"  # cap002's own: a GUID, not a DICOM UID
_IDENTIFYING_VRS = {"UI", "PN", "DA", "TM", "DT"}
_IDENTIFYING_KEYWORDS = {"PatientID", "AccessionNumber", "InstitutionName", "StationName", "DeviceSerialNumber",
                         "StudyID", "OtherPatientIDs", "InstitutionAddress"}


@pytest.fixture(scope="module")
def case(shared_data, tmp_path_factory) -> tuple[Path, set[str]]:
    """cap002 (every 3rd slice) with the planted identifiers, its invalid SeriesInstanceUID kept, plus a
    5-slice second series; and every identifying value of the input."""
    root = tmp_path_factory.mktemp("ids") / "case"
    root.mkdir()
    files = sorted(CAP002.glob("*.dcm"))
    study_uid = "1.2.826.0.1.3680043.10.999.1"
    values: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the invalid UIDs are the point
        for k, f in enumerate(files[::3] + files[1:10:2]):
            ds = pydicom.dcmread(f)
            for key, value in IDENTIFIERS.items():
                setattr(ds, key, value)
            ds.StudyInstanceUID = study_uid
            ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.999.2.{k + 1}"
            ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.999.3"
            second = k >= len(files[::3])
            ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.999.4" if second else INVALID_SERIES_UID
            ds.SeriesNumber = 3 if second else 2
            ds.save_as(root / f"{k:04d}.dcm")
            for elem in ds.iterall():
                text = str(elem.value).strip() if elem.VR != "SQ" and not isinstance(elem.value, bytes) else ""
                if len(text) < 6:
                    continue
                if (elem.VR in _IDENTIFYING_VRS and not text.startswith("1.2.840.10008")) \
                        or elem.keyword in _IDENTIFYING_KEYWORDS:
                    values.add(text)
    values |= {v for v in IDENTIFIERS.values() if len(v) >= 6}
    assert INVALID_SERIES_UID in values and "Doe^Jane^Q" in values and study_uid in values
    return root, values


def _leaks(text: str, values: set[str]) -> list[str]:
    return sorted(v for v in values if v in text)


def _env() -> dict:
    path = os.pathsep.join([str(REPO / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, COLUMNS="200")


def test_cli_logs_no_identifier(case, tiny_bundle, tmp_path):
    folder, values = case
    runs = [["-v", "predict", str(tiny_bundle), str(folder), "--device", "cpu", "--out", str(tmp_path / "out")],
            ["-v", "predict", str(tiny_bundle), str(folder), "--device", "cpu", "--json", "--series", "1"],
            ["-v", "inspect", str(folder)], ["inspect", str(folder), "--series", "9.9.9"]]
    for args in runs:
        proc = subprocess.run([sys.executable, "-W", "default", "-m", "msnet", *args], env=_env(),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == (2 if args[-1] == "9.9.9" else 0 if args[1] != "predict" or "--out" in args
                                   else proc.returncode), proc.stderr[-2000:]
        assert _leaks(proc.stdout + proc.stderr, values) == [], (args, proc.stderr[-2000:])
        if args[-1] != "9.9.9" and "--json" not in args:
            assert "2 series found" in proc.stdout + proc.stderr  # the listing is there, by index, without UIDs
    assert "not found in this study" in proc.stderr
    assert (tmp_path / "out" / "predictions.jsonl").read_text().strip()
    for f in (tmp_path / "out").iterdir():  # the outputs (a pseudonymous study id) too
        assert _leaks(f.read_text(), values) == [], f.name


def test_service_logs_no_identifier(case, tiny_bundle, tmp_path, caplog, capfd):
    from fastapi.testclient import TestClient

    from msnet.inference.predictor import Predictor
    from msnet.service.app import ServiceSettings, create_app

    folder, values = case
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"case/{f.name}")
    predictor = Predictor(tiny_bundle, device="cpu")
    app = create_app(None, ServiceSettings(tmp_dir=str(tmp_path)), predictor=predictor)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught, TestClient(app) as client:
        warnings.simplefilter("always")
        ok = client.post("/v1/predict", files={"file": ("case.zip", buf.getvalue())}, data={"study_id": "p-1"})
        other = client.post("/v1/predict", files={"file": ("case.zip", buf.getvalue())},
                            data={"study_id": "p-2", "series": "1"})
        missing = client.post("/v1/predict", files={"file": ("case.zip", buf.getvalue())},
                              data={"study_id": "p-3", "series": "1.2.826.0.1.3680043.10.999.77"})
    assert ok.status_code == 200 and other.status_code in (200, 422) and missing.status_code == 422
    assert ok.json()["n_slices"] == len(list(folder.iterdir())) - 5
    if other.status_code == 200:
        assert other.json()["n_slices"] == 5
    out, err = capfd.readouterr()
    logged = "\n".join(r.getMessage() for r in caplog.records) + out + err + "\n".join(str(w.message) for w in caught)
    assert _leaks(logged, values) == []
    assert _leaks(ok.text + other.text + missing.text, values) == []


def test_listener_logs_no_identifier(case, tiny_bundle, tmp_path, caplog, capfd):
    """The listener's diagnosis step (the one that reads, predicts and logs): its process log names the
    study by a hash only; the outcome log keeps the StudyInstanceUID, by design (docs/pacs.md), and
    nothing else of the input."""
    import shutil

    from msnet.inference.predictor import Predictor
    from msnet.service.listener import Listener, ListenerSettings, _Study

    folder, values = case
    study_uid = str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).StudyInstanceUID)
    spool = tmp_path / "spool"
    listener = Listener(Predictor(tiny_bundle, device="cpu"), tiny_bundle, ListenerSettings(spool=spool))
    received, apex = spool / "queued-x", spool / "queued-y"
    shutil.copytree(folder, received)
    apex.mkdir()
    for f in sorted(folder.iterdir())[-5:]:  # the second series alone: 5 slices of the apex, refused
        shutil.copy(f, apex / f.name)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for path in (received, apex):  # the worker loop of the listener, on two received studies
            listener._held += 1
            listener._queue.put(_Study(study_uid, path, "MODALITY", time.monotonic(), n=len(list(path.iterdir()))))
        listener._queue.put(None)
        listener._work()
    out, err = capfd.readouterr()
    logged = "\n".join(r.getMessage() for r in caplog.records) + out + err + "\n".join(str(w.message) for w in caught)
    assert "study " in logged and _leaks(logged, values) == []
    lines = [json.loads(line) for line in (spool / "outcomes.jsonl").read_text().splitlines()]
    assert [x["status"] for x in lines] == ["ok", "failed"] and lines[1]["error"]
    assert all(x["study_uid"] == study_uid for x in lines)  # the outcome log's one DICOM value, by design
    assert _leaks(json.dumps(lines), values - {study_uid}) == []


def test_to_dict_serialises_the_schema_fields_only():
    """The root cause the probe found: ``dataclasses.asdict`` deep-copied ``extra`` (the HU volume and the
    pydicom header, whose re-validation printed UIDs). ``to_dict`` now never touches ``extra``, and
    every field it writes is one the JSON Schema lists."""
    from dataclasses import fields

    import jsonschema
    import numpy as np

    from msnet.inference.predictor import Prediction

    class Untouchable:
        def __deepcopy__(self, memo):
            raise AssertionError("extra was copied")

        __copy__ = __reduce_ex__ = __deepcopy__

    p = Prediction(study_id="s1", prediction="CAP", probabilities={"CAP": 0.7, "NORMAL": 0.3}, n_slices=2,
                   key_slices=[{"slice_index": np.int64(1), "score": 1.0}], slice_scores=[0.5, 1.0],
                   timing_s={k: 0.0 for k in ("read", "preprocess", "backbone", "aggregate", "total")},
                   warnings=[], model={"name": "m", "bundle_sha256": "0" * 16, "msnet_version": "x", "runtime": "torch"},
                   extra={"volume": Untouchable(), "header": Untouchable()})
    d = p.to_dict()
    schema = json.loads((REPO / "docs" / "prediction.schema.json").read_text())
    listed = set(schema["$defs"]["prediction"]["properties"])
    assert {f.name for f in fields(Prediction)} - {"extra"} <= listed
    assert "extra" not in d and type(d["key_slices"][0]["slice_index"]) is int
    jsonschema.validate(d, schema)
    p.key_slices[0]["slice_index"] = np.zeros(2)  # an array is never serialised by accident
    with pytest.raises(TypeError, match="key_slices"):
        p.to_dict()
