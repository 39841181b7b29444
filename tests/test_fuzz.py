"""Fuzz the reader with mutated real DICOM and NIfTI bytes (issue 11): only MsnetError escapes
``read_study``, a returned volume has no NaN and passes the sanity checks, memory stays bounded.
Seeded and short here; ``python benchmarks/fuzz_read.py --examples 5000`` runs it longer."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from fuzz_inputs import FUZZ_MAX_SLICE_PIXELS, FUZZ_MAX_VOXELS, OPS, PEAK_BOUND, check_read, mutate, seeds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msnet.io import ReadLimits, set_read_limits

SEEDS = {}


@pytest.fixture(scope="module", autouse=True)
def _fuzz_setup(shared_data):
    SEEDS.update({s.name: s for s in seeds()})
    set_read_limits(ReadLimits(max_slice_pixels=FUZZ_MAX_SLICE_PIXELS, max_voxels=FUZZ_MAX_VOXELS))
    yield
    set_read_limits(None)


ops = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 999), st.integers(0, 255)), min_size=1, max_size=4)


@pytest.mark.parametrize("name", ["ct_small", "jpeg_lossless", "nifti", "nifti_gz"])
def test_fuzz_read(name):
    outcomes = []

    @settings(max_examples=40, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(ops)
    def run(mutation):
        seed = SEEDS[name]
        with tempfile.TemporaryDirectory(prefix="msnet-fuzz-") as tmp:
            path = Path(tmp) / f"study{seed.suffix}"
            path.write_bytes(mutate(seed, mutation))
            outcome = check_read(path)
        assert outcome.peak_bytes < PEAK_BOUND, (mutation, outcome.peak_bytes)
        outcomes.append(outcome.result)

    run()
    assert "refused" in outcomes  # the mutations do reach the checks
    assert check_read_unmutated(name) == "ok"


def check_read_unmutated(name: str) -> str:
    seed = SEEDS[name]
    with tempfile.TemporaryDirectory(prefix="msnet-fuzz-") as tmp:
        path = Path(tmp) / f"study{seed.suffix}"
        path.write_bytes(seed.data)
        return check_read(path).result
