"""Transfer of a slice model to a cohort whose classes differ from the model's: infection scores per slice.

A slice classifier trained on other classes (e.g. UCSD COVID-CT screenshots, COVID-19 vs
NON-COVID) cannot be scored by accuracy on a volumetric cohort labelled COVID-19 / CAP /
NORMAL. With the cohort's slice labels it can still be asked whether it sees lesions: every
slice of every study gets an **infection score**, 1 - p(the model's normal class: NORMAL or
NON-COVID), and two AUCs measure it:

- ``infection_auc_vs_normal``: slices labelled infected against every slice of the NORMAL patients;
- ``infection_auc_within_patients``: slices labelled infected against the slices of the same
  patients that carry no infection label (the harder test: same scanner, same body).

``finetune --test COHORT_DIR`` runs this when ``COHORT_DIR/cohort.csv`` has labels the model
does not know (:func:`msnet.stages.ct_eval.score_test_cohort`, which adds the slices that show lung
and the lung-area baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from msnet.errors import MsnetError
from msnet.metrics import auc_score

SLICE_FIELDS = ["patient_id", "label", "slice_index", "slice_label", "infection_score"]
NORMAL_NAMES = ("NORMAL", "NON-COVID")
"""Model classes whose probability means 'no infection' (compared without case, - and _)."""


def _key(name: str) -> str:
    return str(name).upper().replace("_", "-").replace(" ", "-")


def normal_class(classes: Sequence[str], configured: str | None = None) -> str:
    """The model class that means 'no infection': NORMAL, NON-COVID (or the configured normal class).

    >>> normal_class(["COVID-19", "NonCOVID"]), normal_class(["COVID-19", "CAP", "NORMAL"])
    ('NonCOVID', 'NORMAL')
    """
    wanted = {_key(n) for n in NORMAL_NAMES} | ({_key(configured)} if configured else set())
    for c in classes:
        if _key(c) in wanted or _key(c).replace("-", "") in {w.replace("-", "") for w in wanted}:
            return str(c)
    raise MsnetError(f"the model's classes {list(classes)} have no NORMAL or NON-COVID class, so no infection "
                     "score (1 - p(normal)) can be made", fix="test a slice model trained with a normal class")


def is_normal_patient(label: str) -> bool:
    """A cohort patient whose every slice counts as infection-free (label NORMAL)."""
    return _key(label) == "NORMAL"


def infection_metrics(patients: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The two infection AUCs from per-patient slice scores.

    Each patient: ``label`` (cohort class), ``scores`` (infection score per slice) and
    ``slice_labels`` (1 = infected, per slice; None when the cohort has none for it). NORMAL
    patients give negatives for the first AUC; patients with at least one labelled infected
    slice give the positives, and their unlabelled slices the negatives of the second.
    Non-normal patients without slice labels take no part. An AUC without positives or
    negatives is None.

    >>> p = [{"label": "COVID-19", "scores": np.array([.9, .2, .8]), "slice_labels": np.array([1, 0, 1])},
    ...      {"label": "NORMAL", "scores": np.array([.1, .3]), "slice_labels": None}]
    >>> m = infection_metrics(p); m["infection_auc_vs_normal"], m["infection_auc_within_patients"]
    (1.0, 1.0)
    """
    infected, unlabelled, normal = [], [], []
    n_labelled_patients = n_normal_patients = n_skipped = 0
    for p in patients:
        scores = np.asarray(p["scores"], dtype=np.float64)
        if is_normal_patient(p["label"]):
            normal.append(scores)
            n_normal_patients += 1
            continue
        labels = p.get("slice_labels")
        if labels is None or not np.any(np.asarray(labels) > 0):
            n_skipped += 1
            continue
        pos = np.asarray(labels)[: scores.size] > 0
        infected.append(scores[pos])
        unlabelled.append(scores[~pos])
        n_labelled_patients += 1
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0)  # noqa: E731
    pos, neg_normal, neg_within = cat(infected), cat(normal), cat(unlabelled)

    def auc(neg: np.ndarray) -> float | None:
        if pos.size == 0 or neg.size == 0:
            return None
        return auc_score(np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)], np.r_[pos, neg])

    return {
        "infection_auc_vs_normal": auc(neg_normal),
        "infection_auc_within_patients": auc(neg_within),
        "n_infected_slices": int(pos.size),
        "n_normal_patient_slices": int(neg_normal.size),
        "n_unlabelled_slices": int(neg_within.size),
        "n_labelled_patients": n_labelled_patients,
        "n_normal_patients": n_normal_patients,
        "n_patients_without_slice_labels": n_skipped,
        "mean_score_infected": float(pos.mean()) if pos.size else None,
        "mean_score_normal_patients": float(neg_normal.mean()) if neg_normal.size else None,
        "mean_score_unlabelled": float(neg_within.mean()) if neg_within.size else None,
    }
