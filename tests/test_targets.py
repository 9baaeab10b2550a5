"""Masked, three-way and weighted losses and the truth AUROC is scored on (no Spark, no ranks)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from cxr_pipeline.schema import DatasetSpec
from cxr_pipeline.training.data.targets import LabelLayout, LabelLoss, positive_weights
from cxr_pipeline.training.evaluation.metrics import bootstrap_auroc_ci, per_label_auroc
from cxr_pipeline.training.evaluation.operating_points import Policy, choose_thresholds

NAMES = ("Atelectasis", "Cardiomegaly", "Edema")


def spec(policies=None, has_mask=False) -> DatasetSpec:
    return DatasetSpec("chexpert", NAMES, 32, label_policies=policies or {}, has_mask=has_mask)


def test_without_mask_or_multiclass_the_loss_is_torch_bce_with_pos_weight():
    layout = LabelLayout(spec())
    logits, labels = torch.randn(8, 3), torch.randint(0, 2, (8, 3)).float()
    weight = torch.tensor([2.0, 0.5, 3.0])
    ours = LabelLoss(layout, "pos-weighted", weight)(logits, labels, torch.ones_like(labels))
    assert torch.allclose(ours, nn.BCEWithLogitsLoss(pos_weight=weight)(logits, labels))
    assert torch.allclose(LabelLoss(layout, "bce")(logits, labels, torch.ones_like(labels)),
                          nn.BCEWithLogitsLoss()(logits, labels))


def test_masked_entries_get_no_gradient_and_do_not_change_the_loss():
    layout = LabelLayout(spec(has_mask=True))
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    logits = torch.randn(2, 3, requires_grad=True)
    loss = LabelLoss(layout, "bce")(logits, labels, mask)
    loss.backward()
    assert (logits.grad[mask == 0] == 0).all() and (logits.grad[mask == 1] != 0).all()
    shifted = logits.detach().clone()
    shifted[mask == 0] += 100.0
    assert torch.allclose(LabelLoss(layout, "bce")(shifted, labels, mask), loss)
    expected = nn.BCEWithLogitsLoss(reduction="none")(logits, labels)[mask == 1].mean()
    assert torch.allclose(loss, expected)


def test_multiclass_label_gets_three_logits_cross_entropy_and_positive_probability():
    layout = LabelLayout(spec({"Cardiomegaly": "U-MultiClass"}))
    assert layout.binary == [0, 2] and layout.multiclass == [1] and layout.num_outputs == 5
    assert [layout.positive_logit(i) for i in range(3)] == [0, 4, 1]
    logits = torch.randn(4, 5)
    labels = torch.tensor([[1.0, 0, 0], [0, 1, 1], [0, 2, 0], [1, 2, 1]])
    loss = LabelLoss(layout, "bce")(logits, labels, torch.ones_like(labels))
    binary = nn.BCEWithLogitsLoss(reduction="sum")(logits[:, :2], labels[:, [0, 2]])
    three_way = nn.CrossEntropyLoss(reduction="sum")(logits[:, 2:], labels[:, 1].long())
    assert torch.allclose(loss, (binary + three_way) / 12)
    probabilities = layout.probabilities(logits)
    assert torch.allclose(probabilities[:, 1], torch.softmax(logits[:, 2:], dim=1)[:, 2])
    assert torch.allclose(probabilities[:, [0, 2]], torch.sigmoid(logits[:, :2]))


def test_batch_weighted_loss_uses_the_chestxray8_factors():
    layout = LabelLayout(spec())
    labels = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]])  # |P| = 2, |N| = 10
    logits = torch.randn(4, 3)
    elementwise = nn.BCEWithLogitsLoss(reduction="none")(logits, labels)
    beta = torch.where(labels == 1, torch.tensor(12 / 2), torch.tensor(12 / 10))
    ours = LabelLoss(layout, "batch-weighted")(logits, labels, torch.ones_like(labels))
    assert torch.allclose(ours, (beta * elementwise).mean())


def test_positive_weights_count_only_entries_that_count():
    layout = LabelLayout(spec({"Edema": "U-MultiClass"}, has_mask=True))
    labels = np.array([[1, 0, 2], [0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=float)
    mask = np.array([[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1]], dtype=float)
    # Atelectasis: 1 positive, 1 negative counted; Cardiomegaly: 1 positive, 3 negatives; Edema is three-way.
    assert positive_weights(labels, mask, layout).tolist() == [1.0, 3.0]


def test_truth_is_unknown_where_masked_or_uncertain_and_metrics_skip_it():
    layout = LabelLayout(spec({"Cardiomegaly": "U-MultiClass"}, has_mask=True))
    labels = np.array([[1, 2, 0], [0, 1, 1], [0, 0, 1], [1, 2, 0], [0, 0, 0], [1, 1, 1]], dtype=float)
    mask = np.array([[1, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=float)
    truth = layout.truth(labels, mask)
    assert np.isnan(truth[2, 0]) and np.isnan(truth[1, 1]) and np.isnan(truth[5, 1]) and np.isnan(truth[3, 2])
    assert truth[0, 1] == 1 and truth[2, 1] == 0
    scores = np.random.default_rng(0).random(labels.shape)
    rows = per_label_auroc(truth, scores, NAMES)
    for index, row in enumerate(rows[:3]):
        known = ~np.isnan(truth[:, index])
        assert row["n_pos"] + row["n_neg"] == known.sum()
        assert row["auroc"] == pytest.approx(roc_auc_score(truth[known, index], scores[known, index]))
    low, high = bootstrap_auroc_ci(truth, scores, [f"p{i}" for i in range(6)], n_resamples=200)
    assert np.isfinite(low[:3]).all() and (low <= high).all()
    assert all(threshold is not None for threshold in choose_thresholds(truth, scores, [Policy('youden')])['youden'])
