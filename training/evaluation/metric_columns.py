"""The per-label figures of an evaluation, listed once (METRICS): the Delta results table's columns
(training/evaluation/results.py), the report's table (training/report.py), the MLflow metrics of a run
(training/serving/tracking.py) and the sweep's comparison are all derived from it, and training and
`evaluate` fill a row's figures with `figures()`.

Adding a metric of calibrated probabilities is one entry with a `compute` function: every row then carries it.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import pyarrow as pa

from cxr_pipeline.training.evaluation.calibration import brier, expected_calibration_error
from cxr_pipeline.training.evaluation.metrics import known

Compute = Callable[[np.ndarray, np.ndarray], float]  # one label's truth (0/1) and probabilities -> value


class Metric(NamedTuple):
    name: str
    kind: str = "ratio"  # "ratio" (float), "count" (integer) or "text"
    # from the label's truth and calibrated probabilities (its known rows); None: a figure of the AUROC
    # report (training/evaluation/metrics.py) or of the operating point (training/evaluation/operating_points.py)
    compute: Compute | None = None
    at_threshold: bool = False  # measured at the label's threshold of the run's operating point; null without one

    @property
    def arrow_type(self) -> pa.DataType:
        return {"ratio": pa.float64(), "count": pa.int64(), "text": pa.string()}[self.kind]


METRICS = (
    Metric("auroc"),
    Metric("auroc_ci_low"),  # 95 %, patient-level bootstrap
    Metric("auroc_ci_high"),
    Metric("auroc_weighted"),  # label 'mean' only: the mean weighted by each label's prevalence
    Metric("n_pos", "count"),
    Metric("n_neg", "count"),
    # at the label's threshold chosen on validation by the run's operating-point policy
    Metric("operating_point", "text", at_threshold=True),  # the policy, e.g. youden
    Metric("threshold", at_threshold=True),
    Metric("accuracy", at_threshold=True),
    Metric("precision", at_threshold=True),
    Metric("recall", at_threshold=True),
    Metric("specificity", at_threshold=True),
    Metric("f1", at_threshold=True),
    Metric("tp", "count", at_threshold=True),
    Metric("fp", "count", at_threshold=True),
    Metric("fn", "count", at_threshold=True),
    Metric("tn", "count", at_threshold=True),
    # of the calibrated probabilities (training/evaluation/calibration.py)
    Metric("brier", compute=brier),
    Metric("ece", compute=expected_calibration_error),
)


def names(kind: str | None = None) -> list[str]:
    """The metric columns in order, or those of one kind."""
    return [metric.name for metric in METRICS if kind in (None, metric.kind)]


def mean_figures() -> list[str]:
    """The ratio figures a 'mean' row carries (the AUROC, its interval, the prevalence-weighted mean): what a
    comparison of runs shows."""
    return [metric.name for metric in METRICS
            if metric.kind == "ratio" and metric.compute is None and not metric.at_threshold]


def computed(labels: np.ndarray, probabilities: np.ndarray, label_names) -> dict[str, dict]:
    """{label: {metric: value}} of every metric with a `compute` function, over the label's known rows
    (None where it has none); the 'mean' row gets none of them."""
    values = {}
    for index, label in enumerate(label_names):
        rows = known(labels[:, index])
        values[label] = {metric.name: float(metric.compute(labels[rows, index], probabilities[rows, index]))
                         if rows.any() else None for metric in METRICS if metric.compute is not None}
    return values


def figures(report_row: dict, chosen: dict | None = None, operating_point: str | None = None,
            computed_values: dict | None = None) -> dict:
    """One label's value of every METRICS column: from its AUROC report row (auroc, CI, counts), its row of
    the operating-point table at the run's threshold (`chosen`, with `operating_point` the policy), and
    `computed()`'s values; None where a figure has no source."""
    at_threshold = {**(chosen or {}), "operating_point": operating_point} if chosen else {}
    sources = {**report_row, **(computed_values or {})}
    return {metric.name: (at_threshold if metric.at_threshold else sources).get(metric.name) for metric in METRICS}
