"""What a training run writes besides its checkpoints, from rank 0: the summary.csv row and MLflow metrics of
each epoch, and each stage's report (the calibration and thresholds stored with the best checkpoint,
predictions CSVs, operating-point and calibration tables, ROC and reliability figures, the AUROC rows
in RUN_DIR/auroc_rows.parquet and the Delta results table, and the stage's MLflow logging through
training/tracking.py).
"""
from __future__ import annotations

import csv
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from cxr_pipeline.schema import DatasetSpec
from cxr_pipeline.training import calibration, checkpoints, distributed
from cxr_pipeline.training.evaluation import (Predictions, SplitEvaluation, apply_calibration, evaluate_split,
                                              fit_on_val)
from cxr_pipeline.training.operating_points import Policy
from cxr_pipeline.training.plots import reliability_diagram, roc_curves, training_curves
from cxr_pipeline.training.results import NO_TABLE, save_run_rows, write_results

log = logging.getLogger("train")
# The options that make a model what it is, kept with each result row to compare runs.
MODEL_CONFIG = ("model", "weights", "stages", "epochs_kt", "epochs_finetune", "lr_kt", "lr_finetune", "optimizer",
                "weight_decay", "schedule", "batch_size", "loss", "oversample", "augment", "amp", "seed",
                "calibration", "operating_point")
OPERATING_COLUMNS = ("threshold", "accuracy", "precision", "recall", "specificity", "f1", "tp", "fp", "fn", "tn")


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
        calibrators, thresholds = None, {}
        if "val" in raw:
            calibrators, thresholds = fit_on_val(raw["val"], args.calibration, self.policies)
            log.info("%s calibration (fitted on val): %s", stage,
                     calibration.describe(calibrators, self.spec.label_names))
            if best_epoch:
                best = checkpoints.load(self.run_dir / f"best_{stage}.pth")
                checkpoints.save({**best, "calibration": calibrators, "operating_points": thresholds,
                                  "operating_point": args.operating_point,
                                  "thresholds": thresholds[args.operating_point]}, self.run_dir / f"best_{stage}.pth")
        rows, operating_rows, calibration_rows = [], [], []
        created = datetime.now(timezone.utc)
        for split, predictions in raw.items():
            result = evaluate_split(predictions, calibrators, thresholds, self.spec.label_names, args.bootstrap,
                                    args.seed)
            operating_rows += [{"split": split, **row} for row in result.operating]
            calibration_rows += [{"split": split, **row} for row in result.calibration]
            chosen = {row["label"]: row for row in result.operating if row["policy"] == args.operating_point}
            rows += self.result_rows(stage, split, best_epoch, wait_fraction, created, result, chosen)
            self.save_predictions(stage, split, result.calibrated)
            self.plot_split(stage, split, best_epoch, predictions, result, calibrators)
            self.log_split(stage, best_epoch, split, result.metrics[-1], chosen)
        if train is not None:
            self.save_predictions(stage, "train", apply_calibration(train, calibrators))
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
        quality = {row["label"]: row for row in result.calibration}
        rows = []
        for metric in result.metrics:
            at_threshold = {key: value for key, value in chosen.get(metric["label"], {}).items()
                            if key in OPERATING_COLUMNS}
            rows.append({
                "run_id": args.run_id, "created_at": created, "dataset": self.spec.dataset,
                "image_size": self.spec.image_size, "model": args.model, "stage": stage, "split": split,
                **metric, **at_threshold, "operating_point": args.operating_point if at_threshold else None,
                "brier": quality.get(metric["label"], {}).get("brier"),
                "ece": quality.get(metric["label"], {}).get("ece"),
                "best_epoch": best_epoch, "world_size": self.dist.size, "backend": self.dist.name,
                "data_wait_fraction": wait_fraction, "run_dir": str(self.run_dir.resolve()),
                "model_config": json.dumps({key: getattr(args, key) for key in MODEL_CONFIG}),
                "mlflow_run_id": self.tracker.run_id, "dataset_version": args.dataset_version,
            })
        return rows

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

    def save_predictions(self, stage, split, predictions: Predictions) -> None:
        """image_id and one probability column per label: the format training.evaluate reads."""
        with (self.run_dir / f"predictions_{stage}_{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image_id", *self.spec.label_names])
            for image_id, row in zip(predictions.image_ids, predictions.scores):
                writer.writerow([image_id, *(f"{value:.6f}" for value in row)])


def write_csv(path: Path, rows: list[dict]) -> None:
    if rows:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
            writer.writeheader()
            writer.writerows(rows)
