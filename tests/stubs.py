"""A stand-in for the model in service tests: it reads the study exactly as the Predictor does
(:func:`msnet.io.open_study`, so every reader check and limit applies) and answers a fixed
class without a network, so the tests need no trained bundle."""

from __future__ import annotations


class StubPredictor:
    classes = ("COVID-19", "CAP", "NORMAL")
    metadata = {"name": "stub", "intended_use": "tests only"}

    def predict(self, study, study_id=None, explain_dir=None, top_k=5, series=None) -> "StubPrediction":
        from msnet.io import open_study

        vol = open_study(study, series=series, study_id=study_id)
        return StubPrediction({"study_id": vol.study_id, "prediction": "NORMAL",
                               "probabilities": {"COVID-19": 0.1, "CAP": 0.2, "NORMAL": 0.7}, "n_slices": vol.n_slices,
                               "key_slices": [], "timing_s": {"total": 0.0}, "warnings": list(vol.warnings)})


class StubPrediction:
    """What the service needs of a Prediction: ``to_dict()``."""

    def __init__(self, values: dict):
        self.values = values

    def to_dict(self) -> dict:
        return dict(self.values)
