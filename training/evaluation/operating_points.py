"""Decision thresholds chosen on validation under named policies, and what they give elsewhere.

A policy turns one label's validation truth and (calibrated) probabilities into a threshold;
an image is called positive when its probability is at or above it. Policies:

- `youden`: maximise sensitivity + specificity - 1.
- `f1`: maximise F1 at the validation prevalence.
- `sens>=X`: the most specific threshold whose validation sensitivity is at least X.
- `spec>=X`: the most sensitive threshold whose validation specificity is at least X.
- `prevalence=P`: the fewest-errors decision where the prevalence is P instead of the
  validation prevalence: with calibrated probabilities p, call positive when the prior-shifted
  probability is >= 0.5 (Bayes' rule on the odds), i.e. p >= 1 / (1 + odds(P) / odds(val)).
  `prevalence=0.5` weighs both kinds of error alike whatever the training prevalence was.

Rank-based policies (youden, f1, sens, spec) reach their optimum on a whole gap between two
adjacent validation scores; the threshold is put in the middle of that gap, not on the edge
of one validation image, so it does not hinge on that one image.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np

from cxr_pipeline.training.evaluation.metrics import known, patient_resample_weights

DEFAULT_POLICIES = ("sens>=0.95", "youden", "f1", "spec>=0.95", "prevalence=0.5")
POLICY_PATTERN = re.compile(r"^(youden|f1)$|^(sens|spec)>=(0?\.\d+|1(\.0*)?)$|^prevalence=(0?\.\d+)$")


@dataclass(frozen=True)
class Policy:
    text: str

    @classmethod
    def parse(cls, text: str) -> "Policy":
        text = text.strip().replace(" ", "")
        if not POLICY_PATTERN.match(text):
            raise ValueError(f"operating point {text!r}: use youden, f1, sens>=X, spec>=X or prevalence=P "
                             "(X, P between 0 and 1), e.g. 'sens>=0.95'")
        return cls(text)

    @property
    def value(self) -> float | None:
        return float(re.split(">=|=", self.text)[1]) if "=" in self.text else None


def parse_policies(text: str) -> list[Policy]:
    """'youden,sens>=0.95' -> policies, in order, without repeats."""
    return [Policy.parse(part) for part in dict.fromkeys(p for p in text.split(",") if p.strip())]


def _cuts(truth: np.ndarray, scores: np.ndarray):
    """Per distinct score s (descending): tp and fp of 'score >= s', and the middle of the gap
    below s (the threshold that gives the same counts with the widest margin)."""
    order = np.argsort(-scores, kind="mergesort")
    ordered, positive = scores[order], truth[order] == 1
    last_of_value = np.r_[ordered[1:] != ordered[:-1], True]
    tp, fp = np.cumsum(positive)[last_of_value], np.cumsum(~positive)[last_of_value]
    values = ordered[last_of_value]
    below = np.r_[values[1:], values[-1] - 1e-3]
    return tp, fp, (values + below) / 2


def choose_threshold(truth: np.ndarray, scores: np.ndarray, policy: Policy) -> float | None:
    """One label's threshold on validation (truth 1/0 only); None without both classes."""
    positives, negatives = int((truth == 1).sum()), int((truth == 0).sum())
    if not positives or not negatives:
        return None
    if policy.text.startswith("prevalence="):
        target, val = policy.value, positives / (positives + negatives)
        shift = (target / (1 - target)) / (val / (1 - val))
        return float(1 / (1 + shift))
    tp, fp, thresholds = _cuts(truth, scores)
    sensitivity, specificity = tp / positives, 1 - fp / negatives
    if policy.text == "youden":
        best = int(np.argmax(sensitivity + specificity))
    elif policy.text == "f1":
        best = int(np.argmax(2 * tp / (tp + positives + fp)))
    elif policy.text.startswith("sens>="):  # counts grow down the list: the first that reaches X
        best = int(np.argmax(sensitivity >= policy.value - 1e-12))
    else:  # spec>=X: the last (lowest) cut that keeps specificity
        meets = np.flatnonzero(specificity >= policy.value - 1e-12)
        if not len(meets):
            return float(scores.max() + 1e-6)  # even the top score has too many negatives: call none positive
        best = int(meets[-1])
    return float(thresholds[best])


def choose_thresholds(labels: np.ndarray, scores: np.ndarray, policies: list[Policy]) -> dict[str, list]:
    """policy text -> per-label thresholds (None where a label lacks positives or negatives)."""
    chosen = {}
    for policy in policies:
        per_label = []
        for index in range(labels.shape[1]):
            rows = known(labels[:, index])
            per_label.append(choose_threshold(labels[rows, index], scores[rows, index], policy))
        chosen[policy.text] = per_label
    return chosen


def _rates(tp, fp, fn, tn) -> dict[str, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"accuracy": (tp + tn) / (tp + fp + fn + tn), "precision": tp / (tp + fp), "recall": tp / (tp + fn),
                "specificity": tn / (tn + fp), "f1": 2 * tp / (2 * tp + fp + fn)}


def metrics_at(truth: np.ndarray, scores: np.ndarray, threshold: float, patient_ids=None, n_resamples: int = 1000,
               seed: int = 0, level: float = 0.95) -> dict:
    """Accuracy, precision, recall (sensitivity), specificity, F1 and the confusion counts at a
    threshold, each rate with a patient-level bootstrap CI when patient ids are given."""
    actual, decided = truth == 1, scores >= threshold
    cells = [actual & decided, ~actual & decided, actual & ~decided, ~actual & ~decided]
    counts = [int(c.sum()) for c in cells]
    row = {"threshold": float(threshold), **{k: (None if np.isnan(v) else float(v))
                                             for k, v in _rates(*map(np.float64, counts)).items()},
           "tp": counts[0], "fp": counts[1], "fn": counts[2], "tn": counts[3]}
    if patient_ids is not None and n_resamples:
        weights = patient_resample_weights(patient_ids, n_resamples, seed).astype(np.float64)
        resampled = _rates(*(weights @ c for c in cells))
        tail = 100 * (1 - level) / 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a rate undefined in every resample
            for name, values in resampled.items():
                low, high = np.nanpercentile(values, [tail, 100 - tail])
                row[f"{name}_ci_low"] = None if np.isnan(low) else float(low)
                row[f"{name}_ci_high"] = None if np.isnan(high) else float(high)
    return row


def operating_table(labels: np.ndarray, scores: np.ndarray, patient_ids, label_names,
                    thresholds: dict[str, list], n_resamples: int = 1000, seed: int = 0) -> list[dict]:
    """One row per (policy, label) with a threshold: the metrics of `metrics_at` on this split."""
    rows = []
    for policy, per_label in thresholds.items():
        for index, (name, threshold) in enumerate(zip(label_names, per_label)):
            known_rows = known(labels[:, index])
            if threshold is None or not known_rows.any():
                continue
            ids = None if patient_ids is None else np.asarray(patient_ids)[known_rows]
            rows.append({"policy": policy, "label": name,
                         **metrics_at(labels[known_rows, index], scores[known_rows, index], threshold, ids,
                                      n_resamples, seed)})
    return rows
