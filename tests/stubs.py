"""A stand-in for the model in service tests: it reads the study exactly as the Predictor does
(``open_study`` + ``read_study``, so every reader check and limit applies) and answers a fixed
class without a network, so the tests need no trained bundle."""

from __future__ import annotations

from pathlib import Path


class StubPredictor:
    classes = ("COVID-19", "CAP", "NORMAL")
    metadata = {"name": "stub", "intended_use": "tests only"}

    def predict(self, study, study_id=None, explain_dir=None, top_k=5) -> "StubPrediction":
        from msnet.io import read_study
        from msnet.io.archives import open_study

        with open_study(study) as path:
            vol = read_study(path, study_id=study_id or Path(study).name.removesuffix(".zip"))
        return StubPrediction({"study_id": vol.study_id, "prediction": "NORMAL",
                               "probabilities": {"COVID-19": 0.1, "CAP": 0.2, "NORMAL": 0.7}, "n_slices": vol.n_slices,
                               "key_slices": [], "timing_s": {"total": 0.0}, "warnings": list(vol.warnings)})


class StubPrediction:
    """What the service needs of a Prediction: ``to_dict()``."""

    def __init__(self, values: dict):
        self.values = values

    def to_dict(self) -> dict:
        return dict(self.values)
