"""From stored labels to model outputs, losses, probabilities and the truth AUROC is scored on.

Plain labels get one logit each (sigmoid). Labels written under U-MultiClass
(etl/uncertainty.py) hold a class index 0 negative / 1 uncertain / 2 positive and get three
logits (softmax); their probability is that of "positive" (CheXpert paper). Entries that an
uncertainty policy masked (`label_mask` 0, U-Ignore) count in no loss and in no AUROC, and
neither do U-MultiClass entries whose class is "uncertain": their truth is unknown.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxr_pipeline.schema import DatasetSpec

MULTICLASS_WIDTH = 3
POSITIVE_CLASS = 2
LOSSES = ("bce", "pos-weighted", "batch-weighted")


class LabelLayout:
    """Which labels are binary and which three-way, and where their logits sit: the binary
    labels' logits first (in label order), then three per U-MultiClass label."""

    def __init__(self, spec: DatasetSpec):
        multiclass = set(spec.multiclass_labels)
        self.num_labels = spec.num_labels
        self.binary = [i for i, name in enumerate(spec.label_names) if name not in multiclass]
        self.multiclass = [i for i, name in enumerate(spec.label_names) if name in multiclass]
        self.num_outputs = len(self.binary) + MULTICLASS_WIDTH * len(self.multiclass)

    def positive_logit(self, label_index: int) -> int:
        """The output whose growth means label `label_index` is positive (what Grad-CAM explains)."""
        if label_index in self.binary:
            return self.binary.index(label_index)
        return len(self.binary) + MULTICLASS_WIDTH * self.multiclass.index(label_index) + POSITIVE_CLASS

    def split_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, num_outputs) -> binary logits (N, B) and three-way logits (N, M, 3)."""
        binary = logits[:, :len(self.binary)]
        return binary, logits[:, len(self.binary):].reshape(len(logits), len(self.multiclass), MULTICLASS_WIDTH)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, num_outputs) logits -> (N, num_labels) probability of each label being positive."""
        binary, multiclass = self.split_logits(logits.float())
        out = torch.empty(len(logits), self.num_labels, dtype=torch.float32, device=logits.device)
        out[:, self.binary] = torch.sigmoid(binary)
        out[:, self.multiclass] = torch.softmax(multiclass, dim=-1)[..., POSITIVE_CLASS]
        return out

    def truth(self, labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Stored labels and mask -> 0/1 truth per label, NaN where it is unknown (masked, or a
        U-MultiClass entry of class 'uncertain'). Soft labels (U-SelfTrained) stay as they are."""
        truth = np.asarray(labels, dtype=np.float64).copy()
        if self.multiclass:
            classes = truth[:, self.multiclass]
            truth[:, self.multiclass] = np.where(classes == 1, np.nan, (classes == POSITIVE_CLASS).astype(float))
        truth[np.asarray(mask) == 0] = np.nan
        return truth


class LabelLoss(nn.Module):
    """Mean loss over the label entries that count (mask 1): binary cross-entropy for binary
    labels, cross-entropy over three classes for U-MultiClass labels.

    `kind` weighs binary positives: `bce` not at all; `pos-weighted` by `pos_weight` per label
    (negatives/positives of the train split); `batch-weighted` by the per-batch factors of
    Wang et al. (ChestX-ray8), beta_P = (|P|+|N|)/|P| on positives and beta_N = (|P|+|N|)/|N|
    on negatives, |P| and |N| counted over the batch's binary label entries."""

    def __init__(self, layout: LabelLayout, kind: str = "pos-weighted", pos_weight: torch.Tensor | None = None):
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
        if kind == "pos-weighted" and pos_weight is None:
            raise ValueError("the pos-weighted loss needs pos_weight")
        self.layout, self.kind = layout, kind
        self.register_buffer("pos_weight", pos_weight if kind == "pos-weighted" else None)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        binary_logits, multiclass_logits = self.layout.split_logits(logits.float())
        binary_labels, binary_mask = labels[:, self.layout.binary], mask[:, self.layout.binary]
        weight = None
        if self.kind == "batch-weighted":
            positives = (binary_labels * binary_mask).sum()
            negatives = ((1 - binary_labels) * binary_mask).sum()
            total = positives + negatives
            weight = torch.where(binary_labels > 0.5, total / positives.clamp(min=1), total / negatives.clamp(min=1))
        binary = F.binary_cross_entropy_with_logits(binary_logits, binary_labels, weight=weight,
                                                    pos_weight=self.pos_weight, reduction="none")
        total_loss = (binary * binary_mask).sum()
        counted = binary_mask.sum()
        if self.layout.multiclass:
            classes = labels[:, self.layout.multiclass].long()
            three_way = F.cross_entropy(multiclass_logits.transpose(1, 2), classes, reduction="none")
            multiclass_mask = mask[:, self.layout.multiclass]
            total_loss = total_loss + (three_way * multiclass_mask).sum()
            counted = counted + multiclass_mask.sum()
        return total_loss / counted.clamp(min=1)


def positive_weights(labels: np.ndarray, mask: np.ndarray, layout: LabelLayout) -> torch.Tensor:
    """Negatives / positives per binary label over the entries that count (1 for a label
    without positives), the `pos_weight` of :class:`LabelLoss`."""
    binary, counted = np.asarray(labels)[:, layout.binary], np.asarray(mask)[:, layout.binary]
    positives = (binary * counted).sum(axis=0)
    negatives = ((1 - binary) * counted).sum(axis=0)
    return torch.tensor(np.where(positives > 0, negatives / np.maximum(positives, 1), 1.0), dtype=torch.float32)
