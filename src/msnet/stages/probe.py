"""The linear probe: an L2-regularised, class-weighted logistic regression on frozen features.

Used by stage 1's ``finetune.mode: linear_probe`` on slice images (:mod:`msnet.stages.finetune`) and on CT
cohorts (:mod:`msnet.stages.ct_eval`), so both fit the same model the same way.

>>> x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
>>> w, b = fit_probe(x, torch.tensor([0, 0, 1, 1]), 2, c=10.0)
>>> ((x @ w.T + b).argmax(1)).tolist()
[0, 0, 1, 1]
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from msnet.data.splits import class_weights
from msnet.errors import MsnetError

PROBE_SCALES = ("overall", "feature")


def fit_probe(feats: torch.Tensor, y: torch.Tensor, n_classes: int, c: float = 0.1, scale: str = "overall",
              balanced: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (n_classes, d), bias (n_classes,)) of a logistic regression on ``feats`` (n, d), in the
    features' own units: fitted on the features centred and scaled by one overall standard deviation, or
    with ``scale="feature"`` each by its own (as scikit-learn's StandardScaler), the scaling folded back in.
    ``c``: inverse L2 strength (scikit-learn's C); ``balanced``: class-weighted cross-entropy."""
    if scale not in PROBE_SCALES:
        raise MsnetError(f"unknown finetune.probe_scale {scale!r}", fix=f"use one of {', '.join(PROBE_SCALES)}")
    feats = feats.double()
    mu = feats.mean(0)
    sd = (feats.std(0) if scale == "feature" else feats.std()).clamp_min(1e-6)
    z = (feats - mu) / sd
    weights = class_weights(y, n_classes).double() if balanced else None
    w = torch.zeros(n_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    lam = 1.0 / (max(c, 1e-12) * len(y))
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z @ w.T + b, y, weight=weights) + 0.5 * lam * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (w / sd).float(), (b - (w * mu / sd).sum(1)).float()


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits (n, k).

    >>> softmax(np.array([[0.0, 0.0]])).tolist()
    [[0.5, 0.5]]
    """
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
