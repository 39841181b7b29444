"""``msnet bench train``: MS-Net training as ``msnet train`` runs it, packed :class:`MSNet` against the
padded-batch :class:`MSNetReference`, and the GEMM floor; medians over repeated runs."""

from __future__ import annotations

import time

import numpy as np

from msnet.bench.common import REPEATS, gemm_gflops, load_average, summary
from msnet.config import Config
from msnet.data.splits import carve
from msnet.errors import MsnetError
from msnet.models.aggregators import MSNet, MSNetReference
from msnet.stages.train import fit


def msnet_flops_per_slice(in_features: int, width: int = 64, n_blocks: int = 4, kernel_size: int = 3
                          ) -> tuple[float, float]:
    """FLOPs (2 x multiply-adds) per slice of MS-Net's convolutions: (forward, one training step).

    A training step is the forward pass plus the backward pass: gradients of the weights of every
    conv and of the inputs of every conv but the first (the features need none).

    >>> msnet_flops_per_slice(2048)
    (409600.0, 966656.0)
    """
    stem = 2.0 * in_features * width
    rest = 2.0 * width * width * (n_blocks * (kernel_size + 1) + 2)
    return stem + rest, 2 * stem + 3 * rest


def _synthetic_features(patients: int, d: int, slices: tuple[int, int], n_classes: int, seed: int
                        ) -> tuple[list, "torch.Tensor"]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(slices[0], slices[1] + 1, (patients,), generator=g).tolist()
    feats = [torch.randn(n, d, generator=g).relu_() for n in lengths]  # like pooled CNN features: >= 0
    labels = torch.arange(patients) % n_classes
    return feats, labels[torch.randperm(patients, generator=g)]


def _expected_rows(seqs: list, crop_prob: float, min_fraction: float) -> float:
    """Mean number of slices an epoch of ``fit`` feeds: each study whole, or with probability
    ``crop_prob`` a crop of uniform length in [ceil(n * min_fraction), n]."""
    total = 0.0
    for s in seqs:
        n = s.shape[0]
        lo = max(1, int(np.ceil(n * min_fraction)))
        total += (1 - crop_prob) * n + crop_prob * (lo + n) / 2
    return total


def bench_train(patients: int = 300, epochs: int = 100, measure_epochs: int = 5, features: int = 2048,
                slices: tuple[int, int] = (100, 200), batch_size: int = 8, threads: int = 2, seed: int = 0,
                repeats: int = REPEATS, console=None) -> dict:
    """Time MS-Net training as ``msnet train`` runs it (``stages.train.fit``: Adam, batch 8, random crops,
    class weights, validation every epoch) on synthetic features, for :class:`~msnet.models.aggregators.MSNet`
    and for the naive :class:`~msnet.models.aggregators.MSNetReference` (padded batch, mask after every
    layer: MS-Net as it was written first), in the same run, against the GEMM floor; print and return.

    Both train ``measure_epochs`` epochs from the same initial weights and seed, ``repeats`` times (the
    median per epoch is reported, with the spread of the repeats); times for ``epochs``
    are extrapolated from them when ``measure_epochs < epochs``. 20 % of the patients are the
    validation set, as ``msnet train`` carves it. Also reported: how far the two runs' losses and
    final weights are apart (the same training, up to float rounding).

    e.g. bench_train(patients=300, epochs=100)
    {'ours_s_per_epoch': 0.3, 'naive_s_per_epoch': 1.4, 'naive_over_ours': 4.6, ...}
    """
    import torch

    if patients < 4 or epochs < 1 or measure_epochs < 1 or slices[0] < 1 or slices[1] < slices[0]:
        raise MsnetError(f"bench train needs >= 4 patients, >= 1 epoch and 1 <= min slices <= max slices; got "
                         f"patients={patients}, epochs={epochs}, measure_epochs={measure_epochs}, slices={slices}",
                         fix="e.g. --patients 300 --epochs 100 --measure-epochs 5")
    n_classes = 3
    measured = min(measure_epochs, epochs)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        feats, labels = _synthetic_features(patients, features, slices, n_classes, seed)
        ids = [f"p{i:04d}" for i in range(patients)]
        cfg = Config()
        cfg.train.batch_size = batch_size
        train_ids, val_ids = carve(ids, [int(y) for y in labels], cfg.train.val_fraction, seed)
        pos = {p: i for i, p in enumerate(ids)}
        tx, ty = [feats[pos[p]] for p in train_ids], labels[[pos[p] for p in train_ids]]
        vx, vy = [feats[pos[p]] for p in val_ids], labels[[pos[p] for p in val_ids]]

        def train(cls, n_epochs: int, x=tx, y=ty, v=vx, w=vy) -> tuple[float, dict, list[dict], "torch.nn.Module"]:
            cfg.train.epochs = n_epochs
            torch.manual_seed(seed)
            model = cls(features, n_classes=n_classes)
            t = time.perf_counter()
            best, history = fit(model, x, y, v, w, cfg, n_classes, seed)
            return time.perf_counter() - t, best, history, model

        for cls in (MSNet, MSNetReference):  # warm-up: lazy imports, oneDNN kernels
            train(cls, 1, tx[:2 * batch_size], ty[:2 * batch_size], vx[:batch_size], vy[:batch_size])
        ours_runs, naive_runs = [], []
        for _ in range(max(1, repeats)):  # alternated, so that a change of load falls on both
            ours_runs.append(train(MSNet, measured))
            naive_runs.append(train(MSNetReference, measured))
        ours, naive = summary([r[0] for r in ours_runs]), summary([r[0] for r in naive_runs])
        ours_t, naive_t = ours["median"], naive["median"]
        _, _, ours_hist, ours_model = ours_runs[-1]
        _, _, naive_hist, naive_model = naive_runs[-1]
        gflops = gemm_gflops(threads)
    finally:
        torch.set_num_threads(threads_before)
    fwd, step = msnet_flops_per_slice(features)
    rows = _expected_rows(tx, cfg.train.crop_prob, cfg.train.crop_min_fraction)
    flops_epoch = rows * step + sum(s.shape[0] for s in vx) * fwd
    floor_epoch = flops_epoch / (gflops * 1e9)
    ours_epoch, naive_epoch = ours_t / measured, naive_t / measured
    loss_diff = max(abs(a[k] - b[k]) for a, b in zip(ours_hist, naive_hist) for k in ("train_loss", "val_loss"))
    weight_diff = max(float((a - b).abs().max()) for a, b in zip(ours_model.state_dict().values(),
                                                                 naive_model.state_dict().values()))
    result = {
        "patients": patients, "train_patients": len(tx), "val_patients": len(vx), "features": features,
        "slices": list(slices), "batch_size": batch_size, "threads": threads, "epochs": epochs,
        "measured_epochs": measured, "extrapolated": measured < epochs,
        "load_average": load_average(), "repeats": max(1, repeats),
        "ours_spread": round(ours["spread"], 3), "naive_spread": round(naive["spread"], 3),
        "gemm_gflops": round(gflops, 1), "gflop_per_epoch": round(flops_epoch / 1e9, 2),
        "floor_s_per_epoch": round(floor_epoch, 4), "ours_s_per_epoch": round(ours_epoch, 4),
        "naive_s_per_epoch": round(naive_epoch, 4),
        "floor_s": round(floor_epoch * epochs, 2), "ours_s": round(ours_epoch * epochs, 2),
        "naive_s": round(naive_epoch * epochs, 2),
        "naive_over_ours": round(naive_epoch / ours_epoch, 2), "ours_over_floor": round(ours_epoch / floor_epoch, 2),
        "naive_over_floor": round(naive_epoch / floor_epoch, 2),
        "max_loss_diff": loss_diff, "max_weight_diff": weight_diff,
        "same_val_accuracy": all(a["val_accuracy"] == b["val_accuracy"] for a, b in zip(ours_hist, naive_hist)),
    }
    print_bench_train(result, console)
    return result


def print_bench_train(result: dict, console=None) -> None:
    """Print a bench_train result as a table and the headline ratios."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    r = result
    how = (f"measured over {r['measured_epochs']} epochs, times for {r['epochs']} extrapolated"
           if r["extrapolated"] else f"measured over all {r['epochs']} epochs")
    how += f", median of {r['repeats']}"
    table = Table(title=f"train MS-Net: {r['patients']} patients ({r['train_patients']} train, {r['val_patients']} val), "
                        f"{r['slices'][0]}-{r['slices'][1]} slices x {r['features']} features, batch {r['batch_size']}, "
                        f"Adam, {r['threads']} threads; {how}")
    for col in ("", "s / epoch", f"s / {r['epochs']} epochs", "x floor", "spread"):
        table.add_column(col)
    table.add_row(f"floor: {r['gflop_per_epoch']} GFLOP/epoch at {r['gemm_gflops']} GFLOP/s (fp32 GEMM)",
                  f"{r['floor_s_per_epoch']:.3f}", f"{r['floor_s']:.1f}", "1.00", "")
    table.add_row("naive: MSNetReference (padded batch, mask after every layer)", f"{r['naive_s_per_epoch']:.3f}",
                  f"{r['naive_s']:.1f}", f"{r['naive_over_floor']:.2f}", f"{100 * r['naive_spread']:.0f} %")
    table.add_row("ours: MSNet (packed, no padding)", f"{r['ours_s_per_epoch']:.3f}", f"{r['ours_s']:.1f}",
                  f"{r['ours_over_floor']:.2f}", f"{100 * r['ours_spread']:.0f} %")
    console.print(table)
    console.print(f"naive/ours {r['naive_over_ours']:.2f}x; ours/floor {r['ours_over_floor']:.2f}; same training: "
                  f"max loss difference {r['max_loss_diff']:.1e}, max weight difference {r['max_weight_diff']:.1e}, "
                  f"same validation accuracy every epoch: {r['same_val_accuracy']}; load average {r['load_average']}")
