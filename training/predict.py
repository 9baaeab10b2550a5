"""Score images with a trained checkpoint: calibrated probabilities and decisions, to a file or a Delta table.

    python -m training.predict --checkpoint RUN_DIR/best_finetune.pth /data/new_studies/ --output predictions.csv
    python -m training.predict --checkpoint C 'scans/*.png' list_of_paths.txt --output p.csv --parquet
    python -m training.predict --checkpoint C /data/nih_224 --split test --output p.csv   # an ETL dataset
    python -m training.predict --checkpoint C /data/incoming --results-table outputs/scores_delta
    python -m training.predict --checkpoint C image.png --overlay-dir heatmaps/           # terminal + Grad-CAM
    python -m training.predict --checkpoint C /data/site_b/ --prevalence auto --output p.csv  # at site B's prevalence

Inputs: image files (PNG, JPEG, DICOM), folders (searched recursively), glob patterns, text
files listing one path per line, or a Parquet dataset written by etl/preprocess.py. Images are
prepared exactly as for training (training/serving/scorer.py).

One output row per input image, in the columns of training/serving/predictions.py: `image_id`, `path`, the
calibrated probability of each label (calibration fitted on val by train.py), `<label>_positive` (1/0) at the
run's operating point (thresholds chosen on val), `error` (an unreadable image gets its reason there and empty
scores, and the run goes on), and the model's identity on every row: the checkpoint's sha256 and path, the
training run and its dataset version, so `evaluate --results-table` on the file leads back to them.
`--results-table` writes the rows to a Delta table, one row per image and checkpoint, as jobs/score.py does
for registered models.

`--prevalence`: the calibrated probabilities hold val's prevalence; a site with another gets them too high or too
low. `auto` estimates each label's prevalence from all the images of the run (EM over their probabilities, with a
bootstrap 95 % interval: training/evaluation/prevalence.py), logs it and moves the probabilities to it; `P` (a
one-label model) or `label=P,label2=Q` (or `label=auto`) moves them to prevalences you know. The `prevalence`
column says which was used. Decisions stay the run's: made at its val-chosen thresholds on the unadjusted
probabilities, so the operating point keeps the meaning it was chosen for (e.g. sensitivity 0.95 on val); the
terminal shows each threshold moved with the probabilities.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from cxr_pipeline.etl import versions
from cxr_pipeline.schema import SPLITS, read_dataset_spec, split_dir
from cxr_pipeline.training.evaluation import prevalence
from cxr_pipeline.training.evaluation.results import add_engine_argument
from cxr_pipeline.training.explain import overlays
from cxr_pipeline.training.explain.gradcam import METHODS
from cxr_pipeline.training.models.fusion import metadata_features
from cxr_pipeline.training.models.registry import uses_metadata
from cxr_pipeline.training.serving.prediction_table import write_predictions
from cxr_pipeline.training.serving.predictions import ERROR_COLUMN, PREVALENCE_COLUMN, to_arrow, write_predictions_csv
from cxr_pipeline.training.serving.scorer import (PrevalenceError, Scorer, adjust_rows, check_enough_to_estimate,
                                                  check_pixels, checked_targets, dataset_batches, image_paths,
                                                  is_dataset, load, predict_rows, read_batches)

log = logging.getLogger("predict")


def shown_thresholds(scorer: Scorer, used: str) -> list[float | None]:
    """The run's thresholds on the scale of probabilities adjusted to `used` (PREVALENCE_COLUMN's JSON): the
    same decisions."""
    if not used:
        return scorer.thresholds
    targets = json.loads(used)
    names = scorer.spec.label_names
    moved = prevalence.adjust(np.array([[np.nan if t is None else t for t in scorer.thresholds]]),
                              scorer.val_prevalence, [targets.get(name) for name in names])[0]
    return [None if t is None else float(m) for t, m in zip(scorer.thresholds, moved)]


def print_rows(rows: pd.DataFrame, scorer: Scorer) -> None:
    for row in rows.to_dict("records"):
        print(row["path"])
        if row[ERROR_COLUMN]:
            print(f"  skipped: {row[ERROR_COLUMN]}")
            continue
        thresholds = shown_thresholds(scorer, row[PREVALENCE_COLUMN])
        for name, threshold in sorted(zip(scorer.spec.label_names, thresholds), key=lambda x: -row[x[0]]):
            decision = "" if threshold is None else (
                f"  {'POSITIVE' if row[name] >= threshold else 'negative'} (threshold {threshold:.3f})")
            print(f"  {name:<20} {row[name]:.3f}{decision}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+",
                        help="images, folders, glob patterns, .txt lists of paths, or one ETL dataset folder")
    parser.add_argument("--checkpoint", required=True, help="RUN_DIR/best_<stage>.pth from train.py")
    parser.add_argument("--output", help="CSV to write, one row per input image (default, without "
                                         "--results-table: print to the terminal)")
    parser.add_argument("--parquet", action="store_true", help="also write the rows as Parquet beside --output")
    parser.add_argument("--results-table",
                        help="write the rows to this Delta table (a folder, or catalog.schema.table through Spark), "
                             "replacing the rows it holds for the same images and checkpoint")
    add_engine_argument(parser)
    parser.add_argument("--split", action="append", choices=SPLITS,
                        help="with an ETL dataset: the split(s) to score (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prevalence", default="",
                        help="move the calibrated probabilities from val's prevalence to this one: 'auto' (estimated "
                             f"from all the images scored, at least {prevalence.MIN_IMAGES}, logged with its 95%% "
                             "interval), P in (0, 1) for a one-label model, or 'label=P,label2=Q' ('label=auto' too); "
                             "decisions stay at the run's thresholds (default: val's prevalence, unadjusted)")
    parser.add_argument("--overlay-dir", help="write Grad-CAM overlay PNGs here, <image>_<label>.png")
    parser.add_argument("--label", help="label of the overlays (default: each image's "
                                        f"{overlays.TOP_LABELS} most probable labels)")
    parser.add_argument("--cam", choices=METHODS,
                        help="heatmap method (default: gradcam; hirescam for small_cnn and the VGGs, whose heads "
                             "keep position)")
    fusion = parser.add_argument_group("patient data, for models that fuse it (<model>+meta); unknown if left out")
    fusion.add_argument("--age", type=float, help="age in years")
    fusion.add_argument("--sex", choices=["M", "F"])
    fusion.add_argument("--view-position", help="PA, AP, LL or LATERAL")
    return parser


def main(argv=None) -> pd.DataFrame:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    scorer = load(args.checkpoint)
    extra = (metadata_features([args.age], [args.sex], [args.view_position]),) if uses_metadata(scorer.model_name) \
        else ()
    if args.label and args.label not in scorer.spec.label_names:
        raise SystemExit(f"--label {args.label!r} is not one of {list(scorer.spec.label_names)}")
    try:
        targets = checked_targets(scorer, args.prevalence)  # before scoring: a setting it cannot apply stops here
    except PrevalenceError as exc:
        raise SystemExit(f"--prevalence: {exc}") from None
    if len(args.inputs) == 1 and is_dataset(Path(args.inputs[0])):
        dataset = versions.resolve(args.inputs[0]).path
        stored_spec = read_dataset_spec(dataset)
        check_pixels(scorer.spec, stored_spec, dataset)
        splits = args.split or list(SPLITS)
        total = sum(pq.ParquetFile(f).metadata.num_rows for s in splits if split_dir(dataset, s).exists()
                    for f in split_dir(dataset, s).glob("*.parquet"))
        paths, batches = [], dataset_batches(dataset, splits, stored_spec, args.batch_size)
    else:
        paths = image_paths(args.inputs)
        total, batches = len(paths), read_batches(paths, scorer.spec, args.batch_size)
    try:
        check_enough_to_estimate(targets, total)  # before scoring; adjust_rows checks again what could be read
    except PrevalenceError as exc:
        raise SystemExit(f"--prevalence: {exc}") from None
    rows = predict_rows(scorer, batches, total, extra)
    failed = int((rows[ERROR_COLUMN] != "").sum())
    log.info("scored %d images with %s (%s, operating point %s); %d unreadable, listed with their reason",
             len(rows) - failed, args.checkpoint, "calibrated" if scorer.calibration else "not calibrated",
             scorer.operating_point or "none", failed)
    if targets:
        try:
            rows, estimates = adjust_rows(scorer, rows, targets)
        except PrevalenceError as exc:  # too few of the images could be read
            raise SystemExit(f"--prevalence: {exc}") from None
        if estimates:
            log.info("prevalence estimated from the %d images scored:\n%s", len(rows) - failed,
                     prevalence.describe(estimates, [scorer.val_prevalence[scorer.spec.label_names.index(e.label)]
                                                     for e in estimates]))
        log.info("probabilities moved from val's prevalence to %s; decisions at the run's thresholds, unchanged",
                 (rows[PREVALENCE_COLUMN].iloc[0] if len(rows) else "") or "none (nothing to estimate from)")
    labels = scorer.spec.label_names
    if args.output:
        output = Path(args.output)
        write_predictions_csv(rows, output)
        if args.parquet:
            pq.write_table(to_arrow(rows, labels), output.with_suffix(".parquet"))
        log.info("wrote %s%s", output, " and its .parquet" if args.parquet else "")
    if args.results_table:
        engine = write_predictions(args.results_table, rows, labels, args.results_engine)
        log.info("wrote %d rows to %s (%s)", len(rows), args.results_table, engine)
    if not (args.output or args.results_table):
        print_rows(rows, scorer)
    if args.overlay_dir:
        overlays.write_file_overlays(scorer, paths, Path(args.overlay_dir), args.label, args.cam, extra)
    return rows


if __name__ == "__main__":
    main()
