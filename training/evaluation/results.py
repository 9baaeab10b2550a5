"""Per-label AUROC rows in a Delta table: one row per (run, stage, split, label).

Two engines write and read the same table (same schema, same transaction log), chosen by `--results-engine`:
- `deltalake` (delta-rs): a Delta table without Spark; what a laptop, CI and horovodrun use.
- `delta-spark`: through a Spark session with the Delta jars, as on Databricks, where the table may be a Unity
  Catalog name (`catalog.schema.table`). Spark is imported only when this engine is chosen.
- `auto` (default): delta-spark for a catalog table name, on a Databricks runtime, or where this process
  already runs a Spark session with Delta; delta-rs elsewhere.

A write replaces the rows of the same (run_id, stage) pairs, if the table has any, else appends: a retried job
that reports a stage again leaves one set of rows, and distinct runs never touch each other's rows. Each write
is one table version. Every training run also keeps its own rows in RUN_DIR/auroc_rows.parquet (plain
Parquet): what a job's driver publishes when the training processes run where no table can be written.
"""
from __future__ import annotations

import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxr_pipeline.etl.sessions import on_databricks, session_builder
from cxr_pipeline.training.evaluation.metric_columns import METRICS

RESULT_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")),
    ("dataset", pa.string()),
    ("image_size", pa.int32()),
    ("model", pa.string()),
    ("stage", pa.string()),
    ("split", pa.string()),
    ("label", pa.string()),
    *((metric.name, metric.arrow_type) for metric in METRICS),  # training/evaluation/metric_columns.py
    ("best_epoch", pa.int32()),
    ("world_size", pa.int32()),
    ("backend", pa.string()),
    ("data_wait_fraction", pa.float64()),
    ("run_dir", pa.string()),
    ("model_config", pa.string()),  # the model and its training options, e.g. for ensembles and the report
    # the MLflow run that logged this training run (training/serving/tracking.py); null without MLflow and in rows
    # written before the column existed (appends merge it into older tables)
    ("mlflow_run_id", pa.string()),
    # the ETL version the run read (etl/versions.py); null for a plain dataset folder and in older rows
    ("dataset_version", pa.string()),
])
ENGINES = ("auto", "deltalake", "delta-spark")
NO_TABLE = "none"  # train.py --results-table none: the rows stay in RUN_DIR/auroc_rows.parquet
RUN_ROWS = "auroc_rows.parquet"
TABLE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*){1,2}$")  # schema.table or catalog.schema.table
SPARK_TYPES = {pa.string(): "string", pa.timestamp("us", tz="UTC"): "timestamp", pa.int32(): "int",
               pa.int64(): "bigint", pa.float64(): "double", pa.bool_(): "boolean"}


def spark_ddl(schema: pa.Schema, without: tuple = ()) -> str:
    """An Arrow schema as Spark DDL (`name` type, ...), less the columns `without`."""
    return ", ".join(f"`{field.name}` {SPARK_TYPES[field.type]}" for field in schema if field.name not in without)


def spark_frame(spark, table: pa.Table):
    """An Arrow table as a Spark DataFrame of the same columns and types. Python values, not pandas: a null int
    column would become NaN floats that Spark's int columns refuse."""
    return spark.createDataFrame([tuple(row.values()) for row in table.to_pylist()], schema=spark_ddl(table.schema))


def add_engine_argument(parser, flag: str = "--results-engine") -> None:
    """The option that chooses how a command writes and reads its Delta table (`resolve_engine`)."""
    parser.add_argument(flag, choices=ENGINES, default="auto",
                        help="auto (default): delta-spark for a catalog table name, on Databricks or inside a Spark "
                             "session with Delta, else deltalake (delta-rs, no Spark); or name one")


def is_table_name(table_uri: str) -> bool:
    return bool(TABLE_NAME.match(table_uri))


def active_delta_session():
    """This process's Spark session if it has Delta's SQL extension (never imports Spark itself)."""
    if "pyspark" not in sys.modules:
        return None
    from pyspark.sql import SparkSession

    spark = SparkSession.getActiveSession()
    if spark is None or "DeltaSparkSessionExtension" not in spark.conf.get("spark.sql.extensions", ""):
        return None
    return spark


def resolve_engine(engine: str, table_uri: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"unknown results engine {engine!r}; choose one of {ENGINES}")
    if engine != "auto":
        return engine
    if is_table_name(table_uri) or on_databricks() or active_delta_session() is not None:
        return "delta-spark"
    return "deltalake"


def spark_session():
    """The active Delta-enabled session, else one started for the results (etl/sessions.py)."""
    return active_delta_session() or session_builder("cxr-results", delta=True).getOrCreate()


def quoted(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def run_stages(rows: pa.Table) -> list[tuple[str, str | None]]:
    """The (run_id, stage) pairs of the rows: what a write replaces."""
    return sorted(set(zip(rows.column("run_id").to_pylist(), rows.column("stage").to_pylist())), key=str)


def replaced_rows_predicate(rows: pa.Table) -> str:
    """SQL that matches the table rows these rows replace."""
    return " OR ".join(f"(run_id = {quoted(run)} AND stage " + ("IS NULL)" if stage is None else f"= {quoted(stage)})")
                       for run, stage in run_stages(rows))


def write_results(table_uri: str, rows: list[dict] | pd.DataFrame, engine: str = "auto") -> str:
    """Write rows to the table: replacing the rows of the same (run_id, stage) pairs where the table has
    some, else appending. Returns the engine used."""
    if isinstance(rows, pd.DataFrame):
        rows = rows.astype(object).where(rows.notna(), None).to_dict("records")
    table = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    predicate = replaced_rows_predicate(table)
    engine = resolve_engine(engine, table_uri)
    if engine == "deltalake":
        write_with_deltalake(table_uri, table, predicate)
    else:
        write_with_spark(spark_session(), table_uri, table, predicate)
    return engine


def refuse_catalog_name(table_uri: str, engine_flag: str = "the engine") -> None:
    """delta-rs writes folders only: a catalog table name is refused before anything is written, saying what to
    do. The results, prediction and monitor tables' delta-rs writers all call it."""
    if is_table_name(table_uri):
        raise ValueError(f"{table_uri!r} is a catalog table name: write it with {engine_flag} delta-spark or auto (a "
                         "Spark session with Delta, as on Databricks), or give a folder path (./NAME for a folder "
                         "here)")


def write_with_deltalake(table_uri: str, table: pa.Table, predicate: str) -> None:
    refuse_catalog_name(table_uri, "--results-engine")
    from deltalake import DeltaTable, write_deltalake
    from deltalake.exceptions import TableNotFoundError

    try:
        replaces = DeltaTable(table_uri).to_pyarrow_dataset().to_table(
            columns=["run_id", "stage"], filter=pc_predicate(table)).num_rows > 0
    except TableNotFoundError:
        replaces = False
    if replaces:  # schema_mode merge: tables from before a column was added
        write_deltalake(table_uri, table, mode="overwrite", predicate=predicate, schema_mode="merge")
    else:
        write_deltalake(table_uri, table, mode="append", schema_mode="merge")


def pc_predicate(table: pa.Table):
    """replaced_rows_predicate as a pyarrow expression."""
    import pyarrow.dataset as ds

    expression = None
    for run, stage in run_stages(table):
        same_stage = ds.field("stage").is_null() if stage is None else ds.field("stage") == stage
        pair = (ds.field("run_id") == run) & same_stage
        expression = pair if expression is None else expression | pair
    return expression


def write_with_spark(spark, table_uri: str, table: pa.Table, predicate: str) -> None:
    """Through Delta on Spark: a catalog table by name (created on first write), else a Delta folder."""
    frame = spark_frame(spark, table)
    replaces = table_exists(spark, table_uri) and read_with_spark(spark, table_uri).where(predicate).limit(1).count()
    writer = frame.write.format("delta").option("mergeSchema", "true")
    save_delta(writer.mode("overwrite").option("replaceWhere", predicate) if replaces else writer.mode("append"),
               table_uri)


# Delta on Spark by catalog table name or by path: what the results writer and jobs/score.py share.
def save_delta(writer, table_uri: str) -> None:
    if is_table_name(table_uri):
        writer.saveAsTable(table_uri)
    else:
        writer.save(table_uri)


def delta_table(spark, table_uri: str):
    from delta.tables import DeltaTable

    return DeltaTable.forName(spark, table_uri) if is_table_name(table_uri) else DeltaTable.forPath(spark, table_uri)


def table_exists(spark, table_uri: str) -> bool:
    from delta.tables import DeltaTable

    if is_table_name(table_uri):
        return spark.catalog.tableExists(table_uri)
    return DeltaTable.isDeltaTable(spark, table_uri)


def read_with_spark(spark, table_uri: str):
    return spark.read.table(table_uri) if is_table_name(table_uri) else spark.read.format("delta").load(table_uri)


def read_results(table_uri: str, engine: str = "auto") -> pd.DataFrame:
    if resolve_engine(engine, table_uri) == "deltalake":
        from deltalake import DeltaTable

        return DeltaTable(table_uri).to_pandas()
    # Spark hands timestamps over in the session's time zone: as microseconds since the epoch they stay UTC
    rows = read_with_spark(spark_session(), table_uri).selectExpr("*", "unix_micros(created_at) AS created_us")
    frame = rows.drop("created_at").toPandas()
    frame["created_at"] = pd.to_datetime(frame.pop("created_us"), unit="us", utc=True)
    return frame[[name for name in RESULT_SCHEMA.names if name in frame] +
                 [name for name in frame if name not in RESULT_SCHEMA.names]]


def table_history(table_uri: str, engine: str = "auto") -> list[tuple[int, str, datetime]]:
    """(version, operation, commit time in UTC) of every version of the table, oldest first."""
    if resolve_engine(engine, table_uri) == "deltalake":
        from deltalake import DeltaTable

        entries = [(entry["version"], entry["operation"],
                    datetime.fromtimestamp(entry["timestamp"] / 1000, timezone.utc))
                   for entry in DeltaTable(table_uri).history()]
    else:
        history = delta_table(spark_session(), table_uri).history()
        history = history.selectExpr("version", "operation", "unix_micros(timestamp) AS micros").collect()
        entries = [(row.version, row.operation, datetime.fromtimestamp(row.micros / 1e6, timezone.utc))
                   for row in history]
    return sorted(entries)


def save_run_rows(run_dir: Path, rows: list[dict]) -> Path:
    """RUN_DIR/auroc_rows.parquet: the run's rows so far, these replacing any of the same (run_id, stage)."""
    path = run_dir / RUN_ROWS
    new = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    if path.exists():
        kept = pq.read_table(path, schema=RESULT_SCHEMA).filter(~pc_predicate(new))
        new = pa.concat_tables([kept, new])
    staging = path.with_name(f".{path.name}.tmp")
    pq.write_table(new, staging)
    staging.replace(path)  # readers see the old file or the new one, never half of one
    return path


def read_run_rows(run_dir: Path) -> pd.DataFrame:
    """The rows of RUN_DIR/auroc_rows.parquet (empty when the run wrote none)."""
    path = Path(run_dir) / RUN_ROWS
    return pq.read_table(path, schema=RESULT_SCHEMA).to_pandas() if path.exists() else pd.DataFrame()


def dataset_version(row) -> str:
    """A result row's dataset version as people read it: rows of plain folders and from before versions say so."""
    version = row.get("dataset_version")
    return version if isinstance(version, str) and version else "none (plain folder or older row)"


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
