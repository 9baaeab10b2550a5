"""The Spark session of a command: under spark-submit or on Databricks it is theirs; run as a plain Python
command (`cxr-etl`, `cxr-score`, tests) it starts one, at `--master` or else local[*]."""
from __future__ import annotations

import os
import sys


def session_builder(app_name: str, master: str | None = None):
    from pyspark.sql import SparkSession

    # Python workers must run this interpreter (the venv's), not whatever `python3` is on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master:
        return builder.master(master)
    if "PYSPARK_GATEWAY_PORT" not in os.environ and "DATABRICKS_RUNTIME_VERSION" not in os.environ:
        return builder.master("local[*]")
    return builder
