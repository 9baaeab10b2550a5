"""One self-contained HTML page per run: its per-label results with confidence intervals and
operating-point metrics, its figures, and a comparison with every other run in the Delta table.

train.py writes RUN_DIR/report.html at the end of a run; rebuild one (e.g. after more runs were
added to the table) with:

    python -m training.report --table outputs/results_delta [--run-id RUN] [--output report.html]
"""
from __future__ import annotations

import argparse
import base64
import html
import json
from pathlib import Path

import pandas as pd

from cxr_pipeline.training.results import dataset_version, latest_run, read_results

DETAIL_COLUMNS = ["label", "auroc", "auroc_ci_low", "auroc_ci_high", "auroc_weighted", "n_pos", "n_neg",
                  "threshold", "accuracy", "precision", "recall", "specificity", "f1", "tp", "fp", "fn", "tn",
                  "brier", "ece"]
STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}th{background:#eee}
tr.this{background:#fff3c4}img{max-width:48%;margin:4px;border:1px solid #ddd}code{background:#f4f4f4}"""


def image_tag(path: Path) -> str:
    """The PNG inline (base64), so the page can be mailed or attached on its own."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}" title="{html.escape(path.name)}">'


COUNT_COLUMNS = {"n_pos", "n_neg", "tp", "fp", "fn", "tn", "image_size", "best_epoch", "world_size"}


def cell(column: str, value) -> str:
    if pd.isna(value):
        return ""
    if column in COUNT_COLUMNS:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def number_table(frame: pd.DataFrame, highlight: pd.Series | None = None) -> str:
    """An HTML table of `frame`; rows where `highlight` is true get class "this"."""
    marks = highlight.tolist() if highlight is not None else [False] * len(frame)
    header = "".join(f"<th>{html.escape(column)}</th>" for column in frame.columns)
    body = "".join(
        ("<tr class='this'>" if marked else "<tr>")
        + "".join(f"<td>{cell(column, value)}</td>" for column, value in zip(frame.columns, row)) + "</tr>"
        for row, marked in zip(frame.itertuples(index=False), marks))
    return f"<table><tr>{header}</tr>{body}</table>"


def with_interval(frame: pd.DataFrame, metric: str) -> pd.Series:
    """'0.912 [0.881, 0.940]' per row, from the metric and its _ci_low / _ci_high columns."""
    def text(row):
        if pd.isna(row[metric]):
            return ""
        low, high = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
        interval = "" if pd.isna(low) or pd.isna(high) else f" [{low:.3f}, {high:.3f}]"
        return f"{row[metric]:.3f}{interval}"
    return frame.apply(text, axis=1)


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
            "(training/operating_points.py) and applied unchanged to test; 95% patient-level bootstrap intervals.</p>",
            number_table(table)]


def calibration_section(run_dir: Path, stage: str) -> list[str]:
    path = run_dir / f"calibration_{stage}.csv"
    if not path.exists():
        return []
    frame = pd.read_csv(path)
    return [f"<h2>{html.escape(stage)} &mdash; calibration</h2><p>Brier score and expected calibration error "
            "(15 bins) before (raw) and after the calibration fitted on val.</p>", number_table(frame)]


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
             f"({html.escape(str(first['backend']))}), written {html.escape(str(first['created_at']))}. Outputs: <code>{html.escape(str(run_dir))}</code></p>"]
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
        parts.append(f"<h2>{title}</h2>{number_table(rows[present])}")
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


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", required=True,
                        help="the Delta results table (train.py --results-table): a folder or catalog.schema.table")
    parser.add_argument("--run-id", help="run to report (default: the run written last)")
    parser.add_argument("--output", help="HTML file to write (default: RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    results = read_results(args.table)
    run = latest_run(results, args.run_id)
    if run.empty:
        raise SystemExit(f"no rows of run {args.run_id!r} in {args.table}" if args.run_id else f"{args.table} is empty")
    output = Path(args.output) if args.output else Path(run["run_dir"].iloc[0]) / "report.html"
    path = write_report(results, output, run["run_id"].iloc[0])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
