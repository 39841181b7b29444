"""A GPU fed from DICOM files: seconds per patient and patients per minute, from JPEG Lossless files.

Builds a temporary bundle (random-init backbone + MS-Net of a shipped config; speed does not depend
on the weights) and measures, in one run, with torch.cuda.synchronize around each timing:

- backbone only: preprocessed slices -> features (the encoder alone, the study in memory);
- from HU: ``Predictor.predict_volume`` on the study already read (checks and lung gate on the host,
  beside the model on the GPU); the header pass and the checks with the lung gate also alone;
- from files: ``Predictor.predict`` on the study folder (header pass and sort, parallel decode in
  worker processes, then the above), best and median of ``--repeats``;
- a folder: ``predict_many`` over ``--patients`` copies of the study (hard links), read one study
  ahead (``prefetch=1``, the GPU default: the next study is decoded on the host while the GPU works
  on this one) and with reader processes (``readers=N``: N studies read, checked and lung-gated in
  parallel processes) against no read-ahead (``prefetch=0``), patients per minute.

Targets on a 16-core host with one H100/H200: <= 0.10 s per 150-slice patient from files, and
>= 150 patients/min for a folder. Runs on the CPU too (slowly), e.g.

    python benchmarks/gpu_from_files.py --device cpu --config cpu --patients 3 --repeats 1
    python benchmarks/gpu_from_files.py --study COVID-CT-MD/"Sample data"/"COVID-19 subjects"/P001
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch



def _copies(study: Path, folder: Path, n: int) -> list[Path]:
    """``n`` copies of a study folder as hard links (symbolic links when the file system has none)."""
    out = []
    files = sorted(p for p in study.rglob("*") if p.is_file())
    for k in range(n):
        dst = folder / f"patient{k:04d}"
        for f in files:
            target = dst / f.relative_to(study)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copyfile(f, target)
        out.append(dst)
    return out


def _folder(pred, studies: list[Path], prefetch: int, device: torch.device, readers: int = 0) -> dict:
    from msnet.bench import timed
    from msnet.inference.batch import predict_many

    status: list[dict] = []
    wall = timed(lambda: status.extend(predict_many(pred, studies, prefetch=prefetch, readers=readers)[1]),
                 device, 1)[0]
    ok = sum(s["status"] == "ok" for s in status)
    return {"prefetch": prefetch, "readers": readers, "patients": len(studies), "ok": ok, "wall_s": round(wall, 3),
            "s_per_patient": round(wall / len(studies), 4), "patients_per_min": round(60 * len(studies) / wall, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, required=True, help="a DICOM study folder (JPEG Lossless), e.g. COVID-CT-MD's P001")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", default="paper", choices=["paper", "cpu"])
    ap.add_argument("--batch-size", type=int, default=160)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--patients", type=int, default=60, help="copies of the study in the folder run")
    ap.add_argument("--readers", type=int, default=0,
                    help="reader processes in the third folder run (default: half the cores, 2 to 8)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args(argv)

    from msnet.bench import run_batches, temp_bundle, timed
    from msnet.inference.predictor import Predictor, gate
    from msnet.io import decode
    from msnet.io.dicom import read_headers

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory(prefix="msnet-gpu-files-") as tmp:
        tmp = Path(tmp)
        bundle = temp_bundle(args.config, tmp / "bundle")
        dtype = args.dtype if device.type == "cuda" else "float32"
        pred = Predictor(bundle, device=str(device), batch_size=args.batch_size, dtype=dtype)
        vol, _ = pred.read(args.study)
        x = pred.spec.prepare(vol.hu, vol.kind)
        if device.type == "cuda":
            x = x.pin_memory()

        def backbone_only():
            run_batches(pred.encoder.embed, x, pred.batch_size)

        t = time.perf_counter()
        for _ in range(args.warmup):  # cudnn autotune, allocator, decode workers forked
            backbone_only()
            pred.predict(args.study)
        warmup_s = time.perf_counter() - t
        bb = timed(backbone_only, device, args.repeats)
        hu = timed(lambda: pred.predict_volume(vol), device, args.repeats)
        reads = timed(lambda: pred.read(args.study), device, args.repeats)
        files_in_study = sorted(p for p in args.study.rglob("*") if p.is_file())
        headers = timed(lambda: read_headers(files_in_study), device, args.repeats)
        checks = timed(lambda: gate(vol), device, args.repeats)
        stages: list[dict] = []
        files = timed(lambda: stages.append(pred.predict(args.study).timing_s), device, args.repeats)
        studies = _copies(args.study, tmp / "folder", args.patients)
        readers = args.readers or max(2, min(8, len(os.sched_getaffinity(0)) // 2))
        folder = [_folder(pred, studies, 0, device), _folder(pred, studies, 1, device),
                  _folder(pred, studies, 0, device, readers=readers)]
    per150 = 150 / vol.n_slices
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "host_cores": len(os.sched_getaffinity(0)), "decode_workers": decode._n_workers(),
        "study": args.study.name, "slices": vol.n_slices, "transfer_syntax": vol.transfer_syntax,
        "backbone": pred.metadata["backbone"]["name"], "input_size": pred.spec.size, "dtype": pred.encoder.dtype,
        "batch_size": pred.batch_size, "warmup_s": round(warmup_s, 2),
        "backbone_only_s": round(min(bb), 4),
        "from_hu_s": round(min(hu), 4), "from_hu_median_s": round(statistics.median(hu), 4),
        "read_s": round(min(reads), 4), "read_median_s": round(statistics.median(reads), 4),
        "header_pass_median_s": round(statistics.median(headers), 4),
        "checks_and_lung_gate_median_s": round(statistics.median(checks), 4),
        "from_files_s": round(min(files), 4), "from_files_median_s": round(statistics.median(files), 4),
        "from_files_per_150_slices_s": round(statistics.median(files) * per150, 4),
        "stages_median_s": {k: round(statistics.median(s[k] for s in stages), 4) for k in stages[0]},
        "folder": folder,
        "read_ahead_speedup": round(folder[0]["wall_s"] / folder[1]["wall_s"], 2),
        "reader_processes_speedup": round(folder[0]["wall_s"] / folder[2]["wall_s"], 2),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
