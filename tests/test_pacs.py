"""The PACS path against a real Orthanc (DICOMweb plugin) and dcmtk: read a study by WADO-RS, write
the diagnosis back as SR + Key Object Selection by STOW-RS, and the C-STORE listener.

The Debian packages come from `.ci/run`; where they are absent these tests skip with the command
that installs them. Key slices are checked against an order computed here from the uploaded files'
ImagePositionPatient (superior first), not against the reader's own list.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from conftest import require_system_tool
import pytest
from typer.testing import CliRunner

from msnet.cli import app
from msnet.errors import MsnetError

INSTALL = "apt-get install orthanc orthanc-dicomweb dcmtk dicom3tools"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
SNOMED = {"COVID-19": "840539006", "CAP": "385093006", "NORMAL": "17621005"}  # docs/pacs.md, "What the SR says"
REPO = Path(__file__).resolve().parents[1]


def _dcmtk(tool: str) -> str | None:
    """A dcmtk tool (pynetdicom installs its own `storescu` script, which must not be picked up)."""
    dsrdump = shutil.which("dsrdump")
    if dsrdump is None:
        return None
    path = Path(dsrdump).with_name(tool)
    return str(path) if path.is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(check, timeout_s: float, what: str, step_s: float = 0.25):
    """Poll ``check()`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


@dataclass
class Orthanc:
    http: str
    dicom_port: int

    @property
    def dicomweb(self) -> str:
        return f"{self.http}/dicom-web"

    def get(self, path: str, **kw):
        import httpx

        r = httpx.get(f"{self.http}{path}", timeout=30, **kw)
        r.raise_for_status()
        return r

    def upload(self, folder: Path) -> str:
        import httpx

        uid = None
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            r = httpx.post(f"{self.http}/instances", content=f.read_bytes(), timeout=30)
            r.raise_for_status()
            uid = uid or pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID
        return uid

    def series(self, study_uid: str) -> list[dict]:
        """Every series of a study: its Modality and the parsed files of its instances."""
        import httpx

        found = httpx.post(f"{self.http}/tools/lookup", content=study_uid, timeout=30).json()
        study = next((f["ID"] for f in found if f["Type"] == "Study"), None)
        if study is None:
            return []
        out = []
        for s in self.get(f"/studies/{study}/series").json():
            files = [pydicom.dcmread(BytesIO(self.get(f"/instances/{i}/file").content)) for i in s["Instances"]]
            out.append({"modality": s["MainDicomTags"].get("Modality"), "uid": s["MainDicomTags"]["SeriesInstanceUID"],
                        "files": files})
        return out


class OrthancProcess(Orthanc):
    """An Orthanc server process that a test can stop and start again (same ports, same storage)."""

    def __init__(self, root: Path):
        super().__init__(f"http://127.0.0.1:{_free_port()}", _free_port())
        self.root, self.proc, self.logfile = root, None, None
        config = {"Name": "msnet-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
                  "HttpPort": int(self.http.rsplit(":", 1)[1]), "DicomPort": self.dicom_port, "DicomAet": "ORTHANC",
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [str(PLUGIN)],
                  "StableAge": 1, "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        (root / "orthanc.json").write_text(json.dumps(config))

    def start(self) -> None:
        self.logfile = open(self.root / "orthanc.log", "a")
        self.proc = subprocess.Popen([ORTHANC, str(self.root / "orthanc.json")], stdout=self.logfile,
                                     stderr=subprocess.STDOUT, cwd=self.root)

        def up():
            if self.proc.poll() is not None:
                pytest.fail(f"Orthanc exited: {(self.root / 'orthanc.log').read_text()[-2000:]}")
            try:
                return self.get("/system").json()
            except Exception:
                return None

        _wait_for(up, 30, "Orthanc to start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        if self.logfile is not None:
            self.logfile.close()
        self.proc = self.logfile = None


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """Orthanc on free loopback ports, temp storage, DICOMweb on, remote access off."""
    require_system_tool(Path(ORTHANC).is_file() and PLUGIN.is_file() and bool(_dcmtk("dsrdump")) and bool(_dcmtk("storescu")),
                        f"Orthanc with its DICOMweb plugin and dcmtk are needed: {INSTALL}")
    server = OrthancProcess(tmp_path_factory.mktemp("orthanc"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _canonical_uids(folder: Path) -> list[str]:
    """SOPInstanceUIDs of an axial series, superior first (highest ImagePositionPatient z)."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in folder.rglob("*") if f.is_file()]
    headers.sort(key=lambda d: -float(d.ImagePositionPatient[2]))
    return [str(d.SOPInstanceUID) for d in headers]


def _items(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _meaning(item) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning) if "ConceptNameCodeSequence" in item else ""


def _test_study(bundle: Path, label: str, k: int = 0) -> Path:
    from msnet.data.cohorts import read_cohort

    rows = [r for r in read_cohort(bundle.parent.parent / "data" / "cohort.csv") if r["label"] == label]
    return Path(rows[k]["path"])


def _check_results(orthanc: Orthanc, study_uid: str, source: Path, pred: dict, n_ct: int = 1) -> Path:
    """The study holds one SR and one KO series (new series, besides its ``n_ct`` CT series) naming the
    predicted class and exactly the key slices."""
    series = orthanc.series(study_uid)
    sr = [s for s in series if s["modality"] == "SR"]
    ko = [s for s in series if s["modality"] == "KO"]
    ct = [s for s in series if s["modality"] == "CT"]
    assert len(sr) == 1 and len(ko) == 1 and len(ct) == n_ct, [s["modality"] for s in series]
    source_series = str(pydicom.dcmread(next(p for p in source.rglob("*") if p.is_file())).SeriesInstanceUID)
    assert len({sr[0]["uid"], ko[0]["uid"], source_series}) == 3
    src = pydicom.dcmread(next(p for p in source.rglob("*") if p.is_file()), stop_before_pixels=True)
    uids = _canonical_uids(source)
    keys = {uids[k["slice_index"]] for k in pred["key_slices"]}
    assert keys and len(keys) == len(pred["key_slices"])

    report = sr[0]["files"][0]
    assert report.StudyInstanceUID == study_uid
    for keyword in ("PatientID", "PatientName", "PatientSex", "StudyDate", "AccessionNumber"):  # copied, as DICOM asks
        assert str(report.get(keyword) or "") == str(src.get(keyword) or ""), keyword
    items = list(_items(report))
    finding = [i for i in items if _meaning(i) == "Finding"]
    assert [i.ConceptCodeSequence[0].CodeValue for i in finding] == [SNOMED[pred["prediction"]]]
    probs = {_meaning(i).removeprefix("Probability of "): float(i.MeasuredValueSequence[0].NumericValue)
             for i in items if i.ValueType == "NUM"}
    assert probs.keys() == pred["probabilities"].keys()
    np.testing.assert_allclose([probs[c] for c in probs], [pred["probabilities"][c] for c in probs], atol=1e-6)
    texts = [str(i.TextValue) for i in items if i.ValueType == "TEXT"]
    text = " ".join(texts)
    assert "research use only" in text.lower() and pred["prediction"] in text
    # everything the JSON warns about, and the model card's intended use, as text items of their own
    warned = [t.removeprefix("Warning: ") for i, t in zip([i for i in items if i.ValueType == "TEXT"], texts)
              if _meaning(i) == "Warning"]
    if isinstance(pred.get("warnings"), list):
        assert warned == pred["warnings"]
    assert any(t.startswith("Intended use: Research use only") for t in texts)
    numbering = next(t for t in texts if t.startswith("Key slices by slice index (0 = most superior slice"))
    assert [int(part.split(" (")[0]) for part in numbering.split(": ", 1)[1].split(", ")] == \
        [k["slice_index"] for k in pred["key_slices"]]
    sr_refs = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in items if i.ValueType == "IMAGE"}
    assert sr_refs == keys

    kos = ko[0]["files"][0]
    assert kos.StudyInstanceUID == study_uid and kos.PatientID == src.PatientID
    refs = [str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in _items(kos) if i.ValueType == "IMAGE"]
    assert sorted(refs) == sorted(keys)
    evidence = {str(ref.ReferencedSOPInstanceUID) for s in kos.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for ref in se.ReferencedSOPSequence}
    assert evidence == keys
    return report


def _validate(path: Path) -> None:
    """dciodvfy (dicom3tools) finds no error; warnings (such as the local coding scheme) are allowed."""
    dciodvfy = shutil.which("dciodvfy")
    require_system_tool(dciodvfy is not None, f"dciodvfy is needed: {INSTALL}")
    check = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def _dump_and_validate(ds, tmp_path: Path) -> str:
    """dsrdump parses the document and dciodvfy finds no error; returns the dump."""
    path = tmp_path / f"{ds.Modality}.dcm"
    ds.save_as(path)
    dump = subprocess.run([_dcmtk("dsrdump"), str(path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0 and "Document" in dump.stdout, dump.stderr
    _validate(path)
    return dump.stdout


@pytest.mark.parametrize("which", ["synthetic", "real"])
def test_predict_dicomweb_url_stores_sr_and_ko_in_the_study(which, tiny_bundle, orthanc, tmp_path, request):
    from msnet.inference.predictor import Predictor

    if which == "real":
        from conftest import P001

        request.getfixturevalue("shared_data")
        source = P001
    else:
        source = _test_study(tiny_bundle, "COVID-19")
    study_uid = orthanc.upload(source)
    url = f"{orthanc.dicomweb}/studies/{study_uid}"
    out = tmp_path / "dicom"
    explain = ["--explain", str(tmp_path / "explain")] if which == "synthetic" else []  # + Secondary Capture
    runs = []
    for _ in range(2):  # the same study stored twice: the archive still holds one SR and one KO
        res = CliRunner().invoke(app, ["predict", str(tiny_bundle), url, "--json", "--store", orthanc.dicomweb,
                                       "--dicom-out", str(out), *explain])
        assert res.exit_code == 0, res.output
        runs.append(json.loads(next(line for line in res.stdout.splitlines() if line.startswith("{"))))
    pred = runs[0]
    assert runs[1]["prediction"] == pred["prediction"] and runs[1]["key_slices"] == pred["key_slices"]
    assert pred["warnings"] and "synthetic" in pred["warnings"][0]  # the tiny bundle's own warning, at least
    assert pred["study_id"] == study_uid and pred["n_slices"] == len(_canonical_uids(source))

    # the study read over DICOMweb gives the same diagnosis as the same files read from the folder
    local = Predictor(tiny_bundle, device="cpu").predict(source)
    local = local.to_dict() if hasattr(local, "to_dict") else local
    assert local["prediction"] == pred["prediction"]
    assert [k["slice_index"] for k in local["key_slices"]] == [k["slice_index"] for k in pred["key_slices"]]
    np.testing.assert_allclose(list(local["probabilities"].values()), list(pred["probabilities"].values()), atol=1e-5)

    report = _check_results(orthanc, study_uid, source, pred)
    written = sorted(p.name for p in (out / study_uid).iterdir())
    assert written == (["msnet-ko.dcm", "msnet-sc.dcm", "msnet-sr.dcm"] if explain else ["msnet-ko.dcm", "msnet-sr.dcm"])
    dump = _dump_and_validate(report, tmp_path)
    assert "Imaging Measurement Report" in dump and f"Probability of {pred['prediction']}" in dump
    _dump_and_validate(pydicom.dcmread(out / study_uid / "msnet-ko.dcm"), tmp_path)
    if explain:
        sc = [s for s in orthanc.series(study_uid) if s["modality"] == "OT"]
        assert len(sc) == 1 and sc[0]["files"][0].PhotometricInterpretation == "RGB"
        assert sc[0]["files"][0].StudyInstanceUID == study_uid
        _validate(out / study_uid / "msnet-sc.dcm")


def test_missing_study_is_a_clear_per_study_error(tiny_bundle, orthanc, tmp_path):
    url = f"{orthanc.dicomweb}/studies/1.2.826.0.1.3680043.8.498.1"
    res = CliRunner().invoke(app, ["predict", str(tiny_bundle), url, "--json", "--out", str(tmp_path)])
    assert res.exit_code == 1
    status = (tmp_path / "status.csv").read_text()
    assert "not found" in status and "1.2.826.0.1.3680043.8.498.1" in status


def test_unreachable_server_is_retried_then_reported(monkeypatch):
    import requests

    from msnet.io import dicomweb, read_study

    monkeypatch.setattr(dicomweb, "WAIT_S", 0.0)
    calls = []
    real_send = requests.Session.send
    monkeypatch.setattr(requests.Session, "send", lambda self, *a, **k: calls.append(1) or real_send(self, *a, **k))
    url = f"http://127.0.0.1:{_free_port()}/dicom-web/studies/1.2.3"  # nothing listens there
    with pytest.raises(MsnetError, match=f"after {dicomweb.ATTEMPTS} tries") as exc:
        read_study(url)
    assert len(calls) == dicomweb.ATTEMPTS and url in str(exc.value)


def test_credentials_never_travel_in_the_url():
    from msnet.io import read_study

    with pytest.raises(MsnetError, match="MSNET_DICOMWEB") as exc:
        read_study("https://alice:s3cret@pacs.example/dicom-web/studies/1.2.3")
    assert "s3cret" not in str(exc.value) and "alice" not in str(exc.value)


def test_sop_instance_uids_follow_the_slices_when_one_is_skipped(tiny_bundle, tmp_path):
    from msnet.io import read_study

    study = tmp_path / "study"
    shutil.copytree(_test_study(tiny_bundle, "NORMAL"), study)
    uids = _canonical_uids(study)
    victim = sorted(study.iterdir())[2]
    lost = str(pydicom.dcmread(victim, stop_before_pixels=True).SOPInstanceUID)
    victim.write_bytes(victim.read_bytes()[:-5000])  # pixel data cut short: this slice cannot be decoded
    vol = read_study(study)
    assert any("could not be decoded" in w for w in vol.warnings)
    assert vol.sop_instance_uids == [u for u in uids if u != lost] and vol.n_slices == len(uids) - 1
    assert vol.dicom_headers.StudyInstanceUID == pydicom.dcmread(victim, stop_before_pixels=True).StudyInstanceUID
    assert "dicom_headers" not in repr(vol)  # the header (patient module) is never printed with the volume


def test_dicom_results_need_a_dicom_source(tmp_path):
    from msnet.inference.dicom_out import ModelIdentity, write_sr
    from msnet.io import CTVolume

    vol = CTVolume(np.zeros((3, 8, 8), np.float32), (1.0, 1.0, 1.0), np.array([0.0, -1.0, -2.0]), "nifti-study", "x.nii")
    with pytest.raises(MsnetError, match="needs a DICOM study|need a DICOM study"):
        write_sr(vol, "CAP", {"COVID-19": 0.1, "CAP": 0.8, "NORMAL": 0.1}, [1], tmp_path, ModelIdentity("m", "1", "0" * 64))
    assert not any(tmp_path.iterdir())


def test_listener_receives_a_study_and_stores_sr_back(tiny_bundle, orthanc, tmp_path):
    """Study A is diagnosed once quiet; study B, sent just before SIGTERM, is diagnosed while draining."""
    source, source_b = _test_study(tiny_bundle, "CAP"), _test_study(tiny_bundle, "COVID-19", 1)
    first = pydicom.dcmread(next(source.iterdir()), stop_before_pixels=True)
    study_uid, patient_id = str(first.StudyInstanceUID), str(first.PatientID)
    study_b = str(pydicom.dcmread(next(source_b.iterdir()), stop_before_pixels=True).StudyInstanceUID)
    port, spool = _free_port(), tmp_path / "spool"
    listener = _listener(tiny_bundle, port, spool, "--allow", "TESTSCU", "--store-aet",
                         f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", quiet_s=2)
    storescu = [_dcmtk("storescu"), "-aec", "MSNET", "127.0.0.1", str(port), "+sd", str(source)]
    try:
        refused = subprocess.run([*storescu[:1], "-aet", "INTRUDER", *storescu[1:]], capture_output=True, timeout=60)
        assert refused.returncode != 0  # association rejected: calling AE title not allowed
        sent = subprocess.run([*storescu[:1], "-aet", "TESTSCU", *storescu[1:]], capture_output=True, text=True,
                              timeout=120)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        _wait_for(lambda: any(s["modality"] == "SR" for s in orthanc.series(study_uid)), 180,
                  "the SR to arrive in Orthanc", step_s=1.0)
        _wait_for(lambda: (spool / "outcomes.jsonl").is_file(), 30, "the outcome log")
        sent = subprocess.run([*storescu[:1], "-aet", "TESTSCU", *storescu[1:-1], str(source_b)], capture_output=True,
                              text=True, timeout=120)
        assert sent.returncode == 0, sent.stdout + sent.stderr
    finally:
        listener.send_signal(signal.SIGTERM)
        try:
            output, _ = listener.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            listener.kill()
            raise
    assert listener.returncode == 0, output
    lines = [json.loads(line) for line in (spool / "outcomes.jsonl").read_text().splitlines()]
    assert [(x["study_uid"], x["status"]) for x in lines] == [(study_uid, "ok"), (study_b, "ok")]
    assert any(s["modality"] == "SR" for s in orthanc.series(study_b))
    assert lines[0]["calling_aet"] == "TESTSCU" and lines[0]["instances"] == len(_canonical_uids(source))
    pred = {"prediction": lines[0]["prediction"], "probabilities": lines[0]["probabilities"],
            "key_slices": [{"slice_index": k} for k in lines[0]["key_slices"]]}
    _check_results(orthanc, study_uid, source, pred, n_ct=0)  # the images went to msnet only
    assert patient_id not in (spool / "outcomes.jsonl").read_text() and patient_id not in output
    assert not [p for p in spool.iterdir() if p.is_dir() and p.name != "outbox"]  # received files removed
    assert not list((spool / "outbox").iterdir())  # every result stored


def test_a_failed_store_keeps_the_diagnosis_and_names_the_study(tiny_bundle, tmp_path, monkeypatch):
    """The archive is down: the diagnosis is printed and written first; the failure names the study; exit 1;
    a re-run does the study again (its result was never stored)."""
    from msnet.io import dicomweb

    monkeypatch.setattr(dicomweb, "WAIT_S", 0.0)
    source = _test_study(tiny_bundle, "CAP")
    down = f"http://127.0.0.1:{_free_port()}/dicom-web"  # nothing listens there
    res = CliRunner().invoke(app, ["predict", str(tiny_bundle), str(source), "--json", "--store", down,
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 1, res.output
    pred = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("{")))
    assert pred["study_id"] == source.name and pred["n_slices"] == len(_canonical_uids(source))
    assert f"study {source.name}: diagnosed ({pred['prediction']}" in res.output and "not stored" in res.output
    assert "after 3 tries" in res.output
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [(x["prediction"]["prediction"], x["stored"]) for x in lines] == [(pred["prediction"], False)]
    status = (tmp_path / "out" / "status.csv").read_text()
    assert "failed" in status and source.name in status
    from msnet.inference.batch import _finished

    assert _finished(tmp_path / "out") == {}  # not done: a re-run diagnoses and stores it


def test_urls_that_are_not_dicomweb_say_so(orthanc, tmp_path):
    """Orthanc's REST API, one of its web pages, and a plain web server: each is named as not DICOMweb, with
    the URL to use, instead of a parse error."""
    import http.server
    import threading

    from msnet.inference.dicom_out import store_stow
    from msnet.io import read_study

    sr = tmp_path / "x.dcm"
    pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm")).save_as(sr)
    with pytest.raises(MsnetError, match="not a DICOMweb endpoint") as exc:
        read_study(f"{orthanc.http}/studies/1.2.3")
    assert f"{orthanc.http}/dicom-web" in str(exc.value)
    with pytest.raises(MsnetError, match="not a DICOMweb endpoint") as exc:
        store_stow(f"{orthanc.http}/app/explorer.html", [sr])
    assert f"{orthanc.http}/dicom-web" in str(exc.value)

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # a viewer: every path answers its HTML page
            body = b"<!doctype html><html><body>viewer</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/viewer/studies/1.2.3"
        with pytest.raises(MsnetError, match=r"not a DICOMweb endpoint \(text/html") as exc:
            read_study(url)
        assert "JSONDecodeError" not in str(exc.value) and "DICOMweb" in exc.value.fix
    finally:
        server.shutdown()
    assert orthanc.get("/system").json()  # nothing above disturbed the real server


def _listener(tiny_bundle: Path, port: int, spool: Path, *options: str, quiet_s: int = 1) -> subprocess.Popen:
    """`msnet listen` on ``port`` with ``options`` (where to store, who may call), once its port is open."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "msnet", "listen", str(tiny_bundle), "--ae-title", "MSNET", "--port", str(port),
           "--quiet-seconds", str(quiet_s), "--spool", str(spool), "--device", "cpu", *options]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def listening():
        if proc.poll() is not None:
            pytest.fail(f"listener exited: {proc.stdout.read()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    _wait_for(listening, 120, "the listener to open its port")
    return proc


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, output
    return output


def _outcomes(spool: Path) -> list[dict]:
    path = spool / "outcomes.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def test_listener_keeps_results_while_the_archive_is_down_and_never_duplicates(tiny_bundle, orthanc, tmp_path):
    """Archive down: the study is received and diagnosed, its result waits in the outbox (reported as pending,
    kept across a restart of the listener); archive up again: the SR and KO arrive. The same study sent
    again later gives no second SR or KO."""
    source = _test_study(tiny_bundle, "COVID-19", 2)
    study_uid = str(pydicom.dcmread(next(source.iterdir()), stop_before_pixels=True).StudyInstanceUID)
    port, spool = _free_port(), tmp_path / "spool"
    storescu = [_dcmtk("storescu"), "-aet", "TESTSCU", "-aec", "MSNET", "127.0.0.1", str(port), "+sd", str(source)]
    status_cmd = [sys.executable, "-m", "msnet", "listen", "--status", "--spool", str(spool)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    orthanc.stop()
    try:
        listener = _listener(tiny_bundle, port, spool, "--store", orthanc.dicomweb, "--retry-seconds", "1")
        try:
            sent = subprocess.run(storescu, capture_output=True, text=True, timeout=120)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            pending = _wait_for(lambda: [x for x in _outcomes(spool) if x["status"] == "pending"], 180,
                                "the result to be reported pending", step_s=1.0)
        finally:
            output = _stop(listener)
        assert pending[0]["study_uid"] == study_uid and pending[0]["prediction"] in SNOMED
        assert "after 3 tries" in pending[0]["error"]
        status = json.loads(subprocess.run(status_cmd, env=env, capture_output=True, text=True, timeout=60).stdout)
        assert [p["study_uid"] for p in status["pending"]] == [study_uid] and status["pending"][0]["attempts"] >= 1
        assert not status["queued"] and "sent after the next start" in output
    finally:
        orthanc.start()
    listener = _listener(tiny_bundle, port, spool, "--store", orthanc.dicomweb, "--retry-seconds", "1")
    try:
        _wait_for(lambda: any(s["modality"] == "SR" for s in orthanc.series(study_uid)), 120,
                  "the SR to arrive in Orthanc after the restart", step_s=1.0)
        first = {s["modality"]: s["files"][0].SOPInstanceUID for s in orthanc.series(study_uid)}
        sent = subprocess.run(storescu, capture_output=True, text=True, timeout=120)  # the same study again
        assert sent.returncode == 0, sent.stdout + sent.stderr
        _wait_for(lambda: len([x for x in _outcomes(spool) if x["status"] == "ok"]) == 2, 180,
                  "the second diagnosis to be stored", step_s=1.0)
    finally:
        _stop(listener)
    lines = _outcomes(spool)
    assert [(x["study_uid"], x["status"]) for x in lines] == [(study_uid, "pending"), (study_uid, "ok"),
                                                              (study_uid, "ok")]
    pred = {"prediction": lines[1]["prediction"], "probabilities": lines[1]["probabilities"],
            "key_slices": [{"slice_index": k} for k in lines[1]["key_slices"]]}
    _check_results(orthanc, study_uid, source, pred, n_ct=0)  # one SR and one KO, after three stores
    assert {s["modality"]: s["files"][0].SOPInstanceUID for s in orthanc.series(study_uid)} == first
    status = json.loads(subprocess.run(status_cmd, env=env, capture_output=True, text=True, timeout=60).stdout)
    assert status["pending"] == [] and status["queued"] == []
