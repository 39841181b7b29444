"""One training engine for every stage that trains (stage 1's slice classifier, stage 3's aggregators).

The engine owns what every training run shares: epochs, the optimiser step, an exponential moving
average of the weights, validation after every epoch with model selection (best validation accuracy,
ties to the lower validation loss), early stopping, the resume state written atomically after every
epoch, the history, progress, and data-parallel wrapping under torchrun. A stage brings only what is
its own: how an epoch's batches are made, how a batch goes through the model, and how the
validation set is scored.

>>> import torch, numpy as np
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> x, y = torch.randn(64, 2), torch.randint(0, 2, (64,))
>>> x[y == 1] += 3
>>> model = torch.nn.Linear(2, 2)
>>> engine = Engine(model, torch.optim.Adam(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), epochs=20)
>>> def score(m):
...     return torch.softmax(m(x), 1).detach().numpy(), y
>>> result = engine.run(lambda epoch: [(x, y)], score)
>>> result.best["accuracy"] > 0.9, len(result.history)
(True, 20)
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from msnet.files import atomic_torch_save, write_csv_atomic
from msnet.progress import Rate
from msnet import device as D

log = logging.getLogger(__name__)

Batches = Callable[[int], Iterable[tuple[Any, torch.Tensor]]]
"""epoch -> (inputs, targets) pairs; inputs go to ``forward``, targets to the loss."""
Score = Callable[[nn.Module], tuple[np.ndarray, torch.Tensor | np.ndarray]]
"""model (in eval mode) -> (class probabilities (n, c), labels (n,)) of the validation set."""


def validation_row(probs: np.ndarray, labels) -> tuple[float, float]:
    """(accuracy, mean negative log-likelihood) of class probabilities against labels."""
    p = torch.from_numpy(np.asarray(probs, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    loss = float(nn.functional.nll_loss(torch.log(p.clamp_min(1e-8)), y))
    return float((p.argmax(1) == y).numpy().mean()), loss  # exact k/n (float64)


@dataclass
class Result:
    """What a training run found: the history (one row per validation) and the selected epoch."""

    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"accuracy": -1.0, "loss": float("inf"), "epoch": -1})


class Engine:
    """Trains ``model`` with ``opt`` and ``loss_fn`` for ``epochs`` epochs (see the module's docstring).

    ``state_file``: the resume state (model, optimiser, moving average, history, selection) written
    after every epoch, read by :meth:`run` with ``resume=True``; ``history_file``: the history as CSV
    after every epoch. ``on_best(model, row)`` is called on the main process when the validation
    improves, with the model to keep (the moving average when there is one). ``freeze_bn`` keeps the
    batch-norm statistics as loaded. ``log_epochs``: an INFO line per epoch (else DEBUG);
    ``progress``: a rich Progress that gets an epochs bar.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, loss_fn: nn.Module, *, epochs: int,
                 forward: Callable[[nn.Module, Any], torch.Tensor] | None = None, device: torch.device | None = None,
                 early_stopping: int = 0, ema: float = 0.0, freeze_bn: bool = False, rank: int = 0, world: int = 1,
                 state_file: Path | None = None, history_file: Path | None = None,
                 on_best: Callable[[nn.Module, dict], None] | None = None, log_epochs: bool = True, progress=None,
                 name: str = "training") -> None:
        self.model, self.opt, self.loss_fn, self.epochs = model, opt, loss_fn, int(epochs)
        self.forward = forward or (lambda m, x: m(x))
        self.device = device or torch.device("cpu")
        self.early_stopping, self.freeze_bn, self.rank, self.world = early_stopping, freeze_bn, rank, world
        self.state_file, self.history_file, self.on_best = state_file, history_file, on_best
        self.log_epochs, self.progress, self.name = log_epochs, progress, name
        self.decay = float(ema)
        self.ema: nn.Module | None = None
        if self.decay > 0:
            self.ema = copy.deepcopy(model).eval()
            for q in self.ema.parameters():
                q.requires_grad_(False)
        self.result = Result()
        self.start_epoch = 0
        self._ddp: nn.Module | None = None

    @property
    def eval_model(self) -> nn.Module:
        """The model that is validated and kept: the moving average when there is one."""
        return self.ema if self.ema is not None else self.model

    @property
    def train_model(self) -> nn.Module:
        """The model the optimiser steps through (wrapped for data parallelism under torchrun)."""
        if self.world > 1 and self._ddp is None:
            self._ddp = nn.parallel.DistributedDataParallel(self.model)
        return self._ddp if self.world > 1 else self.model

    @torch.no_grad()
    def _update_ema(self) -> None:
        for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
            pe.mul_(self.decay).add_(pm.detach(), alpha=1 - self.decay)
        for be, bm in zip(self.ema.buffers(), self.model.buffers()):
            be.copy_(bm)

    def resume(self) -> bool:
        """Continue from ``state_file`` if it exists; True if it did."""
        if self.state_file is None or not Path(self.state_file).is_file():
            return False
        state = torch.load(self.state_file, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.start_epoch = state["epoch"] + 1
        self.result = Result(state["history"], state["best"])
        log.info("%s: resuming at epoch %d", self.name, self.start_epoch + 1)
        return True

    def train_epoch(self, epoch: int, batches: Batches) -> float:
        """One pass over ``batches(epoch)``; the mean training loss per example."""
        model = self.train_model
        model.train()
        if self.freeze_bn:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        total, seen = 0.0, 0
        for x, y in batches(epoch):
            y = y.to(self.device)
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.forward(model, x), y)
            loss.backward()
            self.opt.step()
            if self.ema is not None:
                self._update_ema()
            total += loss.item() * len(y)
            seen += len(y)
        return total / max(seen, 1)

    def validate(self, epoch: int, train_loss: float | None, score: Score) -> bool:
        """Score the validation set after ``epoch`` (-1 with ``train_loss`` None: the model as it starts,
        history's epoch 0), keep the best, write the resume state; True if the validation improved."""
        model = self.eval_model
        was_training = model.training
        model.eval()
        acc, loss = validation_row(*score(model))
        model.train(was_training)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": loss, "val_accuracy": acc}
        self.result.history.append(row)
        say = log.info if self.log_epochs else log.debug
        if train_loss is None:
            say("%s: before training (epoch 0): val loss %.4f, val accuracy %.4f", self.name, loss, acc)
        else:
            say("%s: epoch %d/%d: train loss %.4f, val loss %.4f, val accuracy %.4f", self.name, epoch + 1,
                self.epochs, train_loss, loss, acc)
        best = self.result.best
        improved = acc > best["accuracy"] or (acc == best["accuracy"] and loss < best["loss"])
        if improved:
            self.result.best = {"accuracy": acc, "loss": loss, "epoch": epoch + 1}
            if self.on_best is not None and D.is_main():
                self.on_best(model, row)
        if D.is_main():
            self._save(epoch)
        return improved

    def _save(self, epoch: int) -> None:
        if self.state_file is not None:
            state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "epoch": epoch,
                     "history": self.result.history, "best": self.result.best}
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
            atomic_torch_save(state, self.state_file)
        if self.history_file is not None and self.result.history:
            write_csv_atomic(self.history_file, list(self.result.history[0]), self.result.history)

    def run(self, batches: Batches, score: Score) -> Result:
        """Epochs ``start_epoch .. epochs - 1``, each trained then validated, until early stopping."""
        stale, rate = 0, Rate(self.epochs - self.start_epoch, "epochs")
        task = (self.progress.add_task(f"  {self.name}", total=self.epochs - self.start_epoch)
                if self.progress is not None else None)
        for epoch in range(self.start_epoch, self.epochs):
            train_loss = self.train_epoch(epoch, batches)
            stale = 0 if self.validate(epoch, train_loss, score) else stale + 1
            if self.log_epochs:
                log.info("%s: %s", self.name, rate.update())
            if task is not None:
                self.progress.advance(task)
            if self.early_stopping and stale >= self.early_stopping:
                log.info("%s: early stopping after %d epochs without improvement", self.name, stale)
                break
        if task is not None:
            self.progress.remove_task(task)
        return self.result


def best_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s state (to keep the selected epoch in memory)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
