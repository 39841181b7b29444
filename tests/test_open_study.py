"""One way in (issue 29, item 3): ``open_study`` reads paths, zips (any case of ``.zip``) and volume
files through the reader registry; a new format is one reader plus one registration."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

import ct_cases
from msnet.errors import MsnetError
from msnet.io import CTVolume, READERS, known_suffixes, open_study, reader_for, register_reader


@pytest.fixture(scope="module")
def axial(shared_data, tmp_path_factory) -> Path:
    return ct_cases.axial(tmp_path_factory.mktemp("open") / "case7")


def test_zip_in_any_case_reads_as_the_folder(axial, tmp_path):
    ref = open_study(axial)
    path = tmp_path / "CASE7.ZIP"
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(axial.iterdir()):
            zf.write(f, f"case7/{f.name}")
    vol = open_study(path)
    assert vol.study_id == "CASE7" and ref.study_id == "case7"
    np.testing.assert_array_equal(vol.hu, ref.hu)
    assert not list(tmp_path.glob("msnet-study-*"))


def test_readers_are_chosen_by_what_they_accept(axial, tmp_path):
    assert reader_for(axial).name == "folder"
    assert reader_for(next(axial.iterdir())).name == "dicom"
    assert reader_for(Path("x.NII.GZ")).name == "nifti" and reader_for(Path("x.mha")).name == "metaimage"
    text = tmp_path / "notes.txt"
    text.write_text("not a study")
    assert reader_for(text) is None
    with pytest.raises(MsnetError, match="not a DICOM, NIfTI, MetaImage or image file"):
        open_study(text)


def test_a_new_format_is_one_registration(tmp_path):
    """A reader of .npy volumes, registered, is used by open_study and known by its suffix."""

    class NpyReader:
        name, suffixes = "npy", (".npy",)

        def accepts(self, path: Path) -> bool:
            return path.name.lower().endswith(self.suffixes)

        def read(self, path: Path, study_id: str, series=None) -> CTVolume:
            hu = np.load(path).astype(np.float32)
            return CTVolume(hu, (1.0, 1.0, 1.0), -np.arange(len(hu), dtype=float), study_id, str(path))

    hu = np.random.default_rng(0).normal(-500, 400, (3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "vol.npy", hu)
    reader = register_reader(NpyReader(), first=True)
    try:
        assert ".npy" in known_suffixes()
        vol = open_study(tmp_path / "vol.npy")
        assert vol.study_id == "vol"
        np.testing.assert_array_equal(vol.hu, hu)
    finally:
        READERS.remove(reader)
    assert ".npy" not in known_suffixes()
