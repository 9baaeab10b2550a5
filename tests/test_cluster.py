"""A real Spark standalone cluster (master + one worker on 127.0.0.1) running the ETL."""
import json
import socket
import subprocess
import threading
from pathlib import Path

import pyspark
import pytest

from conftest import BIN, NIH, ROOT, current
from test_faults import dataset_content

SPARK_CLASS = Path(pyspark.__file__).parent / "bin" / "spark-class"


REGISTERED = "Successfully registered with master"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def standalone_master(tmp_path_factory):
    port, ui = free_port(), free_port()
    logs = tmp_path_factory.mktemp("spark-cluster")
    master_log = (logs / "master.log").open("w")
    master = subprocess.Popen([SPARK_CLASS, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(port), "--webui-port", str(ui)], stdout=master_log, stderr=master_log)
    worker = subprocess.Popen([SPARK_CLASS, "org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}",
                               "--host", "127.0.0.1", "--cores", "2", "--memory", "2g", "--webui-port",
                               str(free_port()), "--work-dir", str(logs / "work")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    joined, settled = [], threading.Event()  # settled: the worker joined, or its output ended

    def follow_worker_log():
        """Copy the worker's output to worker.log and signal the line saying it joined the master
        (the worker retries the connection itself until the master listens)."""
        with (logs / "worker.log").open("w") as log:
            for line in worker.stdout:
                log.write(line)
                log.flush()
                if REGISTERED in line:
                    joined.append(line)
                    settled.set()
        settled.set()

    threading.Thread(target=follow_worker_log, daemon=True).start()
    try:
        # Waits for the worker's own signal; the timeout only guards against a hang.
        if not settled.wait(300) or not joined:
            pytest.fail(f"the standalone worker did not register with the master; see {logs}")
        yield f"spark://127.0.0.1:{port}"
    finally:
        for process in (worker, master):
            process.terminate()
            process.wait(30)


def test_etl_on_a_standalone_cluster_writes_what_local_mode_writes(standalone_master, nih_dataset, tmp_path):
    output = tmp_path / "cluster_out"
    result = subprocess.run(
        [str(BIN / "spark-submit"), "--master", standalone_master, "etl/preprocess.py", "--source", "nih",
         "--data-root", str(NIH), "--labels-csv", str(NIH / "Data_Entry_sample.csv"), "--output", str(output),
         "--size", "64", "--rows-per-file", "8"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert dataset_content(output) == dataset_content(nih_dataset)
    summary = json.loads((current(output) / "_etl_summary.json").read_text())
    assert summary["rows_written"] == json.loads((nih_dataset / "_etl_summary.json").read_text())["rows_written"]


def test_delta_spark_writes_the_results_table_from_the_clusters_executors(standalone_master, tmp_path):
    """The delta-spark engine against a real cluster: the rows are written by the standalone worker's executor
    (the jars are on its classpath as on the driver's), committed by the driver, and read back by delta-rs."""
    import pandas as pd
    from deltalake import DeltaTable

    from test_delta_engines import WRITES, sample_rows, spark_python

    table = tmp_path / "results"
    ran = spark_python(f"""
        import json
        from cxr_pipeline.etl.sessions import session_builder
        from test_delta_engines import WRITES, sample_rows
        from cxr_pipeline.training.evaluation.results import write_results
        spark = session_builder("cxr-cluster-delta", {standalone_master!r}, delta=True).getOrCreate()
        for run_id, stage, auroc in WRITES:
            write_results({str(table)!r}, sample_rows(run_id, stage, auroc), "delta-spark")
        executors = [e.host() for e in spark.sparkContext._jsc.sc().statusTracker().getExecutorInfos()]
        print(json.dumps({{"master": spark.sparkContext.master, "hosts": executors}}))
    """)
    facts = json.loads(ran.stdout.strip().splitlines()[-1])
    assert facts["master"] == standalone_master and len(facts["hosts"]) >= 2  # the driver and the worker's executor
    rows = DeltaTable(str(table)).to_pandas()
    expected = pd.DataFrame([row for run_id, stage, auroc in WRITES[1:] for row in sample_rows(run_id, stage, auroc)])
    assert len(rows) == len(expected)
    assert sorted(rows["auroc"].round(6)) == sorted(expected["auroc"].round(6))
    assert [entry["operation"] for entry in DeltaTable(str(table)).history()] == ["WRITE"] * 3
