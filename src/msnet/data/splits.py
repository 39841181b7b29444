"""The one way msnet splits patients: stratified by label, optionally grouped (all items of a group,
e.g. the images of one patient, land on the same side). Seeded and deterministic.

>>> ids = [f"p{i}" for i in range(10)]
>>> labels = ["a"] * 5 + ["b"] * 5
>>> rest, held = carve(ids, labels, 0.2, seed=0)
>>> sorted(labels[ids.index(p)] for p in held)
['a', 'b']
>>> folds = stratified_folds(ids, labels, 5, seed=0)
>>> sorted(len(f) for f in folds), sorted(p for f in folds for p in f) == sorted(ids)
([2, 2, 2, 2, 2], True)
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Sequence

import torch


def _groups_by_label(ids: Sequence[str], labels: Sequence[str], groups: Sequence[str] | None,
                     seed: int) -> dict[str, list[list[str]]]:
    """label -> shuffled list of groups (each a list of ids); a group's label is its most common one."""
    members: dict[str, list[str]] = {}
    for i, item in enumerate(ids):
        members.setdefault(str(groups[i]) if groups is not None else str(item), []).append(item)
    label_of = dict(zip(ids, labels))
    rng = random.Random(seed)
    out: dict[str, list[list[str]]] = {}
    for g in sorted(members):
        y = Counter(label_of[m] for m in members[g]).most_common(1)[0][0]
        out.setdefault(y, []).append(sorted(members[g]))
    for y in out:
        rng.shuffle(out[y])
    return dict(sorted(out.items()))


def stratified_folds(ids: Sequence[str], labels: Sequence[str], k: int, seed: int,
                     groups: Sequence[str] | None = None) -> list[list[str]]:
    """``k`` disjoint lists of ids covering all of them, each class spread evenly over the folds
    (and whole groups kept together when ``groups`` is given)."""
    folds: list[list[str]] = [[] for _ in range(k)]
    offset = 0
    for gs in _groups_by_label(ids, labels, groups, seed).values():
        for i, g in enumerate(gs):
            folds[(i + offset) % k].extend(g)
        offset += len(gs)
    return folds


def carve(ids: Sequence[str], labels: Sequence[str] | dict, fraction: float, seed: int,
          groups: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(rest, held): about ``fraction`` of each class's groups is held out (at least one group of a
    class that has two or more). ``labels`` is a sequence parallel to ``ids`` or a dict id -> label."""
    ids = list(ids)
    labels = [labels[i] for i in ids] if isinstance(labels, dict) else list(labels)
    rest: list[str] = []
    held: list[str] = []
    for gs in _groups_by_label(ids, labels, groups, seed).values():
        n = max(1, int(round(len(gs) * fraction))) if len(gs) > 1 else 0
        held += [i for g in gs[:n] for i in g]
        rest += [i for g in gs[n:] for i in g]
    return rest, held


def class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights for a class-weighted loss, mean 1 over the classes present.

    >>> class_weights(torch.tensor([0, 0, 0, 1]), 2).tolist()
    [0.5, 1.5]
    """
    counts = torch.bincount(labels, minlength=n_classes).float()
    w = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    present = (counts > 0).sum()
    return w * present / w.sum()
