"""Per-label AUROC against a pairwise reference, and undefined labels."""
import numpy as np

from training.metrics import mean_auroc, per_label_auroc


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
