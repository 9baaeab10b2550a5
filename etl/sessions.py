"""The Spark session of a command: under spark-submit or on Databricks it is theirs; run as a plain Python
command (`cxr-etl`, `cxr-score`, tests) it starts one, at `--master` or else local[*].

Delta: a Databricks runtime has it built in. Elsewhere the installer puts the jars of the pinned delta-spark
release on pyspark's classpath (install/delta_jars.sh), and `delta=True` turns on Delta's SQL extension and
catalog; where the jars are not there (a plain `pip install`), the session asks Spark to fetch the matching
release from Maven at start, as delta-spark's `configure_spark_with_delta_pip` does.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

DELTA_CONF = {"spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
              "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog"}


def on_databricks() -> bool:
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def session_builder(app_name: str, master: str | None = None, delta: bool = False):
    from pyspark.sql import SparkSession

    # Python workers must run this interpreter (the venv's), not whatever `python3` is on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if not master and "PYSPARK_GATEWAY_PORT" not in os.environ and not on_databricks():
        master = "local[*]"
    if delta and not on_databricks():
        builder = with_delta(builder)
        if master and master.startswith("local"):
            # Rebuilding a table's state runs spark.databricks.delta.snapshotPartitions tasks (50 by default,
            # sized for clusters); on one machine a few do the same work without 50 task launches per read.
            builder = builder.config("spark.databricks.delta.snapshotPartitions", "4")
    return builder.master(master) if master else builder


def delta_jars() -> list[Path]:
    """The Delta jars on this Spark's classpath (pyspark's jars/, or $SPARK_HOME/jars)."""
    import pyspark

    home = Path(os.environ.get("SPARK_HOME") or Path(pyspark.__file__).parent)
    return sorted((home / "jars").glob("delta-spark_*.jar"))


def with_delta(builder):
    for key, value in DELTA_CONF.items():
        builder = builder.config(key, value)
    if not delta_jars():
        from delta import pip_utils

        return pip_utils.configure_spark_with_delta_pip(builder)
    return builder
