"""The writer registry (msnet.inference.writers): each output kind is a registered writer; a new one
is one class and one registration; the DICOM writers give the objects the PACS path wrote before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from conftest import P001
from msnet.errors import MsnetError
from msnet.inference.dicom_out import ModelIdentity
from msnet.inference.writers import DICOM, WRITERS, StudyContext, Writer, base, get_writer, register_writer, write_outputs
from msnet.io import CTVolume
from msnet.service.pacs import prepare_outputs

MODEL = ModelIdentity("msnet-efficientnet_lite0-msnet", "0.1.0", "5e" * 32)
SOP = {"sr": "1.2.840.10008.5.1.4.1.1.88.33", "ko": "1.2.840.10008.5.1.4.1.1.88.59", "sc": "1.2.840.10008.5.1.4.1.1.7"}


@pytest.fixture(scope="module")
def p001(shared_data):
    from msnet.io import read_study

    return read_study(P001)


def _prediction(study_id="P001") -> dict:
    return {"study_id": study_id, "prediction": "COVID-19", "probabilities": {"COVID-19": 0.8, "CAP": 0.15, "NORMAL": 0.05},
            "key_slices": [{"slice_index": 70}, {"slice_index": 90}], "warnings": []}


def test_every_output_kind_is_registered_once():
    assert {"sr", "ko", "sc", "fhir"} <= set(WRITERS)
    assert all(isinstance(w, Writer) and w.name == n and w.summary for n, w in WRITERS.items())
    assert set(DICOM) == {"sr", "ko", "sc"} and get_writer("sc").needs == {"dicom", "explanation"}
    with pytest.raises(MsnetError, match="no output named 'pdf'.*sr, ko, sc, fhir"):
        get_writer("pdf")


def test_a_new_output_is_one_class_and_one_registration(monkeypatch, p001, tmp_path):
    monkeypatch.setattr(base, "WRITERS", dict(base.WRITERS))  # the registration ends with the test
    prepared = []

    @register_writer
    class Summary(Writer):
        name = "summary-txt"
        summary = "one line of text per study"

        def prepare(self, out):
            prepared.append(out)

        def write(self, prediction, study, out):
            path = Path(out) / f"{prediction['study_id']}.txt"
            path.write_text(f"{prediction['prediction']} by {study.model.name}\n")
            return [path]

    assert prepare_outputs({"summary-txt": tmp_path, "fhir": None}) == {"summary-txt": tmp_path}
    assert prepared == [tmp_path]  # checked once, before any study
    [path] = write_outputs(["summary-txt"], _prediction(), StudyContext(p001, MODEL), tmp_path)
    assert path.read_text() == f"COVID-19 by {MODEL.name}\n"
    with pytest.raises(ValueError, match="two writers named 'summary-txt'"):
        register_writer(Summary)
    with pytest.raises(ValueError, match="needs"):
        register_writer(type("Pdf", (Summary,), {"name": "pdf", "needs": frozenset({"printer"})}))


def test_dicom_writers_write_sr_ko_and_sc_only_when_explained(p001, tmp_path):
    study = p001.dicom_headers.StudyInstanceUID
    files = write_outputs(DICOM, _prediction(), StudyContext(p001, MODEL), tmp_path / "plain")
    assert [f.relative_to(tmp_path / "plain").as_posix() for f in files] == ["P001/msnet-sr.dcm", "P001/msnet-ko.dcm"]
    png = tmp_path / "strip.png"
    Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (32, 2, 1)).reshape(32, 128, 1).repeat(3, 2)).save(png)
    explained = write_outputs(DICOM, _prediction(), StudyContext(p001, MODEL, png), tmp_path / "explained")
    datasets = {f.stem.removeprefix("msnet-"): pydicom.dcmread(f) for f in explained}
    assert {k: str(ds.SOPClassUID) for k, ds in datasets.items()} == SOP
    assert {str(ds.StudyInstanceUID) for ds in datasets.values()} == {study}
    again = {f.stem.removeprefix("msnet-"): pydicom.dcmread(f) for f in files}
    assert all(again[k].SOPInstanceUID == datasets[k].SOPInstanceUID for k in again)  # same result, same objects
    sc = datasets["sc"].pixel_array
    assert sc.shape == (32, 128, 3) and np.array_equal(sc, np.asarray(Image.open(png).convert("RGB")))


def test_dicom_outputs_need_a_dicom_study_and_fhir_does_not(tmp_path):
    vol = CTVolume(np.zeros((3, 8, 8), np.float32), (1.0, 1.0, 1.0), np.array([0.0, -1.0, -2.0]), "nifti-study", "x.nii")
    pred = {**_prediction("nifti-study"), "key_slices": [{"slice_index": 1}]}
    with pytest.raises(MsnetError, match="need a DICOM study"):
        write_outputs(["sr"], pred, StudyContext(vol, MODEL), tmp_path)
    [path] = write_outputs(["fhir"], pred, StudyContext(vol, MODEL), tmp_path)
    report = json.loads(path.read_text())["entry"][-1]["resource"]
    assert {"system": "urn:msnet:study-id", "value": "nifti-study"} in report["identifier"]
