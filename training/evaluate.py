"""Score a predictions file against the labels of a dataset split, as train.py scores itself.

    python -m training.evaluate --dataset /data/nih_224 --split test --predictions preds.csv

The file holds `image_id` and one probability column per label (train.py writes
RUN_DIR/predictions_<stage>_<split>.csv in this format), so results of other tools can be
compared on the same footing: same rows, same AUROC, same patient-level bootstrap CIs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from etl.schema import LABEL_MASK_COLUMN, DatasetSpec, read_dataset_spec, split_dir
from training.metrics import auroc_report
from training.plots import roc_curves
from training.targets import LabelLayout


def load_truth(dataset: Path, split: str, spec: DatasetSpec) -> pd.DataFrame:
    """image_id -> patient_id and `truth` (per label 1, 0 or NaN where unknown), as train.py scores."""
    columns = ["image_id", "patient_id", "labels"] + ([LABEL_MASK_COLUMN] if spec.has_mask else [])
    table = pq.read_table(split_dir(dataset, split), columns=columns).to_pandas()
    labels = np.asarray(table["labels"].tolist(), dtype=np.float64).reshape(-1, spec.num_labels)
    mask = np.asarray(table[LABEL_MASK_COLUMN].tolist()).reshape(labels.shape) if spec.has_mask else 1
    table["truth"] = list(LabelLayout(spec).truth(labels, np.broadcast_to(mask, labels.shape)))
    return table.drop(columns=["labels"]).set_index("image_id")


def align(predictions: pd.DataFrame, truth: pd.DataFrame, label_names) -> pd.DataFrame:
    """Predictions joined to truth; errors name what does not match and what to do."""
    missing_columns = [name for name in ("image_id", *label_names) if name not in predictions.columns]
    if missing_columns:
        raise SystemExit(f"predictions lack columns {missing_columns}; expected image_id and {list(label_names)}")
    predictions = predictions.set_index("image_id")
    unknown = predictions.index.difference(truth.index)
    if len(unknown):
        raise SystemExit(f"{len(unknown)} predicted image ids are not in this split, e.g. {list(unknown[:3])}")
    if predictions.index.has_duplicates:
        raise SystemExit("predictions list some image ids more than once")
    unscored = truth.index.difference(predictions.index)
    if len(unscored):
        raise SystemExit(f"{len(unscored)} images of the split have no prediction, e.g. {list(unscored[:3])}; "
                         "score every image so results stay comparable")
    return truth.join(predictions[list(label_names)])


def score(predictions: pd.DataFrame, dataset: Path, split: str, bootstrap: int = 1000, seed: int = 0):
    """AUROC report of `predictions` (image_id + a column per label) on a split, and the arrays
    it was computed from: (report, truth, scores, joined frame)."""
    spec = read_dataset_spec(dataset)
    joined = align(predictions, load_truth(Path(dataset), split, spec), spec.label_names)
    labels = np.asarray(joined["truth"].tolist(), dtype=np.float64).reshape(len(joined), spec.num_labels)
    scores = joined[list(spec.label_names)].to_numpy(dtype=np.float64)
    report = auroc_report(labels, scores, joined["patient_id"].to_numpy(), spec.label_names, bootstrap, seed)
    return report, labels, scores, joined


def print_report(title: str, report: list[dict], joined: pd.DataFrame) -> None:
    print(f"{title}: {len(joined)} images, {joined['patient_id'].nunique()} patients")
    for row in report:
        value = "    -" if row["auroc"] is None else (
            f"{row['auroc']:.3f} [{row['auroc_ci_low']:.3f}, {row['auroc_ci_high']:.3f}]")
        print(f"  {row['label']:<20} {value}  n+={row['n_pos']} n-={row['n_neg']}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="folder written by etl/preprocess.py")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--predictions", required=True, help="CSV: image_id, then one probability column per label")
    parser.add_argument("--bootstrap", type=int, default=1000, help="patient-level resamples for 95%% CIs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--roc-png", help="also draw the ROC curves to this PNG")
    args = parser.parse_args(argv)

    report, labels, scores, joined = score(pd.read_csv(args.predictions), Path(args.dataset), args.split,
                                           args.bootstrap, args.seed)
    print_report(f"{args.predictions} on {args.dataset} {args.split}", report, joined)
    if args.roc_png:
        roc_curves(labels, scores, report, Path(args.roc_png), f"{Path(args.predictions).name}, {args.split}")
    return report


if __name__ == "__main__":
    main()
