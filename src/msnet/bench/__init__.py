"""Performance measurements, reported as ratios measured in one run, medians over ``--repeats``.

One module per ``msnet bench`` command: :mod:`~msnet.bench.read` (``read``, ``decoders``),
:mod:`~msnet.bench.predict` (``predict``; the temporary bundles the others time, peak memory),
:mod:`~msnet.bench.extract`, :mod:`~msnet.bench.train`, :mod:`~msnet.bench.eager`; what they share
(median and spread of repeated timings, the GEMM rate, FLOP floors) in :mod:`~msnet.bench.common`.
"""

from msnet.bench.common import (REPEATS, backbone_floor, default_study, gemm_gflops, repeated, run_batches,
                                study_flops, summary, timed)
from msnet.bench.eager import EAGER_VARIANTS, _eager_variant, bench_eager
from msnet.bench.extract import bench_extract, print_bench_extract
from msnet.bench.predict import CONFIGS, CT_SLICES, bench_predict, peak_rss, print_bench_predict, temp_bundle
from msnet.bench.read import _plain_read, bench_decoders, bench_read, print_bench_read
from msnet.bench.train import bench_train, msnet_flops_per_slice, print_bench_train

__all__ = ["CONFIGS", "CT_SLICES", "EAGER_VARIANTS", "REPEATS", "backbone_floor", "bench_decoders", "bench_eager",
           "bench_extract", "bench_predict", "bench_read", "bench_train", "default_study", "gemm_gflops",
           "msnet_flops_per_slice", "peak_rss", "print_bench_extract", "print_bench_predict", "print_bench_read",
           "print_bench_train", "repeated", "run_batches", "study_flops", "summary", "temp_bundle", "timed",
           "_eager_variant", "_plain_read"]
