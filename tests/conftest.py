"""Shared fixtures. Real data comes from ../shared/data (never copied into the repo);
tests that need it skip with the reason when it is absent."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CXR_SHARED_DATA", ROOT.parent / "shared" / "data"))
NIH = SHARED_DATA / "nih"
KERMANY = SHARED_DATA / "kermany" / "train"
CHEXPERT_TRAIN_CSV = SHARED_DATA / "chexpert" / "chexpert_train.csv.gz"
DICOM = SHARED_DATA / "dicom"
BIN = Path(sys.executable).parent

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set CXR_SHARED_DATA to the shared/data folder)")
    return path


def current(output: Path) -> Path:
    """The folder of an ETL output's current version (etl/versions.py)."""
    from cxr_pipeline.etl.versions import resolve

    return resolve(output).path


def run_cli(*args, timeout=600, env=None, check=True) -> subprocess.CompletedProcess:
    """Run a project command line as a user would; fail the test with its output on error
    (check=False: return the result of a run that is meant to fail)."""
    environment = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})}
    result = subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env=environment)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
                    f"\n--- stderr\n{result.stderr[-6000:]}")
    return result


def chexpert_table():
    """The real CheXpert train.csv (223k rows; the images are not in the shared data)."""
    import pandas as pd

    return pd.read_csv(require(CHEXPERT_TRAIN_CSV), dtype=str, keep_default_na=False)


def write_chexpert_images(root: Path, paths) -> None:
    """Small grey JPEGs at the table's paths, different per image (generated: no real pixels exist here)."""
    import numpy as np
    from PIL import Image

    for i, path in enumerate(paths):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        pixels = (np.add.outer(np.arange(48), np.arange(40)) * (i + 1) % 256).astype(np.uint8)
        Image.fromarray(pixels).save(root / path, quality=95)


def spark_etl(*args, **kwargs) -> subprocess.CompletedProcess:
    return run_cli(BIN / "spark-submit", "--master", "local[2]", "etl/preprocess.py", *args, **kwargs)


@pytest.fixture(scope="session")
def nih_dataset(tmp_path_factory) -> Path:
    """The 100 real NIH PNGs through the Spark ETL at 64 px, 8 rows per file (built once): its version folder."""
    require(NIH / "images")
    output = tmp_path_factory.mktemp("etl") / "nih_64"
    spark_etl("--source", "nih", "--data-root", NIH, "--labels-csv", NIH / "Data_Entry_sample.csv",
              "--output", output, "--size", 64, "--rows-per-file", 8)
    return current(output)


@pytest.fixture
def spark_catalog_env(tmp_path) -> dict:
    """Environment for Spark processes that share a persistent local catalog: a Hive metastore in Derby and a
    warehouse folder, set the ordinary way (spark-defaults.conf in SPARK_CONF_DIR). Names such as
    spark_catalog.cxr.auroc_results then resolve as Unity Catalog's three-level names do on Databricks."""
    folder = tmp_path / "spark-catalog"
    folder.mkdir()
    (folder / "spark-defaults.conf").write_text("\n".join([
        "spark.sql.catalogImplementation hive",
        f"spark.sql.warehouse.dir {folder / 'warehouse'}",
        f"spark.hadoop.javax.jdo.option.ConnectionURL jdbc:derby:;databaseName={folder / 'metastore_db'};create=true",
        f"spark.driver.extraJavaOptions -Dderby.system.home={folder}",
    ]) + "\n")
    return {"SPARK_CONF_DIR": str(folder)}
