"""Explanations: Grad-CAM of the backbone on the key slices, and the slice-score curve.

Grad-CAM (Selvaraju et al. 2017) on the backbone's last feature map, for the
predicted class: through the fine-tuned slice head when the bundle has one,
otherwise through the aggregator (the slice's pooled features put back into the
study's sequence).

The map shown (:func:`study_cam`: the same in the Grad-CAM strip of ``--explain``, its Secondary
Capture and the web viewer) is made comparable across the study and kept to the lungs:

- **one scale for the whole study**: each slice's Grad-CAM is weighted by the slice's score (the
  study's scores, highest = 1) and divided by one study-wide constant, the largest weighted value
  over the key slices (:func:`study_scale`). A slice that drove nothing shows (almost) nothing; a
  weak slice is not blown up to full colour as a per-slice maximum would do;
- **inside the lungs**: the map is multiplied by a soft lung mask of the slice (HU studies: the
  lung segmentation of :func:`msnet.preprocess.lung_stats` on that slice, its edge blurred);
- **smooth**: upsampled bilinearly from the feature map, no threshold; the overlay's opacity rises
  smoothly with the value (:func:`cam_rgba`), so there is no hard edge at a cut-off.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from msnet import preprocess as P
from msnet.models.astra import slab_index, to_ras_plane, to_slab_plane

log = logging.getLogger(__name__)


def grad_cam(predictor, unit_slice: torch.Tensor, feats: torch.Tensor, index: int, target: int,
             normalise: bool = True, study: np.ndarray | None = None, kind: str = "hu") -> np.ndarray:
    """Grad-CAM map (S, S) of one preprocessed slice for class ``target``: in [0, 1] scaled to its own
    maximum (``normalise``), else the raw ReLU'd map (for :func:`study_cam`).

    A slab backbone (``astra_slab``) has no map of one slice: its map is the 3-D Grad-CAM of the slab the
    slice takes its features from (:func:`slab_cam`), read at the slice's depth; it needs ``study``, the
    study's slices (n, H, W) as the model saw them (``kind`` "hu" or "grey"), and gives zeros without."""
    spec = predictor.spec
    backbone = predictor.bundle.backbone
    if getattr(backbone, "whole_study", False):
        if study is None:
            log.info("no Grad-CAM: backbone %s reads slabs of slices and the study's slices were not given",
                     backbone.name)
            return np.zeros(tuple(unit_slice.shape[-2:]), np.float32)
        cam = slab_cam(predictor, study, kind, feats, index, target)
    else:
        x = P.finish(unit_slice[None], spec.mean, spec.std).to(predictor.device)
        with torch.enable_grad():
            maps = backbone.forward_maps(x)
            fmap = maps[-1]
            fmap.retain_grad()
            pooled = backbone.pool(maps, x)
            _target_logit(predictor, pooled, feats, [index], target).backward()
        weights = fmap.grad.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * fmap).sum(dim=1, keepdim=True)).detach()
        cam = F.interpolate(cam, size=unit_slice.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    if normalise and cam.max() > 0:
        cam = cam / cam.max()
    return cam.cpu().numpy()


def _target_logit(predictor, pooled: torch.Tensor, feats: torch.Tensor, at: list[int], target: int) -> torch.Tensor:
    """The logit of ``target`` from features ``pooled`` (1, d): through the slice head when the bundle has one,
    else through the aggregator with ``pooled`` put in the study's sequence at the slices ``at``."""
    if predictor.head is not None:
        return predictor.head.to(predictor.device)(pooled)[0, target]
    seq = feats.clone().to(predictor.device)
    mask = torch.zeros(len(seq), 1, dtype=torch.bool, device=seq.device)
    mask[at] = True
    seq = torch.where(mask, pooled.expand_as(seq), seq)[None]
    return predictor.aggregator(seq)[0, target]


def slab_cam(predictor, study: np.ndarray, kind: str, feats: torch.Tensor, index: int, target: int) -> torch.Tensor:
    """3-D Grad-CAM of a slab backbone (:class:`msnet.models.astra.SlabNet`) at slice ``index``: the slab whose
    centre is nearest the slice (the one it takes its features from) goes through the 3-D network; the
    deepest pooled stage's maps, weighted by their mean gradient of the target logit (through the slice head,
    or the aggregator with the slab's features at every slice that takes them), summed and ReLU'd, are
    upsampled to (k, S, S) and read at the slice's depth, then turned back from the weights' RAS plane to the
    display plane. Returns the raw map (S, S)."""
    spec, net = predictor.spec, predictor.bundle.backbone.model
    k = net.k
    slabs, nearest = slab_index(len(study), k, net.stride)
    slab = int(nearest[index])
    rows = slabs[slab].numpy()
    units = spec.unit(np.asarray(study)[rows], kind)  # (k, c, S, S), superior first
    x = to_slab_plane(P.finish(units, spec.mean, spec.std).to(predictor.device)[None])  # (1, 3, k, S, S)
    with torch.enable_grad():
        maps = net.net.forward_stages(x)
        fmap = maps[net.stages[-1] - 1]
        fmap.retain_grad()
        at = torch.nonzero(nearest == slab).flatten().tolist()  # every slice that takes this slab's features
        _target_logit(predictor, net.pool_maps(maps), feats, at, target).backward()
    weights = fmap.grad.mean(dim=(2, 3, 4), keepdim=True)
    cam = F.relu((weights * fmap).sum(dim=1, keepdim=True)).detach()  # (1, 1, k', S', S')
    cam = F.interpolate(cam, size=(k, *x.shape[-2:]), mode="trilinear", align_corners=False)[0, 0]
    depth = k - 1 - int(np.flatnonzero(rows == index)[0])  # the slab runs superior last
    return to_ras_plane(cam[depth])


def lung_weight(hu_slice: np.ndarray, pixel_spacing_mm: tuple[float, float], size: int,
                blur_px: int = 5) -> np.ndarray:
    """A soft lung mask (size, size) in [0, 1] of one HU slice (H, W), at the model's input size: the lung
    segmentation of :func:`msnet.preprocess.lung_stats` (a grid of about 3 mm), resized bilinearly and
    its edge blurred over ``blur_px`` pixels. Zero everywhere when the slice shows no lung."""
    stats = P.lung_stats(np.asarray(hu_slice, np.float32)[None], (1.0, *pixel_spacing_mm))
    h, w = hu_slice.shape
    _, fy, fx = stats.step
    grid = stats.mask[0].astype(np.float32)
    full = np.zeros((h, w), np.float32)
    block = np.repeat(np.repeat(grid, fy, axis=0), fx, axis=1)[:h, :w]
    full[: block.shape[0], : block.shape[1]] = block
    m = F.interpolate(torch.from_numpy(full)[None, None], size=(size, size), mode="bilinear", align_corners=False)
    if blur_px > 1:
        m = F.avg_pool2d(F.pad(m, [blur_px // 2] * 4, mode="replicate"), blur_px, stride=1)
    return m[0, 0].clamp(0, 1).numpy()


def study_scale(weighted_maps: list[np.ndarray]) -> float:
    """The one scale of a study's maps: the largest value of the key slices' weighted maps (1 when all are 0)."""
    peak = max((float(np.max(m)) for m in weighted_maps), default=0.0)
    return peak if peak > 0 else 1.0


def weighted_cam(predictor, hu_or_grey: np.ndarray, kind: str, feats: torch.Tensor, index: int, target: int,
                 score: float, pixel_spacing_mm: tuple[float, float] | None,
                 study: np.ndarray | None = None) -> np.ndarray:
    """One slice's Grad-CAM before the study's scale: raw map x the slice's score x its soft lung mask
    (no mask for grey-level images). ``hu_or_grey``: the slice (H, W) as the model saw it; ``study``: all
    of the study's slices so (a slab backbone's map needs the slice's neighbours, :func:`slab_cam`)."""
    spec = predictor.spec
    unit = spec.unit(hu_or_grey[None], kind)[0]
    cam = grad_cam(predictor, unit, feats, index, target, normalise=False, study=study, kind=kind)
    cam = cam * max(float(score), 0.0)
    if kind == "hu" and pixel_spacing_mm is not None:
        cam = cam * lung_weight(hu_or_grey, pixel_spacing_mm, cam.shape[-1])
    return cam.astype(np.float32)


def study_cam(weighted: np.ndarray, scale: float) -> np.ndarray:
    """A weighted map on the study's one scale, in [0, 1]."""
    return np.clip(weighted / scale, 0.0, 1.0)


def cam_rgba(cam: np.ndarray, opacity: float = 0.6) -> np.ndarray:
    """A map in [0, 1] as an RGBA float image: jet colours; opacity rising smoothly from 0 (value 0) to
    ``opacity`` (value 0.5 and above), so weak values fade out without a hard edge."""
    from matplotlib import colormaps

    t = np.clip(cam / 0.5, 0.0, 1.0)
    rgba = colormaps["jet"](np.clip(cam, 0.0, 1.0)).astype(np.float32)
    rgba[..., 3] = opacity * t * t * (3.0 - 2.0 * t)  # smoothstep
    return rgba


def explain(predictor, vol, feats: torch.Tensor, pred: int, scores: np.ndarray, order: np.ndarray, out_dir: Path) -> dict:
    """Write `<id>_key_slices.png` (Grad-CAM strip) and `<id>_slice_scores.png`; return their paths."""
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    spec = predictor.spec
    cls = predictor.classes[pred]
    k = len(order)
    spacing = (float(vol.spacing_mm[1]), float(vol.spacing_mm[2])) if vol.kind == "hu" else None
    weighted = [weighted_cam(predictor, np.asarray(vol.hu[i]), vol.kind, feats, int(i), pred, float(scores[i]), spacing,
                             study=vol.hu) for i in order]
    scale = study_scale(weighted)
    fig = Figure(figsize=(2.6 * max(k, 1), 3.0), dpi=110)
    for j, i in enumerate(order):
        cam = study_cam(weighted[j], scale)
        show = P.prepare_unit(vol.hu[i : i + 1], vol.kind, [P.LUNG] if vol.kind == "hu" else [], spec.size)[0, 0]
        ax = fig.add_subplot(1, k, j + 1)
        ax.imshow(show.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.imshow(cam_rgba(cam))
        where = f" z {vol.z_mm[i]:.0f} mm" if vol.kind == "hu" and len(vol.z_mm) == len(scores) else ""
        ax.set_title(f"slice {int(i)}{where}  score {scores[i]:.2f}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{vol.study_id}: key slices for {cls} (Grad-CAM; slice 0 = most superior)", fontsize=9)
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
    return {"key_slices_png": str(strip), "slice_scores_png": str(curve), "cam_scale": scale}
