"""Atomic writes leave either the old file or the new one, with the modes the umask gives."""

from __future__ import annotations

import os
import stat

import pytest

from msnet.files import atomic_torch_save, atomic_write_text, write_csv_atomic


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode) -> None:
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        write_csv_atomic(tmp_path / "b.csv", ["k"], [{"k": 1}])
        atomic_torch_save({"w": 1}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.csv", "c.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_interrupted_write_keeps_the_old_file_and_no_temp(tmp_path) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")

    class Boom(Exception):
        pass

    def explode(_tmp):
        raise Boom

    from msnet.files import atomic_write

    with pytest.raises(Boom):
        atomic_write(target, explode)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_same_checkpoint_gives_same_bytes_whatever_the_file_name(tmp_path) -> None:
    import torch

    state = {"w": torch.arange(6.0).reshape(2, 3), "name": "x"}
    atomic_torch_save(state, tmp_path / "a.pt")
    atomic_torch_save(state, tmp_path / "b" / "other.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b" / "other.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], state["w"])
    atomic_torch_save({**state, "name": "y"}, tmp_path / "c.pt")
    assert (tmp_path / "c.pt").read_bytes() != (tmp_path / "a.pt").read_bytes()
