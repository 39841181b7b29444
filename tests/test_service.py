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

from conftest import CAP002
from fastapi.testclient import TestClient  # noqa: E402

from msnet.service.app import UPLOAD_PREFIX, ServiceSettings, create_app, warn_if_exposed  # noqa: E402
from msnet.service.viewer import ViewerStore, ViewerStudy  # noqa: E402

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
    assert set(out) - {"images", "viewer"} == set(direct)
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


# ------------------------------------------------------------------ the page's study viewer


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG" and not im.text  # no text chunks: nothing but pixels
    return np.asarray(im)


def viewer_get(c: TestClient, token: str, path: str = "", **kw):
    return c.get(f"/v1/studies/{token}{path}", **kw)


@pytest.fixture(scope="module")
def real_chest(shared_data) -> list[Path]:
    """20 consecutive slices (512 x 512, JPEG Lossless) of a real chest CT: cap002's lower lobes, where
    its pneumonia is labelled (canonical indices 90-109: sorted by SliceLocation, head first)."""
    import pydicom

    files = sorted(CAP002.iterdir(), key=lambda f: -float(pydicom.dcmread(f, stop_before_pixels=True).SliceLocation))
    return files[90:110]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_viewer_slices_real_ct(make_client, predictor, real_chest, tmp_path):
    """Every slice of a real chest CT in every window: right size and count, grey order follows HU,
    lung tissue visible only in the lung window, soft tissue spread out in the mediastinal one."""
    from msnet.io import read_study

    c = make_client()
    files = [("file", (f.name, f.read_bytes(), "application/dicom")) for f in real_chest]
    r = post(c, files, data={"study_id": "real-1"})
    assert r.status_code == 200, r.text
    v = r.json()["viewer"]
    for f in real_chest:
        (tmp_path / f.name).symlink_to(f)
    vol = read_study(tmp_path)
    n, h, w = vol.hu.shape
    assert (v["n_slices"], v["height"], v["width"]) == (n, h, w) == (20, 512, 512)
    assert v["windows"] == ["lung", "mediastinum", "as_read"] and v["cam_class"] == r.json()["prediction"]
    assert v["z_mm"] == pytest.approx(list(vol.z_mm), abs=1e-3) and v["z_mm"][0] > v["z_mm"][-1]  # head first
    info = viewer_get(c, v["token"]).json()
    assert info["slice_scores"] == r.json()["slice_scores"] and info["key_slices"] == r.json()["key_slices"]

    tiles = {}
    for win in v["windows"]:
        for i in range(n):
            resp = viewer_get(c, v["token"], f"/slices/{i}.png", params={"window": win})
            assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
            tiles[win, i] = decode_png(resp.content)
            assert tiles[win, i].shape[:2] == (h, w) and tiles[win, i].dtype == np.uint8
    assert len(tiles) == 3 * n
    assert viewer_get(c, v["token"], f"/slices/{n}.png").status_code == 404
    assert viewer_get(c, v["token"], "/slices/-1.png").status_code == 404
    bad = viewer_get(c, v["token"], "/slices/0.png", params={"window": "bone"})
    assert bad.status_code == 422 and "lung" in bad.json()["detail"]

    hu = vol.hu[0]
    lung, med = tiles["lung", 0].astype(int), tiles["mediastinum", 0].astype(int)
    order = np.argsort(hu, axis=None, kind="stable")
    for tile in (lung, med):  # a window is monotone in HU, pixel for pixel (so the tile is not flipped)
        assert (np.diff(tile.ravel()[order]) >= 0).mean() > 0.999
    parenchyma = (hu > -900) & (hu < -700)
    soft = (hu > 0) & (hu < 80)
    assert parenchyma.sum() > 200 and soft.sum() > 1000
    assert 40 < np.median(lung[parenchyma]) < 200 and med[parenchyma].max() == 0
    assert np.ptp(np.percentile(med[soft], [5, 95])) > 3 * np.ptp(np.percentile(lung[soft], [5, 95]))
    # "as read": the slice as the model sees it (its own window), before resizing to the input size
    from PIL import Image

    spec = predictor.encoder.spec
    seen = spec.unit(vol.hu[:1], "hu")[0].mean(0).numpy()
    as_read = tiles["as_read", 0]
    grey = as_read if as_read.ndim == 2 else as_read.mean(-1)
    small = np.asarray(Image.fromarray(grey.astype(np.uint8)).resize((spec.size, spec.size), Image.BILINEAR)) / 255
    assert np.abs(small - seen).mean() < 0.03


def test_viewer_gradcam_overlay(make_client, predictor, study):
    """The Grad-CAM of a key slice: an RGBA map of the slice's size for the predicted class, not the slice."""
    from msnet.inference.explain import grad_cam, study_cam, study_scale, weighted_cam
    from msnet.io import read_study

    c = make_client()
    r = post(c, {"file": ("study.zip", zip_study(study), "application/zip")}, data={"study_id": "cam-1"})
    assert r.status_code == 200, r.text
    out = r.json()
    v, k = out["viewer"], out["key_slices"][0]["slice_index"]
    plain = decode_png(viewer_get(c, v["token"], f"/slices/{k}.png").content)
    resp = viewer_get(c, v["token"], f"/cam/{k}.png")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    cam = decode_png(resp.content)
    assert cam.shape == (*plain.shape, 4)
    alpha = cam[..., 3]
    assert 0 < (alpha > 0).mean() < 1  # a map with hot and cold parts, not a flat fill
    composite = plain[..., None] * (1 - alpha[..., None] / 255) + cam[..., :3] * (alpha[..., None] / 255)
    assert np.abs(composite - plain[..., None]).max() > 50  # the overlay changes what is seen
    assert viewer_get(c, v["token"], f"/cam/{k}.png").content == resp.content  # cached, same map
    # the map is that slice's Grad-CAM for the predicted class (wiring: slice index and class), on the
    # study's one scale (the key slices') and inside the lungs, as in the key-slice strip
    vol = read_study(study)
    pred = predictor.predict(study)
    target = list(predictor.classes).index(out["prediction"])
    spacing = (float(vol.spacing_mm[1]), float(vol.spacing_mm[2]))
    weighted = {i: weighted_cam(predictor, vol.hu[i], vol.kind, pred.extra["features"], i, target,
                                pred.slice_scores[i], spacing) for i in [x["slice_index"] for x in out["key_slices"]]}
    direct = study_cam(weighted[k], study_scale(list(weighted.values())))
    from PIL import Image

    big = np.asarray(Image.fromarray((direct * 255).astype(np.uint8)).resize(plain.shape[::-1], Image.BILINEAR))
    hot_direct, hot_served = big > 0.3 * 255, alpha > 0.4 * 255
    assert (hot_direct & hot_served).sum() / max((hot_direct | hot_served).sum(), 1) > 0.8
    # the served map is weaker than the slice's own-maximum map wherever the lungs are not
    own = grad_cam(predictor, predictor.encoder.spec.unit(vol.hu[k : k + 1], vol.kind)[0], pred.extra["features"], k,
                   target)
    assert direct.sum() < own.sum()
    assert viewer_get(c, v["token"], f"/cam/{v['n_slices']}.png").status_code == 404


def test_viewer_gradcam_on_the_models_lung_crop(predictor, study, tmp_path):
    """A model that reads slices cropped to the lungs: its Grad-CAM is put back where the crop lies."""
    from dataclasses import replace

    from msnet import preprocess as P
    from msnet.inference.encoder import SliceEncoder
    from msnet.io import read_study

    spec = replace(predictor.encoder.spec, lung_crop=True)
    cropping = predictor.with_encoder(SliceEncoder(spec, predictor.bundle.backbone, device="cpu"))
    cropping.spec = spec
    vol = read_study(study)
    r0, r1, c0, c1 = P.lung_box(P.lung_stats(vol.hu, vol.spacing_mm, vol.z_mm), vol.hu.shape)
    h, w = vol.hu.shape[1:]
    assert (r1 - r0) * (c1 - c0) < 0.8 * h * w  # the crop leaves out part of the slice

    c = TestClient(create_app(None, ServiceSettings(tmp_dir=str(tmp_path)), predictor=cropping))
    out = post(c, {"file": ("study.zip", zip_study(study), "application/zip")}).json()
    token, k = out["viewer"]["token"], out["key_slices"][0]["slice_index"]
    alpha = decode_png(viewer_get(c, token, f"/cam/{k}.png").content)[..., 3]
    assert alpha.shape == (h, w)
    inside = np.zeros((h, w), bool)
    inside[max(r0, 0) : r1, max(c0, 0) : c1] = True
    assert alpha[~inside].max() == 0  # nothing outside the box the model saw
    # a map that is strong everywhere (this small model's own map may be weak on any one slice) fills
    # exactly that box
    from types import SimpleNamespace

    from msnet.service.viewer import cam_png

    full = cam_png(SimpleNamespace(slices=np.zeros((1, h, w), np.float32), crop=(r0, r1, c0, c1)),
                   np.full((16, 16), 255, np.uint8))
    alpha = decode_png(full)[..., 3]
    assert alpha[~inside].max() == 0 and alpha[inside].min() > 0


def test_viewer_unknown_token_and_key(make_client, study):
    c = make_client()
    for path in ("", "/slices/0.png", "/cam/0.png"):
        r = viewer_get(c, "no-such-token", path)
        assert r.status_code == 404 and "analyse the study again" in r.json()["detail"]
    ck = make_client(api_key="s3cret")
    r = post(ck, {"file": ("study.zip", zip_study(study), "application/zip")}, headers={"X-API-Key": "s3cret"})
    token = r.json()["viewer"]["token"]
    assert viewer_get(ck, token, "/slices/0.png").status_code == 401
    assert viewer_get(ck, token, "/slices/0.png", headers={"X-API-Key": "s3cret"}).status_code == 200
    paths = c.get("/openapi.json").json()["paths"]
    assert "/v1/studies/{token}/slices/{index}.png" in paths and "/v1/studies/{token}/cam/{index}.png" in paths


def test_viewer_keeps_last_studies_only(make_client, study):
    """An LRU of 2: a third prediction drops the least recently used study; a read counts as a use."""
    c = make_client(viewer_studies=2)
    files = {"file": ("study.zip", zip_study(study), "application/zip")}
    t1, t2 = (post(c, files).json()["viewer"]["token"] for _ in range(2))
    assert viewer_get(c, t1, "/slices/0.png").status_code == 200  # t1 is now more recent than t2
    t3 = post(c, files).json()["viewer"]["token"]
    assert len({t1, t2, t3}) == 3
    assert viewer_get(c, t2).status_code == 404
    assert viewer_get(c, t1).status_code == 200 and viewer_get(c, t3).status_code == 200
    assert len(c.app.state.viewer) == 2
    # no viewer at all, or a study over the memory budget: the prediction still answers, viewer null
    for settings in ({"viewer_studies": 0}, {"viewer_mb": 0.001}):
        r = post(make_client(**settings), files)
        assert r.status_code == 200 and r.json()["viewer"] is None
    # nothing identifying reaches the viewer's answers
    r = post(c, files)
    token = r.json()["viewer"]["token"]
    for path in ("", "/slices/0.png", "/cam/0.png"):
        body = viewer_get(c, token, path).content
        assert SECRET_NAME.encode() not in body and SECRET_ID.encode() not in body


def _fake_study(n: int = 4, size: int = 32, tag: str = "s") -> ViewerStudy:
    import torch

    return ViewerStudy(study_id=tag, slices=np.zeros((n, size, size), np.int16), kind="hu",
                       spacing_mm=(1.0, 1.0, 1.0), z_mm=None, features=torch.zeros(n, 8), target=0,
                       target_name="COVID-19", slice_scores=[0.0] * n, key_slices=[], cam_size=16)


def test_viewer_store_bounds_bytes_and_time():
    now = [0.0]
    one = _fake_study().nbytes
    store = ViewerStore(max_studies=10, max_bytes=int(2.5 * one), ttl_s=60, clock=lambda: now[0])
    tokens = [store.put(_fake_study(tag=f"s{i}")) for i in range(3)]
    assert all(tokens) and len(store) == 2 and store.used_bytes <= store.max_bytes
    assert store.get(tokens[0]) is None and store.get(tokens[2]).study_id == "s2"
    assert store.put(_fake_study(n=40)) is None  # larger than the whole budget: not kept, nothing dropped
    assert len(store) == 2
    now[0] = 59.0
    assert store.get(tokens[1]) is not None
    now[0] = 60.5  # expiry counts from the prediction, however often the study is read
    assert store.sweep() == 2 and len(store) == 0 and store.get(tokens[2]) is None
