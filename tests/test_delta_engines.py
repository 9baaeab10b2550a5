"""Delta through Spark for real: the delta-spark engine (the Delta jars install/delta_jars.sh put on pyspark's
classpath) and delta-rs write the same AUROC table, each reads what the other wrote, a retried run's rows replace
its earlier ones in either, and catalog table names work against a local Hive metastore (Derby), which stands in
for Unity Catalog's catalog.schema.table here. Spark runs in subprocesses, as the commands do."""
import json
import textwrap

import pandas as pd
import pytest
from deltalake import DeltaTable

from conftest import BIN, ROOT, run_cli
from cxr_pipeline.training.evaluation.results import read_results, table_history, write_results

LABELS = ("Atelectasis", "Effusion", "mean")


def sample_rows(run_id: str, stage: str, auroc: float) -> list[dict]:
    """Rows shaped like a training run's: val and test, per label and the mean, some columns left null."""
    created = pd.Timestamp("2026-12-01 10:00", tz="UTC") + pd.Timedelta(minutes=len(stage))
    return [{"run_id": run_id, "created_at": created, "dataset": "nih", "image_size": 64, "model": "small_cnn",
             "stage": stage, "split": split, "label": label, "auroc": auroc + index / 100,
             "auroc_ci_low": auroc - 0.1, "auroc_ci_high": min(1.0, auroc + 0.1),
             "auroc_weighted": auroc if label == "mean" else None, "n_pos": 3 + index, "n_neg": 20,
             "operating_point": None if label == "mean" else "sens>=0.95",
             "threshold": None if label == "mean" else 0.4,
             "tp": None if label == "mean" else 3, "best_epoch": 2, "world_size": 2, "backend": "torch",
             "run_dir": f"/runs/{run_id}", "model_config": json.dumps({"model": "small_cnn"}), "mlflow_run_id": None}
            for split in ("val", "test") for index, label in enumerate(LABELS)]


# A run's kt rows, the same stage reported again by a retry, then its finetune rows: three table versions.
WRITES = [("run-1", "kt", 0.60), ("run-1", "kt", 0.70), ("run-1", "finetune", 0.80)]


def spark_python(code: str, env=None, timeout=600):
    """Run Python that uses Spark in its own process (a fresh JVM, as every command gets)."""
    prelude = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
    return run_cli(BIN / "python", "-c", prelude + textwrap.dedent(code), env=env, timeout=timeout)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """The same three writes through each engine, and each engine's reading of the other's table."""
    folder = tmp_path_factory.mktemp("engines")
    by_rs, by_spark = folder / "by_deltalake", folder / "by_spark"
    for run_id, stage, auroc in WRITES:
        assert write_results(str(by_rs), sample_rows(run_id, stage, auroc), "deltalake") == "deltalake"
    spark_python(f"""
        from test_delta_engines import WRITES, sample_rows
        from cxr_pipeline.training.evaluation.results import read_results, write_results
        for run_id, stage, auroc in WRITES:
            assert write_results({str(by_spark)!r}, sample_rows(run_id, stage, auroc), "delta-spark") == "delta-spark"
        read_results({str(by_rs)!r}, "delta-spark").to_parquet({str(folder / "rs_read_by_spark.parquet")!r})
    """)
    return folder, by_rs, by_spark


def ordered(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.sort_values(["run_id", "stage", "split", "label"]).reset_index(drop=True)


def test_each_engine_reads_what_the_other_wrote_with_the_same_schema_rows_and_history(tables):
    folder, by_rs, by_spark = tables
    written_by_spark = ordered(read_results(str(by_spark), "deltalake"))
    written_by_rs = ordered(read_results(str(by_rs), "deltalake"))
    pd.testing.assert_frame_equal(written_by_spark, written_by_rs)
    read_by_spark = ordered(pd.read_parquet(folder / "rs_read_by_spark.parquet"))
    pd.testing.assert_frame_equal(read_by_spark[written_by_rs.columns], written_by_rs, check_dtype=False)
    assert DeltaTable(str(by_spark)).schema().to_arrow() == DeltaTable(str(by_rs)).schema().to_arrow()
    # the retry replaced the kt rows in both: one set per (run, stage), with the retry's figures
    for rows in (written_by_spark, written_by_rs):
        assert len(rows) == 2 * 2 * len(LABELS)
        kt_mean = rows[(rows["stage"] == "kt") & (rows["label"] == "mean")]
        assert kt_mean["auroc"].round(6).tolist() == [0.72, 0.72]
    for table in (by_spark, by_rs):
        assert [(version, operation) for version, operation, _ in table_history(str(table), "deltalake")] == [
            (0, "WRITE"), (1, "WRITE"), (2, "WRITE")]


def test_show_results_prints_the_same_table_whichever_engine_wrote_it(tables):
    _, by_rs, by_spark = tables
    shown = {}
    for table in (by_rs, by_spark):
        result = run_cli(BIN / "python", "-m", "training.show_results", "--table", table, "--history")
        shown[table] = result.stdout
        assert "run run-1: small_cnn on nih at 64px, 2 torch rank(s)" in result.stdout
        assert result.stdout.count("version ") == 3
    table_part = {table: text.split("version 0")[0] for table, text in shown.items()}
    assert table_part[by_rs] == table_part[by_spark]
    assert "0.820" in table_part[by_rs] and "0.720" in table_part[by_rs]  # finetune/val, kt/val of the mean


def test_a_catalog_table_name_through_a_local_metastore_written_and_read_by_different_processes(
        spark_catalog_env):
    """catalog.schema.table: `auto` picks delta-spark for a name; the table lives in the metastore and its
    warehouse, so a second process (show_results) finds it by name, rows and history included."""
    name = "spark_catalog.cxr.auroc_results"
    spark_python(f"""
        from test_delta_engines import WRITES, sample_rows
        from cxr_pipeline.training.evaluation.results import spark_session, write_results
        spark_session().sql("CREATE SCHEMA IF NOT EXISTS cxr")  # the bundle's schema resource, here
        for run_id, stage, auroc in WRITES:
            assert write_results({name!r}, sample_rows(run_id, stage, auroc)) == "delta-spark"
    """, env=spark_catalog_env)
    shown = run_cli(BIN / "python", "-m", "training.show_results", "--table", name, "--history",
                    env=spark_catalog_env).stdout
    assert "run run-1: small_cnn" in shown and shown.count("version ") == 3
    mean = next(line for line in shown.splitlines() if line.startswith("mean"))
    assert mean.split()[1:5] == ["0.720", "0.720", "0.820", "0.820"], mean


def test_delta_rs_writers_refuse_a_catalog_table_name_before_writing_and_name_the_flag(tmp_path, monkeypatch):
    """delta-rs writes folders only: the results, prediction and monitor tables' writers refuse a catalog name
    with the engine flag to change, and leave no folder of that name behind."""
    from cxr_pipeline.training.serving import monitor
    from cxr_pipeline.training.serving.prediction_table import write_deltalake_rows

    monkeypatch.chdir(tmp_path)
    name = "main.cxr.anything"
    with pytest.raises(ValueError, match=r"'main.cxr.anything' is a catalog table name: write it with "
                                         r"--results-engine delta-spark or auto"):
        write_results(name, sample_rows("run-1", "kt", 0.6), "deltalake")
    with pytest.raises(ValueError, match="is a catalog table name: write it with --engine delta-spark"):
        monitor.write_rows(name, pd.DataFrame(columns=monitor.MONITOR_SCHEMA.names), "deltalake")
    with pytest.raises(ValueError, match="is a catalog table name: write it with the engine delta-spark"):
        write_deltalake_rows(name, None, "models:/m/1")
    assert not list(tmp_path.iterdir())
