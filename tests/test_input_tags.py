"""Inputs that are valid files but mislabelled (issue 27, item 5), rebuilt from a real scan (normal001,
small): a CT series whose Modality says MR is refused naming the tag; a CT stored without its -1024
intercept is refused with advice that names RescaleIntercept; several series are listed by index and
``series=`` picks one."""

from __future__ import annotations

import numpy as np
import pytest

import ct_cases
from msnet.errors import MsnetError
from msnet.inference.predictor import gate
from msnet.io import open_study


def test_modality_mr_on_a_ct_series_is_refused(shared_data, tmp_path):
    folder = ct_cases.axial(tmp_path / "mr", modality="MR")
    with pytest.raises(MsnetError) as info:
        open_study(folder)
    assert "Modality (0008,0060) is 'MR'" in info.value.problem and "CT Image Storage" in info.value.problem
    assert "Modality=CT" in info.value.fix
    vol = open_study(ct_cases.axial(tmp_path / "ct"))  # the same pixels tagged CT read
    gate(vol)


def test_missing_intercept_advice_names_rescale_intercept(shared_data, tmp_path):
    hu, (sz, sy, sx), o = ct_cases.base_volume()
    ipps = [(o[0], o[1], o[2] - k * sz) for k in range(len(hu))]
    folder = ct_cases.write_series(tmp_path / "raw", hu + 1024, [1, 0, 0, 0, 1, 0], ipps, (sy, sx), intercept=0.0)
    vol = open_study(folder)
    assert vol.hu.min() >= 0 and any("RescaleIntercept" in w for w in vol.warnings)  # inspect's warning
    with pytest.raises(MsnetError) as info:
        gate(vol)
    assert "lung" in info.value.problem and "RescaleIntercept (0028,1052)" in info.value.fix
    assert "-1024" in info.value.fix


def test_series_by_index_or_uid(shared_data, tmp_path):
    ct_cases.axial(tmp_path / "study" / "a", series_uid="1.2.826.0.1.3680043.10.998.1", series_number=2)
    hu, (sz, sy, sx), o = ct_cases.base_volume()
    ipps = [(o[0], o[1], o[2] - k * sz) for k in range(10)]
    ct_cases.write_series(tmp_path / "study" / "b", hu[:10], [1, 0, 0, 0, 1, 0], ipps, (sy, sx),
                          series_uid="1.2.826.0.1.3680043.10.998.2", series_number=3)
    vol = open_study(tmp_path / "study")
    assert vol.n_slices == len(hu) and vol.n_series == 2
    listing = next(w for w in vol.warnings if "2 series found" in w)
    assert "[1] CT 10 slices, series number 3" in listing and "1.2.826" not in listing
    assert open_study(tmp_path / "study", series=1).n_slices == 10
    assert open_study(tmp_path / "study", series="1.2.826.0.1.3680043.10.998.2").n_slices == 10
    with pytest.raises(MsnetError, match="series 5 not found in this study"):
        open_study(tmp_path / "study", series=5)
    np.testing.assert_array_equal(open_study(tmp_path / "study", series=0).hu, vol.hu)
