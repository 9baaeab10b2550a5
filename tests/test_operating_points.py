"""Operating-point policies against brute force, their CIs, and calibration fitted on val."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxr_pipeline.training.evaluation import calibration
from cxr_pipeline.training.evaluation.operating_points import (Policy, choose_threshold, metrics_at, operating_table,
                                                             parse_policies)


def scores_and_truth(n=600, seed=0, prevalence=0.3, separation=1.5):
    rng = np.random.default_rng(seed)
    truth = (rng.random(n) < prevalence).astype(float)
    logits = rng.normal(size=n) + separation * truth
    return truth, 1 / (1 + np.exp(-logits))


def brute_force(truth, scores, objective, allowed=lambda sens, spec: True):
    """The best value of objective(tp, fp, fn, tn) over every 'score >= s' cut, by trying each."""
    best = None
    for cut in np.unique(scores):
        decided = scores >= cut
        tp, fp = (decided & (truth == 1)).sum(), (decided & (truth == 0)).sum()
        fn, tn = (~decided & (truth == 1)).sum(), (~decided & (truth == 0)).sum()
        if allowed(tp / (tp + fn), tn / (tn + fp)):
            value = objective(tp, fp, fn, tn)
            best = value if best is None else max(best, value)
    return best


def counts(truth, scores, threshold):
    decided = scores >= threshold
    return ((decided & (truth == 1)).sum(), (decided & (truth == 0)).sum(),
            (~decided & (truth == 1)).sum(), (~decided & (truth == 0)).sum())


@pytest.mark.parametrize("policy, objective, allowed", [
    ("youden", lambda tp, fp, fn, tn: tp / (tp + fn) + tn / (tn + fp), None),
    ("f1", lambda tp, fp, fn, tn: 2 * tp / (2 * tp + fp + fn), None),
    ("sens>=0.9", lambda tp, fp, fn, tn: tn / (tn + fp), lambda sens, spec: sens >= 0.9),
    ("spec>=0.9", lambda tp, fp, fn, tn: tp / (tp + fn), lambda sens, spec: spec >= 0.9),
])
def test_rank_policies_reach_the_brute_force_optimum(policy, objective, allowed):
    truth, scores = scores_and_truth()
    threshold = choose_threshold(truth, scores, Policy.parse(policy))
    assert objective(*counts(truth, scores, threshold)) == pytest.approx(
        brute_force(truth, scores, objective, allowed or (lambda sens, spec: True)))


def test_threshold_sits_in_the_middle_of_the_gap_between_scores():
    truth = np.array([0, 0, 1, 1.0])
    scores = np.array([0.1, 0.2, 0.6, 0.9])
    assert choose_threshold(truth, scores, Policy.parse("youden")) == pytest.approx(0.4)


def test_a_specificity_no_cut_reaches_calls_nothing_positive():
    truth = np.array([0, 0, 1, 0, 1.0])
    scores = np.array([0.9, 0.9, 0.9, 0.2, 0.1])  # the top score is shared by two negatives
    threshold = choose_threshold(truth, scores, Policy.parse("spec>=0.9"))
    assert not (scores >= threshold).any()


def test_prevalence_policy_is_bayes_rule_on_the_odds():
    truth = np.array([1.0] * 75 + [0.0] * 25)  # val prevalence 0.75
    scores = np.linspace(0, 1, 100)
    assert choose_threshold(truth, scores, Policy.parse("prevalence=0.5")) == pytest.approx(0.75)
    assert choose_threshold(truth, scores, Policy.parse("prevalence=0.75")) == pytest.approx(0.5)


@pytest.mark.parametrize("text", ["youdens", "sens>=2", "spec>0.9", "prevalence=1.5", "f1,"])
def test_bad_policies_are_refused_with_the_syntax(text):
    with pytest.raises(ValueError, match="youden, f1, sens>=X"):
        Policy.parse(text)


def test_policies_parse_in_order_without_repeats():
    assert [p.text for p in parse_policies("f1, youden,f1,sens>=0.95")] == ["f1", "youden", "sens>=0.95"]


def test_metrics_at_a_threshold_with_patient_bootstrap_intervals():
    truth, scores = scores_and_truth(n=400)
    patients = np.arange(400) // 2
    row = metrics_at(truth, scores, 0.5, patients, n_resamples=300, seed=1)
    tp, fp, fn, tn = counts(truth, scores, 0.5)
    assert (row["tp"], row["fp"], row["fn"], row["tn"]) == (tp, fp, fn, tn)
    assert row["recall"] == pytest.approx(tp / (tp + fn)) and row["specificity"] == pytest.approx(tn / (tn + fp))
    for metric in ("accuracy", "precision", "recall", "specificity", "f1"):
        assert row[f"{metric}_ci_low"] < row[metric] < row[f"{metric}_ci_high"], metric
    # the same patients, resampled the same way: the same intervals
    assert metrics_at(truth, scores, 0.5, patients, n_resamples=300, seed=1) == row


def test_operating_table_applies_given_thresholds_to_each_label():
    truth, scores = scores_and_truth()
    labels = np.stack([truth, 1 - truth], axis=1)
    both = np.stack([scores, 1 - scores], axis=1)
    labels[:10, 1] = np.nan  # unknown for the second label only
    rows = operating_table(labels, both, np.arange(len(truth)), ["a", "b"], {"youden": [0.5, None], "f1": [0.4, 0.6]},
                           n_resamples=50)
    assert [(r["policy"], r["label"]) for r in rows] == [("youden", "a"), ("f1", "a"), ("f1", "b")]
    assert rows[2]["tp"] + rows[2]["fp"] + rows[2]["fn"] + rows[2]["tn"] == len(truth) - 10


def test_platt_calibration_fixes_overconfidence_and_keeps_the_ranking():
    rng = np.random.default_rng(3)
    truth = (rng.random(20000) < 0.7).astype(float)
    x = rng.normal(size=20000) + 2.0 * truth - 1.0  # classes N(-1, 1) and N(1, 1): true log-odds 2x + log(7/3)
    overconfident = 1 / (1 + np.exp(-(3 * x + 1)))  # too sharp and shifted
    labels = truth[:, None]
    states = calibration.fit(labels, overconfident[:, None], "platt")
    calibrated = calibration.apply(states, overconfident[:, None])[:, 0]
    assert states[0]["a"] == pytest.approx(2 / 3, rel=0.1)
    assert states[0]["b"] == pytest.approx(np.log(7 / 3) - 2 / 3, abs=0.1)
    assert calibration.expected_calibration_error(truth, calibrated) < \
        calibration.expected_calibration_error(truth, overconfident) / 3
    assert roc_auc_score(truth, calibrated) == pytest.approx(roc_auc_score(truth, overconfident))


def test_temperature_has_no_shift_and_isotonic_is_monotone():
    truth, scores = scores_and_truth(n=3000, prevalence=0.5)
    labels = truth[:, None]
    temperature = calibration.fit(labels, scores[:, None], "temperature")[0]
    assert temperature["method"] == "temperature" and temperature["b"] == 0
    isotonic = calibration.fit(labels, scores[:, None], "isotonic")
    mapped = calibration.apply(isotonic, np.sort(scores)[:, None])[:, 0]
    assert (np.diff(mapped) >= 0).all() and mapped.min() >= 0 and mapped.max() <= 1
    assert calibration.brier(truth, calibration.apply(isotonic, scores[:, None])[:, 0]) <= \
        calibration.brier(truth, scores)


def test_auto_calibration_needs_enough_of_each_class_for_isotonic():
    truth, scores = scores_and_truth(n=600)
    assert calibration.fit(truth[:, None], scores[:, None], "auto")[0]["method"] == "platt"
    big_truth, big_scores = scores_and_truth(n=4000, prevalence=0.5)
    assert calibration.fit(big_truth[:, None], big_scores[:, None], "auto")[0]["method"] == "isotonic"
    assert calibration.fit(np.ones((5, 1)), np.random.rand(5, 1), "auto")[0] == {"method": "none"}
    few = np.r_[np.ones(9), np.zeros(100)][:, None]  # 9 positives: too few to fit two parameters
    assert calibration.fit(few, np.random.rand(109, 1), "platt")[0] == {"method": "none"}


def test_calibration_state_travels_in_a_weights_only_checkpoint(tmp_path):
    truth, scores = scores_and_truth(n=3000, prevalence=0.5)
    states = calibration.fit(np.stack([truth, truth], 1), np.stack([scores, scores], 1), "isotonic")
    states[1] = calibration.fit(truth[:, None], scores[:, None], "platt")[0]
    torch.save({"calibration": states}, tmp_path / "c.pth")
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)["calibration"]
    both = np.stack([scores, scores], 1)
    assert np.array_equal(calibration.apply(loaded, both), calibration.apply(states, both))
