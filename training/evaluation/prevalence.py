"""Prevalence where a model runs: estimated from its unlabelled predictions, and probabilities adjusted to it.

Calibrated probabilities are calibrated to a prior, the prevalence of the split the calibration was fitted on
(val: train.py stores it in the best checkpoint as `val_prevalence`). A site with another prevalence gets
probabilities that are too high or too low all together, though the ranking holds: the pneumonia recipe's
val-fitted calibration lowered val's ECE and raised the test split's (README, "Calibration does not transfer").

- `estimate`: the prevalence of an unlabelled batch, per label, by the EM procedure of Saerens, Latinne and
  Decaestecker (2002), "Adjusting the outputs of a classifier to new a priori probabilities: a simple
  procedure", Neural Computation 14(1): 21-41. Start from the prior; re-weight each posterior by the ratio of
  the current estimate to the prior (Bayes' rule: p' = sigmoid(logit(p) + logit(pi) - logit(prior))); the
  new estimate is the mean re-weighted posterior; repeat until it moves less than TOLERANCE (at most
  MAX_ITERATIONS). Each label is a binary problem of its own. It assumes prior shift only: the images of each
  class look as they did on val, only their proportions changed; a site whose positives or negatives look
  different (other scanners, other patients) breaks that, and the estimate with it. The 95 % interval is the
  percentile bootstrap of the EM estimate over images resampled with replacement (all resamples iterated at
  once, as one array).
- `adjust`: the prior-shift correction of the same paper for a known (or estimated) prevalence,
  logit(p') = logit(p) + logit(target) - logit(prior), per label. It is monotone, so rankings (AUROC) and the
  decisions at a threshold moved with it are unchanged.

Probabilities are clipped to (EPSILON, 1 - EPSILON) before logits are taken; NaN (an image not scored) is
ignored by `estimate` and stays NaN through `adjust`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cxr_pipeline.training.evaluation.metrics import known

EPSILON = 1e-6
TOLERANCE = 1e-6
MAX_ITERATIONS = 1000
BOOTSTRAP_ELEMENTS = 4_000_000  # resamples x images iterated at once (32 MB a float64 array)
# The fewest scored images a prevalence is estimated from to move probabilities to it: with 100, a binary label's
# prevalence is known to about +-0.1 (binomial, 95 %); with one, EM drives the estimate to 0 or 1 and the moved
# probability with it.
MIN_IMAGES = 100


@dataclass(frozen=True)
class PrevalenceEstimate:
    label: str
    estimate: float  # estimated prevalence in the scored batch (NaN: no scored image, or no prior)
    low: float  # `level` interval, percentile bootstrap over images
    high: float
    iterations: int  # EM iterations of the point estimate


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPSILON, 1 - EPSILON)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * z))


def _valid(value) -> bool:
    return value is not None and np.isfinite(value) and 0 < value < 1


def em(logits: np.ndarray, prior: float) -> tuple[np.ndarray, int]:
    """EM prevalence of each row of (R, N) posterior logits calibrated to `prior`: ((R,) estimates, iterations
    the slowest row took)."""
    base = float(_logit(prior))
    current = np.full(logits.shape[0], prior, dtype=np.float64)
    for iteration in range(1, MAX_ITERATIONS + 1):
        shift = _logit(current) - base
        updated = _sigmoid(logits + shift[:, None]).mean(axis=1)
        done = np.abs(updated - current) < TOLERANCE
        current = updated
        if done.all():
            return current, iteration
    return current, MAX_ITERATIONS


def estimate(probabilities: np.ndarray, prior: Sequence[float], label_names, n_resamples: int = 200,
             seed: int = 0, level: float = 0.95) -> list[PrevalenceEstimate]:
    """Per label, the prevalence of the batch whose (N, L) calibrated `probabilities` are given (NaN rows, the
    images not scored, left out), with its `level` bootstrap interval over `n_resamples` resamples of images;
    `prior` is the prevalence the probabilities are calibrated to (the checkpoint's val_prevalence). A label
    with no scored image, or whose prior is not in (0, 1), gets NaN."""
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(len(probabilities), -1)
    names = list(label_names)
    if probabilities.shape[1] != len(names) or len(prior) != len(names):
        raise ValueError(f"{probabilities.shape[1]} probability columns, {len(prior)} priors and {len(names)} "
                         "labels: one of each per label")
    rng = np.random.default_rng(seed)
    tails = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    found = []
    for index, name in enumerate(names):
        column = probabilities[:, index]
        logits = _logit(column[np.isfinite(column)])
        if not len(logits) or not _valid(prior[index]):
            found.append(PrevalenceEstimate(name, np.nan, np.nan, np.nan, 0))
            continue
        (point,), iterations = em(logits[None], prior[index])
        resampled = []
        per_chunk = max(1, BOOTSTRAP_ELEMENTS // len(logits))
        for start in range(0, n_resamples, per_chunk):
            rows = rng.integers(0, len(logits), size=(min(per_chunk, n_resamples - start), len(logits)))
            resampled.append(em(logits[rows], prior[index])[0])
        low, high = np.percentile(np.concatenate(resampled), tails) if n_resamples else (np.nan, np.nan)
        found.append(PrevalenceEstimate(name, float(point), float(low), float(high), iterations))
    return found


def adjust(probabilities: np.ndarray, prior: Sequence[float | None], target: Sequence[float | None]) -> np.ndarray:
    """(N, L) probabilities calibrated to `prior` -> calibrated to `target`, per label:
    logit(p') = logit(p) + logit(target) - logit(prior). A label whose target is None or NaN (not asked for,
    or not estimable) is returned unchanged, as is one whose target equals its prior; NaN stays NaN. A prior
    that is None or NaN (unknown) is refused only where its label has a target. Targets are clipped to
    (EPSILON, 1 - EPSILON)."""
    adjusted = np.array(probabilities, dtype=np.float64)
    if adjusted.ndim != 2 or len(prior) != adjusted.shape[1] or len(target) != adjusted.shape[1]:
        raise ValueError(f"probabilities of shape {adjusted.shape}, {len(prior)} priors, {len(target)} targets: "
                         "(N, L) probabilities and one prior and target per label")
    for index, (before, after) in enumerate(zip(prior, target)):
        if after is None or not np.isfinite(after) or after == before:
            continue
        if not _valid(before):
            raise ValueError(f"label {index}: prior {before!r} is not a prevalence in (0, 1), so its probabilities "
                             "cannot be moved to another")
        if not 0 <= after <= 1:
            raise ValueError(f"label {index}: target prevalence {after!r} is not in [0, 1]")
        column = adjusted[:, index]
        adjusted[:, index] = np.where(np.isnan(column), np.nan,
                                      _sigmoid(_logit(column) + _logit(after) - _logit(before)))
    return adjusted


def observed(labels: np.ndarray) -> list[float | None]:
    """Per label column of (N, L) truth (1, 0, NaN or other values where unknown): the fraction positive among
    the known rows; None where none is known. What train.py stores as the checkpoint's `val_prevalence`."""
    labels = np.asarray(labels, dtype=np.float64)
    positives, counted = (labels == 1).sum(axis=0), known(labels).sum(axis=0)
    return [float(p / k) if k else None for p, k in zip(positives, counted)]


def describe(estimates: list[PrevalenceEstimate], prior: Sequence[float], level: float = 0.95) -> str:
    """One line per label: the estimate with its interval, beside the prior (val's prevalence)."""
    return "\n".join(
        f"{e.label}: prevalence {e.estimate:.3f} [{level:.0%} CI {e.low:.3f}, {e.high:.3f}] estimated "
        f"({e.iterations} EM iterations); val's {p:.3f}" if np.isfinite(e.estimate) else
        f"{e.label}: prevalence not estimated (no scored image, or no val prevalence in the checkpoint)"
        for e, p in zip(estimates, [np.nan if p is None else p for p in prior]))
