"""jobs/score.py's executors: mapInPandas batches of (image_id, path, input) scored by the logged model, loaded
once per Python worker, into the scores table's rows. Image files are read here and given to the model as
bytes (the model reads no paths); a batch that fails is retried row by row so one bad image never fails the
job."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cxr_pipeline.schema import DatasetSpec
from cxr_pipeline.training.serving.predictions import (ERROR_COLUMN, IDENTITY_COLUMNS, PREVALENCE_COLUMN, SCORED_AT,
                                                       columns, decision_column, label_columns, table_names)

SCORING_FAILED = "scoring_failed"


def predict_or_explain(model, frame: pd.DataFrame, batch_size: int) -> pd.DataFrame:
    """model.predict on a batch; if the batch fails as a whole, row by row, a row that still fails getting
    its reason in `error`: a bad image must never fail the job."""
    try:
        return model.predict(frame, params={"batch_size": batch_size})
    except Exception:  # noqa: BLE001 - retried row by row below, where each failure is reported
        rows = []
        for index in range(len(frame)):
            try:
                rows.append(model.predict(frame.iloc[index:index + 1], params={"batch_size": 1}))
            except Exception as exc:  # noqa: BLE001
                rows.append(pd.DataFrame({ERROR_COLUMN: [f"{SCORING_FAILED}: {type(exc).__name__}: {exc}"]},
                                         index=frame.index[index:index + 1]))
        return pd.concat(rows)


def table_rows(scored: pd.DataFrame, batch: pd.DataFrame, model_uri: str, label_names) -> pd.DataFrame:
    """The model's output for a batch of (image_id, path, input) as table rows, less scored_at (one per job): the
    batch's ids and paths, the pinned model URI, the table's column names."""
    names = [name for name in columns(label_names, table=True) if name != SCORED_AT]
    # a row that failed as a whole (predict_or_explain) has only its error
    rows = scored.rename(columns=table_names(label_names)).reindex(columns=names)
    rows["image_id"], rows["path"] = batch["image_id"].to_numpy(), batch["path"].to_numpy()
    rows["model_uri"] = model_uri
    for name in map(decision_column, label_columns(label_names, table=True)):
        rows[name] = rows[name].astype("Int32")
    rows[[ERROR_COLUMN, PREVALENCE_COLUMN]] = rows[[ERROR_COLUMN, PREVALENCE_COLUMN]].fillna("")
    rows[list(IDENTITY_COLUMNS)] = rows[list(IDENTITY_COLUMNS)].astype(object).where(rows[list(IDENTITY_COLUMNS)]
                                                                                     .notna(), None)
    return rows


def model_input(batch: pd.DataFrame, input_column: str) -> tuple[pd.DataFrame, pd.Series]:
    """What the model scores for a batch, and each row's read error ("" where none). ETL pixels go as they are.
    Image files (`path`) are read here, on the executor (this job is trusted with the paths it lists; the model
    reads no paths, training/serving/mlflow_model.py) and go as their bytes (`content`); a file that cannot be
    read goes as nothing, with training.predict's reason (scorer.read_image: image_missing, unreadable_file)."""
    if input_column != "path":
        return batch[[input_column]], pd.Series("", index=batch.index, dtype=object)
    from cxr_pipeline.etl.images import ImageError
    from cxr_pipeline.training.serving.mlflow_model import CONTENT_COLUMN
    from cxr_pipeline.training.serving.scorer import read_image

    contents, errors = [], []
    for path in batch["path"]:
        try:
            contents.append(read_image(Path(path)))
            errors.append("")
        except ImageError as exc:
            contents.append(None)
            errors.append(str(exc))
    return (pd.DataFrame({CONTENT_COLUMN: contents}, index=batch.index),
            pd.Series(errors, index=batch.index, dtype=object))


def partition_scorer(model_folder_name: str, model_uri: str, input_column: str, spec: DatasetSpec, batch_size: int):
    """The function mapInPandas runs: (image_id, path, input) batches -> table rows (without scored_at); image
    files are read here and scored as bytes (model_input)."""
    def score(batches):
        from pyspark import SparkFiles

        from cxr_pipeline.training.serving.mlflow_model import cached_model

        model = cached_model(SparkFiles.get(model_folder_name))  # once per Python worker
        for batch in batches:
            frame, unread = model_input(batch, input_column)
            scored = predict_or_explain(model, frame, batch_size)
            # an unread file's row: the model saw no input; the reason is the read's
            scored[ERROR_COLUMN] = scored[ERROR_COLUMN].where(unread == "", unread)
            yield table_rows(scored, batch, model_uri, spec.label_names)
    return score
