"""The service under hostile input and slow clients (issue 11), with a stub model (tests/stubs.py)
that reads studies exactly as the Predictor does; a real server on 127.0.0.1 for the
connection tests."""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from conftest import DICOM_ZOO, P001
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from stubs import StubPredictor

from msnet.service.app import ServiceSettings, create_app, make_server

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
P001_FILES = sorted(P001.glob("*.dcm"))
MB = 1 << 20

needs_data = pytest.mark.usefixtures("shared_data")  # the real scans beside the repository


@pytest.fixture
def client(tmp_path):
    tmp = tmp_path / "uploads"
    tmp.mkdir()
    app = create_app(None, ServiceSettings(tmp_dir=str(tmp)), predictor=StubPredictor())
    with TestClient(app) as c:
        yield c
    assert app.state.pool.wait_idle(30)
    assert list(tmp.iterdir()) == [], "per-request temp dirs were left behind"


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / MB


def _post(c, name: str, data: bytes):
    return c.post("/v1/predict", files={"file": (name, data, "application/octet-stream")})


def _nifti_bytes(data: np.ndarray, gz: bool) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(data, np.eye(4))
    buf = io.BytesIO()
    file_map = nib.Nifti1Image.make_file_map({"image": buf, "header": buf})
    img.to_file_map(file_map)
    raw = buf.getvalue()
    if gz:
        import gzip

        raw = gzip.compress(raw, compresslevel=1)
    return raw


@needs_data
def test_nan_volume_answers_422_json(client):
    import nibabel as nib

    data = np.asarray(nib.load(DICOM_ZOO / "totalsegmentator-example" / "example_ct.nii.gz").dataobj).astype(np.float32)
    data[:, :, 7] = np.nan
    r = _post(client, "ct.nii", _nifti_bytes(data, gz=False))
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"
    assert "NaN or infinite" in r.json()["detail"] and "/tmp" not in r.json()["detail"]


@needs_data
def test_limits_answer_413_without_memory_growth(client):
    r = _post(client, "bomb.nii.gz", _nifti_bytes(np.zeros((2048, 2048, 64), np.int16), gz=True))  # 1 MB -> 512 MiB
    assert r.status_code == 413 and "would expand to" in r.json()["detail"]
    ds = pydicom.dcmread(P001_FILES[40])
    ds.Rows = ds.Columns = 20000
    buf = io.BytesIO()
    ds.save_as(buf)
    before = _rss_mb()
    r = _post(client, "huge.dcm", buf.getvalue())
    assert r.status_code == 413 and "20000 x 20000" in r.json()["detail"]
    assert _rss_mb() - before < 100


@needs_data
@pytest.mark.parametrize("how", ["crc", "size"])
def test_corrupt_zip_answers_422(client, how):
    from test_hostile import _corrupt, _zip_of

    r = _post(client, "case.zip", _corrupt(_zip_of(P001_FILES[:3]), how))
    assert r.status_code == 422 and "corrupt zip member" in r.json()["detail"] and "Bad CRC-32" in r.json()["detail"]


def test_docs_work_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "/docs-static/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text.replace("https://fastapi", "")
    js = client.get("/docs-static/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000 and b"SwaggerUIBundle" in js.content
    assert client.get("/docs-static/swagger-ui.css").status_code == 200
    assert client.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]["responses"]["503"]


def test_stalled_upload_answers_408(tmp_path):
    with _Server(ServiceSettings(tmp_dir=str(tmp_path), read_timeout_s=0.5)) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; "
                  b"filename=\"a.dcm\"\r\n\r\nabc")
        answer = _answer_of(s, 5.0)
        s.close()
        srv.app.state.pool.wait_idle(10)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"stalled for 0.5 s" in answer
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ slow clients on loopback


class _Server:
    """A real uvicorn server (the same configuration as `msnet serve`) on 127.0.0.1, in a thread."""

    def __init__(self, settings: ServiceSettings):
        self.app = create_app(None, settings, predictor=StubPredictor())
        self.server = make_server(self.app, "127.0.0.1", 0, log_level="warning")
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()


def _idle_connection(url: str) -> socket.socket:
    """A client that sends the request line and one header line, then nothing."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return s


def _answer_of(s: socket.socket, wait_s: float) -> bytes:
    s.settimeout(wait_s)
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except socket.timeout:
        pass
    return data


def test_slow_clients_do_not_lock_out_health_or_real_clients(tmp_path):
    """50 idle connections (one header line each) + 20 real clients: /health stays 200, every real
    client gets its answer, and the only refusals are the documented 503s with Retry-After."""
    study = CT_SMALL.read_bytes()
    settings = ServiceSettings(tmp_dir=str(tmp_path), max_connections=32, header_timeout_s=2.0, workers=2,
                               queue_size=18)
    with _Server(settings) as srv:
        idle = [_idle_connection(srv.url) for _ in range(50)]
        health: list[int] = []
        results: list[tuple[str, int, str | None]] = []
        errors: list[str] = []
        stop = threading.Event()

        def poll_health():
            with httpx.Client(timeout=10) as c:
                while not stop.is_set():
                    try:
                        health.append(c.get(srv.url + "/health").status_code)
                    except httpx.HTTPError as exc:
                        errors.append(f"health: {type(exc).__name__}")
                    time.sleep(0.05)

        def real_client(k: int):
            try:
                with httpx.Client(timeout=30) as c:
                    r = c.post(srv.url + "/v1/predict", files={"file": ("ct.dcm", study)}, data={"study_id": f"c{k}"})
                    results.append(("predict", r.status_code, r.headers.get("retry-after")))
                    r = c.get(srv.url + "/health")
                    results.append(("health", r.status_code, r.headers.get("retry-after")))
            except httpx.HTTPError as exc:
                errors.append(f"client {k}: {type(exc).__name__}: {exc}")

        poller = threading.Thread(target=poll_health)
        poller.start()
        clients = [threading.Thread(target=real_client, args=(k,)) for k in range(20)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(60)
        stop.set()
        poller.join(10)
        answers = [_answer_of(s, 4.0) for s in idle]  # the idle ones: 503 to make room, else 408 at the deadline
        for s in idle:
            s.close()
        stats = srv.app.state.guard.stats()

    assert errors == []
    assert health and set(health) == {200}
    assert len(results) == 40
    refused = [r for r in results if r[1] != 200]
    assert all(code == 503 and retry for _, code, retry in refused), refused
    assert sum(1 for kind, code, _ in results if kind == "predict" and code == 200) >= 15
    firsts = [a.split(b"\r\n", 1)[0] for a in answers]
    assert set(firsts) <= {b"HTTP/1.1 503 Service Unavailable", b"HTTP/1.1 408 Request Timeout"}, set(firsts)
    assert all(b"retry-after: 5" in a for a in answers if a.startswith(b"HTTP/1.1 503"))
    assert stats["closed_to_make_room"] + stats["closed_slow_headers"] == 50


def test_health_answers_while_connections_are_busy(tmp_path):
    """More busy requests than max_connections: other routes get 503 + Retry-After, /health 200."""
    settings = ServiceSettings(tmp_dir=str(tmp_path), max_connections=2, header_timeout_s=5.0, read_timeout_s=5.0)
    with _Server(settings) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        busy = []
        for _ in range(3):  # uploads whose headers are complete but whose bodies never come
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 100000\r\n\r\n--b\r\n")
            busy.append(s)
        time.sleep(0.3)
        with httpx.Client(timeout=10) as c:
            assert c.get(srv.url + "/health").status_code == 200
            r = c.get(srv.url + "/openapi.json")
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
        for s in busy:
            s.close()


def test_access_log_never_shows_a_viewer_token(tmp_path):
    """The real server's access log (uvicorn, as `msnet serve` runs it) records viewer requests with the
    token replaced: a token found in a log would open that study's images to whoever reads the log."""
    token = "Zq3_secret-token-value-1234"
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    access = logging.getLogger("uvicorn.access")
    with _Server(ServiceSettings(tmp_dir=str(tmp_path))) as srv:
        access.addHandler(handler)
        try:
            access.setLevel(logging.INFO)
            for path in (f"/v1/studies/{token}", f"/v1/studies/{token}/slices/3.png?window=lung",
                         f"/v1/studies/{token}/cam/3.png", "/health"):
                httpx.get(srv.url + path, timeout=10)
            deadline = time.monotonic() + 5
            while len(records) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            access.removeHandler(handler)
    assert len(records) >= 4, records
    assert not [r for r in records if token in r], records
    assert any("/v1/studies/<token>/slices/3.png?window=lung" in r for r in records)
    assert any("/health" in r for r in records)
