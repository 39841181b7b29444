"""Stage 1's calibration: the slice classifier's temperature, fitted on the model-selection slices or
on out-of-fold predictions and stored in its checkpoint; and the linear probe's refit on every image.

>>> import numpy as np
>>> from msnet.metrics import fit_temperature
>>> logits = np.log(np.array([[0.99, 0.01], [0.99, 0.01], [0.01, 0.99], [0.99, 0.01]]))
>>> fit_temperature(logits, np.array([0, 0, 1, 1])) > 1  # over-confident: softened
True
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from msnet.config import FinetuneConfig
from msnet.data.slices import SliceSet
from msnet.device import is_main
from msnet.inference.bundle import checkpoint_info
from msnet.metrics import fit_temperature
from msnet.stages.probe import softmax
from msnet.stages.slice_model import fit_linear_probe, load_slice_classifier, log_probs, predict_slices, save_backbone

CALIBRATIONS = ("select", "cv")
OOF_FILE = "oof.npz"
"""Out-of-fold log-probabilities and labels of `--cv` (finetune/cv/oof.npz), for calibration: cv."""


def resave(model: nn.Module, path: Path, **extra) -> None:
    """Write ``model`` (loaded by :func:`msnet.stages.slice_model.load_slice_classifier`) back over its
    stage-1 checkpoint with its preprocessing, keeping the checkpoint's epoch and selection accuracy and
    adding ``extra`` (main process only)."""
    if is_main():
        info = checkpoint_info(path)
        kept = {k: info[k] for k in ("epoch", "val_accuracy") if k in info}
        save_backbone(model, model.spec, list(info["classes"]), path, extra={**kept, **extra})


def calibrate(path: Path, val_set: SliceSet, device: torch.device, tta: bool = False,
              fit_on: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, float, nn.Module]:
    """Fit the slice classifier's temperature on the validation slices (or on ``fit_on``: log-probabilities
    and labels) and store it in its checkpoint; returns the calibrated validation probabilities, the
    temperature and the model (loaded from ``path``, its temperature set)."""
    model = load_slice_classifier(path, device)
    logits = log_probs(predict_slices(model, val_set, device, tta))
    temperature = fit_temperature(*(fit_on if fit_on is not None else (logits, val_set.labels.numpy())))
    resave(model, path, temperature=temperature)
    model.temperature = float(temperature)
    return softmax(logits / temperature), temperature, model


def refit_probe(model: nn.Module, path: Path, sets: list[SliceSet], ft: FinetuneConfig,
                device: torch.device) -> nn.Module:
    """finetune.probe_refit: the calibrated linear probe ``model`` (saved at ``path``) fitted again on all
    of ``sets`` (the training and the selection images), its temperature kept; saved in place and returned."""
    both = SliceSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]))
    fit_linear_probe(model, both, ft, device)
    resave(model, path, temperature=model.temperature, refit_on=len(both))
    return model.eval()
