"""Seconds per patient for `Predictor` on a GPU: SE-ResNet50 (random weights), bf16 autocast, channels_last.

Builds a temporary bundle (random-init seresnet50 + MS-Net, the paper config), writes one synthetic
512 px DICOM study, warms up, then times with torch.cuda.synchronize:

- backbone only: preprocessed slices -> features (the Predictor's backbone callable, its batch size);
- end to end from HU: Predictor.predict_volume (window, resize, backbone, MS-Net, key slices);
- end to end from files: Predictor.predict (adds DICOM decoding).

Target on one H100: <= 0.06 s per 150-slice patient. Runs on CPU too (slowly), e.g.

    python benchmarks/gpu_predict.py --device cpu --slices 4 --repeats 1
    python benchmarks/gpu_predict.py --slices 150 --compile      # on a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", default="paper", choices=["paper", "cpu"])
    ap.add_argument("--slices", type=int, default=150)
    ap.add_argument("--pixels", type=int, default=512, help="synthetic study size (rows = columns)")
    ap.add_argument("--batch-size", type=int, default=150)
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="feature dtype (a bundle serves the dtype its features were extracted with)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args(argv)

    from msnet.bench import run_batches, temp_bundle, timed
    from msnet.io import read_study
    from msnet.inference.predictor import Predictor
    from msnet.data.synthetic import synth_cohort

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory(prefix="msnet-gpu-") as tmp:
        tmp = Path(tmp)
        bundle = temp_bundle(args.config, tmp / "bundle")
        synth_cohort(tmp / "data", n_patients=1, size=args.pixels, slices=(args.slices, args.slices))
        study = next(p for p in (tmp / "data").iterdir() if p.is_dir())
        vol = read_study(study)
        pred = Predictor(bundle, device=str(device), batch_size=args.batch_size, compile=args.compile, dtype=args.dtype)
        x = pred.spec.prepare(vol.hu, vol.kind)
        if device.type == "cuda":
            x = x.pin_memory()

        def backbone_only():
            run_batches(pred.encoder.embed, x, pred.batch_size)

        t = time.perf_counter()
        for _ in range(args.warmup):  # compile / cudnn autotune / allocator
            backbone_only()
            pred.predict_volume(vol)
        warmup_s = time.perf_counter() - t
        bb = timed(backbone_only, device, args.repeats)
        e2e = timed(lambda: pred.predict_volume(vol), device, args.repeats)
        files = timed(lambda: pred.predict(study), device, max(1, args.repeats // 3))
        last = pred.predict_volume(vol).to_dict()
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backbone": pred.metadata["backbone"]["name"], "input_size": pred.spec.size, "slices": vol.n_slices,
        "pixels": args.pixels, "batch_size": args.batch_size, "compile": args.compile,
        "dtype": pred.encoder.dtype, "warmup_s": round(warmup_s, 2),
        "backbone_only_s": round(min(bb), 4), "end_to_end_from_hu_s": round(min(e2e), 4),
        "end_to_end_from_files_s": round(min(files), 4),
        "median_end_to_end_from_hu_s": round(sorted(e2e)[len(e2e) // 2], 4),
        "timing_s": {k: round(v, 4) for k, v in last["timing_s"].items()},
        "per_150_slices_from_hu_s": round(min(e2e) * 150 / vol.n_slices, 4),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
