"""Load benchmark of `msnet serve`: concurrent clients against one server on 127.0.0.1.

Starts the service in a subprocess (loopback only), measures single-request latency, then lets
``--clients`` threads of this process post synthetic studies at once. Every answer must be 200
with the same prediction as a direct :class:`msnet.inference.predictor.Predictor` call. Reports p50/p95
latency against the single-request latency, throughput and the server's peak RSS.

    python benchmarks/load_service.py                     # builds a tiny bundle first (~1 min)
    python benchmarks/load_service.py --bundle runs/cpu/bundle --clients 20 --size 128
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import yaml

import msnet

TINY_CONFIG = yaml.safe_load((Path(msnet.__file__).parent / "configs" / "tiny.yaml").read_text())


def build_tiny_bundle(root: Path) -> Path:
    import yaml

    from msnet.config import load_config
    from msnet.stages.run import run_pipeline
    from msnet.data.synthetic import synth_cohort

    synth_cohort(root / "data", n_patients=12, size=64, seed=5, slices=(10, 16))
    (root / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    cfg = load_config(root / "config.yaml")
    run_pipeline(cfg)
    return cfg.run_path / "bundle"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    """High-water resident memory of a process (psutil when installed, else /proc VmHWM)."""
    try:
        import psutil

        info = psutil.Process(pid).memory_info()
        return getattr(info, "peak_wset", info.rss) / 2**20
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def zip_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"{folder.name}/{f.name}")
    return buf.getvalue()


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="model bundle (default: build a tiny one)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--studies", type=int, default=4, help="distinct synthetic studies, cycled over clients")
    ap.add_argument("--size", type=int, default=64, help="synthetic slice size (px)")
    ap.add_argument("--slices", type=int, nargs=2, default=(20, 30))
    ap.add_argument("--workers", type=int, default=2, help="server inference workers")
    ap.add_argument("--deadline-s", type=float, default=600, help="give up after this long")
    args = ap.parse_args()

    import httpx

    from msnet.inference.predictor import Predictor
    from msnet.data.synthetic import synth_cohort

    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="msnet-load-") as tmp:
        tmp = Path(tmp)
        bundle = args.bundle or build_tiny_bundle(tmp / "bundle")
        synth_cohort(tmp / "studies", n_patients=args.studies, size=args.size, seed=99, slices=tuple(args.slices))
        folders = sorted(p for p in (tmp / "studies").iterdir() if p.is_dir())
        payloads = [zip_folder(f) for f in folders]
        predictor = Predictor(bundle, device="cpu")
        expected = [predictor.predict(f).to_dict() for f in folders]
        del predictor

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        code = (f"import logging; logging.basicConfig(level=logging.WARNING); from msnet.service.app import serve; "
                f"serve({str(bundle)!r}, host='127.0.0.1', port={port}, workers={args.workers}, "
                f"queue_size={args.clients + 4}, timeout_s={args.deadline_s}, device='cpu', log_level='warning')")
        server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            with httpx.Client(timeout=args.deadline_s) as client:
                while True:
                    if server.poll() is not None:
                        raise SystemExit(f"server exited: {server.stderr.read().decode()[-2000:]}")
                    try:
                        if client.get(url + "/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        time.sleep(0.2)

                def post(i: int) -> tuple[int, float, str | None]:
                    t = time.perf_counter()
                    r = client.post(url + "/v1/predict", files={"file": (f"s{i}.zip", payloads[i % len(payloads)])})
                    dt = time.perf_counter() - t
                    return r.status_code, dt, r.json().get("prediction") if r.status_code == 200 else r.text[:200]

                post(0)  # warm-up
                single = [post(i)[1] for i in range(len(payloads))]
                baseline = statistics.median(single)

                results: list = [None] * args.clients
                barrier = threading.Barrier(args.clients)

                def client_thread(i: int) -> None:
                    barrier.wait()
                    try:
                        results[i] = post(i)
                    except Exception as exc:  # counted as an error below
                        results[i] = (0, float("nan"), f"{type(exc).__name__}: {exc}")

                threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(args.clients)]
                t0 = time.perf_counter()
                for th in threads:
                    th.start()
                for th in threads:
                    th.join(max(1.0, args.deadline_s - (time.time() - t_start)))
                wall = time.perf_counter() - t0
            rss = peak_rss_mb(server.pid)
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()

    errors = [(i, r) for i, r in enumerate(results) if r is None or r[0] != 200]
    wrong = [i for i, r in enumerate(results) if r and r[0] == 200 and r[2] != expected[i % len(expected)]["prediction"]]
    lat = [r[1] for r in results if r and r[0] == 200]
    report = {
        "clients": args.clients, "server_workers": args.workers, "studies": len(payloads),
        "slices_per_study": [e["n_slices"] for e in expected], "size_px": args.size,
        "zip_kib": [round(len(p) / 1024) for p in payloads],
        "single_request_s": round(baseline, 3),
        "concurrent_p50_s": round(pct(lat, 50), 3) if lat else None,
        "concurrent_p95_s": round(pct(lat, 95), 3) if lat else None,
        "p50_over_single": round(pct(lat, 50) / baseline, 2) if lat else None,
        "p95_over_single": round(pct(lat, 95) / baseline, 2) if lat else None,
        "wall_s": round(wall, 2), "throughput_rps": round(len(lat) / wall, 2),
        "errors": len(errors), "wrong_predictions": len(wrong),
        "server_peak_rss_mib": round(rss, 1), "cpus": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    for i, r in errors[:5]:
        print(f"client {i}: {r}", file=sys.stderr)
    return 0 if not errors and not wrong else 1


if __name__ == "__main__":
    sys.exit(main())
