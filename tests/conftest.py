"""Shared fixtures: the real public CT data beside the repository (../shared/data)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
COVID_CT_MD = SHARED_DATA / "covid-ct-md"
SAMPLE = COVID_CT_MD / "Sample data"
P001 = SAMPLE / "COVID-19 subjects" / "P001"
CAP002 = SAMPLE / "Cap subjects" / "cap002"
NORMAL001 = SAMPLE / "Normal subjects" / "normal001"
DICOM_ZOO = SHARED_DATA / "dicom-zoo"
UCSD = SHARED_DATA / "ucsd-covid-ct"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is missing (it lies beside the repository)")
    return SHARED_DATA
