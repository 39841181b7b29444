"""The web page words the server's errors for the person at the page: the reader's real messages (whose
advice is written for the command line) become page sentences without flags, `msnet` commands or
environment variables, and the server's own message stays available under "Details"."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from conftest import REPO, require_system_tool

from msnet.errors import LimitError, MsnetError

ERRORS_JS = REPO / "src" / "msnet" / "service" / "static" / "errors.js"
NODE = shutil.which("node") or shutil.which("nodejs")
CLI_WORDING = ("--", "`", "msnet ", "MSNET_", "Fix:", "STUDY", "pass ")


@pytest.fixture(autouse=True)
def _node() -> None:
    require_system_tool(NODE is not None, "node is not installed (apt-get install -y nodejs)")


def _page(calls: list[tuple[str, int, object]]) -> list:
    """What errors.js shows for each (kind, status, detail), run by node."""
    script = (f"const E = require({json.dumps(str(ERRORS_JS))});\n"
              f"const calls = {json.dumps(calls)};\n"
              "console.log(JSON.stringify(calls.map(([k, s, d]) => E[k](s, d))));")
    res = subprocess.run([NODE, "-e", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _reader_errors(tmp_path) -> dict[str, MsnetError]:
    """Errors the service's reader and gate raise on bad uploads, as the API answers them."""
    from msnet.gates import check_lungs
    from msnet.io import read_study
    from msnet.io.volume import CTVolume

    errors = {}
    notes = tmp_path / "notes.txt"
    notes.write_text("not a scan")
    with pytest.raises(MsnetError) as exc:
        read_study(notes)
    errors["not a scan"] = exc.value
    water = np.zeros((12, 64, 64), dtype=np.float32)  # a body of water: no lungs anywhere
    vol = CTVolume(hu=water, spacing_mm=(5.0, 0.7, 0.7), z_mm=-5.0 * np.arange(12), study_id="case-1", source="upload")
    with pytest.raises(MsnetError) as exc:
        check_lungs(vol)
    errors["no lungs"] = exc.value
    return errors


def test_upload_errors_in_page_wording(tmp_path):
    errors = _reader_errors(tmp_path)
    limit = LimitError("600000000 voxels, over the limit of 400000000", "upload",
                       "raise MSNET_MAX_VOXELS (or --max-voxels), or pass fewer slices")
    calls = [("upload", 422, str(e)) for e in errors.values()] + [
        ("upload", 413, str(limit)), ("upload", 503, "all workers are busy and the queue is full: retry later"),
        ("upload", 401, "missing or wrong API key: send it in the X-API-Key header"),
        ("upload", 422, [{"msg": "field required"}]), ("upload", 0, "")]
    shown = _page(calls)
    for (_, status, detail), page in zip(calls, shown):
        text = page["text"]
        assert not any(w in text for w in CLI_WORDING), (status, text)
        assert text[0].isupper() and text.endswith("."), text
        if isinstance(detail, str) and "Fix:" in detail:  # the server's message is kept, word for word
            assert page["details"] == detail
    not_scan, no_lungs = shown[0]["text"], shown[1]["text"]
    assert "not a DICOM" in not_scan and "Upload" in not_scan  # the reader's problem, the page's advice
    assert "no lungs found" in no_lungs and "Upload a chest CT series" in no_lungs
    assert "too large" in shown[2]["text"] and "administrator" in shown[2]["text"]
    assert "busy" in shown[3]["text"] and "API key" in shown[4]["text"]


def test_viewer_errors_in_page_wording():
    shown = _page([("viewer", 404, "unknown or expired viewer token: analyse the study again"),
                   ("viewer", 504, "Grad-CAM took longer than 30 s"),
                   ("viewer", 500, "Grad-CAM failed (RuntimeError); see the server log")])
    assert "analyse it again" in shown[0] and "retry" in shown[1] and "RuntimeError" not in shown[2]
    assert not any(w in s for s in shown for w in CLI_WORDING)


def test_the_page_loads_the_error_wording():
    from msnet.service.app import STATIC

    html = (STATIC / "index.html").read_text()
    assert html.index("/static/errors.js") < html.index("/static/app.js")
    assert "PageErrors.upload(" in (STATIC / "app.js").read_text()
    assert "PageErrors.viewer(" in (STATIC / "viewer.js").read_text()
