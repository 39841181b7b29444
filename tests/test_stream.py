"""Streamed decode: the backbone works on the first decoded slices while the rest are decoded, and the
answer is exactly the answer of the whole read (same features, same refusals, same dropped slices)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest import P001

from msnet.errors import MsnetError
from msnet.io import StudyStream, read_study

needs_data = pytest.mark.usefixtures("shared_data")
P001_FILES = sorted(P001.glob("*.dcm"))


def _predict_both(bundle: Path, study: Path, monkeypatch) -> tuple:
    """(streamed prediction, whole-read prediction, whether the streamed features were kept)."""
    from msnet.inference.predictor import Predictor

    kept = []
    original = Predictor.predict_volume

    def spy(self, vol, *args, feats=None, **kwargs):
        kept.append(feats is not None)
        return original(self, vol, *args, feats=feats, **kwargs)

    monkeypatch.setattr(Predictor, "predict_volume", spy)
    streamed = Predictor(bundle, device="cpu", stream=True).predict(study)
    whole = Predictor(bundle, device="cpu", stream=False).predict(study)
    assert kept[1] is False  # the whole read encodes the volume itself
    return streamed, whole, kept[0]


def _same(a, b) -> None:
    assert a.probabilities == b.probabilities
    assert a.key_slices == b.key_slices and a.slice_scores == b.slice_scores
    assert a.n_slices == b.n_slices and a.warnings == b.warnings
    assert torch.equal(a.extra["features"], b.extra["features"])


@needs_data
def test_streamed_prediction_equals_the_whole_read_on_a_real_scan(tiny_bundle, monkeypatch):
    """P001: 148 JPEG Lossless files decoded by the worker processes, consumed as they come."""
    streamed, whole, kept = _predict_both(tiny_bundle, P001, monkeypatch)
    assert kept, "the features computed during the decode were used"
    _same(streamed, whole)
    assert streamed.n_slices == 148


@needs_data
def test_a_slice_that_fails_to_decode_is_dropped_and_the_rest_encoded_again(tiny_bundle, tmp_path, monkeypatch):
    study = tmp_path / "mixed"
    study.mkdir()
    for f in P001_FILES[::4]:  # 37 files over the whole chest: the worker processes decode them
        shutil.copy(f, study / f.name)
    cut = study / P001_FILES[64].name  # its JPEG stream cut short, the file's structure intact: fails in the decode
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(cut)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: int(len(frame) * 0.6)]])
    ds.save_as(cut)
    streamed, whole, kept = _predict_both(tiny_bundle, study, monkeypatch)
    assert not kept, "the streamed rows include the dropped slice: they must not be used"
    _same(streamed, whole)
    assert streamed.n_slices == 36
    assert any(w.startswith(f"{cut.name}: skipped") for w in streamed.warnings)


@needs_data
def test_a_refused_study_is_refused_the_same_way_when_streamed(tiny_bundle, tmp_path):
    """RescaleSlope 0 makes every voxel the intercept: no diagnosis, streamed or not."""
    from msnet.inference.predictor import Predictor

    study = tmp_path / "slope0"
    study.mkdir()
    for f in P001_FILES[60:72]:
        ds = pydicom.dcmread(f)
        ds.RescaleSlope = 0
        ds.save_as(study / f.name)
    messages = []
    for stream in (True, False):
        with pytest.raises(MsnetError) as info:
            Predictor(tiny_bundle, device="cpu", stream=stream).predict(study)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert "RescaleSlope" in messages[0]


@needs_data
def test_batches_come_in_canonical_order_while_the_rest_is_decoded(tmp_path, monkeypatch):
    """Uncompressed files named against the slice order; the decode is held after four files: the
    first batch is handed out while the rest is not decoded, and every batch holds the final rows."""
    import msnet.io.decode as decode

    study = tmp_path / "shuffled"
    study.mkdir()
    picked = P001_FILES[40:52]
    for i, f in enumerate(picked):
        ds = pydicom.dcmread(f)
        ds.decompress()
        ds.save_as(study / f"{(i * 5) % 12:02d}.dcm")  # file names in another order than the slices
    ref = read_study(study)

    release, calls = threading.Event(), []
    original = decode.decode_file

    def held(*args, **kwargs):
        calls.append(args[0])
        if len(calls) > 4:
            assert release.wait(30), "the consumer never let the decode go on"
        return original(*args, **kwargs)

    monkeypatch.setattr(decode, "decode_file", held)
    seen, ready_at_first = [], None
    with StudyStream(lambda: read_study(study)) as st:
        for start, stop in st.batches(2):
            if ready_at_first is None:
                ready_at_first = st.progress.ready
                release.set()
            seen.append((start, stop, st.progress.hu[start:stop].copy()))
        vol = st.result()
    assert ready_at_first is not None and 2 <= ready_at_first < 12, "the first batch came before the decode ended"
    assert [(a, b) for a, b, _ in seen] == [(i, i + 2) for i in range(0, 12, 2)]
    assert st.rows_match(vol.hu)
    np.testing.assert_array_equal(vol.hu, ref.hu)
    for start, stop, rows in seen:
        np.testing.assert_array_equal(rows, ref.hu[start:stop])
    # the files were decoded in slice order, not in the order of their names
    order = {Path(p).name: k for k, p in enumerate(calls)}
    z = {f.name: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in study.iterdir()}
    by_z = sorted(z, key=z.get, reverse=True)  # superior first
    assert sorted(order, key=order.get) == by_z
