"""The HTTP service: predictions over the API and every hardening case (limits, zips, keys, pool, temp dirs)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import jsonschema
import pytest

from fastapi.testclient import TestClient  # noqa: E402

from msnet.service.app import UPLOAD_PREFIX, ServiceSettings, create_app, warn_if_exposed  # noqa: E402

SECRET_NAME, SECRET_ID = "Doe^Jane", "MRN-99871"


@pytest.fixture(scope="module")
def predictor(tiny_bundle):
    from msnet.inference.predictor import Predictor

    return Predictor(tiny_bundle, device="cpu")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """One synthetic DICOM study whose headers carry a (fake) patient name and ID."""
    import pydicom

    from msnet.data.synthetic import synth_cohort

    root = tmp_path_factory.mktemp("svc")
    synth_cohort(root / "data", n_patients=3, size=64, seed=11, slices=(8, 10))
    folder = sorted(p for p in (root / "data").iterdir() if p.is_dir())[0]
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID = SECRET_NAME, SECRET_ID
        ds.save_as(f)
    return folder


def zip_bytes(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return buf.getvalue()


def zip_study(folder: Path) -> bytes:
    return zip_bytes({f"{folder.name}/{f.name}": f.read_bytes() for f in sorted(folder.iterdir())})


@pytest.fixture
def make_client(predictor, tmp_path):
    """TestClient factory; afterwards no per-request temp dir may be left, whatever the test did."""
    tmp = tmp_path / "uploads"
    tmp.mkdir()
    apps = []

    def make(**settings) -> TestClient:
        app = create_app(None, ServiceSettings(tmp_dir=str(tmp), **settings), predictor=predictor)
        apps.append(app)
        return TestClient(app)

    make.tmp = tmp
    yield make
    for app in apps:
        assert app.state.pool.wait_idle(30)
    assert list(tmp.iterdir()) == [], "per-request temp dirs were left behind"


def post(client: TestClient, files, **kw):
    return client.post("/v1/predict", files=files, **kw)


def assert_png_data_url(url: str) -> None:
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ success


def test_health_and_page(make_client, predictor):
    c = make_client()
    h = c.get("/health").json()
    assert h["status"] == "ok" and h["classes"] == list(predictor.classes)
    assert h["model"] == predictor.metadata["name"] and h["auth_required"] is False
    page = c.get("/")
    assert page.status_code == 200 and "Research use only — not for diagnosis" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert c.get("/static/app.js").status_code == 200
    spec = c.get("/openapi.json").json()
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert c.get("/docs").status_code == 200


def test_predict_zip_matches_direct_call(make_client, predictor, study, caplog):
    c = make_client()
    direct = predictor.predict(study, study_id="case-1").to_dict()
    with caplog.at_level(logging.DEBUG):
        r = post(c, {"file": ("study.zip", zip_study(study), "application/zip")}, data={"study_id": "case-1"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["study_id"] == "case-1" and out["prediction"] == direct["prediction"]
    assert out["n_slices"] == direct["n_slices"] == len(out["slice_scores"])
    for cls, p in direct["probabilities"].items():
        assert out["probabilities"][cls] == pytest.approx(p, abs=1e-5)
    assert [k["slice_index"] for k in out["key_slices"]] == [k["slice_index"] for k in direct["key_slices"]]
    assert set(out["timing_s"]) >= {"read", "preprocess", "backbone", "aggregate", "total"}
    assert_png_data_url(out["images"]["key_slices"])
    assert_png_data_url(out["images"]["slice_scores"])
    assert "explanation" not in out and str(make_client.tmp) not in r.text  # no server paths leak
    schema = json.loads((Path(__file__).resolve().parents[1] / "docs" / "prediction.schema.json").read_text())
    jsonschema.validate(out, schema)  # the CLI's and the service's output are one type
    assert set(out) - {"images"} == set(direct)
    # nothing identifying logged; the pseudonym is
    assert SECRET_NAME not in caplog.text and SECRET_ID not in caplog.text and "Doe" not in caplog.text
    assert "case-1" in caplog.text


def test_predict_several_dicom_files(make_client, predictor, study):
    c = make_client()
    files = [("file", (f.name, f.read_bytes(), "application/dicom")) for f in sorted(study.iterdir())]
    r = post(c, files)
    assert r.status_code == 200, r.text
    out = r.json()
    direct = predictor.predict(study).to_dict()
    assert out["prediction"] == direct["prediction"] and out["n_slices"] == len(files)
    assert out["study_id"].startswith("study-")  # a random pseudonym, not a name from the headers
    assert SECRET_NAME not in r.text and SECRET_ID not in r.text


def test_predict_nifti(make_client, predictor, study, tmp_path):
    import nibabel as nib

    from msnet.io import read_study

    vol = read_study(study)
    data = np.ascontiguousarray(vol.hu[::-1, ::-1, ::-1].transpose(2, 1, 0)).astype(np.int16)
    affine = np.diag([vol.spacing_mm[2], vol.spacing_mm[1], vol.spacing_mm[0], 1.0])
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    c = make_client()
    r = post(c, {"file": ("vol.nii.gz", path.read_bytes(), "application/gzip")})
    assert r.status_code == 200, r.text
    out, direct = r.json(), predictor.predict(path).to_dict()
    assert out["n_slices"] == vol.n_slices and out["prediction"] == direct["prediction"]
    assert out["probabilities"] == pytest.approx(direct["probabilities"], abs=1e-5)
    # a zip holding only the NIfTI file is read as that file
    r2 = post(c, {"file": ("vol.zip", zip_bytes({"vol.nii.gz": path.read_bytes()}), "application/zip")})
    assert r2.status_code == 200, r2.text
    assert r2.json()["probabilities"] == pytest.approx(direct["probabilities"], abs=1e-5)


# ------------------------------------------------------------------ limits and bad input


def test_oversize_upload_413(make_client, study):
    c = make_client(max_upload_mb=0.05)
    r = post(c, {"file": ("study.zip", zip_study(study) + b"\0" * 100_000, "application/zip")})
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_oversize_stream_cut_off_while_reading(predictor, tmp_path):
    """Without a Content-Length the body is counted while it streams: reading stops just past the limit."""
    app = create_app(None, ServiceSettings(tmp_dir=str(tmp_path), max_upload_mb=1.0), predictor=predictor)
    chunk, n_chunks = b"x" * 65536, 800  # 50 MiB offered
    head = b'--BND\r\nContent-Disposition: form-data; name="file"; filename="big.dcm"\r\n\r\n'
    pulled, messages = 0, []

    async def receive():
        nonlocal pulled
        pulled += 1
        if pulled == 1:
            return {"type": "http.request", "body": head, "more_body": True}
        return {"type": "http.request", "body": chunk, "more_body": pulled < n_chunks}

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/predict", "raw_path": b"/v1/predict", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"multipart/form-data; boundary=BND")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    assert messages[0]["status"] == 413
    assert pulled <= 1 + (1 << 20) // len(chunk) + 1  # 1 MiB read, not 50
    assert list(tmp_path.iterdir()) == []


def test_zip_bomb_ratio_413(make_client):
    c = make_client()
    bomb = zip_bytes({"a.dcm": b"\0" * (20 << 20)})  # 20 MiB of zeros -> ~20 KiB
    assert len(bomb) < 100_000
    r = post(c, {"file": ("bomb.zip", bomb, "application/zip")})
    assert r.status_code == 413 and "zip bomb" in r.json()["detail"]


def test_zip_expanded_size_413(make_client):
    c = make_client(max_unzipped_mb=0.5)
    data = np.random.default_rng(0).bytes(1 << 20)  # incompressible: ratio ~1, but 1 MiB unzipped
    r = post(c, {"file": ("big.zip", zip_bytes({"a.dcm": data}), "application/zip")})
    assert r.status_code == 413 and "expands" in r.json()["detail"]


def test_zip_too_many_files_413(make_client):
    c = make_client(max_files=5)
    r = post(c, {"file": ("many.zip", zip_bytes({f"s/{i}.dcm": b"x" for i in range(10)}), "application/zip")})
    assert r.status_code == 413 and "10 entries" in r.json()["detail"]
    files = [("file", (f"{i}.dcm", b"x", "application/dicom")) for i in range(6)]
    assert post(c, files).status_code == 413


@pytest.mark.parametrize("member", ["../evil.dcm", "s/../../evil.dcm", "/etc/evil.dcm", "C:/evil.dcm"])
def test_zip_slip_422(make_client, member):
    data = zip_bytes({member: b"payload", "s/ok.dcm": b"x"})
    assert member in zipfile.ZipFile(io.BytesIO(data)).namelist()
    c = make_client()
    r = post(c, {"file": ("slip.zip", data, "application/zip")})
    assert r.status_code == 422 and "outside the archive" in r.json()["detail"]
    assert not (make_client.tmp.parent / "evil.dcm").exists()


@pytest.mark.parametrize("name,data,words", [
    ("junk.bin", b"hello world " * 50, "not a DICOM"),
    ("junk.zip", b"PK\x03\x04 not really a zip", "not a valid zip"),
    ("notes.zip", zip_bytes({"notes/readme.txt": b"just text"}), "no DICOM files"),
    ("vol.nii.gz", b"\x1f\x8b broken gzip", "NIfTI"),
])
def test_not_a_study_422(make_client, name, data, words):
    c = make_client()
    r = post(c, {"file": (name, data, "application/octet-stream")})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert words in detail and str(make_client.tmp) not in detail


def test_bad_requests_422(make_client):
    c = make_client()
    assert c.post("/v1/predict", json={"file": "x"}).status_code == 422
    r = c.post("/v1/predict", data={"study_id": "x"}, files={"other": ("a.dcm", b"x")})
    assert r.status_code == 422 and "field `file`" in r.json()["detail"]


# ------------------------------------------------------------------ access, pool, timeouts


def test_api_key(make_client, study, monkeypatch):
    c = make_client(api_key="s3cret")
    files = {"file": ("study.zip", zip_study(study), "application/zip")}
    assert post(c, files).status_code == 401
    assert post(c, files, headers={"X-API-Key": "wrong"}).status_code == 401
    assert c.get("/health").json()["auth_required"] is True
    assert post(c, files, headers={"X-API-Key": "s3cret"}).status_code == 200
    monkeypatch.setenv("MSNET_API_KEY", "from-env")
    c2 = make_client()
    assert post(c2, files).status_code == 401
    assert post(c2, {"file": ("x.bin", b"x")}, headers={"X-API-Key": "from-env"}).status_code == 422


def test_warning_when_exposed_without_key(caplog):
    with caplog.at_level(logging.WARNING, logger="msnet.service.app"):
        assert warn_if_exposed("0.0.0.0", None) is True
        assert "without an API key" in caplog.text
        caplog.clear()
        assert warn_if_exposed("127.0.0.1", None) is False
        assert warn_if_exposed("::1", None) is False
        assert warn_if_exposed("0.0.0.0", "key") is False
    assert caplog.text == ""


def _slowed(predictor, monkeypatch, gate: threading.Event | None = None, seconds: float = 0.0):
    real = predictor.predict

    def slow(*args, **kwargs):
        if gate is not None:
            assert gate.wait(30)
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(predictor, "predict", slow)


def test_timeout_504_and_cleanup(make_client, predictor, study, monkeypatch):
    gate = threading.Event()
    _slowed(predictor, monkeypatch, gate=gate)
    c = make_client(timeout_s=0.3)
    r = post(c, {"file": ("study.zip", zip_study(study), "application/zip")})
    assert r.status_code == 504 and not gate.is_set()  # answered while the inference is still held back
    gate.set()
    # the abandoned inference still holds its temp dir; it goes once the worker is done (checked by make_client)


def test_queue_full_503(make_client, predictor, study, monkeypatch):
    gate = threading.Event()
    _slowed(predictor, monkeypatch, gate=gate)
    c = make_client(workers=1, queue_size=1)
    pool = c.app.state.pool
    files = {"file": ("study.zip", zip_study(study), "application/zip")}
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(post(c, files).status_code)) for _ in range(2)]
    for th in threads:
        th.start()
    deadline = time.time() + 20
    while pool.busy < 2 and time.time() < deadline:
        time.sleep(0.02)
    assert pool.busy == 2  # one running, one waiting
    r = post(c, files)
    assert r.status_code == 503 and r.headers["retry-after"]
    gate.set()
    for th in threads:
        th.join(60)
    assert results == [200, 200]


def test_temp_dirs_removed_on_every_path(make_client, predictor, study, monkeypatch):
    """Count temp dirs before and after: success, reader error, zip refusal and a crash in the predictor."""
    c = make_client()
    before = len(list(make_client.tmp.glob(UPLOAD_PREFIX + "*")))
    assert post(c, {"file": ("s.zip", zip_study(study), "application/zip")}).status_code == 200
    assert post(c, {"file": ("j.bin", b"junk")}).status_code == 422
    assert post(c, {"file": ("b.zip", zip_bytes({"../x": b"x"}), "application/zip")}).status_code == 422

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(predictor, "predict", boom)
    r = post(c, {"file": ("s.zip", zip_study(study), "application/zip")})
    assert r.status_code == 500 and "simulated" not in r.text
    assert len(list(make_client.tmp.glob(UPLOAD_PREFIX + "*"))) == before == 0
