"""HTML building blocks of the pages the project writes (the run report, evaluate's report, the sweep's
comparison): a style sheet, tables of numbers, inline images."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from cxr_pipeline.training.evaluation import metric_columns

STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}th{background:#eee}
tr.this{background:#fff3c4}img{max-width:48%;margin:4px;border:1px solid #ddd}code{background:#f4f4f4}"""


def image_tag(path: Path) -> str:
    """The PNG inline (base64), so the page can be mailed or attached on its own."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}" title="{html.escape(path.name)}">'


COUNT_COLUMNS = {*metric_columns.names("count"), "image_size", "best_epoch", "world_size"}  # no decimals


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


def intervals_folded(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with each metric that has _ci_low / _ci_high columns shown as one column, '0.912 [0.881, 0.940]':
    a third of the columns, so a table of every metric fits a page's width."""
    folded = frame.copy()
    for metric in [column for column in frame.columns
                   if f"{column}_ci_low" in frame.columns and f"{column}_ci_high" in frame.columns]:
        folded[metric] = with_interval(frame, metric)
        folded = folded.drop(columns=[f"{metric}_ci_low", f"{metric}_ci_high"])
    return folded
