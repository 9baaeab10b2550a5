"""Per-label AUROC on exact (gathered, unpadded) predictions."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

MEAN_LABEL = "mean"


def per_label_auroc(labels: np.ndarray, scores: np.ndarray, label_names) -> list[dict]:
    """One dict per label (auroc None where a label lacks positives or negatives), then the
    unweighted mean over labels that have an AUROC, as label 'mean'."""
    rows = []
    for index, name in enumerate(label_names):
        truth = labels[:, index]
        n_pos = int((truth == 1).sum())
        n_neg = int((truth == 0).sum())
        auroc = float(roc_auc_score(truth, scores[:, index])) if n_pos and n_neg else None
        rows.append({"label": name, "auroc": auroc, "n_pos": n_pos, "n_neg": n_neg})
    defined = [row["auroc"] for row in rows if row["auroc"] is not None]
    rows.append({
        "label": MEAN_LABEL,
        "auroc": float(np.mean(defined)) if defined else None,
        "n_pos": sum(row["n_pos"] for row in rows),
        "n_neg": sum(row["n_neg"] for row in rows),
    })
    return rows


def mean_auroc(rows: list[dict]) -> float | None:
    return next(row["auroc"] for row in rows if row["label"] == MEAN_LABEL)
