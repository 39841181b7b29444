"""Contract tests over every backbone and aggregator, plus weights, freezing and key slices."""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from msnet.models import aggregators, backbones, timm_backbones
from msnet.models.aggregators import AGGREGATORS
from msnet.models.backbones import SliceClassifier, count_parameters, known_backbones
from msnet.errors import MsnetError

D = 32  # feature size for aggregator tests (MS-Net's count is checked at d=2048)


# ---------------------------------------------------------------- backbones


@pytest.mark.parametrize("name", known_backbones())
def test_backbone_contract(name: str) -> None:
    torch.manual_seed(0)
    bb = backbones.create(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = bb(x)
        if bb.whole_study:  # reads slabs of slices: no per-slice map
            with pytest.raises(MsnetError, match="slab"):
                bb.forward_features(x)
        else:
            fmap = bb.forward_features(x)
            assert fmap.dim() == 4 and fmap.shape[:2] == (2, bb.num_features)
            torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3)))
    assert bb.name == name
    assert pooled.shape == (2, bb.num_features)
    cfg = bb.data_config
    assert cfg["input_size"][0] == 3 and len(cfg["mean"]) == 3 and len(cfg["std"]) == 3
    assert {"interpolation", "crop_pct"} <= set(cfg)
    assert len(bb.stages) >= 5


def test_backbone_names_and_in_chans() -> None:
    assert {"seresnet50", "resnet18", "resnet50", "densenet121", "squeezenet1_1",
            "efficientnet_lite0"} <= set(known_backbones())
    with pytest.raises(MsnetError, match="seresnet50"):
        backbones.create("vgg16")
    bb = backbones.create("squeezenet1_1", in_chans=1)
    assert bb(torch.zeros(1, 1, 64, 64)).shape == (1, 512)
    assert bb.data_config["input_size"][0] == 1 and len(bb.data_config["mean"]) == 1


def test_seresnet50_is_the_senet_layout() -> None:
    bb = backbones.create("seresnet50")
    assert bb.num_features == 2048
    assert type(bb.model).__name__ == "SENet"  # timm legacy_seresnet50
    assert [type(m[0]).__name__ for m in bb.stages] == ["Sequential"] * 5


def test_freeze_stages() -> None:
    bb = backbones.create("resnet18")
    total = count_parameters(bb, trainable_only=False)
    assert count_parameters(bb) == total
    bb.freeze(3)  # stem, layer1, layer2
    frozen = sum(p.numel() for g in bb.stages[:3] for m in g for p in m.parameters())
    assert count_parameters(bb) == total - frozen
    assert not bb.model.layer2[0].conv1.weight.requires_grad
    assert bb.model.layer3[0].conv1.weight.requires_grad
    bb.train()
    assert not bb.model.bn1.training and not bb.model.layer2[0].bn1.training
    assert bb.model.layer3[0].bn1.training
    # BN statistics of frozen stages stay put while training
    before = bb.model.layer1[0].bn1.running_mean.clone()
    bb(torch.randn(2, 3, 64, 64) * 5 + 3)
    torch.testing.assert_close(bb.model.layer1[0].bn1.running_mean, before)
    bb.freeze(0)
    assert count_parameters(bb) == total
    with pytest.raises(MsnetError, match="freeze"):
        bb.freeze(6)
    assert count_parameters(backbones.create("densenet121", freeze=5)) == 0


def test_slice_classifier_trains_head_and_unfrozen_backbone() -> None:
    clf = SliceClassifier(backbones.create("resnet18", freeze=4), n_classes=3)
    assert isinstance(clf.backbone, backbones.Backbone)
    loss = F.cross_entropy(clf(torch.randn(2, 3, 64, 64)), torch.tensor([0, 2]))
    loss.backward()
    assert clf.fc.weight.grad is not None
    assert clf.backbone.model.layer4[1].conv2.weight.grad is not None
    assert clf.backbone.model.layer3[1].conv2.weight.grad is None


def test_flops_per_image_counts_conv_and_linear() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                        nn.Flatten(), nn.Linear(8 * 14 * 14, 5))
    expected = 2 * (16 * 16 * 8 * 3 * 9 + 14 * 14 * 8 * 9 + 8 * 14 * 14 * 5)
    assert backbones.flops_per_image(net, input_size=(3, 16, 16)) == expected


# ---------------------------------------------------------------- weights


def _imagenet_top(bb: backbones.Backbone, image, n: int = 0) -> int:
    state = timm_backbones.efficientnet_lite_state_dict(n)
    cfg = bb.data_config
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=cfg["input_size"][1:], mode=cfg["interpolation"], antialias=True)
    x = (x - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]
    with torch.no_grad():
        logits = F.linear(bb(x), state["classifier.weight"], state["classifier.bias"])
    return int(logits.argmax())


@pytest.mark.parametrize("n", [0, 1, 2])
def test_efficientnet_lite_offline_imagenet_weights(n) -> None:
    import skimage.data as data
    name = f"efficientnet_lite{n}"
    bb = backbones.create(name, pretrained=True).eval()
    assert bb.data_config["mean"] == (0.5, 0.5, 0.5) and bb.data_config["std"] == (0.5, 0.5, 0.5)
    assert 281 <= _imagenet_top(bb, data.chelsea(), n) <= 285  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert _imagenet_top(bb, data.coffee(), n) == 967  # espresso
    hits = timm_backbones.efficientnet_lite_state_dict.cache_info().hits
    again = backbones.create(name, pretrained=True)
    assert timm_backbones.efficientnet_lite_state_dict.cache_info().hits > hits
    torch.testing.assert_close(again.model.conv_stem.weight, bb.model.conv_stem.weight)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and empty caches: downloads must fail fast."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    try:
        import huggingface_hub.constants as hf_constants

        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    except ImportError:
        pass

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", ["resnet18", "seresnet50", "squeezenet1_1"])
def test_pretrained_offline_names_weights_path(offline, name: str) -> None:
    with pytest.raises(MsnetError, match="weights=PATH"):
        backbones.create(name, pretrained=True)


def test_weights_path_formats(tmp_path) -> None:
    import timm

    torch.manual_seed(1)
    src = backbones.create("resnet18")
    x = torch.randn(1, 3, 64, 64)
    expected = src.eval()(x)
    timm_model = timm.create_model("resnet18", num_classes=1000)
    timm_model.load_state_dict(src.model.state_dict(), strict=False)  # keeps its random fc head
    variants = {
        "wrapper.pt": src.state_dict(),
        "timm.pth": {"state_dict": timm_model.state_dict(), "epoch": 3},
        "model_key.pth": {"model": timm_model.state_dict()},
        "classifier.pt": SliceClassifier(src, n_classes=3).state_dict(),
    }
    for file, obj in variants.items():
        torch.save(obj, tmp_path / file)
        loaded = backbones.create("resnet18", weights=tmp_path / file).eval()
        torch.testing.assert_close(loaded(x), expected, msg=file)


def test_weights_path_mismatch_is_clear(tmp_path) -> None:
    state = backbones.create("resnet18").model.state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(MsnetError, match=r"missing keys .*layer4\..*unexpected keys \[extra.weight\]"):
        backbones.create("resnet18", weights=tmp_path / "partial.pt")
    torch.save(backbones.create("resnet50").state_dict(), tmp_path / "r50.pt")
    with pytest.raises(MsnetError, match="r50.pt"):
        backbones.create("resnet18", weights=tmp_path / "r50.pt")
    with pytest.raises(MsnetError, match="not found"):
        backbones.create("resnet18", weights=tmp_path / "nope.pt")


# ---------------------------------------------------------------- aggregators


def _padded_batch(lengths: list[int], d: int = D, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), d, generator=g)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return x, mask


def _make(name: str) -> nn.Module:
    torch.manual_seed(0)
    return aggregators.create(name, in_features=D).eval()


def test_msnet_parameter_count_matches_paper() -> None:
    assert count_parameters(aggregators.MSNet(2048), trainable_only=False) == 207_683
    assert count_parameters(aggregators.create("msnet", in_features=2048)) == 207_683


def test_unknown_aggregator_lists_names() -> None:
    with pytest.raises(MsnetError, match="msnet, mean, max, mil, vote"):
        aggregators.create("lstm", in_features=8)
    with pytest.raises(MsnetError, match="bad option"):
        aggregators.create("mean", in_features=8, width=3)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregator_shapes_and_padding(name: str) -> None:
    agg = _make(name)
    for length in (1, 7, 150):
        x = torch.randn(2, length, D)
        assert agg(x).shape == (2, 3)
        assert agg.forward_features(x, None).shape == (2, agg.num_features)
        assert agg.forward_head(agg.forward_features(x)).shape == (2, 3)
    lengths = [7, 1, 150, 3]
    x, mask = _padded_batch(lengths)
    with torch.no_grad():
        batched = agg(x, mask)
        for i, n in enumerate(lengths):
            alone = agg(x[i : i + 1, :n])
            torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)
        # float mask works like the bool mask
        torch.testing.assert_close(agg(x, mask.float()), batched)
        # padded values never matter, even NaN
        noisy = x.clone()
        noisy[~mask] = torch.randn(int((~mask).sum()), D) * 100
        torch.testing.assert_close(agg(noisy, mask), batched)
        noisy[~mask] = float("nan")
        torch.testing.assert_close(agg(noisy, mask), batched)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregator_gradients_reach_every_parameter(name: str) -> None:
    agg = _make(name)
    x, mask = _padded_batch([40, 25, 33], seed=3)
    loss = F.cross_entropy(agg(x, mask), torch.tensor([0, 1, 2]))
    loss.backward()
    for pname, p in agg.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregator_config_rebuilds(name: str) -> None:
    agg = _make(name)
    rebuilt = aggregators.create(name, **agg.config)
    rebuilt.load_state_dict(agg.state_dict())
    x = torch.randn(1, 5, D)
    torch.testing.assert_close(rebuilt.eval()(x), agg(x))


@pytest.mark.parametrize("name", AGGREGATORS)
def test_slice_scores_contract(name: str) -> None:
    agg = _make(name)
    lengths = [9, 4, 1]
    x, mask = _padded_batch(lengths, seed=5)
    with torch.inference_mode():
        scores = agg.slice_scores(x, mask)
    assert scores.shape == mask.shape
    assert (scores >= 0).all() and (scores[~mask] == 0).all()
    assert (scores.sum(dim=1) > 0).all()
    with torch.no_grad():
        for i, n in enumerate(lengths):  # padding does not change the scores either
            torch.testing.assert_close(agg.slice_scores(x[i : i + 1, :n]), scores[i : i + 1, :n],
                                       atol=1e-5, rtol=1e-5)


def test_mil_scores_are_attention_weights() -> None:
    agg = _make("mil")
    x, mask = _padded_batch([6, 3])
    scores = agg.slice_scores(x, mask)
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(2))
    h, a = agg._embed_attend(*aggregators._prepare(x, mask))
    torch.testing.assert_close(agg.forward_features(x, mask), (a[:, :, None] * h).sum(dim=1))


@pytest.mark.parametrize("name", ["msnet", "max"])
def test_argmax_scores_equal_autograd_gradient_times_activation(name: str) -> None:
    agg = _make(name)
    x, mask = _padded_batch([12, 5], seed=7)
    xm, m = aggregators._prepare(x, mask)
    fmap = agg.temporal(xm, m) if name == "msnet" else xm.transpose(1, 2)
    pooled, idx = aggregators._masked_max(fmap, m)
    pooled = pooled.detach().requires_grad_(True)
    logits = agg.forward_head(pooled)
    pred = logits.argmax(dim=1)
    logits.gather(1, pred[:, None]).sum().backward()
    contrib = (pooled.grad * pooled).detach().clamp(min=0)
    expected = torch.zeros(mask.shape).scatter_add(1, idx, contrib)
    kwargs = {"method": "argmax"} if name == "msnet" else {}
    torch.testing.assert_close(agg.slice_scores(x, mask, **kwargs), expected)


def test_msnet_input_scores_are_gradient_times_input() -> None:
    agg = _make("msnet").eval()
    x, mask = _padded_batch([12, 5], seed=3)
    xg = aggregators._prepare(x, mask)[0].clone().requires_grad_(True)
    logits = agg(xg, mask)
    logits.gather(1, logits.argmax(dim=1)[:, None]).sum().backward()
    expected = ((xg.grad * xg).sum(dim=2).clamp(min=0) * mask).detach()
    with torch.inference_mode():
        got = agg.slice_scores(x, mask)
    torch.testing.assert_close(got, expected)


def test_mean_and_vote_scores_follow_the_decisive_slice() -> None:
    mean, vote = _make("mean"), _make("vote")
    for agg in (mean, vote):
        x = torch.zeros(1, 6, D)
        with torch.no_grad():
            x[0, 2] = agg.fc.weight[1] * 5  # a slice that pushes strongly towards class 1
        assert int(agg(x).argmax()) == 1
        assert int(agg.slice_scores(x).argmax()) == 2


@pytest.mark.parametrize("name", [n for n in known_backbones()
                                  if backbones.backbone_entry(n).arch and not n.startswith("astra")])
def test_stage_tables_follow_timms_feature_info(name):
    """A registered timm backbone's stage groups hold, in order, the modules timm's own ``feature_info``
    names for its stages (beyond the stem), so ``pool_stages`` and ``freeze`` count stages as timm does."""
    import timm

    arch = backbones.backbone_entry(name).arch
    info = [f["module"] for f in timm.create_model(arch, pretrained=False, num_classes=0).feature_info][1:]
    groups = backbones.create(name).stage_paths
    where = [next(i for i, g in enumerate(groups) if m in g) for m in info]
    assert where == sorted(where) and len(set(where)) == len(where) and 0 not in where
