"""Per-label AUROC on exact (gathered, unpadded) predictions, with patient-level bootstrap CIs.

Truth is 1 or 0 per image and label; any other value (NaN for a masked or uncertain label, a
soft label) is unknown, and that image does not count for that label.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import roc_auc_score

MEAN_LABEL = "mean"


def known(truth: np.ndarray) -> np.ndarray:
    """Rows of one label's truth column that are 1 or 0."""
    return (truth == 0) | (truth == 1)


def per_label_auroc(labels: np.ndarray, scores: np.ndarray, label_names) -> list[dict]:
    """One dict per label (auroc None where a label lacks positives or negatives), then the
    unweighted mean over labels that have an AUROC, as label 'mean', which also carries
    `auroc_weighted`: the mean weighted by each label's prevalence (papers report both)."""
    rows = []
    for index, name in enumerate(label_names):
        truth = labels[:, index]
        n_pos = int((truth == 1).sum())
        n_neg = int((truth == 0).sum())
        rows_known = known(truth)
        auroc = float(roc_auc_score(truth[rows_known], scores[rows_known, index])) if n_pos and n_neg else None
        rows.append({"label": name, "auroc": auroc, "n_pos": n_pos, "n_neg": n_neg})
    aurocs = [row["auroc"] for row in rows if row["auroc"] is not None]
    prevalence = [row["n_pos"] / (row["n_pos"] + row["n_neg"]) for row in rows if row["auroc"] is not None]
    rows.append({
        "label": MEAN_LABEL,
        "auroc": float(np.mean(aurocs)) if aurocs else None,
        "auroc_weighted": float(np.average(aurocs, weights=prevalence)) if aurocs else None,
        "n_pos": sum(row["n_pos"] for row in rows),
        "n_neg": sum(row["n_neg"] for row in rows),
    })
    return rows


def mean_auroc(rows: list[dict]) -> float | None:
    return next(row["auroc"] for row in rows if row["label"] == MEAN_LABEL)


def patient_resample_weights(patient_ids, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, N) counts: how often each image is drawn when whole patients are drawn
    with replacement (images of one patient are not independent, so they are resampled together)."""
    _, patient_index = np.unique(np.asarray(patient_ids), return_inverse=True)
    patients = patient_index.max() + 1 if len(patient_index) else 0
    draws = np.random.default_rng(seed).multinomial(patients, np.full(patients, 1.0 / patients), size=n_resamples)
    return draws[:, patient_index]


def weighted_auroc(truth: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC under each row of `weights` (R, N) at once; NaN where a resample lacks a class.

    Sort once; per distinct score, sum the weights of positives and negatives; a positive
    beats every negative of a lower score and ties count one half (the Mann-Whitney form)."""
    order = np.argsort(scores, kind="mergesort")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    positive = truth[order] == 1
    w = weights[:, order].astype(np.float64)
    pos = np.add.reduceat(np.where(positive, w, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(positive, 0.0, w), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


def bootstrap_auroc_ci(labels: np.ndarray, scores: np.ndarray, patient_ids, n_resamples: int = 1000,
                       seed: int = 0, level: float = 0.95, chunk: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CIs, by patient-level bootstrap, of each label's AUROC and (last column)
    of their unweighted mean. Returns (low, high), each of length num_labels + 1; NaN where
    a label has no positives or no negatives."""
    resampled = np.full((n_resamples, labels.shape[1]), np.nan)
    weights = patient_resample_weights(patient_ids, n_resamples, seed)
    for index in range(labels.shape[1]):
        rows_known = known(labels[:, index])
        truth = labels[rows_known, index]
        if not (truth == 1).any() or not (truth == 0).any():
            continue
        for start in range(0, n_resamples, chunk):  # bounded memory: chunk x N floats at a time
            resampled[start:start + chunk, index] = weighted_auroc(
                truth, scores[rows_known, index], weights[start:start + chunk, rows_known])
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: labels without an AUROC
        mean = np.nanmean(resampled, axis=1, keepdims=True)
        table = np.hstack([resampled, mean])
        tail = 100 * (1 - level) / 2
        return np.nanpercentile(table, tail, axis=0), np.nanpercentile(table, 100 - tail, axis=0)


def auroc_report(labels: np.ndarray, scores: np.ndarray, patient_ids, label_names, n_resamples: int = 1000,
                 seed: int = 0) -> list[dict]:
    """per_label_auroc rows with `auroc_ci_low` / `auroc_ci_high` (95%, patient-level bootstrap)."""
    rows = per_label_auroc(labels, scores, label_names)
    low, high = bootstrap_auroc_ci(labels, scores, patient_ids, n_resamples, seed)
    for row, lo, hi in zip(rows, low, high):
        defined = row["auroc"] is not None
        row["auroc_ci_low"] = float(lo) if defined else None
        row["auroc_ci_high"] = float(hi) if defined else None
    return rows
