"""Per-label AUROC rows in a Delta table: one row per (run, stage, split, label).

Two writers, chosen by `--results-engine`:
- `deltalake` (delta-rs, default): a real Delta table (transaction log, versions, history)
  written without Spark; what runs on a laptop and in CI.
- `delta-spark`: through a Spark session that has the Delta jars, as on Databricks. Spark is
  imported only when this engine is chosen, so training never needs it otherwise.
Appends never overwrite: each write is one new table version.

The table is a Delta folder (a path), or with `delta-spark` a Unity Catalog table name
(`catalog.schema.table`), as on Databricks, where volumes hold files and tables belong in
the catalog.
"""
from __future__ import annotations

import re

import pandas as pd
import pyarrow as pa

RESULT_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")),
    ("dataset", pa.string()),
    ("image_size", pa.int32()),
    ("model", pa.string()),
    ("stage", pa.string()),
    ("split", pa.string()),
    ("label", pa.string()),
    ("auroc", pa.float64()),
    ("auroc_ci_low", pa.float64()),
    ("auroc_ci_high", pa.float64()),
    ("auroc_weighted", pa.float64()),  # label 'mean' only: the mean weighted by each label's prevalence
    ("n_pos", pa.int64()),
    ("n_neg", pa.int64()),
    # at the label's threshold chosen on validation by the run's operating-point policy
    # (training/operating_points.py); null where there is none
    ("operating_point", pa.string()),
    ("threshold", pa.float64()),
    ("accuracy", pa.float64()),
    ("precision", pa.float64()),
    ("recall", pa.float64()),
    ("specificity", pa.float64()),
    ("f1", pa.float64()),
    ("tp", pa.int64()),
    ("fp", pa.int64()),
    ("fn", pa.int64()),
    ("tn", pa.int64()),
    # of the calibrated probabilities (training/calibration.py)
    ("brier", pa.float64()),
    ("ece", pa.float64()),
    ("best_epoch", pa.int32()),
    ("world_size", pa.int32()),
    ("backend", pa.string()),
    ("data_wait_fraction", pa.float64()),
    ("run_dir", pa.string()),
    ("model_config", pa.string()),  # the model and its training options, e.g. for ensembles and the report
    # the MLflow run that logged this training run (training/tracking.py); null without MLflow and in rows
    # written before the column existed (appends merge it into older tables)
    ("mlflow_run_id", pa.string()),
])
ENGINES = ("deltalake", "delta-spark")
TABLE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*){1,2}$")  # schema.table or catalog.schema.table


def is_table_name(table_uri: str) -> bool:
    return bool(TABLE_NAME.match(table_uri))


def append_results(table_uri: str, rows: list[dict], engine: str = "deltalake") -> None:
    table = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    if engine == "deltalake":
        if is_table_name(table_uri):
            raise ValueError(f"{table_uri!r} is a catalog table name: write it with --results-engine delta-spark "
                             "(a Spark session with Delta, as on Databricks), or give a folder path (./NAME for a folder "
                             "here)")
        from deltalake import write_deltalake

        write_deltalake(table_uri, table, mode="append", schema_mode="merge")  # tables from before new columns
    elif engine == "delta-spark":
        from pyspark.sql import SparkSession

        publish(SparkSession.builder.getOrCreate(), table.to_pandas(), table_uri)  # a Delta-enabled session
    else:
        raise ValueError(f"unknown results engine {engine!r}; choose one of {ENGINES}")


def publish(spark, rows: pd.DataFrame, table_uri: str) -> None:
    """Append rows with a Delta-enabled Spark session: to a catalog table by name, else to a path."""
    writer = spark.createDataFrame(rows).write.format("delta").mode("append").option("mergeSchema", "true")
    if is_table_name(table_uri):
        writer.saveAsTable(table_uri)
    else:
        writer.save(table_uri)


def read_results(table_uri: str) -> pd.DataFrame:
    from deltalake import DeltaTable

    return DeltaTable(table_uri).to_pandas()


def latest_run(results: pd.DataFrame, run_id: str | None = None) -> pd.DataFrame:
    """Rows of `run_id`, or of the run written last."""
    if results.empty:
        return results
    if run_id is None:
        run_id = results.sort_values("created_at")["run_id"].iloc[-1]
    return results[results["run_id"] == run_id].sort_values("created_at", kind="stable")


def auroc_table(run: pd.DataFrame) -> pd.DataFrame:
    """Labels down, (stage, split) across, AUROC in the cells; rows and columns in written order."""
    rows = list(dict.fromkeys(run["label"]))
    columns = list(dict.fromkeys(zip(run["stage"], run["split"])))
    table = run.pivot_table(index="label", columns=["stage", "split"], values="auroc", aggfunc="first", dropna=False)
    return table.reindex(index=rows, columns=columns)
