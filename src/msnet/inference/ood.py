"""Out-of-distribution score: how far a study's slice features lie from the features a bundle was trained on.

A :class:`FeatureDescription` is fitted on the training studies' per-slice features (``RUN/features``):
they are standardised, projected on their first principal components and whitened; a reference set of
those slices is kept. A slice's score is the distance to its k-th nearest reference slice (``knn``, the
default: benchmarks/ood_table.py measures it against the Mahalanobis distance in the same basis,
``mahalanobis``, on real scans and odd inputs, docs/gates.md); a study's score is the median over its
slices. Every training study is scored against the others (its own slices left out of the reference):
a new study's percentile is its place among those scores, and the threshold is their
:data:`THRESHOLD_QUANTILE` quantile times :data:`THRESHOLD_MARGIN`.

>>> rng = np.random.default_rng(0)
>>> train = {f"s{i}": rng.normal(size=(20, 16)).astype(np.float32) for i in range(8)}
>>> d = FeatureDescription.fit(train, dims=8)
>>> near, far = d.score(rng.normal(size=(20, 16))), d.score(rng.normal(5.0, 1.0, size=(20, 16)))
>>> bool(near <= d.threshold < far), d.percentile(far)
(True, 100.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SCHEMA = 1
METHODS = ("knn", "mahalanobis")
DIMS = 64
"""Principal components kept (fewer when there are fewer training slices)."""
K = 5
"""The k of the k-nearest-neighbour distance."""
SLICES_PER_STUDY = 48
"""Slices of a training study used (evenly spaced): every study weighs alike, and the reference stays small."""
MAX_REFERENCE = 8192
"""Reference slices kept at most (evenly over the studies)."""
THRESHOLD_QUANTILE = 0.99
THRESHOLD_MARGIN = 1.25
"""The threshold is this much above the :data:`THRESHOLD_QUANTILE` quantile of the training studies' scores."""


def _even(n: int, m: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, num=min(n, m)).round().astype(np.int64))


@dataclass
class FeatureDescription:
    """The training features of a bundle, as the OOD score needs them (see the module's doc)."""

    method: str
    mean: np.ndarray
    scale: np.ndarray
    basis: np.ndarray
    reference: np.ndarray
    reference_study: np.ndarray
    k: int
    train_scores: np.ndarray
    threshold: float
    n_studies: int

    @classmethod
    def fit(cls, features: dict[str, np.ndarray], method: str = "knn", dims: int = DIMS, k: int = K,
            slices_per_study: int = SLICES_PER_STUDY, max_reference: int = MAX_REFERENCE) -> "FeatureDescription":
        """From per-study slice features {study: (l, d)} (at least 2 studies)."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        studies = [np.asarray(f, dtype=np.float32).reshape(len(f), -1) for f in features.values() if len(f)]
        if len(studies) < 2:
            raise ValueError("an OOD description needs the features of at least 2 studies")
        per = max(1, min(slices_per_study, max_reference // len(studies)))
        picked = [s[_even(len(s), per)] for s in studies]
        x = np.concatenate(picked)
        owner = np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(picked)])
        mean = x.mean(axis=0)
        scale = x.std(axis=0) + 1e-6 * (float(x.std()) + 1e-12)
        z = torch.from_numpy((x - mean) / scale)
        r = max(1, min(dims, z.shape[0] - 1, z.shape[1]))
        if z.shape[0] * z.shape[1] <= 2e7:
            _, s, vh = torch.linalg.svd(z, full_matrices=False)
            v = vh.T
        else:
            _, s, v = torch.pca_lowrank(z, q=r, center=False)
        sd = (s[:r] / max(1.0, (z.shape[0] - 1) ** 0.5)).clamp_min(1e-6)
        basis = (v[:, :r] / sd).numpy().astype(np.float32)
        ref = (z.numpy() @ basis).astype(np.float32)
        desc = cls(method=method, mean=mean.astype(np.float32), scale=scale.astype(np.float32), basis=basis,
                   reference=ref, reference_study=owner, k=int(k), train_scores=np.zeros(0, np.float32),
                   threshold=float("inf"), n_studies=len(studies))
        scores = np.array([desc._study_score(desc._project(s), exclude=i) for i, s in enumerate(studies)], np.float32)
        desc.train_scores = np.sort(scores)
        desc.threshold = float(np.quantile(scores, THRESHOLD_QUANTILE)) * THRESHOLD_MARGIN
        return desc

    def _project(self, feats) -> np.ndarray:
        x = feats.detach().float().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, np.float32)
        return ((x.reshape(len(x), -1) - self.mean) / self.scale) @ self.basis

    def _slice_scores(self, p: np.ndarray, exclude: int | None = None) -> np.ndarray:
        if self.method == "mahalanobis":
            return np.sqrt((p.astype(np.float64) ** 2).sum(axis=1) / p.shape[1])
        ref = self.reference if exclude is None else self.reference[self.reference_study != exclude]
        k = min(self.k, len(ref))
        d = torch.cdist(torch.from_numpy(np.ascontiguousarray(p, dtype=np.float32)), torch.from_numpy(ref))
        return (d.topk(k, dim=1, largest=False).values[:, -1] / np.sqrt(p.shape[1])).numpy().astype(np.float64)

    def _study_score(self, p: np.ndarray, exclude: int | None = None) -> float:
        return float(np.median(self._slice_scores(p, exclude))) if len(p) else float("nan")

    def score(self, feats) -> float:
        """A study's score from its slice features (l, d): the median slice score."""
        return self._study_score(self._project(feats))

    def percentile(self, score: float) -> float:
        """Percent of the training studies that score at or below ``score``."""
        return round(100.0 * float(np.searchsorted(self.train_scores, score, side="right")) / len(self.train_scores), 1)

    def to_state(self) -> dict:
        """Tensors and plain values only (a checkpoint read with ``weights_only=True``)."""
        return {"schema": SCHEMA, "kind": "ood", "method": self.method, "k": self.k, "threshold": self.threshold,
                "n_studies": self.n_studies,
                **{name: torch.from_numpy(np.ascontiguousarray(getattr(self, name)))
                   for name in ("mean", "scale", "basis", "reference", "reference_study", "train_scores")}}

    @classmethod
    def from_state(cls, state: dict) -> "FeatureDescription":
        if state.get("schema") != SCHEMA or state.get("kind") != "ood" or state.get("method") not in METHODS:
            raise ValueError(f"not an OOD description of schema {SCHEMA}")
        arrays = {name: state[name].numpy() for name in ("mean", "scale", "basis", "reference", "reference_study",
                                                         "train_scores")}
        return cls(method=state["method"], k=int(state["k"]), threshold=float(state["threshold"]),
                   n_studies=int(state["n_studies"]), **arrays)

    def summary(self) -> dict:
        """What the model card says about it."""
        return {"method": self.method, "k": self.k, "dims": int(self.basis.shape[1]), "n_studies": self.n_studies,
                "reference_slices": int(len(self.reference)), "threshold": round(self.threshold, 4),
                "train_score_median": round(float(np.median(self.train_scores)), 4)}
