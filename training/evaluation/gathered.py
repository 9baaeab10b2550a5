"""Evaluation during training: exact predictions of a whole split, gathered from every rank, and what a
stage's report measures on them (the calibration and operating-point thresholds fitted on val, then per
split the AUROC with its CI, the metrics at each threshold and the calibration quality).
training/evaluate.py is the command that scores a predictions CSV after the fact.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from cxr_pipeline.schema import DatasetSpec
from cxr_pipeline.training.data.inputs import InputTransform
from cxr_pipeline.training.data.reader import METADATA_COLUMNS, SplitReader, prefetch, split_row_count
from cxr_pipeline.training.data.targets import LabelLayout, LabelLoss
from cxr_pipeline.training.evaluation import calibration
from cxr_pipeline.training.evaluation.metrics import auroc_report
from cxr_pipeline.training.evaluation.operating_points import Policy, choose_thresholds, operating_table
from cxr_pipeline.training.loop import distributed
from cxr_pipeline.training.loop.precision import Precision
from cxr_pipeline.training.models.fusion import metadata_features

EVAL_SPLITS = ("val", "test")


@dataclass
class Predictions:
    image_ids: list[str]
    patient_ids: list[str]
    scores: np.ndarray  # (N, L) probabilities
    labels: np.ndarray  # (N, L) truth: 1, 0, or NaN where unknown (training.data.targets.LabelLayout.truth)
    loss: float | None = None  # the training loss on these rows (per-image mean), to see over-fitting


@dataclass(frozen=True)
class Feed:
    """How this rank reads its shard of a split and puts the batches through the model: the readers, the
    model's inputs (pixels, and the metadata features of fusion models) on the device, the precision of the
    forward pass, the loss, and the label layout that turns outputs into probabilities."""

    dataset: str
    spec: DatasetSpec
    layout: LabelLayout
    dist: distributed.Single
    batch_size: int
    reader_pool: str
    reader_workers: int
    device: torch.device
    inputs: InputTransform
    precision: Precision
    loss_fn: LabelLoss
    fused: bool  # the model takes metadata features after the images

    def reader(self, split: str, **options) -> SplitReader:
        return SplitReader(self.dataset, split, self.spec, self.batch_size, self.dist.rank, self.dist.size,
                           pool=self.reader_pool, workers=self.reader_workers, with_metadata=self.fused,
                           pin_memory=self.device.type == "cuda", **options)

    def extra_inputs(self, batch) -> tuple:
        """What the model takes after the images: the metadata features of fusion models."""
        if not self.fused:
            return ()
        return (metadata_features(*(batch.metadata[column] for column in METADATA_COLUMNS)).to(self.device),)


@torch.no_grad()
def predict(model, split: str, feed: Feed) -> Predictions:
    """Exact predictions of the whole split: every rank scores its shard, all are gathered."""
    model.eval()
    reader = feed.reader(split)
    image_ids, patient_ids, scores, labels = [], [], [], []
    loss_sum = 0.0
    for batch in prefetch(reader):
        images = feed.inputs(batch.images.to(feed.device, non_blocking=True), evaluation=True)
        logits = feed.precision.evaluate(model, images, *feed.extra_inputs(batch))
        loss = feed.loss_fn(logits, batch.labels.to(feed.device), batch.mask.to(feed.device))
        loss_sum += loss.item() * len(batch.image_ids)
        scores.append(feed.layout.probabilities(logits).cpu().numpy())
        labels.append(feed.layout.truth(batch.labels.numpy(), batch.mask.numpy()))
        image_ids.extend(batch.image_ids)
        patient_ids.extend(batch.patient_ids)
    empty = np.zeros((0, feed.spec.num_labels), dtype=np.float32)
    shards = feed.dist.allgather_object(
        (image_ids, patient_ids, np.concatenate(scores or [empty]), np.concatenate(labels or [empty]), loss_sum))
    gathered = Predictions([i for s in shards for i in s[0]], [p for s in shards for p in s[1]],
                           np.concatenate([s[2] for s in shards]), np.concatenate([s[3] for s in shards]),
                           sum(s[4] for s in shards) / max(sum(len(s[0]) for s in shards), 1))
    expected = split_row_count(feed.dataset, split)
    if len(gathered.image_ids) != expected or len(set(gathered.image_ids)) != expected:
        raise RuntimeError(f"{split}: gathered {len(gathered.image_ids)} predictions "
                           f"({len(set(gathered.image_ids))} distinct) for {expected} rows; evaluation must "
                           "see each row exactly once")
    return gathered


def predict_for_report(model, feed: Feed, with_train: bool) -> tuple[dict[str, Predictions], Predictions | None]:
    """Predictions of the non-empty EVAL_SPLITS and, when asked, of train; every rank takes part."""
    splits = [split for split in EVAL_SPLITS if split_row_count(feed.dataset, split)]
    raw = {split: predict(model, split, feed) for split in splits}
    return raw, predict(model, "train", feed) if with_train else None


def fit_on_val(val: Predictions, method: str, policies: list[Policy]) -> tuple[list[dict], dict[str, list]]:
    """The per-label calibration (training/evaluation/calibration.py) fitted on val, and the val thresholds of every
    operating-point policy chosen on the calibrated scores."""
    calibrators = calibration.fit(val.labels, val.scores, method)
    return calibrators, choose_thresholds(val.labels, calibration.apply(calibrators, val.scores), policies)


def apply_calibration(predictions: Predictions, calibrators: list[dict] | None) -> Predictions:
    return replace(predictions, scores=calibration.apply(calibrators, predictions.scores))


@dataclass
class SplitEvaluation:
    calibrated: Predictions  # the split's predictions with the val-fitted calibration applied
    metrics: list[dict]  # training.evaluation.metrics.auroc_report: per label, then the mean
    operating: list[dict]  # operating_points.operating_table: per policy and label, at its threshold
    calibration: list[dict]  # training.evaluation.calibration.calibration_metrics: per label, before and after


def evaluate_split(predictions: Predictions, calibrators: list[dict] | None, thresholds: dict[str, list],
                   label_names, bootstrap: int, seed: int) -> SplitEvaluation:
    """Apply the val-fitted calibration and thresholds, unchanged, to one split and measure it."""
    calibrated = apply_calibration(predictions, calibrators)
    scores = calibrated.scores
    metrics = auroc_report(predictions.labels, scores, predictions.patient_ids, label_names, bootstrap, seed)
    operating = operating_table(predictions.labels, scores, predictions.patient_ids, label_names, thresholds,
                                bootstrap, seed)
    fit = calibration.calibration_metrics(predictions.labels, predictions.scores, scores, label_names)
    return SplitEvaluation(calibrated, metrics, operating, fit)
