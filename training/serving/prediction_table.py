"""Delta tables of prediction rows (training/serving/predictions.py's columns, with Delta-safe label names): one
row per (image_id, model_uri), written by jobs/score.py and `predict --results-table` with the engines of the
AUROC rows (training/evaluation/results.py):
- `deltalake` (delta-rs; no Delta jars): new rows are appended; where some replace rows of the same model, that
  model's rows are rewritten in one commit (every file holds one model's rows, so the predicate removes whole
  files). Not delta-rs's MERGE: with deltalake 1.6 it writes string_view Parquet that pyarrow 14 (petastorm's
  limit) cannot open. Two writers of the same model at the same time could add a row twice.
- `delta-spark` (a Spark session with Delta, as on Databricks, where the table may be a Unity Catalog name): a
  MERGE on (image_id, model_uri).
"""
from __future__ import annotations

import pandas as pd
import pyarrow as pa

from cxr_pipeline.training.evaluation.results import (delta_table, quoted, read_with_spark, refuse_catalog_name,
                                                      resolve_engine, save_delta, spark_frame, spark_session,
                                                      table_exists)
from cxr_pipeline.training.serving.predictions import ERROR_COLUMN, KEY, to_arrow

MERGE_PREDICATE = " AND ".join(f"t.{column} = s.{column}" for column in KEY)


def earlier_rows(table_uri: str, model_uri: str, engine: str, spark=None) -> pd.DataFrame:
    """image_id and error of the rows the table holds for this model (none when there is no table)."""
    if engine == "deltalake":
        import pyarrow.dataset as ds
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        refuse_catalog_name(table_uri)
        try:
            dataset = DeltaTable(table_uri).to_pyarrow_dataset()
        except TableNotFoundError:
            return pd.DataFrame({"image_id": [], ERROR_COLUMN: []})
        return dataset.to_table(filter=ds.field("model_uri") == model_uri,
                                columns=["image_id", ERROR_COLUMN]).to_pandas()
    if not table_exists(spark, table_uri):
        return pd.DataFrame({"image_id": [], ERROR_COLUMN: []})
    rows = read_with_spark(spark, table_uri).filter(f"model_uri = {quoted(model_uri)}")
    return rows.select("image_id", ERROR_COLUMN).toPandas()


def write_deltalake_rows(table_uri: str, rows: pa.Table, model_uri: str) -> None:
    """Append the rows of one model; where some replace rows the table holds for it, rewrite that model's rows
    in one commit."""
    import pyarrow.dataset as ds
    from deltalake import DeltaTable, write_deltalake
    from deltalake.exceptions import TableNotFoundError

    refuse_catalog_name(table_uri)
    new_ids = pa.array(rows.column("image_id").to_pylist(), pa.string())
    this_model = ds.field("model_uri") == model_uri
    try:
        dataset = DeltaTable(table_uri).to_pyarrow_dataset()
        replaces = dataset.count_rows(filter=this_model & ds.field("image_id").isin(new_ids)) > 0
    except TableNotFoundError:
        replaces = False
    if not replaces:
        write_deltalake(table_uri, rows, mode="append", schema_mode="merge")
        return
    earlier = dataset.to_table(filter=this_model & ~ds.field("image_id").isin(new_ids))
    kept = pa.table([earlier[field.name].cast(field.type) if field.name in earlier.column_names
                     else pa.nulls(earlier.num_rows, field.type)  # a table from before the column existed
                     for field in rows.schema], schema=rows.schema)
    write_deltalake(table_uri, pa.concat_tables([kept, rows]), mode="overwrite",
                    predicate=f"model_uri = {quoted(model_uri)}", schema_mode="merge")


def merge_spark(spark, rows, table_uri: str, replace_matched_when: str | None = None) -> None:
    """MERGE a Spark DataFrame of rows on (image_id, model_uri) through Delta on Spark, by table name or path:
    rows the table holds are replaced (where `replace_matched_when` holds, if given), new ones inserted."""
    spark.conf.set("spark.databricks.delta.schema.autoMerge.enabled", "true")  # a model with new labels or columns
    if not table_exists(spark, table_uri):
        save_delta(rows.write.format("delta").mode("errorifexists"), table_uri)
        return
    (delta_table(spark, table_uri).alias("t").merge(rows.alias("s"), MERGE_PREDICATE)
     .whenMatchedUpdateAll(condition=replace_matched_when).whenNotMatchedInsertAll().execute())


def write_predictions(table_uri: str, frame: pd.DataFrame, label_names, engine: str = "auto") -> str:
    """Write one model's prediction rows (predictions.prediction_frame) to the table, replacing the rows it
    holds for the same images and model. Returns the engine used."""
    engine = resolve_engine(engine, table_uri)
    if frame.empty:
        return engine
    (model_uri,) = set(frame["model_uri"])
    rows = to_arrow(frame.drop_duplicates(list(KEY), keep="last"), label_names, table=True)
    if engine == "deltalake":
        write_deltalake_rows(table_uri, rows, model_uri)
    else:
        spark = spark_session()
        merge_spark(spark, spark_frame(spark, rows), table_uri)
    return engine
