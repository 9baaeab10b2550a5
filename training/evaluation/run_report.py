"""The HTML page of one training run: its per-label results with confidence intervals and operating-point
metrics, its figures, and a comparison with every other run in the Delta results table (RUN_DIR/report.html,
rebuilt with `python -m training.report`)."""
from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from cxr_pipeline.training.evaluation import metric_columns
from cxr_pipeline.training.evaluation.html_tables import (STYLE, image_tag, intervals_folded, number_table,
                                                          with_interval)
from cxr_pipeline.training.evaluation.results import dataset_version, latest_run

DETAIL_COLUMNS = ["label", *(name for name in metric_columns.names() if name != "operating_point")]


def operating_point_section(run_dir: Path, stage: str) -> list[str]:
    """Every policy's val-chosen thresholds, applied unchanged to val and test, with 95% CIs."""
    path = run_dir / f"operating_points_{stage}.csv"
    if not path.exists():
        return []
    frame = pd.read_csv(path)
    table = frame[["split", "policy", "label"]].copy()
    table["threshold"] = frame["threshold"].map(lambda v: f"{v:.4f}")
    for metric, title in (("accuracy", "accuracy"), ("recall", "sensitivity"), ("specificity", "specificity"),
                          ("precision", "precision"), ("f1", "F1")):
        table[title] = with_interval(frame, metric)
    table = table.sort_values(["split", "label"], key=lambda c: c.map({"test": 0, "val": 1}).fillna(2)
                              if c.name == "split" else c, kind="stable")
    return [f"<h2>{html.escape(stage)} &mdash; operating points</h2><p>Thresholds chosen on val by each policy "
            "(training/evaluation/operating_points.py) and applied unchanged to test; 95% patient-level bootstrap "
            "intervals.</p>",
            number_table(table)]


def calibration_section(run_dir: Path, stage: str) -> list[str]:
    path = run_dir / f"calibration_{stage}.csv"
    if not path.exists():
        return []
    frame = pd.read_csv(path)
    return [f"<h2>{html.escape(stage)} &mdash; calibration</h2><p>Brier score and expected calibration error "
            "(15 bins) before (raw) and after the calibration fitted on val. The calibrated probabilities hold "
            "val's prevalence: <code>prevalence_estimated</code> is each split's prevalence as EM estimates it from "
            "its probabilities alone (labels unseen, as <code>predict --prevalence auto</code> does), with its 95% "
            "bootstrap interval, beside the true <code>prevalence</code>; <code>brier_adjusted</code> and "
            "<code>ece_adjusted</code> are the figures after moving the probabilities to that estimate.</p>",
            number_table(intervals_folded(frame))]


def comparison(results: pd.DataFrame) -> pd.DataFrame:
    """One row per run, stage and split: mean AUROC with its CI, best first."""
    means = results[results["label"] == "mean"].copy()
    means["created_at"] = pd.to_datetime(means["created_at"]).dt.strftime("%Y-%m-%d %H:%M")
    means["dataset_version"] = [dataset_version(row) for _, row in means.iterrows()]
    columns = ["run_id", "created_at", "dataset", "dataset_version", "image_size", "model", "stage", "split", "auroc",
               "auroc_ci_low", "auroc_ci_high", "best_epoch", "world_size"]
    return means[columns].sort_values(["dataset", "split", "auroc"], ascending=[True, True, False])


def render(results: pd.DataFrame, run_id: str | None = None) -> str:
    run = latest_run(results, run_id)
    if run.empty:
        raise SystemExit("the results table has no rows" if run_id is None else f"no rows of run {run_id!r}")
    first = run.iloc[0]
    run_dir = Path(first["run_dir"])
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Run {html.escape(first['run_id'])}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>Run <code>{html.escape(first['run_id'])}</code></h1>",
             f"<p>{html.escape(str(first['model']))} on {html.escape(str(first['dataset']))} (dataset version "
             f"<code>{html.escape(dataset_version(first))}</code>) at "
             f"{int(first['image_size'])} px, {int(first['world_size'])} rank(s) "
             f"({html.escape(str(first['backend']))}), written {html.escape(str(first['created_at']))}. "
             f"Outputs: <code>{html.escape(str(run_dir))}</code></p>"]
    config = first.get("model_config")
    if isinstance(config, str) and config:
        parts.append(f"<p>Training options: <code>{html.escape(json.dumps(json.loads(config)))}</code></p>")
    chosen = run["operating_point"].dropna() if "operating_point" in run else pd.Series(dtype=str)
    policy = chosen.iloc[0] if len(chosen) else "youden"  # runs from before the policies used Youden's J
    parts.append("<p>AUROC with 95% patient-level bootstrap intervals, on calibrated probabilities. Test figures are "
                 "the result; val figures only say how the thresholds and the calibration were fitted. "
                 f"Operating-point metrics at each label's threshold chosen on val by the run's policy "
                 f"(<code>{html.escape(str(policy))}</code>); every policy is compared below.</p>")
    for (stage, split), rows in run.groupby(["stage", "split"], sort=False):
        present = [column for column in DETAIL_COLUMNS if column in rows and rows[column].notna().any()]
        epoch = rows["best_epoch"].iloc[0]
        title = f"{html.escape(stage)} &mdash; {html.escape(split)}"
        title += "" if pd.isna(epoch) else f" (best epoch {int(epoch)})"  # ensembles have none
        parts.append(f"<h2>{title}</h2>{number_table(intervals_folded(rows[present]))}")
    for stage in dict.fromkeys(run["stage"]):
        parts += operating_point_section(run_dir, stage) + calibration_section(run_dir, stage)
    figures = (sorted(run_dir.glob("roc_*.png")) + sorted(run_dir.glob("reliability_*.png"))
               + sorted(run_dir.glob("training_curves.png")))
    if figures:
        parts.append("<h2>Figures</h2>" + "".join(image_tag(path) for path in figures))
    if (run_dir / "filters" / "index.html").exists():  # python -m training.filters --output RUN_DIR/filters
        parts.append("<p><a href='filters/index.html'>Learned 3x3 kernels, layer by layer</a></p>")
    table = comparison(results)
    parts.append(f"<h2>All runs in the table ({table['run_id'].nunique()})</h2><p>Mean AUROC per run, stage and "
                 "split, best first within each dataset and split; this run highlighted.</p>"
                 + number_table(table, table["run_id"] == first["run_id"]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(results: pd.DataFrame, output: Path, run_id: str | None = None) -> Path:
    output.write_text(render(results, run_id))
    return output
