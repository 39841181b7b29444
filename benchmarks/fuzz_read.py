"""Longer fuzz run of the reader: mutated real DICOM and NIfTI bytes (tests/fuzz_inputs.py).

Each example applies 1-4 seeded mutations (truncate, flip a byte, set a header field to a hostile
value, corrupt the pixel data / JPEG fragment) to a real file and reads it. The contract: only
MsnetError escapes ``read_study``; a returned volume is float32 and finite and passes
``check_volume``; the Python-side memory peak of one read stays under the bound the (lowered)
read limits allow; the process's peak RSS is reported. Exit code 1 on any finding, with the
seed, the mutation and the traceback, so it can be replayed.

    python benchmarks/fuzz_read.py                      # 500 examples per seed file
    python benchmarks/fuzz_read.py --examples 5000 --seed 7
"""

from __future__ import annotations

import argparse
import logging
import random
import resource
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

from fuzz_inputs import (FUZZ_MAX_SLICE_PIXELS, FUZZ_MAX_VOXELS, OPS, PEAK_BOUND, check_read,  # noqa: E402
                         mutate, seeds)

from msnet.io import ReadLimits, set_read_limits  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="examples per seed file")
    parser.add_argument("--seed", type=int, default=0, help="random seed (a run is reproducible)")
    args = parser.parse_args()
    set_read_limits(ReadLimits(max_slice_pixels=FUZZ_MAX_SLICE_PIXELS, max_voxels=FUZZ_MAX_VOXELS))
    deaths = _count_worker_deaths()
    rng = random.Random(args.seed)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    findings, counts, peak_max = [], Counter(), 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="msnet-fuzz-") as tmp:
        for seed in seeds():
            for k in range(args.examples):
                ops = [(rng.choice(OPS), rng.randrange(1000), rng.randrange(256)) for _ in range(rng.randint(1, 4))]
                path = Path(tmp) / f"{seed.name}-{k}{seed.suffix}"
                path.write_bytes(mutate(seed, ops))
                try:
                    outcome = check_read(path)
                    counts[(seed.name, outcome.result)] += 1
                    peak_max = max(peak_max, outcome.peak_bytes)
                    if outcome.peak_bytes >= PEAK_BOUND:
                        findings.append((seed.name, ops, f"memory peak {outcome.peak_bytes >> 20} MiB"))
                except Exception:  # noqa: BLE001 - every other exception is a finding
                    counts[(seed.name, "FINDING")] += 1
                    findings.append((seed.name, ops, traceback.format_exc(limit=6)))
                finally:
                    path.unlink(missing_ok=True)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{sum(counts.values())} reads in {time.perf_counter() - t0:.1f} s (seed {args.seed})")
    for (name, result), n in sorted(counts.items()):
        print(f"  {name:14s} {result:8s} {n}")
    print(f"largest Python-side peak of one read: {peak_max / (1 << 20):.1f} MiB "
          f"(bound {PEAK_BOUND / (1 << 20):.0f} MiB); process peak RSS {rss0:.0f} -> {rss1:.0f} MiB")
    print(f"decode workers that died on a file and were replaced (the read went on without GDCM): {deaths.n}")
    for name, ops, text in findings[:20]:
        print(f"\nFINDING {name} {ops}\n{text}")
    print(f"{len(findings)} findings")
    return 1 if findings else 0


class _Counter(logging.Handler):
    n = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "decode worker died" in record.getMessage():
            self.n += 1


def _count_worker_deaths() -> _Counter:
    counter = _Counter()
    log = logging.getLogger("msnet.io.decode")
    log.addHandler(counter)
    log.propagate = False
    return counter


if __name__ == "__main__":
    sys.exit(main())
