"""Sections 1 and 2 of `make bench-scale` (benchmarks/scale.py): one run of etl/preprocess.py under
spark-submit, measured (wall and CPU seconds per stage, memory peaks), and the Parquet layout it wrote."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.sampler import Sampler
from benchmarks.spark_events import EVENT_CONF, executor_peaks, failure, stage_windows
from cxr_pipeline.etl import versions
from cxr_pipeline.schema import SPLITS, split_dir

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SIZE = 512
ROWS_PER_FILE = 256  # etl/preprocess.py --rows-per-file default
SPARK_CORES = 2


def spark_env() -> dict:
    return {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
            "PYSPARK_DRIVER_PYTHON": sys.executable}


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def spark_etl(data_root: Path, output: Path, work: Path, rows: int) -> dict:
    events = fresh(work / "events" / f"etl_{rows}")
    conf = [item for key, value in EVENT_CONF.items()
            for item in ("--conf", f"{key}={value}")]
    command = [str(BIN / "spark-submit"), "--master", f"local[{SPARK_CORES}]", "--conf", f"spark.eventLog.dir={events}",
               *conf, "etl/preprocess.py", "--source", "nih", "--data-root", str(data_root), "--output", str(output),
               "--size", str(SIZE), "--overwrite"]
    log = work / "logs" / f"etl_{rows}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as handle, Sampler() as sampler:
        job = subprocess.Popen(command, cwd=ROOT, env=spark_env(), stdout=handle, stderr=subprocess.STDOUT)
        sampler.root = job.pid
        returncode = job.wait()
    wall, cpu = time.perf_counter() - started, sampler.cpu[-1][1]
    if returncode:
        return {"rows": rows, "wall": wall, "cpu": cpu, "load": sampler.mean_load, "error": failure(log, events),
                "log": str(log), "executor_peak_mb": executor_peaks(events)}
    summary = json.loads((versions.resolve(output).path / "_etl_summary.json").read_text())
    seconds = summary["seconds"]
    stage_cpu = {stage: sampler.cpu_between(*window) for stage, window in stage_windows(log, seconds).items()}
    return {"rows": rows, "rows_written": summary["rows_written"], "wall": wall, "cpu": cpu, "stage_cpu": stage_cpu,
            "load": sampler.mean_load, "seconds": seconds,
            "other": wall - sum(seconds.values()), "driver_python_peak_mb": summary["driver_python_peak_rss_mb"],
            "executor_peak_mb": executor_peaks(events), "log": str(log)}


def spread(values: list) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else {}


def file_layout(dataset: Path) -> dict:
    """Per split: files, row groups, rows per row group and bytes per file, from the footers."""
    layout = {}
    for split in SPLITS:
        files = sorted(split_dir(dataset, split).glob("*.parquet"))
        groups = [pq.ParquetFile(path).metadata for path in files]
        layout[split] = {
            "files": len(files),
            "row_groups": sum(meta.num_row_groups for meta in groups),
            "rows": sum(meta.num_rows for meta in groups),
            "rows_per_row_group": spread([meta.row_group(i).num_rows for meta in groups
                                          for i in range(meta.num_row_groups)]),
            "mb_per_file": spread([round(path.stat().st_size / 1e6, 1) for path in files]),
        }
    return layout
