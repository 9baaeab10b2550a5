"""Score predictions against truth: per-label AUROC with patient-level bootstrap CIs, ROC and
reliability plots, an HTML page and, on request, Delta rows. No ETL needed.

    # any tool's predictions against the labels file of the download
    python -m training.evaluate --predictions preds.csv --labels-csv Data_Entry_2017.csv --output-dir eval/
    python -m training.evaluate --predictions preds.csv --labels-csv CheXpert-v1.0/valid.csv
    # one CSV with both: truth in `<label>`, scores in `<label>_prob` (found without being told)
    python -m training.evaluate --predictions both.csv --labels-csv both.csv
    # score columns named another way than `<label>`, `prob_<label>` or `<label>_prob`
    python -m training.evaluate --predictions preds.csv --labels-csv valid.csv --score-columns '{label}_score'
    # against a split of an ETL dataset (train.py writes RUN_DIR/predictions_<stage>_<split>.csv)
    python -m training.evaluate --dataset /data/nih_224 --split test --predictions preds.csv

Predictions: an id column (`image_id`, `Image Index` or `Path`) and one score column per label, named
`<label>`, `prob_<label>` (the public CheXNet reproductions) or `<label>_prob`: the template that fits
most labels is used and printed; `--score-columns TEMPLATE` names another. Labels are matched by name in
any spelling (training/evaluation/label_files.py says which files and values are understood); whatever is
left out is counted and printed, never dropped silently.
"""
from __future__ import annotations

import argparse
import html
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from cxr_pipeline.etl import versions
from cxr_pipeline.schema import LABEL_MASK_COLUMN, DatasetSpec, read_dataset_spec, split_dir
from cxr_pipeline.training.data.targets import LabelLayout
from cxr_pipeline.training.evaluation import calibration, label_files, metric_columns
from cxr_pipeline.training.evaluation.html_tables import STYLE, image_tag, number_table
from cxr_pipeline.training.evaluation.label_files import Aligned
from cxr_pipeline.training.evaluation.metrics import auroc_report
from cxr_pipeline.training.evaluation.plots import reliability_diagram, roc_curves
from cxr_pipeline.training.evaluation.results import write_results
from cxr_pipeline.training.loop.run_ids import new_run_id
from cxr_pipeline.training.serving.predictions import ModelIdentity, read_identity


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


def from_dataset(predictions: pd.DataFrame, dataset: Path, split: str) -> Aligned:
    """Predictions (image_id + a column per label) lined up with a split of an ETL dataset."""
    spec = read_dataset_spec(dataset)
    joined = align(predictions, load_truth(Path(dataset), split, spec), spec.label_names)
    return Aligned(image_ids=list(joined.index), patient_ids=joined["patient_id"].astype(str).to_numpy(),
                   label_names=list(spec.label_names),
                   truth=np.asarray(joined["truth"].tolist(), dtype=np.float64).reshape(len(joined), spec.num_labels),
                   scores=joined[list(spec.label_names)].to_numpy(dtype=np.float64))


def score(predictions: pd.DataFrame, dataset: Path, split: str, bootstrap: int = 1000, seed: int = 0):
    """AUROC report of `predictions` on a dataset split and the aligned arrays: (report, aligned)."""
    aligned = from_dataset(predictions, dataset, split)
    return auroc_report(aligned.truth, aligned.scores, aligned.patient_ids, aligned.label_names, bootstrap,
                        seed), aligned


def print_report(title: str, report: list[dict], aligned: Aligned) -> None:
    print(f"{title}: {len(aligned.image_ids)} images, {len(set(aligned.patient_ids))} "
          f"{'patients' if aligned.has_patients else 'images resampled (no patient ids)'}")
    for note in aligned.notes:
        print(f"  note: {note}")
    for row in report:
        value = "    -" if row["auroc"] is None else (
            f"{row['auroc']:.4f} [{row['auroc_ci_low']:.4f}, {row['auroc_ci_high']:.4f}]")
        weighted = row.get("auroc_weighted")
        weighted = "" if weighted is None else f"  prevalence-weighted {weighted:.4f}"
        print(f"  {row['label']:<28} {value}  n+={row['n_pos']} n-={row['n_neg']}{weighted}")


def is_probability(scores: np.ndarray) -> bool:
    return bool(scores.size) and scores.min() >= 0 and scores.max() <= 1


def write_outputs(output_dir: Path, title: str, report: list[dict], aligned: Aligned) -> Path:
    """auroc.csv, roc.png, reliability.png (scores in [0, 1]) and report.html in `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(report).to_csv(output_dir / "auroc.csv", index=False)
    figures = [output_dir / "roc.png"]
    roc_curves(aligned.truth, aligned.scores, report, figures[0], title)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>{len(aligned.image_ids)} images, {len(set(aligned.patient_ids))} "
             f"{'patients' if aligned.has_patients else 'images (no patient ids: CIs resample images)'}. "
             "AUROC with 95% patient-level bootstrap intervals.</p>",
             "".join(f"<p>Note: {html.escape(note)}</p>" for note in aligned.notes),
             number_table(pd.DataFrame(report))]
    if is_probability(aligned.scores):
        figures.append(output_dir / "reliability.png")
        reliability_diagram(aligned.truth, {"scores": aligned.scores}, aligned.label_names, figures[-1], title)
        metrics = calibration.calibration_metrics(aligned.truth, aligned.scores, aligned.scores, aligned.label_names)
        parts.append("<h2>Calibration</h2>" + number_table(
            pd.DataFrame(metrics)[["label", "brier", "ece"]].rename(columns={"ece": "ECE (15 bins)"})))
    parts.append("<h2>Figures</h2>" + "".join(image_tag(path) for path in figures) + "</body></html>")
    (output_dir / "report.html").write_text("\n".join(parts))
    return output_dir / "report.html"


def result_rows(report: list[dict], split: str, source: str, model: str, computed_values: dict, run_id: str,
                identity: ModelIdentity, evaluated: str) -> list[dict]:
    """Rows for the Delta results table, under `run_id` (the training run that made the predictions, where the
    file names it) as stage `external:<evaluated file>`, so evaluating another file of the run adds rows and
    evaluating the same one again replaces them; the checkpoint's sha256 and the model URI go in model_config,
    the run's dataset version in its column. `computed_values` are metric_columns.computed()'s figures of the
    scores (none for scores that are not probabilities)."""
    created = datetime.now(timezone.utc)
    lineage = {"evaluated": evaluated, "checkpoint_sha256": identity.checkpoint_sha256, "model_uri": identity.model_uri}
    return [{"run_id": run_id, "created_at": created, "dataset": source, "model": model,
             "stage": f"external:{evaluated}", "split": split, "label": row["label"],
             **metric_columns.figures(row, computed_values=computed_values.get(row["label"])),
             "model_config": json.dumps(lineage), "dataset_version": identity.dataset_version} for row in report]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", required=True,
                        help="CSV: an image id column, then one score (probability) column per label")
    truth = parser.add_argument_group("truth: a labels file, or a split of an ETL dataset")
    truth.add_argument("--labels-csv", help="wide labels CSV (1/0, -1 and blank unknown) or NIH's Data_Entry CSV")
    parser.add_argument("--score-columns", metavar="TEMPLATE",
                        help="how score columns are named, {label} standing for the label in any spelling, e.g. "
                             "'{label}_score' or 'pred {label}'; default: whichever of "
                             f"{', '.join(label_files.KNOWN_TEMPLATES)} fits most labels (printed)")
    parser.add_argument("--score-suffix", help="same as --score-columns '{label}SUFFIX' (kept for old scripts)")
    truth.add_argument("--dataset", help="folder written by etl/preprocess.py")
    truth.add_argument("--split", default="test", choices=["train", "val", "test"], help="with --dataset")
    parser.add_argument("--bootstrap", type=int, default=1000, help="patient-level resamples for 95%% CIs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", help="write auroc.csv, roc.png, reliability.png and report.html here")
    parser.add_argument("--roc-png", help="also draw the ROC curves to this PNG")
    parser.add_argument("--results-table",
                        help="write the AUROC rows to this Delta table, under the training run the predictions file "
                             "names (training/serving/predictions.py) as stage external:<file>: a folder, or "
                             "catalog.schema.table through Spark")
    parser.add_argument("--model-name", help="name of the scored model in the Delta rows (default: the file name)")
    return parser


def score_template(args) -> str | None:
    """--score-columns, or --score-suffix X as '{label}X'; None: the known templates are tried."""
    if args.score_columns and args.score_suffix:
        raise SystemExit("give --score-columns TEMPLATE or --score-suffix SUFFIX, not both")
    if args.score_suffix:
        return label_files.LABEL_FIELD + args.score_suffix
    return args.score_columns and label_files.check_template(args.score_columns)


def named_by_label(predictions: pd.DataFrame, label_names, template: str | None) -> pd.DataFrame:
    """Predictions of a dataset split with their score columns renamed to the dataset's label names (the
    columns found under `template`, or the known template that fits most labels; printed when not bare)."""
    used, columns, _ = label_files.match_scores(predictions.columns, list(label_names), template)
    if used != label_files.LABEL_FIELD:
        print(f"note: score columns matched as {used!r} ({len(columns)} labels)")
    renamed = {column: name for name, column in columns.items() if column != name}
    return predictions.drop(columns=[name for name in renamed.values() if name in predictions.columns]).rename(
        columns=renamed)


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if bool(args.labels_csv) == bool(args.dataset):
        raise SystemExit("give the truth as --labels-csv FILE or as --dataset DIR (with --split), one of them")
    template = score_template(args)
    if args.labels_csv:
        aligned = label_files.align(args.predictions, args.labels_csv, template)
        source, split = Path(args.labels_csv).name, "labels_csv"
    else:
        dataset = versions.resolve(args.dataset).path
        aligned = from_dataset(named_by_label(pd.read_csv(args.predictions), read_dataset_spec(dataset).label_names,
                                              template), dataset, args.split)
        source, split = read_dataset_spec(dataset).dataset, args.split
    report = auroc_report(aligned.truth, aligned.scores, aligned.patient_ids, aligned.label_names, args.bootstrap,
                          args.seed)
    title = f"{Path(args.predictions).name} on {source} {split}"
    print_report(title, report, aligned)
    if args.roc_png:
        roc_curves(aligned.truth, aligned.scores, report, Path(args.roc_png), title)
    if args.output_dir:
        print(f"wrote {write_outputs(Path(args.output_dir), title, report, aligned)}")
    if args.results_table:
        computed_values = (metric_columns.computed(aligned.truth, aligned.scores, aligned.label_names)
                           if is_probability(aligned.scores) else {})
        identity = read_identity(args.predictions)
        run_id = identity.run_id or new_run_id("eval")
        if not identity.run_id:
            lacking = "names no training run" if identity.is_known() else "names no model (another tool's file?)"
            print(f"note: {args.predictions} {lacking}: its rows go under a new run id, {run_id}")
        evaluated = Path(args.predictions).name
        write_results(args.results_table, result_rows(report, split, source, args.model_name or evaluated,
                                                       computed_values, run_id, identity, evaluated))
        print(f"wrote {len(report)} rows of run {run_id} to {args.results_table}")
    return report


if __name__ == "__main__":
    main()
