"""Patient-level aggregators over per-slice features (B, l, d) -> logits (B, n_classes).

All share one face (as timm models do): ``forward(x, mask=None)``,
``forward_features(x, mask)`` -> pooled (B, num_features), ``forward_head(feats)``,
``num_features``, ``slice_scores(x, mask)`` -> (B, l) key-slice scores, and
``config`` (the constructor kwargs, so checkpoints rebuild the module with
``create(name, **config)``).

``mask`` (B, l) is True (or 1.0) at real slices; padded batches are right-padded
(real slices first). Padded positions never change a study's output.

>>> agg = create("msnet", in_features=2048)
>>> agg(torch.zeros(2, 7, 2048)).shape
torch.Size([2, 3])
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.nn import functional as F

from msnet.device import one_thread
from msnet.errors import MsnetError

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, type[nn.Module]] = {}


def register_aggregator(name: str):
    """Class decorator: register an aggregator under ``name`` (a new aggregator is one decorated class)."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY:
            raise RuntimeError(f"aggregator {name!r} registered twice")
        _REGISTRY[name] = cls
        return cls

    return add


def _check(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes; return x and a bool mask (B, l)."""
    if x.dim() != 3:
        raise MsnetError(f"aggregator input must be (batch, slices, features), got shape {tuple(x.shape)}",
                         fix="add a batch axis: x[None]")
    if mask is None:
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if mask.dtype != torch.bool:
        mask = mask > 0.5
    return x, mask


def _prepare(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes; return x (zero at padded slices) and a bool mask (B, l)."""
    x, mask = _check(x, mask)
    return x.masked_fill(~mask[:, :, None], 0.0), mask


def pad_batch(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (l_i, d) -> right-padded (B, L, d) and mask (B, L), True on real slices.

    >>> x, m = pad_batch([torch.ones(2, 3), torch.ones(4, 3)])
    >>> tuple(x.shape), m.sum(1).tolist()
    ((2, 4, 3), [2, 4])
    """
    L = max(s.shape[0] for s in seqs)
    x = seqs[0].new_zeros(len(seqs), L, seqs[0].shape[1])
    mask = torch.zeros(len(seqs), L, dtype=torch.bool, device=seqs[0].device)
    for i, s in enumerate(seqs):
        x[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return x, mask


def sequence_logits(model: nn.Module, seqs: list[torch.Tensor]) -> torch.Tensor:
    """Logits (B, n_classes) of a batch given as a list of studies (l_i, d): the aggregator's own
    ``forward_sequences`` where it has one (MS-Net packs the studies without padding), else
    ``model(*pad_batch(seqs))``."""
    fn = getattr(model, "forward_sequences", None)
    return fn(seqs) if fn is not None else model(*pad_batch(seqs))


# MS-Net runs on one CPU thread up to this many input values (about 500 slices of 2048 features:
# a few ms of work), where a second thread gains nothing and can stall on a busy machine
_ONE_THREAD_MAX_VALUES = 2**20

# PyTorch runs a batch-1 conv on oneDNN only above this many input values; below, on generic
# kernels (slow_conv_dilated2d, thnn) that stall for tens of ms per call on two busy cores
_ONEDNN_MIN_VALUES = 20480


def _conv1d(conv: nn.Conv1d, h: torch.Tensor, gemm: bool) -> torch.Tensor:
    """``conv`` ('same' padding) of one packed map h (C_in, T) -> (C_out, T): the module itself
    (oneDNN), or with ``gemm`` one matrix product on the dilated columns (F.unfold)."""
    if not gemm:
        return conv(h[None])[0]
    k = conv.kernel_size[0]
    if k > 1:
        h = F.unfold(h[None, :, None, :], (1, k), dilation=(1, conv.dilation[0]), padding=(0, conv.padding[0]))[0]
    return torch.addmm(conv.bias[:, None], conv.weight.reshape(conv.out_channels, -1), h)


def _small_on_one_thread(method):
    """Run an MS-Net method on one CPU thread when its input is small (:func:`msnet.device.one_thread`)."""

    @functools.wraps(method)
    def run(self, x, *args, **kwargs):
        xs = x if isinstance(x, (list, tuple)) else [x]
        small = bool(xs) and xs[0].device.type == "cpu" and sum(t.numel() for t in xs) <= _ONE_THREAD_MAX_VALUES
        with one_thread(small and not torch.jit.is_tracing()):
            return method(self, x, *args, **kwargs)

    return run


def _masked_max(h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over the last axis of h (B, C, l) at real positions: (values, argmax) (B, C)."""
    return h.masked_fill(~mask[:, None, :], float("-inf")).max(dim=2)


def _argmax_scores(idx: torch.Tensor, contrib: torch.Tensor, n_slices: int) -> torch.Tensor:
    """Sum per slice of the (clamped non-negative) contributions of the channels it won."""
    scores = torch.zeros(idx.shape[0], n_slices, dtype=contrib.dtype, device=contrib.device)
    return scores.scatter_add(1, idx, contrib.clamp(min=0))


def _mlp_contributions(pooled: torch.Tensor, hidden: nn.Linear, out: nn.Linear) -> torch.Tensor:
    """Gradient x input of the predicted logit of ``out(relu(hidden(pooled)))``, per input channel.

    Exact and analytic (the network is piecewise linear), so it works under
    ``torch.no_grad``. Dropout is treated as off (eval behaviour).
    """
    h = hidden(pooled)
    logits = out(F.relu(h))
    pred = logits.argmax(dim=1)
    grad_h = out.weight[pred] * (h > 0).to(h.dtype)  # (B, hidden)
    grad_in = grad_h @ hidden.weight  # (B, in)
    return grad_in * pooled


class Aggregator(nn.Module):
    """A patient-level model over slice features x (B, l, d) with a mask (B, l) of the real slices:
    ``forward_features`` pools them to one vector per patient, ``forward_head`` turns that into
    logits, ``slice_scores`` (B, l) says how much each slice counted."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, mask))


@register_aggregator("msnet")
class MSNet(Aggregator):
    """Multi-Slice Net: temporal conv, dilated residual blocks, max-pool over slices, dense, dense.

    Layout (WaveNet-like): a 1x1 temporal conv d -> width; ``n_blocks``
    residual blocks [dilated conv (kernel_size, dilation 2**i), ReLU, 1x1 conv]
    + identity, ReLU; two 1x1 "post" convs (ReLU after each); masked global
    max-pool over slices; dropout; dense width//2 + ReLU; dropout; dense
    n_classes. Defaults give 207,683 parameters for d=2048 (see docs/models.md).

    The computation is that of :class:`MSNetReference` (every layer on the padded
    batch, the mask applied after each), done without padding: the studies' real
    slices are packed into one sequence with zero gaps between them as wide as the
    widest dilated conv's reach, the 1x1 temporal conv is one GEMM over the real
    slices only, and the gaps are zeroed only where a dilated conv reads them. So a
    study in a padded batch sees exactly the zeros it sees alone, padded values are
    never read, and :meth:`forward_sequences` takes a list of studies without
    building a padded batch at all (what training uses). Tracing (ONNX export)
    runs the padded form. The packed form uses the convs' weights directly, so forward
    hooks on ``stem`` (and, for one study, on the other convs) do not fire; the head's do.

    >>> sum(p.numel() for p in MSNet(2048).parameters())
    207683
    """

    name = "msnet"

    def __init__(self, in_features: int, n_classes: int = 3, width: int = 64, n_blocks: int = 4,
                 kernel_size: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise MsnetError(f"MS-Net kernel_size must be odd, got {kernel_size}",
                             fix="use kernel_size=3 (the paper's) or another odd number")
        self.config = {"in_features": in_features, "n_classes": n_classes, "width": width,
                       "n_blocks": n_blocks, "kernel_size": kernel_size, "dropout": dropout}
        self.num_features = width
        self.stem = nn.Conv1d(in_features, width, 1)
        self.dilated = nn.ModuleList(
            nn.Conv1d(width, width, kernel_size, dilation=2**i, padding=2**i * (kernel_size - 1) // 2)
            for i in range(n_blocks))
        self.pointwise = nn.ModuleList(nn.Conv1d(width, width, 1) for _ in range(n_blocks))
        self.post = nn.ModuleList(nn.Conv1d(width, width, 1) for _ in range(2))
        self.drop = nn.Dropout(dropout)
        self.fc1 = nn.Linear(width, width // 2)
        self.fc2 = nn.Linear(width // 2, n_classes)
        # zero columns between packed studies: the reach of the widest dilated conv
        self.gap = max((conv.padding[0] for conv in self.dilated), default=0)

    # -- the padded form: the definition, and what tracing (ONNX export) records
    def _temporal_padded(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[:, None, :].to(x.dtype)
        h = F.relu(self.stem(x.transpose(1, 2))) * m
        for dilated, pointwise in zip(self.dilated, self.pointwise):
            r = F.relu(dilated(h)) * m
            h = F.relu(h + pointwise(r)) * m
        for conv in self.post:
            h = F.relu(conv(h)) * m
        return h

    # -- the packed form
    def _packed(self, seqs: list[torch.Tensor], masks: list[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, list[int]]:
        """Studies (l_i, d) -> feature map (width, T) of all of them packed with zero gaps, and each
        study's first column. ``masks`` (l_i,) marks real slices inside a study when it has holes
        (their rows of ``seqs`` must be zero)."""
        g = self.gap
        lengths = [s.shape[0] for s in seqs]
        rows = seqs[0] if len(seqs) == 1 else torch.cat(seqs)  # (N, d): real slices only
        y = torch.addmm(self.stem.bias[:, None], self.stem.weight[:, :, 0], rows.t())  # (width, N)
        parts, starts, pos = [], [], 0
        zeros = y.new_zeros(y.shape[0], g)
        for piece, n in zip(y.split(lengths, dim=1), lengths):
            parts += [zeros, piece]
            starts.append(pos + g)
            pos += g + n
        # round T up to a multiple of 64: batches then repeat a few sequence lengths, and the convs'
        # oneDNN primitives (built per input shape) are reused instead of rebuilt at every step
        parts.append(y.new_zeros(y.shape[0], g + (-(pos + g)) % 64))
        h = F.relu(torch.cat(parts, dim=1))  # (width, T); the gaps are zero
        keep = None
        if masks is not None or len(self.dilated) > 1:
            keep = torch.zeros(h.shape[1], dtype=torch.bool, device=h.device)
            for start, n, m in zip(starts, lengths, masks or [None] * len(seqs)):
                keep[start:start + n] = True if m is None else m
            if masks is not None:  # holes: the stem's bias must not reach the first dilated conv
                h = torch.where(keep, h, 0.0)
        gemm = h.numel() <= _ONEDNN_MIN_VALUES
        last = len(self.dilated) - 1
        for i, (dilated, pointwise) in enumerate(zip(self.dilated, self.pointwise)):
            r = _conv1d(dilated, h, gemm).relu_()
            h = h + _conv1d(pointwise, r, gemm)
            if i < last:  # the next dilated conv reads the gaps: zero them
                h = torch.where(keep, h, 0.0)
            h = h.relu_()
        for conv in self.post:
            h = _conv1d(conv, h, gemm).relu_()
        return h, starts

    @staticmethod
    def _unpack(h: torch.Tensor, starts: list[int], mask: torch.Tensor) -> torch.Tensor:
        """Packed (width, T) -> padded (B, width, L) of ``mask`` (B, L); padded positions hold garbage."""
        L = mask.shape[1]
        idx = (torch.tensor(starts, device=h.device)[:, None] + torch.arange(L, device=h.device)).clamp_(max=h.shape[1] - 1)
        return h[:, idx].permute(1, 0, 2)

    def _run(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Padded input (B, L, d) and bool mask -> (B, width, L) feature map, garbage at padded positions."""
        L = x.shape[1]
        ends = (mask * torch.arange(1, L + 1, device=mask.device)).amax(dim=1)
        prefix = bool((mask.sum(dim=1) == ends).all())  # right-padded, no holes
        ends = ends.tolist()
        if prefix:
            h, starts = self._packed([x[i, :e] for i, e in enumerate(ends)])
        else:
            x = x.masked_fill(~mask[:, :, None], 0.0)
            h, starts = self._packed([x[i, :e] for i, e in enumerate(ends)], [mask[i, :e] for i, e in enumerate(ends)])
        return self._unpack(h, starts, mask)

    @_small_on_one_thread
    def temporal(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-slice feature map (B, width, l) before pooling, zero at padded positions."""
        x, mask = _check(x, mask)
        if torch.jit.is_tracing():
            return self._temporal_padded(x.masked_fill(~mask[:, :, None], 0.0), mask)
        return torch.where(mask[:, None, :], self._run(x, mask), 0.0)

    @_small_on_one_thread
    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_tracing():
            x, mask = _prepare(x, mask)
            return _masked_max(self._temporal_padded(x, mask), mask)[0]
        x, mask = _check(x, mask)
        return _masked_max(self._run(x, mask), mask)[0]

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.relu(self.fc1(self.drop(feats)))))

    @_small_on_one_thread
    def forward_sequences(self, seqs: list[torch.Tensor]) -> torch.Tensor:
        """Logits (B, n_classes) of a list of studies (l_i, d), as ``forward(*pad_batch(seqs))``
        without making the padded batch.

        >>> net = MSNet(16).eval()
        >>> seqs = [torch.randn(5, 16), torch.randn(2, 16)]
        >>> torch.allclose(net.forward_sequences(seqs), net(*pad_batch(seqs)), atol=1e-6)
        True
        """
        if not seqs or any(s.dim() != 2 or s.shape[0] == 0 for s in seqs):
            raise MsnetError("MS-Net takes a non-empty list of (slices, features) tensors with at least one slice each",
                             fix="pass one (l, d) tensor per study")
        h, starts = self._packed(seqs)
        lengths = torch.tensor([s.shape[0] for s in seqs], device=h.device)
        mask = torch.arange(int(lengths.max()), device=h.device)[None, :] < lengths[:, None]
        return self.forward_head(_masked_max(self._unpack(h, starts, mask), mask)[0])

    @_small_on_one_thread
    def slice_scores(self, x: torch.Tensor, mask: torch.Tensor | None = None, method: str = "input") -> torch.Tensor:
        """How much each slice drove the predicted class's logit (B, l), >= 0, zero at padding.

        ``method="argmax"``: each pooled channel's contribution (gradient x activation
        of the predicted logit) goes to the slice position it was max-pooled from.
        ``method="input"`` (default) carries the same contributions on through the
        dilated temporal stack down to the input slices: gradient x input of the
        predicted logit w.r.t. each slice's features (summed over features, negatives
        clamped to 0). A pooled position sees ±15 slices through the dilated convs, so
        the argmax position alone points only roughly at the slices that made it win;
        the input reading lands on them (see docs/models.md). Dropout counts as off.
        """
        if method == "argmax":
            x, mask = _prepare(x, mask)
            pooled, idx = _masked_max(self.temporal(x, mask), mask)
            return _argmax_scores(idx, _mlp_contributions(pooled, self.fc1, self.fc2), x.shape[1])
        if method != "input":
            raise MsnetError(f"unknown slice-score method {method!r}", fix="use 'input' or 'argmax'")
        return self.logits_and_scores(x, mask)[1]

    @_small_on_one_thread
    def logits_and_scores(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, k) and ``slice_scores(method="input")`` (B, l) from one forward pass (eval behaviour)."""
        with torch.inference_mode(False), torch.enable_grad():
            x, mask = _prepare(x.detach().clone(), None if mask is None else mask.detach().clone())
            x = x.requires_grad_(True)
            logits = self.fc2(F.relu(self.fc1(_masked_max(self.temporal(x, mask), mask)[0])))
            pred = logits.argmax(dim=1)
            (grad,) = torch.autograd.grad(logits.gather(1, pred[:, None]).sum(), x)
            scores = ((grad * x).sum(dim=2).clamp(min=0) * mask).detach()
        empty = scores.sum(dim=1) <= 0
        if empty.any():  # nothing positive at the input: fall back to the argmax reading
            scores[empty] = self.slice_scores(x.detach()[empty], mask[empty], method="argmax")
        return logits.detach(), scores


class MSNetReference(MSNet):
    """MS-Net computed layer by layer on the padded batch (B, width, l), the mask applied after
    every layer: the plain form of :class:`MSNet`, with the same parameters and state dict.

    :class:`MSNet` is tested against it (outputs and gradients) and ``msnet bench train`` times
    it as the naive baseline; it is not an aggregator of its own (``create`` does not make it).
    """

    def temporal(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-slice feature map (B, width, l) before pooling, zero at padded positions."""
        return self._temporal_padded(x, mask)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, mask = _prepare(x, mask)
        return _masked_max(self.temporal(x, mask), mask)[0]

    def forward_sequences(self, seqs: list[torch.Tensor]) -> torch.Tensor:
        """Logits of a list of studies through a padded batch."""
        return self(*pad_batch(seqs))


@register_aggregator("mean")
class MeanPool(Aggregator):
    """Feature-level average: masked mean over slices, dropout, linear.

    >>> MeanPool(16)(torch.zeros(1, 4, 16)).shape
    torch.Size([1, 3])
    """

    name = "mean"

    def __init__(self, in_features: int, n_classes: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        self.config = {"in_features": in_features, "n_classes": n_classes, "dropout": dropout}
        self.num_features = in_features
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, n_classes)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, mask = _prepare(x, mask)
        m = mask.to(x.dtype)[:, :, None]
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(feats))

    def slice_scores(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per slice: its positive share w_c . x_i / n of the predicted logit c."""
        x, mask = _prepare(x, mask)
        pred = self.fc(self.forward_features(x, mask)).argmax(dim=1)
        n = mask.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)
        share = torch.einsum("bld,bd->bl", x, self.fc.weight[pred]) / n
        return share.clamp(min=0) * mask.to(x.dtype)


@register_aggregator("max")
class MaxPoolMLP(Aggregator):
    """Masked max-pool over slices, then an MLP (COVNet / CT-CAPS style).

    >>> MaxPoolMLP(16, hidden=8)(torch.zeros(1, 4, 16)).shape
    torch.Size([1, 3])
    """

    name = "max"

    def __init__(self, in_features: int, n_classes: int = 3, hidden: int = 128, dropout: float = 0.2) -> None:
        super().__init__()
        self.config = {"in_features": in_features, "n_classes": n_classes, "hidden": hidden, "dropout": dropout}
        self.num_features = in_features
        self.drop = nn.Dropout(dropout)
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, mask = _prepare(x, mask)
        return _masked_max(x.transpose(1, 2), mask)[0]

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.relu(self.fc1(self.drop(feats)))))

    def slice_scores(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """As MS-Net: argmax source of each pooled feature, weighted by gradient x activation."""
        x, mask = _prepare(x, mask)
        pooled, idx = _masked_max(x.transpose(1, 2), mask)
        return _argmax_scores(idx, _mlp_contributions(pooled, self.fc1, self.fc2), x.shape[1])


@register_aggregator("mil")
class AttentionMIL(Aggregator):
    """Gated attention multiple-instance learning (Ilse et al., 2018).

    Slices are embedded (linear + ReLU), weighted by a masked softmax of gated
    attention, summed, and classified by a linear layer.

    >>> AttentionMIL(16, hidden=8, attention=4)(torch.zeros(1, 4, 16)).shape
    torch.Size([1, 3])
    """

    name = "mil"

    def __init__(self, in_features: int, n_classes: int = 3, hidden: int = 128, attention: int = 64,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.config = {"in_features": in_features, "n_classes": n_classes, "hidden": hidden,
                       "attention": attention, "dropout": dropout}
        self.num_features = hidden
        self.embed = nn.Linear(in_features, hidden)
        self.att_v = nn.Linear(hidden, attention)
        self.att_u = nn.Linear(hidden, attention)
        self.att_w = nn.Linear(attention, 1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, n_classes)

    def _embed_attend(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.embed(x))  # (B, l, hidden)
        a = self.att_w(torch.tanh(self.att_v(h)) * torch.sigmoid(self.att_u(h))).squeeze(2)
        a = torch.softmax(a.masked_fill(~mask, float("-inf")), dim=1)
        return h, a

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, mask = _prepare(x, mask)
        h, a = self._embed_attend(x, mask)
        return torch.einsum("bl,blh->bh", a, h)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(feats))

    def slice_scores(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention weights (sum to 1 over real slices)."""
        x, mask = _prepare(x, mask)
        return self._embed_attend(x, mask)[1]


@register_aggregator("vote")
class SliceVote(Aggregator):
    """Score-level aggregation: per-slice linear classifier, softmax, mean over real slices.

    ``forward`` returns log(mean probability) so cross-entropy applies directly;
    ``forward_features`` is the mean probability vector (num_features = n_classes).

    >>> round(SliceVote(16)(torch.zeros(1, 4, 16)).exp().sum().item(), 4)
    1.0
    """

    name = "vote"

    def __init__(self, in_features: int, n_classes: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        self.config = {"in_features": in_features, "n_classes": n_classes, "dropout": dropout}
        self.num_features = n_classes
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, n_classes)

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(self.drop(x)), dim=2)  # (B, l, n_classes)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, mask = _prepare(x, mask)
        m = mask.to(x.dtype)[:, :, None]
        return (self._probs(x) * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.log(feats.clamp(min=1e-12))

    def slice_scores(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per slice: its probability of the predicted class (zero at padding)."""
        x, mask = _prepare(x, mask)
        probs = self._probs(x)
        m = mask.to(x.dtype)
        pred = ((probs * m[:, :, None]).sum(dim=1)).argmax(dim=1)
        return probs.gather(2, pred[:, None, None].expand(-1, x.shape[1], 1)).squeeze(2) * m


AGGREGATORS: tuple[str, ...] = tuple(_REGISTRY)
"""The registered aggregators' names."""


def logits_and_scores(model: nn.Module, x: torch.Tensor,
                      mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and slice scores of any aggregator; one pass where the model offers it (MS-Net).

    >>> logits, scores = logits_and_scores(create("mean", 8), torch.rand(1, 5, 8))
    >>> tuple(logits.shape), tuple(scores.shape)
    ((1, 3), (1, 5))
    """
    if hasattr(model, "logits_and_scores"):
        return model.logits_and_scores(x, mask)
    with torch.no_grad():
        return model(x, mask), model.slice_scores(x, mask)


def create(name: str, in_features: int, n_classes: int = 3, **kwargs) -> nn.Module:
    """Make an aggregator by name (one of :data:`AGGREGATORS`).

    >>> create("mil", in_features=512).num_features
    128
    """
    if name not in _REGISTRY:
        raise MsnetError(f"unknown aggregator {name!r}", fix=f"use one of: {', '.join(AGGREGATORS)}")
    try:
        return _REGISTRY[name](in_features=in_features, n_classes=n_classes, **kwargs)
    except TypeError as exc:
        raise MsnetError(f"bad option for aggregator {name!r}: {exc}",
                         fix=f"use the options of {_REGISTRY[name].__name__}") from exc
