"""Per-label AUROC against a pairwise reference, and undefined labels."""
import numpy as np

from cxr_pipeline.training.evaluation.metrics import mean_auroc, per_label_auroc


def pairwise_auroc(truth, scores):
    pos, neg = scores[truth == 1], scores[truth == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_auroc_matches_pairwise_definition_and_mean_skips_undefined_labels():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 3)) < 0.3).astype(float)
    labels[:, 2] = 0  # no positives: AUROC undefined
    scores = labels * 0.5 + rng.random((200, 3))
    rows = per_label_auroc(labels, scores, ["a", "b", "c"])
    for index in (0, 1):
        assert abs(rows[index]["auroc"] - pairwise_auroc(labels[:, index], scores[:, index])) < 1e-12
        assert rows[index]["n_pos"] == labels[:, index].sum()
    assert rows[2]["auroc"] is None and rows[2]["n_neg"] == 200
    assert mean_auroc(rows) == (rows[0]["auroc"] + rows[1]["auroc"]) / 2
    prevalence = labels[:, :2].mean(axis=0)  # label c has no AUROC and no weight
    weighted = (rows[0]["auroc"] * prevalence[0] + rows[1]["auroc"] * prevalence[1]) / prevalence.sum()
    assert abs(rows[-1]["auroc_weighted"] - weighted) < 1e-12 and "auroc_weighted" not in rows[0]


def test_vectorised_bootstrap_equals_a_slow_per_resample_reference():
    from sklearn.metrics import roc_auc_score

    from cxr_pipeline.training.evaluation.metrics import patient_resample_weights, weighted_auroc

    rng = np.random.default_rng(1)
    truth = (rng.random(300) < 0.3).astype(float)
    scores = np.round(truth * 0.4 + rng.random(300), 2)  # rounded: many ties
    weights = patient_resample_weights(rng.integers(0, 120, 300), 40, seed=5)
    fast = weighted_auroc(truth, scores, weights)
    slow = [roc_auc_score(np.repeat(truth, w), np.repeat(scores, w)) for w in weights]
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)


def test_patient_resampling_keeps_a_patients_images_together():
    from cxr_pipeline.training.evaluation.metrics import patient_resample_weights

    patients = np.array(["a", "a", "a", "b", "c", "c"])
    weights = patient_resample_weights(patients, 200, seed=0)
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 4] == weights[:, 5]).all()
    assert (weights[:, [0, 3, 4]].sum(axis=1) == 3).all()  # three patients drawn per resample


def test_bootstrap_ci_brackets_the_estimate_and_narrows_with_more_patients():
    from cxr_pipeline.training.evaluation.metrics import auroc_report

    rng = np.random.default_rng(2)

    def report(n):
        labels = (rng.random((n, 2)) < 0.3).astype(float)
        scores = labels * 0.5 + rng.random((n, 2))
        return auroc_report(labels, scores, np.arange(n) // 2, ["a", "b"], n_resamples=500, seed=0)

    small, large = report(200), report(4000)
    for row in small + large:
        assert row["auroc_ci_low"] < row["auroc"] < row["auroc_ci_high"]
    width = [r[-1]["auroc_ci_high"] - r[-1]["auroc_ci_low"] for r in (small, large)]
    assert width[1] < width[0] / 2
