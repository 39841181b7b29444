"""The packed MS-Net against its padded-batch reference: same outputs, gradients, scores and training;
plus a smoke run of ``msnet bench train``."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from msnet.config import Config
from msnet.errors import MsnetError
from msnet.models import aggregators
from msnet.models.aggregators import MSNet, MSNetReference, pad_batch, sequence_logits

D = 24
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _pair(seed: int = 0, **kwargs) -> tuple[MSNet, MSNetReference]:
    torch.manual_seed(seed)
    fast = MSNet(D, **kwargs)
    ref = MSNetReference(D, **kwargs)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _batch(lengths: list[int], seed: int, holes: bool = False, padding: float = 0.0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features (B, L, D) with a right-padded mask; ``holes`` drops a few inner slices too."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    x = torch.randn(len(lengths), L, D, generator=g)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    if holes:
        for i, n in enumerate(lengths):
            if n > 4:
                drop = torch.randperm(n - 1, generator=g)[: n // 4] + 1  # never the first slice
                mask[i, drop] = False
    x[~mask] = padding
    return x, mask


def _grads(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor
           ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x, mask)
    (out * weight).sum().backward()
    return out.detach(), {k: p.grad for k, p in model.named_parameters()}, x.grad


CASES = [  # (n_blocks, kernel_size, width): the paper's, wider kernels, shallow, no blocks
    (4, 3, 64), (3, 5, 16), (2, 7, 8), (1, 3, 32), (0, 3, 16), (5, 1, 8),
]
LENGTHS = [[7, 1, 60, 3, 33], [150], [2, 2], [40, 39, 1, 17]]


@pytest.mark.parametrize("n_blocks,kernel_size,width", CASES)
@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("convs", ["gemm", "onednn"])
def test_outputs_and_gradients_match_reference(monkeypatch, n_blocks: int, kernel_size: int, width: int, holes: bool,
                                               convs: str) -> None:
    # small packed maps run their convs as GEMMs, large ones as nn.Conv1d (oneDNN): test both on every case
    monkeypatch.setattr(aggregators, "_ONEDNN_MIN_VALUES", 10**12 if convs == "gemm" else -1)
    fast, ref = _pair(n_blocks=n_blocks, kernel_size=kernel_size, width=width)
    fast.eval(), ref.eval()
    for k, lengths in enumerate(LENGTHS):
        x, mask = _batch(lengths, seed=10 * k + n_blocks, holes=holes)
        weight = torch.randn(len(lengths), 3, generator=torch.Generator().manual_seed(k))
        out_f, grads_f, dx_f = _grads(fast, x, mask, weight)
        out_r, grads_r, dx_r = _grads(ref, x, mask, weight)
        torch.testing.assert_close(out_f, out_r, **TOL)
        assert grads_f.keys() == grads_r.keys()
        for name in grads_r:
            torch.testing.assert_close(grads_f[name], grads_r[name], **TOL, msg=name)
        torch.testing.assert_close(dx_f, dx_r, **TOL)
        assert (dx_f[~mask] == 0).all()  # padding gets no gradient
        fmap = fast.temporal(x, mask)
        torch.testing.assert_close(fmap, ref.temporal(x.masked_fill(~mask[:, :, None], 0), mask), **TOL)
        assert (fmap.transpose(1, 2)[~mask] == 0).all()


def test_a_training_batch_takes_the_onednn_path_and_matches() -> None:
    """Without patching: a batch of long studies (packed map > 20,480 values) through nn.Conv1d."""
    fast, ref = _pair(seed=6)
    fast.eval(), ref.eval()
    x, mask = _batch([150, 97, 120, 64], seed=6)
    weight = torch.randn(4, 3)
    out_f, grads_f, dx_f = _grads(fast, x, mask, weight)
    out_r, grads_r, dx_r = _grads(ref, x, mask, weight)
    torch.testing.assert_close(out_f, out_r, **TOL)
    for name in grads_r:
        torch.testing.assert_close(grads_f[name], grads_r[name], **TOL, msg=name)
    torch.testing.assert_close(dx_f, dx_r, **TOL)


def test_small_studies_run_on_one_thread(monkeypatch) -> None:
    seen = []
    fast, _ = _pair()
    real = fast._packed

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(fast, "_packed", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fast(torch.randn(1, 30, D))
        big = torch.randn(1, aggregators._ONE_THREAD_MAX_VALUES // D + 1, D)
        fast(big)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2]


def test_training_mode_dropout_draws_match() -> None:
    fast, ref = _pair(seed=3)
    fast.train(), ref.train()
    x, mask = _batch([30, 12, 25], seed=4)
    torch.manual_seed(7)
    a = fast(x, mask)
    torch.manual_seed(7)
    b = ref(x, mask)
    torch.testing.assert_close(a, b, **TOL)


def test_padding_never_matters_even_nan() -> None:
    fast, ref = _pair(seed=1)
    fast.eval()
    x, mask = _batch([9, 31, 4], seed=2)
    expected = ref.eval()(x, mask)
    for holes in (False, True):
        x, mask = _batch([9, 31, 4], seed=2, holes=holes, padding=float("nan"))
        out_f, grads, dx = _grads(fast, x, mask, torch.ones(3, 3))
        assert torch.isfinite(out_f).all() and torch.isfinite(dx).all()
        assert all(torch.isfinite(g).all() for g in grads.values())
        if not holes:
            torch.testing.assert_close(out_f, expected, **TOL)
        for i in range(3):  # each study alone, only its real slices
            alone = fast(x[i : i + 1, mask[i]])
            if not holes:
                torch.testing.assert_close(out_f[i : i + 1], alone, **TOL)
    # a study with NaN in its real slices does not reach the others in the packed batch
    x, mask = _batch([9, 31, 4], seed=2)
    x[1, 3] = float("nan")
    out = fast(x, mask)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    torch.testing.assert_close(out[[0, 2]], expected[[0, 2]], **TOL)


@pytest.mark.parametrize("n_blocks,kernel_size", [(4, 3), (3, 5)])
def test_forward_sequences_equals_padded_batch(n_blocks: int, kernel_size: int) -> None:
    fast, ref = _pair(seed=5, n_blocks=n_blocks, kernel_size=kernel_size)
    fast.eval(), ref.eval()
    base = [torch.randn(n, D, generator=torch.Generator().manual_seed(n)) for n in (80, 3, 41, 1, 66)]
    seqs = [base[0][10:50], base[1], base[2], base[3], base[4][::2]]  # views, as fit's crops are
    w = torch.randn(len(seqs), 3)
    params_f = dict(fast.named_parameters())
    (sequence_logits(fast, seqs) * w).sum().backward()
    x, mask = pad_batch(seqs)
    (ref(x, mask) * w).sum().backward()
    torch.testing.assert_close(fast.forward_sequences(seqs), ref(x, mask), **TOL)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(params_f[name].grad, p.grad, **TOL, msg=name)
    with pytest.raises(MsnetError, match="one \\(l, d\\) tensor per study"):
        fast.forward_sequences([base[0], base[0][:0]])


def test_slice_scores_match_reference() -> None:
    fast, ref = _pair(seed=8)
    fast.eval(), ref.eval()
    x, mask = _batch([12, 5, 70], seed=9)
    with torch.inference_mode():
        for method in ("input", "argmax"):
            torch.testing.assert_close(fast.slice_scores(x, mask, method=method),
                                       ref.slice_scores(x, mask, method=method), **TOL)


def test_checkpoints_load_unchanged() -> None:
    """Same parameter names and shapes as MS-Net always had: old checkpoints load strictly."""
    torch.manual_seed(0)
    fast = aggregators.create("msnet", in_features=2048)
    keys = list(fast.state_dict())
    assert keys[:2] == ["stem.weight", "stem.bias"] and keys[-4:] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert {k.rsplit(".", 2)[0] for k in keys} >= {"dilated", "pointwise", "post"}
    assert fast.state_dict()["dilated.3.weight"].shape == (64, 64, 3)
    ref = MSNetReference(**fast.config)
    ref.load_state_dict(fast.state_dict(), strict=True)
    fast.load_state_dict(ref.state_dict(), strict=True)
    assert sum(p.numel() for p in fast.parameters()) == sum(p.numel() for p in ref.parameters())


def test_sequence_logits_pads_for_other_aggregators() -> None:
    torch.manual_seed(0)
    agg = aggregators.create("mil", in_features=D).eval()
    seqs = [torch.randn(6, D), torch.randn(2, D)]
    torch.testing.assert_close(sequence_logits(agg, seqs), agg(*pad_batch(seqs)))


def test_fit_trains_the_same_as_the_reference() -> None:
    from msnet.stages.train import fit

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(int(n), D, generator=g) for n in torch.randint(5, 40, (14,), generator=g)]
    ys = torch.arange(14) % 3
    cfg = Config()
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr = 3, 4, 1e-3
    runs = []
    for cls in (MSNet, MSNetReference):
        torch.manual_seed(0)
        model = cls(D, width=16)
        best, history = fit(model, xs[:10], ys[:10], xs[10:], ys[10:], cfg, 3, seed=0)
        runs.append((best, history))
    (best_f, hist_f), (best_r, hist_r) = runs
    assert best_f["epoch"] == best_r["epoch"]
    for a, b in zip(hist_f, hist_r):
        assert a["val_accuracy"] == b["val_accuracy"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    for k, v in best_r["state"].items():
        torch.testing.assert_close(best_f["state"][k], v, atol=1e-4, rtol=1e-4, msg=k)


def test_onnx_trace_uses_the_padded_form(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from msnet.models.backbones import export_onnx

    fast, _ = _pair(seed=2)
    fast.eval()
    path = export_onnx(fast, (torch.randn(2, 7, D), torch.ones(2, 7, dtype=torch.bool)), tmp_path / "m.onnx",
                       ["features", "mask"], ["logits"],
                       {"features": {0: "batch", 1: "slices"}, "mask": {0: "batch", 1: "slices"}})
    x, mask = _batch([5, 19, 2], seed=3)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"features": x.numpy(), "mask": mask.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), fast(x, mask).detach(), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- bench train


def test_bench_train_smoke() -> None:
    from msnet.bench import bench_train

    r = bench_train(patients=10, epochs=3, measure_epochs=1, features=D, slices=(4, 9), batch_size=4, threads=1)
    assert r["train_patients"] + r["val_patients"] == 10 and r["val_patients"] >= 1
    assert r["extrapolated"] and r["measured_epochs"] == 1 and r["epochs"] == 3
    for key in ("ours_s_per_epoch", "naive_s_per_epoch", "floor_s_per_epoch", "gemm_gflops", "gflop_per_epoch",
                "naive_over_ours", "ours_over_floor", "naive_over_floor"):
        assert r[key] > 0, key
    assert r["ours_s"] == pytest.approx(3 * r["ours_s_per_epoch"], abs=0.01)
    assert r["same_val_accuracy"] and r["max_loss_diff"] < 1e-4 and r["max_weight_diff"] < 1e-3
    full = bench_train(patients=6, epochs=1, measure_epochs=4, features=8, slices=(3, 3), batch_size=2, threads=1)
    assert not full["extrapolated"] and full["measured_epochs"] == 1


def test_bench_train_cli_and_bad_options() -> None:
    from typer.testing import CliRunner

    from msnet.bench import bench_train
    from msnet.cli import app

    res = CliRunner().invoke(app, ["bench", "train", "--patients", "6", "--epochs", "2", "--measure-epochs", "1",
                                   "--features", "8", "--min-slices", "3", "--max-slices", "5", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "naive/ours" in res.output and "extrapolated" in res.output
    with pytest.raises(MsnetError, match="min slices"):
        bench_train(patients=6, epochs=1, slices=(9, 3))
