"""SIGTERM (what systemd, Docker and Kubernetes send) leaves nothing behind: no decode worker
process, no /dev/shm/msnet-* file (issue 11, item 6). Real subprocesses of `msnet`."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from conftest import P001, REPO

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _need_data(shared_data):
    return shared_data


def _env() -> dict:
    path = os.pathsep.join([str(REPO / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path)


def _children(pid: int) -> set[int]:
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                kids.add(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids: set[int], seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return {p for p in pids if _alive(p)}


def _kill_all(proc: subprocess.Popen, pids: set[int], shm: str | None = None) -> None:
    """Cleanup after a failed assertion: the processes this test started, by their ids (SIGTERM
    first, so that they can remove their files; SIGKILL for what is left), and their shm file."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    for pid in pids | {proc.pid}:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    if shm and os.path.exists(shm):
        os.unlink(shm)


def test_sigterm_during_inspect_leaves_no_worker_or_shm(tmp_path):
    _sigterm_mid_decode(["inspect", str(P001)], tmp_path)


def test_sigterm_during_streamed_predict_leaves_no_worker_or_shm(tiny_bundle, tmp_path):
    """`msnet predict` decodes in a reading thread while the backbone works: stopped mid-decode, it
    still leaves nothing behind and prints no traceback."""
    _sigterm_mid_decode(["predict", str(tiny_bundle), str(P001), "--device", "cpu"], tmp_path)


def test_sigint_during_inspect_says_what_is_kept(tmp_path):
    """Ctrl-C (issue 27, item 7): stderr says that the run was interrupted and what is kept; exit 130,
    no traceback, no worker or shared-memory file left."""
    text = _sigterm_mid_decode(["inspect", str(P001)], tmp_path, sig=signal.SIGINT, code=130)
    assert "interrupted: the run was interrupted (Ctrl-C). Kept: nothing half-written" in text


def test_sigint_message_for_predict_names_the_out_folder():
    from msnet.cli import _kept_after_interrupt

    text = _kept_after_interrupt(["predict", "bundle", "a", "b", "--out", "results"])
    assert "results/predictions.jsonl" in text and "finished studies are skipped" in text
    assert "pass --out DIR" in _kept_after_interrupt(["predict", "bundle", "a"])


def _sigterm_mid_decode(args: list[str], tmp_path, sig: int = signal.SIGTERM, code: int | None = None) -> str:
    log = open(tmp_path / "log.txt", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "msnet", *args], env=_env(), stdout=log,
                            stderr=subprocess.STDOUT)
    shm, workers = None, set()
    try:
        deadline = time.monotonic() + 60
        while shm is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/maps") as fh:  # the decode target, mapped while workers write it
                    shm = next((line.split()[-1] for line in fh if "/dev/shm/msnet-" in line), None)
            except OSError:
                break
            time.sleep(0.01)
        assert shm is not None, "the study was not decoded by worker processes"
        deadline = time.monotonic() + 10  # the target is mapped just before the workers are forked
        while not workers and time.monotonic() < deadline and proc.poll() is None:
            workers = _children(proc.pid)
            time.sleep(0.005)
        assert len(workers) >= 1
        time.sleep(0.05)
        workers |= _children(proc.pid)  # all of them, if the first was sampled mid-fork
        proc.send_signal(sig)  # mid-decode
        assert proc.wait(30) == (128 + sig if code is None else code)
        assert _wait_gone(workers, 5) == set()
        assert not os.path.exists(shm)
        text = (tmp_path / "log.txt").read_text()
        assert "Traceback" not in text
        return text
    finally:
        log.close()
        _kill_all(proc, workers, shm)


_SERVE = """
import sys
import msnet.inference.predictor
from stubs import StubPredictor

msnet.inference.predictor.Predictor = lambda bundle, device="auto": StubPredictor()
sys.argv = ["msnet", "serve", "no-bundle", "--port", sys.argv[1], "--workers", "1"]
from msnet.cli import main

main()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_to_serve_stops_its_decode_workers(tmp_path):
    """`msnet serve` (a stub model, the real CLI, uvicorn and reader) after a study decoded by worker
    processes: SIGTERM ends it with 143, and the workers go with it."""
    port = _free_port()
    (tmp_path / "serve.py").write_text(_SERVE)
    log = open(tmp_path / "log.txt", "wb")
    proc = subprocess.Popen([sys.executable, str(tmp_path / "serve.py"), str(port)], env=_env(), stdout=log,
                            stderr=subprocess.STDOUT)
    workers: set[int] = set()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for f in sorted(P001.glob("*.dcm"))[:12]:  # 12 compressed files: the worker processes decode them
                zf.write(f, f"P001/{f.name}")
        r = httpx.post(url + "/v1/predict", files={"file": ("P001.zip", buf.getvalue())}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["n_slices"] == 12
        workers = _children(proc.pid)
        assert len(workers) >= 1, "no decode worker was started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
        assert _wait_gone(workers, 5) == set()
        text = (tmp_path / "log.txt").read_text()
        assert "Traceback" not in text and "Finished server process" in text
    finally:
        log.close()
        _kill_all(proc, workers)
