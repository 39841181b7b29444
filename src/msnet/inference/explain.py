"""Explanations: Grad-CAM of the backbone on the key slices, and the slice-score curve.

Grad-CAM (Selvaraju et al. 2017) on the backbone's last feature map, for the
predicted class: through the fine-tuned slice head when the bundle has one,
otherwise through the aggregator (the slice's pooled features put back into the
study's sequence).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from msnet import preprocess as P

log = logging.getLogger(__name__)


def grad_cam(predictor, unit_slice: torch.Tensor, feats: torch.Tensor, index: int, target: int) -> np.ndarray:
    """Grad-CAM map (S, S) in [0, 1] of one preprocessed slice for class ``target``."""
    spec = predictor.spec
    x = P.finish(unit_slice[None], spec.mean, spec.std).to(predictor.device)
    backbone = predictor.bundle.backbone
    with torch.enable_grad():
        maps = backbone.forward_maps(x)
        fmap = maps[-1]
        fmap.retain_grad()
        pooled = backbone.pool(maps, x)
        if predictor.head is not None:
            logit = predictor.head.to(predictor.device)(pooled)[0, target]
        else:
            seq = feats.clone().to(predictor.device)
            seq = torch.cat([seq[:index], pooled, seq[index + 1 :]])[None]
            logit = predictor.aggregator(seq)[0, target]
        logit.backward()
    weights = fmap.grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * fmap).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=unit_slice.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    if cam.max() > 0:
        cam = cam / cam.max()
    return cam.cpu().numpy()


def explain(predictor, vol, feats: torch.Tensor, pred: int, scores: np.ndarray, order: np.ndarray, out_dir: Path) -> dict:
    """Write `<id>_key_slices.png` (Grad-CAM strip) and `<id>_slice_scores.png`; return their paths."""
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    spec = predictor.spec
    cls = predictor.classes[pred]
    k = len(order)
    fig = Figure(figsize=(2.6 * max(k, 1), 3.0), dpi=110)
    for j, i in enumerate(order):
        unit = spec.unit(vol.hu[i : i + 1], vol.kind)[0]
        cam = grad_cam(predictor, unit, feats, int(i), pred)
        show = P.prepare_unit(vol.hu[i : i + 1], vol.kind, [P.LUNG] if vol.kind == "hu" else [], spec.size)[0, 0]
        ax = fig.add_subplot(1, k, j + 1)
        ax.imshow(show.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.imshow(cam, cmap="jet", alpha=0.35 * (cam > 0.15), vmin=0, vmax=1)
        ax.set_title(f"slice {int(i)}  score {scores[i]:.2f}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{vol.study_id}: key slices for {cls} (Grad-CAM)", fontsize=9)
    fig.tight_layout()
    strip = out_dir / f"{vol.study_id}_key_slices.png"
    fig.savefig(strip)

    fig = Figure(figsize=(7, 2.6), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    idx = np.arange(len(scores))
    ax.fill_between(idx, scores, step="mid", alpha=0.4)
    ax.plot(idx, scores, drawstyle="steps-mid", lw=1)
    ax.scatter(order, scores[order], color="red", zorder=3, s=14, label="key slices")
    ax.set_xlabel("slice index (head → feet)")
    ax.set_ylabel(f"score for {cls}")
    ax.set_xlim(-0.5, len(scores) - 0.5)
    if vol.kind == "hu" and len(vol.z_mm) == len(scores):
        ax.set_title(f"z from {vol.z_mm[0]:.1f} mm (slice 0) to {vol.z_mm[-1]:.1f} mm", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    curve = out_dir / f"{vol.study_id}_slice_scores.png"
    fig.savefig(curve)
    return {"key_slices_png": str(strip), "slice_scores_png": str(curve)}
