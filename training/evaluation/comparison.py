"""A sweep's comparison: one row per model, image size and stage, built from each run's own outputs (its AUROC
rows and summary.csv), as a table (comparison.csv) and as one self-contained HTML page (comparison.html).

Test mean AUROC with its 95% patient-level bootstrap CI is the result; val mean AUROC is labelled val, since it
chose the best epoch and fitted the calibration.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cxr_pipeline.training.evaluation import metric_columns
from cxr_pipeline.training.evaluation.html_tables import STYLE, number_table, with_interval
from cxr_pipeline.training.evaluation.results import read_run_rows

if TYPE_CHECKING:
    from cxr_pipeline.training.loop.grid import Cell, Outcome

# the figures of a stage's test 'mean' row (training/evaluation/metric_columns.py), as test_mean_<figure>
TEST_MEAN_FIGURES = metric_columns.mean_figures()
# the table's columns: these, then test_auroc_<label> per label, then where each run's files are
LEADING_COLUMNS = ["sweep_id", "model", "image_size", "stage", "run_id", "status",
                   *(f"test_mean_{figure}" for figure in TEST_MEAN_FIGURES), "val_mean_auroc", "best_epoch",
                   "epochs", "train_images_per_s", "run_wall_s"]
TRAILING_COLUMNS = ["run_dir", "log", "error"]


def stage_rows(rows: pd.DataFrame, stage: str) -> pd.DataFrame:
    """The stage's rows (a retried run replaces its earlier rows of a stage, never adds a second set)."""
    return rows if rows.empty else rows[rows["stage"] == stage]


def training_speed(run_dir: Path, stage: str) -> tuple[int | None, float | None]:
    """(epochs trained, mean training images/s) of a stage, from RUN_DIR/summary.csv (last attempt per epoch)."""
    path = run_dir / "summary.csv"
    if not path.exists():
        return None, None
    epochs = pd.read_csv(path)
    epochs = epochs[epochs["stage"] == stage].drop_duplicates("epoch", keep="last")
    return (len(epochs), float(epochs["images_per_second"].mean())) if len(epochs) else (None, None)


def stage_metrics(found: pd.DataFrame) -> dict:
    """Test and val mean AUROC and per-label test AUROC from one stage's rows."""
    if found.empty:
        return {}
    mean = found[found["label"] == "mean"].set_index("split")
    test = found[(found["split"] == "test") & (found["label"] != "mean")]
    metrics = {"best_epoch": found["best_epoch"].iloc[0]}
    if "test" in mean.index:
        metrics.update({f"test_mean_{figure}": mean.loc["test", figure] for figure in TEST_MEAN_FIGURES})
    if "val" in mean.index:
        metrics["val_mean_auroc"] = mean.loc["val", "auroc"]
    return {**metrics, **{f"test_auroc_{label}": auroc for label, auroc in zip(test["label"], test["auroc"])}}


def compare(cells: list[Cell], stages: list[str], outcomes: dict[str, Outcome], sweep_id: str) -> pd.DataFrame:
    """One row per model, size and stage, in grid order; test figures first, val labelled as val. `outcomes`
    (by run id) holds the runs trained here; without one a cell's status comes from its rows alone."""
    records = []
    for cell in cells:
        rows, outcome = read_run_rows(cell.run_dir), outcomes.get(cell.run_id)
        for stage in stages:
            found = stage_rows(rows, stage)
            epochs, images_per_s = training_speed(cell.run_dir, stage)
            status = outcome.status if outcome and outcome.returncode != 0 else "no results" if found.empty else "ok"
            records.append({"sweep_id": sweep_id, "model": cell.model, "image_size": cell.size, "stage": stage,
                            "run_id": cell.run_id, "status": status, **stage_metrics(found), "epochs": epochs,
                            "train_images_per_s": images_per_s, "run_wall_s": outcome.wall_s if outcome else None,
                            "run_dir": str(cell.run_dir),
                            "log": str(cell.log_path) if cell.log_path.exists() else "",
                            "error": outcome.error if outcome else ""})
    table = pd.DataFrame(records)
    labels = [column for column in table if column.startswith("test_auroc_")]
    table = table.reindex(columns=[*LEADING_COLUMNS, *labels, *TRAILING_COLUMNS])
    return table.astype({"best_epoch": "Int64", "epochs": "Int64"})


def render(table: pd.DataFrame, sweep_id: str, sweep_dir: Path) -> str:
    """The comparison as one self-contained page: mean AUROC per cell and stage, per-label test AUROC, the runs
    (links relative to `sweep_dir`, where the page is written)."""
    means = table[["model", "image_size", "stage"]].copy()
    means["test mean AUROC [95% CI]"] = with_interval(table, "test_mean_auroc")
    means["val mean AUROC (val)"] = table["val_mean_auroc"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    means["best epoch"], means["epochs"] = table["best_epoch"], table["epochs"]
    means["train images/s"] = table["train_images_per_s"].map(lambda v: "" if pd.isna(v) else f"{v:.1f}")
    means["run wall time (s, all stages)"] = table["run_wall_s"].map(lambda v: "" if pd.isna(v) else f"{v:.0f}")
    means["status"] = table["status"]
    label_columns = [column for column in table if column.startswith("test_auroc_")]
    per_label = table.set_index(table["model"] + " " + table["image_size"].astype(str) + "px " + table["stage"])
    per_label = per_label[label_columns].T.rename(index=lambda column: column.removeprefix("test_auroc_"))
    runs = []
    for _, run in table.drop_duplicates("run_id").iterrows():
        report = Path(run["run_dir"]) / "report.html"
        link = (f" <a href='{html.escape(os.path.relpath(report, sweep_dir))}'>report</a>" if report.exists() else "")
        failure = f": {html.escape(run['error'])}" if run["error"] else ""
        log_text = f", log <code>{html.escape(run['log'])}</code>" if run["log"] else ""
        runs.append(f"<li><code>{html.escape(run['run_id'])}</code> {html.escape(run['status'])}{failure}{link}"
                    f"{log_text}</li>")
    return "\n".join([
        f"<!doctype html><html><head><meta charset='utf-8'><title>Sweep {html.escape(sweep_id)}</title>"
        f"<style>{STYLE}</style></head><body><h1>Sweep <code>{html.escape(sweep_id)}</code></h1>",
        "<p>Mean AUROC over the labels on the test split, with 95% patient-level bootstrap intervals, is the result. "
        "The val figure is labelled val: it chose each stage's best epoch and fitted the calibration, so it is not "
        "an estimate of performance on new patients. Images/s: training throughput, mean over the stage's epochs.</p>",
        number_table(means),
        "<h2>Per-label test AUROC</h2>", number_table(per_label.rename_axis("label").reset_index()),
        f"<h2>Runs ({table['run_id'].nunique()})</h2><ul>{''.join(runs)}</ul></body></html>"])


def summary_lines(table: pd.DataFrame) -> list[str]:
    """The comparison as text, one line per row: the test result with its CI, val labelled as val, the status."""
    lines = []
    for row, result in zip(table.itertuples(), with_interval(table, "test_mean_auroc")):
        val = "" if pd.isna(row.val_mean_auroc) else f" (val {row.val_mean_auroc:.3f})"
        lines.append(f"{row.model} {row.image_size}px {row.stage}: test mean AUROC {result or 'n/a'}{val}, "
                     f"{row.status}")
    return lines
