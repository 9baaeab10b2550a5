"""The one layout of prediction rows: training's predictions_<stage>_<split>.csv, `predict --output` and
`--results-table`, the MLflow model's output and jobs/score.py's Delta table all hold these columns, in
this order, so any of them says which model made it:

- `image_id`, `path`: the image (rows of an ETL dataset: `<split>/<image_id>`; bytes have no path);
- `<label>`: the calibrated probability of each label, empty where the image could not be scored;
- `<label>_positive`: 1/0 at the run's operating point, empty without a threshold or a score;
- `error`: why the image could not be scored, else empty;
- `prevalence`: the prevalence the probabilities were adjusted to (`predict --prevalence`, the MLflow model's
  `prevalence` param), a JSON object of label -> prevalence, the same on every row of a run; empty when they were
  not adjusted (they hold val's prevalence, the checkpoint's `val_prevalence`);
- the model's identity, the same on every row: `checkpoint_sha256` (the sha256 checkpoints.save wrote beside
  the checkpoint), `model_uri` (where the model was loaded from: the checkpoint's path, or the MLflow URI
  pinned to a version), `run_id` (the training run, whose RUN_DIR/config.yaml and Delta rows say how it was
  made) and `dataset_version` (the ETL version it trained on; empty for a plain folder);
- `scored_at` (UTC).

Files name the label columns as the labels; a Delta table names them `table_column(label)`, since Delta refuses
spaces and punctuation in column names (CheXpert's `No Finding` becomes `No_Finding`). training.evaluate reads
every one of these files (training/evaluation/label_files.py skips the columns that are not scores).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from cxr_pipeline.training.evaluation.results import spark_ddl

ERROR_COLUMN = "error"
PREVALENCE_COLUMN = "prevalence"
DECISION_SUFFIX = "_positive"
IDENTITY_COLUMNS = ("checkpoint_sha256", "model_uri", "run_id", "dataset_version")
SCORED_AT = "scored_at"
KEY = ("image_id", "model_uri")  # one row per image and model in a Delta table of predictions


@dataclass(frozen=True)
class ModelIdentity:
    """Which model made a set of predictions; any part may be unknown (None)."""

    checkpoint_sha256: str | None = None
    model_uri: str | None = None
    run_id: str | None = None
    dataset_version: str | None = None

    def is_known(self) -> bool:
        return any(asdict(self).values())


def decision_column(label: str) -> str:
    return f"{label}{DECISION_SUFFIX}"


def table_column(label: str) -> str:
    return re.sub(r"\W", "_", label, flags=re.ASCII)


def label_columns(label_names, table: bool = False) -> list[str]:
    """The probability column of each label, in a file or (`table`) in a Delta table."""
    names = [table_column(label) if table else label for label in label_names]
    if len(set(names)) != len(names):
        raise SystemExit(f"labels {list(label_names)} give clashing column names {names}")
    return names


def columns(label_names, table: bool = False) -> list[str]:
    labels = label_columns(label_names, table)
    return ["image_id", "path", *labels, *map(decision_column, labels), ERROR_COLUMN, PREVALENCE_COLUMN,
            *IDENTITY_COLUMNS, SCORED_AT]


def table_names(label_names) -> dict[str, str]:
    """File column -> Delta table column."""
    return dict(zip(columns(label_names), columns(label_names, table=True)))


def arrow_schema(label_names, table: bool = False) -> pa.Schema:
    labels = label_columns(label_names, table)
    return pa.schema([("image_id", pa.string()), ("path", pa.string()), *((name, pa.float64()) for name in labels),
                      *((decision_column(name), pa.int32()) for name in labels), (ERROR_COLUMN, pa.string()),
                      (PREVALENCE_COLUMN, pa.string()),
                      *((name, pa.string()) for name in IDENTITY_COLUMNS), (SCORED_AT, pa.timestamp("us", tz="UTC"))])


def spark_schema(label_names, without: tuple = ()) -> str:
    """The table's columns as Spark DDL, less those `without`."""
    return spark_ddl(arrow_schema(label_names, table=True), without)


def decide(probabilities: np.ndarray, thresholds) -> np.ndarray:
    """(N, L) 1/0 at the per-label `thresholds`; NaN where a label has no threshold (None) or an image no score."""
    limits = np.array([np.nan if t is None else t for t in thresholds or [None] * probabilities.shape[1]],
                      dtype=np.float64)
    decided = (probabilities >= limits).astype(np.float64)
    return np.where(np.isnan(limits) | np.isnan(probabilities), np.nan, decided)


def prediction_frame(label_names, image_ids, paths, probabilities: np.ndarray, decisions: np.ndarray, errors,
                     identity: ModelIdentity, scored_at: datetime | None = None, prevalence: str = "") -> pd.DataFrame:
    """The rows: `probabilities` and `decisions` (N, L) with NaN where there are none, `errors` "" for the
    images scored, `prevalence` the PREVALENCE_COLUMN of every row ("" when not adjusted)."""
    labels, count = list(label_names), len(image_ids)
    frame = {"image_id": pd.Series(image_ids, dtype=object), "path": pd.Series(paths, dtype=object)}
    frame.update(zip(labels, np.asarray(probabilities, dtype=np.float64).T))
    frame.update((decision_column(label), pd.array(values, dtype="Float64").astype("Int32"))
                 for label, values in zip(labels, np.asarray(decisions, dtype=np.float64).T))
    frame[ERROR_COLUMN] = pd.Series(errors, dtype=object)
    frame[PREVALENCE_COLUMN] = pd.Series([prevalence] * count, dtype=object)
    frame.update((name, pd.Series([value] * count, dtype=object)) for name, value in asdict(identity).items())
    frame[SCORED_AT] = pd.Series([pd.Timestamp(scored_at or datetime.now(timezone.utc))] * count,
                                 dtype="datetime64[us, UTC]")
    return pd.DataFrame(frame, columns=columns(labels))


def to_arrow(frame: pd.DataFrame, label_names, table: bool = False) -> pa.Table:
    """The rows as Arrow, with the schema's types; `table`: with the Delta table's column names."""
    schema = arrow_schema(label_names, table)
    renamed = frame.rename(columns=table_names(label_names)) if table else frame
    renamed = renamed.assign(**{name: renamed[name].astype("Int32") for name in schema.names
                                if schema.field(name).type == pa.int32()})
    return pa.Table.from_pandas(renamed[schema.names], schema=schema, preserve_index=False)


def write_predictions_csv(frame: pd.DataFrame, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, float_format="%.6f")


def read_identity(path) -> ModelIdentity:
    """The identity a predictions CSV carries (all None for another tool's file, which has none)."""
    frame = pd.read_csv(path, usecols=lambda name: name in IDENTITY_COLUMNS, dtype=str, keep_default_na=False)
    values = {}
    for name in frame.columns:
        found = sorted(set(frame[name]) - {""})
        if len(found) > 1:
            raise SystemExit(f"{path} holds the predictions of {len(found)} models ({name}: {', '.join(found[:3])}): "
                             "evaluate each model's file on its own")
        values[name] = found[0] if found else None
    return ModelIdentity(**values)
