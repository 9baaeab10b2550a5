"""Per-label probability calibration fitted on validation predictions, and how to measure it.

A network trained with weighted BCE on one prevalence says little with its raw sigmoid: a
0.9 is not "9 in 10 such images are positive". A calibrator maps each label's probability to
one that is, fitted on the validation split (never on test):

- `temperature`: p' = sigmoid(logit(p) / T), one T per label (Guo et al. 2017); keeps the
  ranking, so AUROC is unchanged.
- `platt`: p' = sigmoid(a * logit(p) + b): temperature plus a shift, which also undoes the
  prior shift that a positive-weighted loss builds in; keeps the ranking.
- `isotonic`: a monotone step function (needs enough validation data: ties can cost a little
  AUROC on small splits).
- `auto` (default): isotonic where a label has at least ISOTONIC_MIN_PER_CLASS validation
  positives and negatives, else platt.

A label with fewer than FIT_MIN_PER_CLASS validation positives or negatives is left as it is
(method `none`): two parameters fitted to a handful of images would do more harm than good.

The fitted state is plain lists and floats, so it travels inside a checkpoint that is loaded
with `weights_only=True`.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from sklearn.isotonic import IsotonicRegression

from cxr_pipeline.training.evaluation.metrics import known

METHODS = ("auto", "temperature", "platt", "isotonic", "none")
ISOTONIC_MIN_PER_CLASS = 500
FIT_MIN_PER_CLASS = 10
EPSILON = 1e-6


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPSILON, 1 - EPSILON)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * z))  # no overflow warnings for large |z|


def _fit_logistic(z: np.ndarray, truth: np.ndarray, with_bias: bool) -> tuple[float, float]:
    """(a, b) minimising the log loss of sigmoid(a z + b); b stays 0 for temperature scaling."""

    def loss(params):
        a, b = params[0], params[1] if with_bias else 0.0
        s = a * z + b
        # log(1 + e^s) - y s, stably; its gradient is (sigmoid(s) - y) * (z, 1)
        value = np.mean(np.logaddexp(0, s) - truth * s)
        residual = sigmoid(s) - truth
        gradient = [np.mean(residual * z)] + ([np.mean(residual)] if with_bias else [])
        return value, np.array(gradient)

    start = np.array([1.0, 0.0] if with_bias else [1.0])
    result = minimize(loss, start, jac=True, method="L-BFGS-B",
                      bounds=[(1e-3, 1e3)] + ([(-50, 50)] if with_bias else []))
    return float(result.x[0]), float(result.x[1]) if with_bias else 0.0


def fit_label(scores: np.ndarray, truth: np.ndarray, method: str) -> dict:
    """The calibrator of one label from its validation scores and 1/0 truth."""
    positives, negatives = int((truth == 1).sum()), int((truth == 0).sum())
    if method == "none" or min(positives, negatives) < FIT_MIN_PER_CLASS:
        return {"method": "none"}
    if method == "auto":
        method = "isotonic" if min(positives, negatives) >= ISOTONIC_MIN_PER_CLASS else "platt"
    if method == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, truth)
        return {"method": "isotonic", "x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}
    a, b = _fit_logistic(logit(scores), truth, with_bias=(method == "platt"))
    return {"method": method, "a": a, "b": b}


def fit(labels: np.ndarray, scores: np.ndarray, method: str = "auto") -> list[dict]:
    """One calibrator per label column, each fitted on the rows whose truth is known."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration {method!r}; choose one of {METHODS}")
    states = []
    for index in range(labels.shape[1]):
        rows = known(labels[:, index])
        states.append(fit_label(scores[rows, index], labels[rows, index], method))
    return states


def apply(states: list[dict] | None, scores: np.ndarray) -> np.ndarray:
    """Calibrated copy of (N, L) probabilities; `states` None (an old checkpoint) leaves them as they are."""
    if not states:
        return np.array(scores, dtype=np.float64)
    out = np.array(scores, dtype=np.float64)
    for index, state in enumerate(states):
        column = out[:, index]
        if state["method"] == "isotonic":
            out[:, index] = np.interp(column, state["x"], state["y"])
        elif state["method"] != "none":
            out[:, index] = sigmoid(state["a"] * logit(column) + state["b"])
    return out


def describe(states: list[dict], label_names) -> str:
    parts = []
    for name, state in zip(label_names, states):
        if state["method"] in ("temperature", "platt"):
            parts.append(f"{name}: {state['method']} a={state['a']:.3f} b={state['b']:.3f}")
        else:
            parts.append(f"{name}: {state['method']}")
    return "; ".join(parts)


def brier(truth: np.ndarray, probabilities: np.ndarray) -> float:
    return float(np.mean((probabilities - truth) ** 2))


def expected_calibration_error(truth: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """ECE: the mean |observed rate - mean probability| over equal-width bins, weighted by count."""
    which = np.minimum((probabilities * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(which):
        members = which == b
        total += members.sum() * abs(truth[members].mean() - probabilities[members].mean())
    return float(total / max(len(truth), 1))


RELIABILITY_BINS = 10
RELIABILITY_MIN_PER_BIN = 20


def reliability(truth: np.ndarray, probabilities: np.ndarray, bins: int = RELIABILITY_BINS,
                min_per_bin: int = RELIABILITY_MIN_PER_BIN) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean probability, observed positive rate, count) per bin of the reliability diagram. Bins hold equal
    counts of images (quantiles of the probabilities), `bins` of them, fewer when there are fewer than
    `min_per_bin` images per bin (one bin below that): an equal-width bin holding two images would draw
    a spike that says nothing. Equal probabilities stay in one bin, so a bin can hold more than its share.
    (The ECE stays on 15 equal-width bins: expected_calibration_error.)"""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    count = max(1, min(bins, len(probabilities) // min_per_bin))
    edges = np.quantile(probabilities, np.linspace(0, 1, count + 1)[1:-1]) if len(probabilities) else []
    which = np.searchsorted(np.unique(edges), probabilities, side="right")
    present = np.unique(which)
    return (np.array([probabilities[which == b].mean() for b in present]),
            np.array([truth[which == b].mean() for b in present]),
            np.array([(which == b).sum() for b in present]))


def calibration_metrics(labels: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, label_names) -> list[dict]:
    """Per label: Brier score and ECE before and after calibration, over rows whose truth is known."""
    rows = []
    for index, name in enumerate(label_names):
        known_rows = known(labels[:, index])
        truth = labels[known_rows, index]
        if not known_rows.any():
            rows.append({"label": name})
            continue
        rows.append({"label": name,
                     "brier_raw": brier(truth, raw[known_rows, index]),
                     "brier": brier(truth, calibrated[known_rows, index]),
                     "ece_raw": expected_calibration_error(truth, raw[known_rows, index]),
                     "ece": expected_calibration_error(truth, calibrated[known_rows, index])})
    return rows
