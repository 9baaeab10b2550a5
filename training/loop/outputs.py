"""What a training run writes besides its checkpoints, from rank 0: the summary.csv row and MLflow metrics of
each epoch, and each stage's report (the calibration, thresholds, val prevalence and val score deciles stored
with the best checkpoint, predictions CSVs, operating-point and calibration tables, ROC and reliability figures,
the AUROC rows in RUN_DIR/auroc_rows.parquet and the Delta results table, and the stage's MLflow logging through
training/serving/tracking.py).
"""
from __future__ import annotations

import csv
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cxr_pipeline.schema import DatasetSpec
from cxr_pipeline.training.evaluation import calibration, metric_columns, prevalence
from cxr_pipeline.training.loop import checkpoints, distributed
from cxr_pipeline.training.evaluation.gathered import (Predictions, SplitEvaluation, apply_calibration, evaluate_split,
                                              fit_on_val)
from cxr_pipeline.training.evaluation.metrics import known
from cxr_pipeline.training.evaluation.operating_points import Policy
from cxr_pipeline.training.evaluation.plots import reliability_diagram, roc_curves, training_curves
from cxr_pipeline.training.evaluation.results import NO_TABLE, save_run_rows, write_results
from cxr_pipeline.training.serving.predictions import (ModelIdentity, decide, prediction_frame,
                                                       write_predictions_csv)

log = logging.getLogger("train")
# The options that make a model what it is, kept with each result row to compare runs.
MODEL_CONFIG = ("model", "weights", "stages", "epochs_kt", "epochs_finetune", "lr_kt", "lr_finetune", "optimizer",
                "weight_decay", "schedule", "batch_size", "loss", "oversample", "augment", "amp", "seed",
                "calibration", "operating_point")
DECILES = np.linspace(0.1, 0.9, 9)  # val_score_deciles: the 9 inner deciles


class RunOutputs:
    """The run's files in RUN_DIR, its Delta rows and its MLflow run. Only rank 0 calls the methods; the
    tracker is a no-op on the other ranks."""

    def __init__(self, args, dist: distributed.Single, spec: DatasetSpec, run_dir: Path, policies: list[Policy],
                 tracker):
        self.args, self.dist, self.spec, self.run_dir, self.policies = args, dist, spec, run_dir, policies
        self.tracker = tracker
        self.results_written = 0  # AUROC rows this process reported (rank 0)

    def record_epoch(self, stage, epoch, stats, val_loss, val_auroc) -> None:
        row = {"stage": stage, "epoch": epoch, **stats, "val_loss": val_loss, "val_mean_auroc": val_auroc}
        path = self.run_dir / "summary.csv"
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        self.tracker.log_epoch(stage, epoch, row)

    def report_stage(self, stage, best_epoch, wait_fraction, raw: dict[str, Predictions],
                     train: Predictions | None) -> None:
        """Report the stage's best model from its predictions (evaluation.predict_for_report). On val, fit the
        calibration and choose the thresholds of every operating-point policy; store them with the checkpoint;
        apply them unchanged to test. Write the rows to the run's file and the Delta table, then the tables and
        figures."""
        args = self.args
        calibrators, thresholds, prior = None, {}, None
        if "val" in raw:
            calibrators, thresholds = fit_on_val(raw["val"], args.calibration, self.policies)
            log.info("%s calibration (fitted on val): %s", stage,
                     calibration.describe(calibrators, self.spec.label_names))
            prior = prevalence.observed(raw["val"].labels)
            if best_epoch:
                best = checkpoints.load(self.run_dir / f"best_{stage}.pth")
                checkpoints.save({**best, "calibration": calibrators, "operating_points": thresholds,
                                  "operating_point": args.operating_point,
                                  "thresholds": thresholds[args.operating_point],
                                  **val_population(raw["val"], calibrators)}, self.run_dir / f"best_{stage}.pth")
        rows, operating_rows, calibration_rows = [], [], []
        created = datetime.now(timezone.utc)
        for split, predictions in raw.items():
            result = evaluate_split(predictions, calibrators, thresholds, self.spec.label_names, args.bootstrap,
                                    args.seed)
            operating_rows += [{"split": split, **row} for row in result.operating]
            calibration_rows += [{"split": split, **row} for row in with_prevalence(
                result.calibration, result.calibrated, prior, self.spec.label_names, args.seed)]
            chosen = {row["label"]: row for row in result.operating if row["policy"] == args.operating_point}
            rows += self.result_rows(stage, split, best_epoch, wait_fraction, created, result, chosen)
            self.save_predictions(stage, split, result.calibrated, thresholds.get(args.operating_point))
            self.plot_split(stage, split, best_epoch, predictions, result, calibrators)
            self.log_split(stage, best_epoch, split, result.metrics[-1], chosen)
        if train is not None:
            self.save_predictions(stage, "train", apply_calibration(train, calibrators),
                                  thresholds.get(args.operating_point))
        write_csv(self.run_dir / f"operating_points_{stage}.csv", operating_rows)
        write_csv(self.run_dir / f"calibration_{stage}.csv", calibration_rows)
        if rows:
            save_run_rows(self.run_dir, rows)
            if args.results_table != NO_TABLE:
                engine = write_results(args.results_table, rows, args.results_engine)
                log.info("%s: %d AUROC rows written to %s (%s)", stage, len(rows), args.results_table, engine)
            self.results_written += len(rows)
            training_curves(self.run_dir / "summary.csv", self.run_dir / "training_curves.png")
        self.tracker.log_stage(stage, rows)

    def result_rows(self, stage, split, best_epoch, wait_fraction, created, result: SplitEvaluation,
                    chosen: dict[str, dict]) -> list[dict]:
        """The Delta rows of one split: per label and the mean, with the metrics at the run's operating point."""
        args = self.args
        computed_values = metric_columns.computed(result.calibrated.labels, result.calibrated.scores,
                                                  self.spec.label_names)
        return [{
            "run_id": args.run_id, "created_at": created, "dataset": self.spec.dataset,
            "image_size": self.spec.image_size, "model": args.model, "stage": stage, "split": split,
            "label": metric["label"],
            **metric_columns.figures(metric, chosen.get(metric["label"]), args.operating_point,
                                     computed_values.get(metric["label"])),
            "best_epoch": best_epoch, "world_size": self.dist.size, "backend": self.dist.name,
            "data_wait_fraction": wait_fraction, "run_dir": str(self.run_dir.resolve()),
            "model_config": json.dumps({key: getattr(args, key) for key in MODEL_CONFIG}),
            "mlflow_run_id": self.tracker.run_id, "dataset_version": args.dataset_version,
        } for metric in result.metrics]

    def plot_split(self, stage, split, best_epoch, predictions: Predictions, result: SplitEvaluation,
                   calibrators: list[dict] | None) -> None:
        """ROC curves of the calibrated scores, and the reliability diagram before and after calibration."""
        scores = result.calibrated.scores
        title = f"{self.args.model}, {stage} (best epoch {best_epoch}), {split}: {len(predictions.image_ids)} images"
        roc_curves(predictions.labels, scores, result.metrics, self.run_dir / f"roc_{stage}_{split}.png", title)
        fitted = ", ".join(sorted({state["method"] for state in calibrators or [{"method": "none"}]}))
        reliability_diagram(predictions.labels, {"before calibration": predictions.scores,
                                                 f"after ({fitted}, fitted on val)": scores},
                            self.spec.label_names, self.run_dir / f"reliability_{stage}_{split}.png", title)

    def log_split(self, stage, best_epoch, split, mean, chosen) -> None:
        text = ("n/a" if mean["auroc"] is None
                else f"{mean['auroc']:.4f} [95% CI {mean['auroc_ci_low']:.4f}, {mean['auroc_ci_high']:.4f}]")
        if len(chosen) == 1:  # one label: say what the operating point gives
            (row,) = chosen.values()
            text += (f"; at the val-chosen {self.args.operating_point} threshold {row['threshold']:.3f}: accuracy "
                     f"{row['accuracy']:.3f}, sensitivity {row['recall']:.3f}, specificity {row['specificity']:.3f}")
        log.info("%s best (epoch %d) on %s: mean AUROC %s", stage, best_epoch, split, text)

    def save_predictions(self, stage, split, predictions: Predictions, thresholds: list | None) -> None:
        """predictions_<stage>_<split>.csv in the columns `predict --output` writes (training/serving/predictions.py),
        under the identity of the stage's best checkpoint: what training.evaluate, ensembles and relabelling read."""
        checkpoint = self.run_dir / f"best_{stage}.pth"
        identity = ModelIdentity(checkpoint_sha256=checkpoints.recorded_sha256(checkpoint),
                                 model_uri=str(checkpoint.resolve()), run_id=self.args.run_id,
                                 dataset_version=self.args.dataset_version)
        rows = prediction_frame(self.spec.label_names, predictions.image_ids,
                                [f"{split}/{image_id}" for image_id in predictions.image_ids], predictions.scores,
                                decide(predictions.scores, thresholds), [""] * len(predictions.image_ids), identity)
        write_predictions_csv(rows, self.run_dir / f"predictions_{stage}_{split}.csv")


def val_population(val: Predictions, calibrators: list[dict] | None) -> dict:
    """What the best checkpoint keeps of val besides the calibration, for where the model runs later:
    `val_prevalence`, per label the fraction positive among val's known labels (the prior its calibrated
    probabilities hold: training/evaluation/prevalence.py estimates a site's prevalence from it and adjusts to
    it), and `val_score_deciles`, per label the 9 inner deciles (10 %, ..., 90 %) of val's calibrated
    probabilities over every val image (the reference a shift monitor compares scored batches with). Plain
    lists of floats (None: a label with no known val truth or no score), as checkpoints load weights only."""
    scores = calibration.apply(calibrators, val.scores)
    deciles = []
    for column in scores.T:
        finite = column[np.isfinite(column)]
        deciles.append(np.quantile(finite, DECILES).tolist() if len(finite) else None)
    return {"val_prevalence": prevalence.observed(val.labels), "val_score_deciles": deciles}


def with_prevalence(rows: list[dict], calibrated: Predictions, prior: list[float | None] | None, label_names,
                    seed: int) -> list[dict]:
    """calibration_metrics' rows of a split, each with the split's true prevalence, the prevalence EM estimates
    from the split's calibrated probabilities alone (labels unseen: what `predict --prevalence auto` does where
    the model runs) with its 95 % bootstrap interval, and the Brier score and ECE of the probabilities moved
    from val's prevalence to that estimate (training/evaluation/prevalence.py)."""
    if prior is None:
        return rows
    estimates = prevalence.estimate(calibrated.scores, prior, label_names, seed=seed)
    adjusted = prevalence.adjust(calibrated.scores, prior, [e.estimate for e in estimates])
    extended = []
    for index, (row, estimate) in enumerate(zip(rows, estimates)):
        rows_known = known(calibrated.labels[:, index])
        if not rows_known.any() or not np.isfinite(estimate.estimate):
            extended.append(row)
            continue
        truth = calibrated.labels[rows_known, index]
        extended.append({**row, "prevalence": float(truth.mean()), "prevalence_estimated": estimate.estimate,
                         "prevalence_estimated_ci_low": estimate.low, "prevalence_estimated_ci_high": estimate.high,
                         "brier_adjusted": calibration.brier(truth, adjusted[rows_known, index]),
                         "ece_adjusted": calibration.expected_calibration_error(truth, adjusted[rows_known, index])})
    return extended


def write_csv(path: Path, rows: list[dict]) -> None:
    if rows:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
            writer.writeheader()
            writer.writerows(rows)
