"""Metric functions against hand-worked cases and against scikit-learn."""

from __future__ import annotations


import numpy as np
import pytest

from msnet.metrics import (
    _weighted_auc,
    auc_score,
    bootstrap_ci,
    classification_metrics,
    confusion_matrix,
    positive_class_index,
    roc_curve,
    table1,
    table3,
)

CLASSES = ("COVID-19", "CAP", "NORMAL")


def _random_case(n: int, seed: int, signal: float = 0.6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    probs = rng.dirichlet([1.0, 1.0, 1.0], n)
    probs[np.arange(n), y] += signal
    probs /= probs.sum(axis=1, keepdims=True)
    return y, probs.argmax(axis=1), probs


def test_perfect_predictions() -> None:
    y = np.array([0, 1, 2, 0, 1, 2, 2])
    probs = np.eye(3)[y] * 0.8 + 0.2 / 3
    m = classification_metrics(y, y, probs, CLASSES)
    assert m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0 and m["macro_f1"] == 1.0
    assert m["macro_auc"] == 1.0 and m["auc"] == 1.0 and m["f1"] == 1.0
    assert all(v == 1.0 for v in m["sensitivity"].values())
    assert all(v == 1.0 for v in m["specificity"].values())
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 3]]
    assert m["n"] == 7 and m["support"] == {"COVID-19": 2, "CAP": 2, "NORMAL": 3}


def test_known_confusion_matrix() -> None:
    # true:  COVID x4, CAP x3, NORMAL x3
    y_true = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 1, 2, 2, 2, 0]
    # rows true, cols predicted:
    #   COVID  [3, 1, 0]
    #   CAP    [0, 2, 1]
    #   NORMAL [1, 0, 2]
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    m = classification_metrics(y_true, y_pred, None, CLASSES)
    # sensitivity = diag / row sums: 3/4, 2/3, 2/3
    assert m["sensitivity"] == pytest.approx({"COVID-19": 0.75, "CAP": 2 / 3, "NORMAL": 2 / 3})
    # precision = diag / column sums (4, 3, 3): 3/4, 2/3, 2/3
    assert m["precision"] == pytest.approx({"COVID-19": 0.75, "CAP": 2 / 3, "NORMAL": 2 / 3})
    # specificity = TN / negatives: COVID (6 neg, 1 FP) 5/6; CAP (7 neg, 1 FP) 6/7; NORMAL 6/7
    assert m["specificity"] == pytest.approx({"COVID-19": 5 / 6, "CAP": 6 / 7, "NORMAL": 6 / 7})
    # F1 = 2TP / (row + col): 6/8, 4/6, 4/6
    assert m["f1_per_class"] == pytest.approx({"COVID-19": 0.75, "CAP": 2 / 3, "NORMAL": 2 / 3})
    assert m["accuracy"] == pytest.approx(0.7)  # 7 of 10 on the diagonal
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 2 / 3 + 2 / 3) / 3)
    assert m["macro_f1"] == pytest.approx((0.75 + 2 / 3 + 2 / 3) / 3)
    assert m["f1"] == m["macro_f1"]
    assert m["macro_auc"] is None and m["auc"] is None  # no probabilities given
    assert m["auc_per_class"] == {"COVID-19": None, "CAP": None, "NORMAL": None}


def test_auc_known_rankings_and_ties() -> None:
    # positives 0.35 and 0.8 against negatives 0.1, 0.4: 3 of 4 pairs ordered correctly
    assert auc_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # pos 0.5 ties neg 0.5 (1/2), beats 0.2 (1); pos 0.9 beats both (2) -> 3.5 / 4
    assert auc_score([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert auc_score([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == pytest.approx(0.5)
    assert auc_score([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert auc_score([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    with pytest.raises(ValueError):
        auc_score([1, 1, 1], [0.1, 0.2, 0.3])


def test_roc_curve_points_and_area() -> None:
    fpr, tpr, thr = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    # thresholds inf, 0.8, 0.4, 0.35, 0.1 -> (fp, tp) = (0,0) (0,1) (1,1) (1,2) (2,2)
    assert thr[0] == np.inf and thr[1:].tolist() == [0.8, 0.4, 0.35, 0.1]
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    y, _, probs = _random_case(200, seed=3)
    for c in range(3):
        fpr, tpr, _ = roc_curve(y == c, probs[:, c])
        area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
        assert area == pytest.approx(auc_score(y == c, probs[:, c]))


def test_roc_curve_with_ties_has_one_point_per_distinct_score() -> None:
    fpr, tpr, thr = roc_curve([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9])
    assert thr[1:].tolist() == [0.9, 0.5, 0.2]
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 1.0, 1.0]


def test_weighted_auc_matches_repeated_samples() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 40).astype(bool)
    s = np.round(rng.random(40), 1)  # many ties
    w = rng.integers(0, 4, 40)
    expected = auc_score(np.repeat(y, w), np.repeat(s, w))
    got = _weighted_auc(y, s, np.stack([np.ones(40), w]))
    assert got[0] == pytest.approx(auc_score(y, s))
    assert got[1] == pytest.approx(expected)


def test_auc_agrees_with_sklearn() -> None:
    import sklearn.metrics as metrics
    y, pred, probs = _random_case(150, seed=5)
    probs = np.round(probs, 2)  # ties
    for c in range(3):
        assert auc_score(y == c, probs[:, c]) == pytest.approx(metrics.roc_auc_score(y == c, probs[:, c]))
    m = classification_metrics(y, pred, probs, CLASSES)
    assert m["macro_f1"] == pytest.approx(metrics.f1_score(y, pred, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy_score(y, pred))


def test_binary_uses_covid_as_positive() -> None:
    classes = ("NORMAL", "COVID-19")
    assert positive_class_index(classes) == 1
    assert positive_class_index(("A", "B")) == 0
    y = [0, 0, 0, 1, 1]
    pred = [0, 0, 1, 1, 0]
    probs = [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.6, 0.4]]
    m = classification_metrics(y, pred, probs, classes)
    assert m["positive_class"] == "COVID-19"
    # COVID: TP 1, FP 1, FN 1 -> F1 = 2/4
    assert m["f1"] == pytest.approx(0.5) == m["f1_per_class"]["COVID-19"]
    # COVID scores 0.6, 0.4 vs negatives 0.1, 0.2, 0.7 -> wins 2 + 2 of 6
    assert m["auc"] == pytest.approx(4 / 6)


def test_absent_class_gives_none() -> None:
    y = [0, 0, 1, 1]
    pred = [0, 1, 1, 1]
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]])
    m = classification_metrics(y, pred, probs, CLASSES)
    assert m["sensitivity"]["NORMAL"] is None and m["auc_per_class"]["NORMAL"] is None
    assert m["f1_per_class"]["NORMAL"] is None
    assert m["specificity"]["NORMAL"] == 1.0
    # balanced accuracy and macro values average the defined classes only
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["macro_auc"] == pytest.approx(1.0)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0], 3)
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0, 1], np.ones((2, 2)), CLASSES)


def test_bootstrap_contains_estimate_and_narrows() -> None:
    widths = []
    for n in (60, 600):
        y, pred, probs = _random_case(n, seed=n, signal=0.4)
        m = classification_metrics(y, pred, probs, CLASSES)
        ci = bootstrap_ci(y, pred, probs, CLASSES, n_boot=1000, seed=0)
        for key, point in [
            ("accuracy", m["accuracy"]),
            ("balanced_accuracy", m["balanced_accuracy"]),
            ("macro_f1", m["macro_f1"]),
            ("macro_auc", m["macro_auc"]),
            *[(f"sensitivity_{c}", m["sensitivity"][c]) for c in CLASSES],
        ]:
            lo, hi = ci[key]
            assert lo <= point <= hi, key
            assert 0.0 <= lo < hi <= 1.0, key
        widths.append(ci["accuracy"][1] - ci["accuracy"][0])
    assert widths[1] < 0.6 * widths[0]


def test_bootstrap_matches_a_plain_loop_and_is_seeded() -> None:
    y, pred, probs = _random_case(50, seed=11)
    n_boot = 200
    ci = bootstrap_ci(y, pred, probs, CLASSES, n_boot=n_boot, seed=7)
    assert ci == bootstrap_ci(y, pred, probs, CLASSES, n_boot=n_boot, seed=7)
    # the same resamples, scored one by one with classification_metrics
    idx = np.random.default_rng(7).integers(0, 50, size=(n_boot, 50))
    ms = [classification_metrics(y[i], pred[i], probs[i], CLASSES) for i in idx]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc"):
        values = [m[key] for m in ms if m[key] is not None]
        assert ci[key] == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])))


def test_table1_counts() -> None:
    text = table1([0, 0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 0, 1, 1, 1, 2, 2, 2, 0], CLASSES)
    lines = text.splitlines()
    assert lines[2] == "| COVID-19 | 75.0% | 3/4 |"
    assert lines[3] == "| CAP | 66.7% | 2/3 |"
    assert "70.0%" in lines[-1] and "7/10" in lines[-1]


def test_table3_per_subset_counts() -> None:
    rows = (
        [{"subset": "test", "label": "COVID-19", "prediction": "COVID-19"}] * 27
        + [{"subset": "test", "label": "COVID-19", "prediction": "CAP"}] * 3
        + [{"subset": "test", "label": "NORMAL", "prediction": "NORMAL"}] * 10
        + [{"subset": "external", "label": "1", "prediction": "1"}] * 4  # indices work too
        + [{"subset": "external", "label": "1", "prediction": "2"}]
    )
    lines = table3(rows, CLASSES).splitlines()
    assert lines[0] == "| Subset | COVID-19 | CAP | NORMAL | Accuracy |"
    # test: COVID 27 of 30, no CAP, NORMAL 10 of 10 -> 37/40
    assert lines[2] == "| test | 27/30 | 0/0 | 10/10 | 92.5% (37/40) |"
    assert lines[3] == "| external | 0/0 | 4/5 | 0/0 | 80.0% (4/5) |"
    assert lines[4] == "| **All** | 27/30 | 4/5 | 10/10 | 91.1% (41/45) |"
    with pytest.raises(ValueError):
        table3([{"subset": "t", "label": "FLU", "prediction": "CAP"}], CLASSES)


def test_calibration_matches_sklearn_brier_and_a_hand_binned_ece() -> None:
    import sklearn.metrics as skm

    from msnet.metrics import calibration

    y, _, probs = _random_case(300, seed=4)
    cal = calibration(y, probs, n_bins=10)
    onehot = np.eye(len(CLASSES))[y]
    # sklearn's Brier is per class (binary); the multi-class Brier is their sum
    brier = sum(skm.brier_score_loss(onehot[:, c], probs[:, c]) for c in range(len(CLASSES)))
    assert cal["brier"] == pytest.approx(brier)
    assert sum(b["n"] for b in cal["bins"]) == len(y)
    conf, hit = probs.max(1), probs.argmax(1) == y
    bins = np.minimum((conf * 10 - 1e-12).astype(int), 9)
    ece = sum(abs(hit[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean() for b in set(bins))
    assert cal["ece"] == pytest.approx(ece)


def test_temperature_scaling_lowers_ece_of_an_overconfident_model() -> None:
    from msnet.metrics import calibration, fit_temperature

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 4000)
    logits = (np.eye(3)[y] * 1.5 + rng.normal(0, 1, (4000, 3))) * 4.0  # right ranking, far too sharp (best T = 4 / 1.5)

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    t = fit_temperature(logits[:2000], y[:2000])
    assert 2.3 < t < 3.0
    before = calibration(y[2000:], softmax(logits[2000:]))["ece"]
    after = calibration(y[2000:], softmax(logits[2000:] / t))["ece"]
    assert after < 0.3 * before and after < 0.04


def test_ece_if_calibrated_is_the_ece_that_chance_gives_a_calibrated_model() -> None:
    """Answers right with exactly their stated probability (drawn here) show an ECE near
    ``ece_if_calibrated`` and above its 95th percentile in about 1 case of 20; an overconfident model's
    ECE lies far above it; the chance ECE shrinks as the cases grow (about as 1 / sqrt(n))."""
    from msnet.metrics import calibration

    rng = np.random.default_rng(7)

    def case(n: int, overconfident: bool = False) -> tuple[np.ndarray, np.ndarray]:
        conf = rng.uniform(0.5, 1.0, n)
        right = rng.random(n) < (0.6 * conf if overconfident else conf)
        y = rng.integers(0, 2, n)
        top = np.where(right, y, 1 - y)
        probs = np.zeros((n, 2))
        probs[np.arange(n), top] = conf
        probs[np.arange(n), 1 - top] = 1 - conf
        return y, probs

    honest = [calibration(*case(118)) for _ in range(60)]
    above = np.mean([c["ece"] > c["ece_if_calibrated_p95"] for c in honest])
    assert above <= 0.15
    ratio = np.mean([c["ece"] for c in honest]) / np.mean([c["ece_if_calibrated"] for c in honest])
    assert 0.8 < ratio < 1.25
    assert all(0.02 < c["ece_if_calibrated"] < c["ece_if_calibrated_p95"] < 0.2 for c in honest)
    bad = calibration(*case(118, overconfident=True))
    assert bad["ece"] > 2 * bad["ece_if_calibrated_p95"]
    assert calibration(*case(118))["ece_if_calibrated"] > 4 * calibration(*case(118 * 40))["ece_if_calibrated"]
    y, probs = case(118)
    assert calibration(y, probs) == calibration(y, probs)  # seeded
    assert calibration(y, probs, draws=1000)["ece_if_calibrated"] == pytest.approx(
        calibration(y, probs)["ece_if_calibrated"], rel=0.1)
