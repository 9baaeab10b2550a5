"""`make bench-scale`: the pipeline at 20,000 NIH-sized images, and the steps that grow faster than the data.

    python -m benchmarks.scale [--sizes 2500,5000,20000] [--probe-rows 20000,112120,1000000]
                               [--ranks 2,4] [--work /tmp/cxr-bench-scale]
    python -m benchmarks.scale --only probes [--probe-rows 112120,1000000]   # section 4's driver probes alone

1. ETL: the real 1024 px NIH PNGs repeated to each of --sizes rows (benchmarks/nih_repeat.py, the full
   Data_Entry table's labels and patients), etl/preprocess.py to 512 px on local[2] with a Spark event
   log. Per stage (the job's `_etl_summary.json` seconds, the rest of
   spark-submit's wall time as "other"): wall seconds and images/s, and the CPU seconds of the job's
   process tree (read from /proc each second: other work on a shared machine changes wall time, not
   these); peak memory of the driver Python (the summary) and of the JVM and Python processes (the event
   log's executor metrics: in local mode the executor is the driver JVM, and its Python process tree
   holds the driver Python and the Python workers).
2. Files: Parquet files, row groups, rows per row group and bytes per file per split (footers).
3. Loader: one pass of split=train of the largest dataset with 2 and with 4 ranks (one process each,
   started together), batch 32, shuffled and padded to full batches as training reads it: rows, files and
   full batches per rank, the train rows no rank read and the rows read more than once (the multiset of
   image ids all ranks yielded), rows/s.
4. Driver-only probes, no pixels decoded, at --probe-rows: the NIH manifest (os.walk of a folder of
   symlinks, the label parsing, the path checks), splits, the patient check, the manifest into Spark as
   the ETL moves it (written to Parquet by the driver, read by Spark) and its shuffle by patient (a no-op
   write), the driver's Python and JVM heap peaks; footer reads of a dataset of as many files as the ETL
   would write (hard links to one real file: page cache, no network), and the image_id column of every train
   file that each loader rank reads once to plan its share. `--only probes` runs these probes
   and nothing else (no ETL, loader or footer reads; table in WORK/scale_probes.json).
5. Growth: the log-log slope of each step's seconds (CPU seconds where measured) and of peak memory
   between the two largest sizes measured, flagged above 1.15; the ETL's CPU seconds extrapolated to
   the probe sizes (fixed cost plus the marginal cost of the two largest sizes; a power law where the
   slope is above 1.15).

The table is printed at the end and written to WORK/scale.json.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import datetime
import json
import math
import multiprocessing
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.nih_repeat import build
from cxr_pipeline.etl import versions
from cxr_pipeline.schema import SPLITS, read_dataset_spec, split_dir

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NIH = Path(os.environ.get("CXR_SHARED_DATA", ROOT.parent / "shared" / "data")) / "nih"
SIZE = 512
BATCH = 32
ROWS_PER_FILE = 256  # etl/preprocess.py --rows-per-file default
SUPERLINEAR = 1.15
FLAG_FROM_SECONDS = 1.0  # a step shorter than this at the largest size is noise on a shared machine, not flagged
SPARK_CORES = 2
EVENT_CONF = {  # plain JSON lines (Spark 4 compresses and rolls by default), executor memory sampled every 0.5 s
    "spark.eventLog.enabled": "true",
    "spark.eventLog.compress": "false",
    "spark.eventLog.rolling.enabled": "false",
    "spark.eventLog.logStageExecutorMetrics": "true",
    "spark.executor.processTreeMetrics.enabled": "true",
    "spark.executor.metrics.pollingInterval": "500ms",
}
MEMORY_METRICS = ("JVMHeapMemory", "JVMOffHeapMemory", "ProcessTreeJVMRSSMemory", "ProcessTreePythonRSSMemory",
                  "ProcessTreeOtherRSSMemory")
# local mode: the one executor is the driver JVM; its Python process tree is the driver Python and the workers
MEMORY_LABELS = {
    "JVMHeapMemory": "JVM heap used (of -Xmx 1 GiB)",
    "JVMOffHeapMemory": "JVM off-heap",
    "ProcessTreeJVMRSSMemory": "JVM RSS",
    "ProcessTreePythonRSSMemory": "Python RSS (driver + workers)",
    "ProcessTreeRSS": "JVM + Python RSS at one sample",
    "ProcessTreeOtherRSSMemory": "'other' RSS (JVM forks, see code)",
}


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Sampler:
    """While a step runs, every second: the machine's 1-minute load average (others share the cores) and,
    once `root` is set to a process id, the CPU seconds its process tree has used so far (from /proc;
    each process counted at its last sample, so at most a second of each is missed)."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self):
        self.root, self.load, self.cpu_by_pid, self.cpu = None, [os.getloadavg()[0]], {}, [(time.time(), 0.0)]

    def __enter__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.wait(1):
            self._sample()

    def _sample(self):
        self.load.append(os.getloadavg()[0])
        if self.root is None:
            return
        children, used = {}, {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, ..., utime (11), stime (12)
                children.setdefault(int(fields[1]), []).append(int(entry))
                used[int(entry)] = (int(fields[11]) + int(fields[12])) / self.TICK
        stack = [self.root]
        while stack:
            pid = stack.pop()
            if pid in used:
                self.cpu_by_pid[pid] = max(self.cpu_by_pid.get(pid, 0.0), used[pid])
            stack += children.get(pid, [])
        self.cpu.append((time.time(), sum(self.cpu_by_pid.values())))

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._sample()
        self.mean_load = statistics.mean(self.load)

    def cpu_between(self, start: float, end: float) -> float:
        """CPU seconds the tree used between two time.time() instants (linear between samples)."""
        times, totals = zip(*self.cpu)

        def at(instant):
            index = max(0, min(len(times) - 1, bisect.bisect_left(times, instant)))
            if index == 0 or times[index] <= instant:
                return totals[index]
            t0, t1, c0, c1 = times[index - 1], times[index], totals[index - 1], totals[index]
            return c0 + (c1 - c0) * (instant - t0) / (t1 - t0)

        return at(end) - at(start)


def stage_windows(log: Path, seconds: dict) -> dict:
    """time.time() windows of decode_write and mean_image, from the ETL's log lines and its own seconds."""
    stamps, text = {}, log.read_text(errors="replace")  # Spark's progress bar may share a line with them
    for key, marker in (("manifest", "manifest: "), ("mean_image", "mean image of ")):
        found = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) etl INFO " + marker, text)
        if found:
            stamps[key] = datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    windows = {}
    if "manifest" in stamps:
        start = stamps["manifest"] + seconds.get("spark_start", 0.0)
        windows["decode_write"] = (start, start + seconds["decode_write"])
    if "mean_image" in stamps:
        windows["mean_image"] = (stamps["mean_image"] - seconds["mean_image"], stamps["mean_image"])
    return windows


def spark_env() -> dict:
    return {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
            "PYSPARK_DRIVER_PYTHON": sys.executable}


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


# ---------------------------------------------------------------- 1. ETL


def executor_peaks(events: Path) -> dict:
    """Peak of each executor memory metric (MB) over every sample in the event log, and the peak of
    the process tree's RSS (JVM + Python) at one sample."""
    peaks = {name: 0 for name in MEMORY_METRICS}
    tree = 0
    for log in events.iterdir():
        for line in log.open():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # the last line of the log of a job that died
                continue
            kind = event["Event"]
            if kind == "SparkListenerExecutorMetricsUpdate":
                samples = [update["Executor Metrics"] for update in event.get("Executor Metrics Updated", [])]
            elif kind == "SparkListenerStageExecutorMetrics":
                samples = [event["Executor Metrics"]]
            elif kind == "SparkListenerTaskEnd":
                samples = [event.get("Task Executor Metrics") or {}]
            else:
                continue
            for sample in samples:
                for name in MEMORY_METRICS:
                    peaks[name] = max(peaks[name], sample.get(name, 0))
                # "Other" is left out: here it was a JVM thread forking a command (comm "Executor task l...",
                # java's command line), counted at the JVM's size for an instant
                tree = max(tree, sample.get("ProcessTreeJVMRSSMemory", 0) + sample.get("ProcessTreePythonRSSMemory", 0))
    return {**{name: round(value / 2**20) for name, value in peaks.items()}, "ProcessTreeRSS": round(tree / 2**20)}


def spark_stages(events: Path) -> list[dict]:
    """Each completed Spark stage: id, call site, tasks, seconds."""
    stages = []
    for path in events.iterdir():
        for line in path.open():
            if '"SparkListenerStageCompleted"' in line:
                info = json.loads(line)["Stage Info"]
                stages.append({"stage": info["Stage ID"], "name": info["Stage Name"].split("/")[-1][:60],
                               "tasks": info["Number of Tasks"],
                               "seconds": (info["Completion Time"] - info["Submission Time"]) / 1000})
    return sorted(stages, key=lambda stage: stage["stage"])


def failure(log: Path, events: Path) -> str:
    """Where and why a failed ETL stopped: the Spark stage that did not finish (its call site in etl/,
    from the event log) or the innermost etl/ frame of a Python traceback, and the root cause."""
    lines = log.read_text(errors="replace").splitlines()
    where = [line.strip().split("/etl/")[-1] for line in lines if line.strip().startswith("File ") and "/etl/" in line]
    finished, names = set(), {}
    for path in events.iterdir():
        for line in path.open():
            if '"SparkListenerStage' not in line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            info = event.get("Stage Info", {})
            if event["Event"] == "SparkListenerStageSubmitted":
                names[info["Stage ID"]] = info["Stage Name"]
            elif event["Event"] == "SparkListenerStageCompleted" and "Failure Reason" not in info:
                finished.add(info["Stage ID"])
    where += [f"Spark stage {stage} ({name.split('/etl/')[-1]})"
              for stage, name in names.items() if stage not in finished]
    causes = [line.strip() for line in lines if line.strip().startswith("Caused by:")]
    errors = [line.strip() for line in lines if "Error" in line or "Exception" in line]
    return f"{where[-1] if where else '?'}: {(causes or errors or ['no error line'])[-1][:200]}"


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


# ---------------------------------------------------------------- 2. files


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


# ---------------------------------------------------------------- 3. loader


def rank_pass(dataset: str, rank: int, world: int, barrier, results) -> None:
    """One rank's pass over split=train as train_one_epoch reads it; reports to `results`."""
    import torch

    from cxr_pipeline.training.data import SplitReader, prefetch

    torch.set_num_threads(1)

    class CountingReader(SplitReader):  # counts the row groups Petastorm hands this rank
        groups = 0

        def _row_groups(self):
            for group in super()._row_groups():
                self.groups += 1
                yield group

    spec = read_dataset_spec(dataset)
    reader = CountingReader(dataset, "train", spec, BATCH, rank, world, shuffle=True, seed=0, full_batches=True)
    barrier.wait()
    started = time.time()
    first_batch, batches, image_ids = None, 0, []
    for batch in prefetch(reader):
        first_batch = first_batch if first_batch is not None else time.time() - started
        batches += 1
        image_ids += batch.image_ids
    ended = time.time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results.put({"cpu": usage.ru_utime + usage.ru_stime, "rank": rank, "rows": len(image_ids), "image_ids": image_ids,
                 "files": len(reader.shard.files), "row_groups": reader.groups, "full_batches": batches,
                 "started": started, "ended": ended, "first_batch_s": first_batch or 0.0,
                 "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})


def loader_pass(dataset: Path, world: int, train_rows: int) -> dict:
    """One pass of `world` ranks over split=train, of `train_rows` rows (file_layout's count)."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(world), context.Queue()
    workers = [context.Process(target=rank_pass, args=(str(dataset), rank, world, barrier, results))
               for rank in range(world)]
    with Sampler() as sampler:
        for worker in workers:
            worker.start()
        ranks = sorted((results.get(timeout=1200) for _ in workers), key=lambda r: r["rank"])
        for worker in workers:
            worker.join()
    steps = min(r["full_batches"] for r in ranks)  # train_one_epoch stops all ranks at the same step
    start = min(r["started"] for r in ranks)
    seen = collections.Counter(i for r in ranks for i in r.pop("image_ids")[:steps * BATCH])
    for r in ranks:
        r["seconds"] = r["ended"] - r["started"]
        r["rows_per_s"] = r["rows"] / r["seconds"]
        r["finished_after_s"] = r["ended"] - start
    wall = max(r["ended"] for r in ranks) - start
    return {"world": world, "steps": steps, "ranks": ranks, "wall": wall, "load": sampler.mean_load,
            "rows_per_s": sum(r["rows"] for r in ranks) / wall, "train_rows": train_rows,
            "unread": train_rows - len(seen), "repeated": sum(seen.values()) - len(seen)}



# ---------------------------------------------------------------- 4. driver-only probes


def timed(timings: dict, name: str, function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    timings[name] = time.perf_counter() - started
    return value


class Stopwatch:
    """Wall seconds, this process's CPU seconds (all its threads) and the time.time() window of each step."""

    def __init__(self):
        self.seconds, self.cpu, self.windows = {}, {}, {}

    def __call__(self, name: str, function, *args, **kwargs):
        wall, cpu, start = time.perf_counter(), time.process_time(), time.time()
        value = function(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - wall
        self.cpu[name] = time.process_time() - cpu
        self.windows[name] = (start, time.time())
        return value


SPARK_STEPS = ("spark_start", "manifest_to_spark", "shuffle_by_patient")  # CPU of the process tree (JVM included)
# what the ETL driver runs, in order (the pieces timed before `manifest` are parts of it, timed alone)
DRIVER_STEPS = ("manifest", "splits", "patient_check", "manifest_to_spark", "shuffle_by_patient")


def driver_probe(data_root: str, rows: int, events: str, log: str, results) -> None:
    """The ETL driver's work for `rows` rows without decoding a pixel (run in a fresh process:
    its peak RSS is the probe's own)."""
    with open(log, "w") as handle:  # Spark's console output (the child's and the JVM's) into the log
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
    clock, sampler = Stopwatch(), Sampler()
    sampler.root = os.getpid()  # this process and, once started, the JVM below it
    root = Path(data_root)
    out = {"rows": rows, "seconds": clock.seconds}
    with sampler:
        driver_probe_steps(root, events, clock, out)
    # CPU seconds: this process's own for the Python steps, the process tree's (JVM included) for Spark's
    out["cpu"] = {name: sampler.cpu_between(*clock.windows[name]) if name in SPARK_STEPS else cpu
                  for name, cpu in clock.cpu.items()}
    out["python_peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    results.put(out)


def driver_probe_steps(root: Path, events: str, clock: Stopwatch, out: dict) -> None:
    import pandas as pd

    from cxr_pipeline.etl import preprocess
    from cxr_pipeline.etl.images import choose_decoder
    from cxr_pipeline.schema import DatasetSpec, metadata_columns
    from cxr_pipeline.etl.sources import nih
    from cxr_pipeline.etl.sources.manifest import index_images
    from cxr_pipeline.etl.splits import assign_splits, check_patient_disjoint, parse_fractions
    from cxr_pipeline.etl.uncertainty import spec_label_fields

    # the pieces of build_manifest that loop in Python per row, timed on their own first (their results are
    # dropped before the manifest is built: the probe's peak memory is the ETL driver's)
    clock("index_images", index_images, root, (".png",))
    table = clock("read_csv", pd.read_csv, root / "Data_Entry_2017.csv", dtype=str, keep_default_na=False,
                  usecols=lambda column: column in nih.LABEL_TABLE_COLUMNS)
    clock("parse_labels", nih.parse_labels, table["Finding Labels"])
    clock("path_checks", nih.escapes_root, root, table["Image Index"])
    del table
    manifest = clock("manifest", nih.build_manifest, root)
    frame = manifest.rows
    frame["split"] = clock("splits", assign_splits, frame["patient_id"], 0, parse_fractions("0.7,0.1,0.2"))
    clock("patient_check", check_patient_disjoint, frame["patient_id"], frame["split"])
    out["manifest_rows"] = len(frame)
    out["python_after_manifest_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    # the start of write_parquet: the manifest written to Parquet by the driver and read by Spark, shuffled by
    # patient (no decode, no write)
    os.environ["PYSPARK_SUBMIT_ARGS"] = " ".join(
        [f"--conf {key}={value}" for key, value in {**EVENT_CONF, "spark.eventLog.dir": events}.items()]
        + ["pyspark-shell"])
    try:
        spark = clock("spark_start", preprocess.spark_session, f"local[{SPARK_CORES}]")
        spec = DatasetSpec(manifest.dataset, manifest.label_names, SIZE, "uint8", **spec_label_fields(manifest),
                           decoder=choose_decoder())
        schema = preprocess.output_schema(spec)
        names = [field.name for field in schema.fields if field.name in set(metadata_columns(spec)) | {"split"}]
        struct = preprocess._input_struct(schema, names)
        manifest_path = preprocess.manifest_file(Path(events).with_name(f"{Path(events).name}.staging"))

        def manifest_to_spark():
            preprocess.write_manifest(frame, struct, manifest_path)
            return spark.read.schema(struct).parquet(str(manifest_path))

        try:
            dataframe = clock("manifest_to_spark", manifest_to_spark)
            out["manifest_parquet_mb"] = manifest_path.stat().st_size / 2**20
            partitions = max(2 * spark.sparkContext.defaultParallelism, -(-len(frame) // ROWS_PER_FILE))
            out["partitions"] = partitions
            clock("shuffle_by_patient",
                  lambda: dataframe.repartition(partitions, "patient_id").write.format("noop").mode("overwrite").save())
        finally:
            manifest_path.unlink(missing_ok=True)
        spark.stop()
    except Exception as exc:  # a driver that runs out of memory here is a finding, not a crash of the benchmark
        out["spark_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"


def run_driver_probe(data_root: Path, rows: int, work: Path) -> dict:
    events = fresh(work / "events" / f"probe_{rows}")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    os.environ.update(spark_env())
    log = work / "logs" / f"probe_{rows}.log"
    log.parent.mkdir(parents=True, exist_ok=True)  # made by the ETL runs, absent with --only probes
    worker = context.Process(target=driver_probe, args=(str(data_root), rows, str(events), str(log), results))
    worker.start()
    try:
        out = results.get(timeout=1200)
    finally:
        worker.join(timeout=60)
        if worker.is_alive():
            worker.terminate()
    if "spark_error" not in out:  # 0: no sample was taken before the session stopped
        out["jvm_peak_mb"] = {name: value or None for name, value in executor_peaks(events).items()}
        out["stages"] = spark_stages(events)
    return out


def files_written(rows: int, layout: dict, layout_rows: int) -> dict:
    """Files per split the ETL would write for `rows` rows: the files per partition measured at
    `layout_rows`, times the partitions preprocess.write_parquet asks for."""
    measured = max(2 * SPARK_CORES, -(-layout_rows // ROWS_PER_FILE))
    partitions = max(2 * SPARK_CORES, -(-rows // ROWS_PER_FILE))
    return {split: max(1, round(layout[split]["files"] / measured * partitions)) for split in SPLITS}


def footer_probe(template: Path, files: dict, work: Path) -> dict:
    """A dataset of `files[split]` hard links per split to one real file of each split; the reads of
    every footer that the ETL (row counts, written_rows) makes, and the image_id column of every train file
    that each loader rank reads once (training/shards.py; the links repeat ids, so it is read here without
    the index's uniqueness check)."""
    from cxr_pipeline.etl.preprocess import written_rows
    from cxr_pipeline.training.data import split_row_count

    dataset = fresh(work / "footer_probe")
    for split, count in files.items():
        source = sorted(split_dir(template, split).glob("*.parquet"))[0]
        folder = split_dir(dataset, split)
        folder.mkdir()
        for index in range(count):
            os.link(source, folder / f"part-{index:05d}.parquet")
    clock = Stopwatch()
    clock("read_dataset_spec", read_dataset_spec, dataset)
    clock("split_row_count", lambda: [split_row_count(dataset, split) for split in SPLITS])
    clock("written_rows", written_rows, dataset)
    clock("loader_index", lambda: [pq.read_table(path, columns=["image_id"])
                                   for path in sorted(split_dir(dataset, "train").glob("*.parquet"))])
    shutil.rmtree(dataset)
    return {"files": sum(files.values()), "train_files": files["train"], "seconds": clock.seconds, "cpu": clock.cpu}


# ---------------------------------------------------------------- 5. growth


def slope(points: list[tuple[float, float]]) -> float | None:
    """Log-log slope between the two largest sizes measured (None when fewer than two, or a zero)."""
    points = sorted((x, y) for x, y in points if y is not None)
    if len(points) < 2 or points[-2][1] <= 0 or points[-1][1] <= 0:
        return None
    (x1, y1), (x2, y2) = points[-2:]
    return math.log(y2 / y1) / math.log(x2 / x1)


def extrapolate(points: list[tuple[float, float]], rows: int) -> float:
    """Fixed cost plus the marginal cost of the two largest sizes; a power law if it grows faster."""
    (x1, y1), (x2, y2) = sorted(points)[-2:]
    k = slope(points)
    if k is not None and k > SUPERLINEAR:
        return y2 * (rows / x2) ** k
    return y2 + (rows - x2) * max(y2 - y1, 0.0) / (x2 - x1)


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}" if abs(value) < 1e4 else f"{value:,.0f}"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(cell).rjust(width) if i else str(cell).ljust(width)
                        for i, (cell, width) in enumerate(zip(row, widths))))
    print()


def probe_rows(result: dict) -> list[tuple[str, dict, dict]]:
    """The driver probes' rows of the scaling table: (name, {rows: value}, options of report's add())."""
    probe_by = {probe["rows"]: probe for probe in result["probes"]}
    measure = "cpu" if all("cpu" in probe for probe in probe_by.values()) else "seconds"
    unit = ", CPU s" if measure == "cpu" else ""

    def total(probe):
        return sum(probe[measure][step] for step in DRIVER_STEPS) if set(DRIVER_STEPS) <= set(probe[measure]) else None

    rows = [(f"probe {piece}{unit}", {n: probe[measure].get(piece) for n, probe in probe_by.items()}, {})
            for piece in ("index_images", "read_csv", "parse_labels", "path_checks", "spark_start") + DRIVER_STEPS]
    rows += [
        (f"probe driver total ({' + '.join(DRIVER_STEPS)}){unit}", {n: total(p) for n, p in probe_by.items()}, {}),
        ("probe shuffle_by_patient, wall s", {n: p["seconds"].get("shuffle_by_patient") for n, p in probe_by.items()},
         {"flag": False}),
        ("probe manifest as Parquet MB", {n: p.get("manifest_parquet_mb") for n, p in probe_by.items()},
         {"seconds": False}),
    ]
    for index, name in ((0, "manifest read + shuffle write"), (-1, "shuffle by patient")):
        stages = {n: p["stages"][index] for n, p in probe_by.items() if p.get("stages")}
        rows += [(f"probe Spark stage: {name}, wall s", {n: stage["seconds"] for n, stage in stages.items()},
                  {"flag": False}),
                 ("  tasks of that stage", {n: stage["tasks"] for n, stage in stages.items()},
                  {"digits": 0, "seconds": False, "flag": False})]
    rows += [("probe driver Python peak MB", {n: p["python_peak_mb"] for n, p in probe_by.items()},
              {"digits": 0, "seconds": False}),
             ("probe driver JVMHeapMemory peak MB",
              {n: p.get("jvm_peak_mb", {}).get("JVMHeapMemory") for n, p in probe_by.items()},
              {"digits": 0, "seconds": False})]
    return rows


def probe_notes(result: dict) -> None:
    """The manifest's size on its way into Spark, the driver's peaks against its 1 GiB budgets, Spark failures."""
    from cxr_pipeline.etl.preprocess import MANIFEST_ROW_GROUP_ROWS

    probe_by = {probe["rows"]: probe for probe in sorted(result["probes"], key=lambda probe: probe["rows"])}
    parquet = [(n, p["manifest_parquet_mb"]) for n, p in probe_by.items() if p.get("manifest_parquet_mb")]
    if parquet:
        n, mb = parquet[-1]
        print(f"manifest as Parquet: {1e6 * mb / n:.0f} MB per million rows, written by the driver in row groups of "
              f"{MANIFEST_ROW_GROUP_ROWS:,} rows (one row group's Arrow copy in driver memory at a time) and read by "
              "Spark's tasks (etl/preprocess.py write_parquet)")
    for n, p in probe_by.items():
        if "spark_error" in p:
            print(f"probe at {n:,} rows: the manifest into Spark failed: {p['spark_error']}")
        else:
            print(f"probe at {n:,} rows: driver Python peak {p['python_peak_mb']:,} MB (after the manifest "
                  f"{p.get('python_after_manifest_mb', 0):,} MB), JVM heap peak "
                  f"{fmt(p.get('jvm_peak_mb', {}).get('JVMHeapMemory'), 0)} MB; budget 1,024 MB each")


def report_probes(result: dict) -> None:
    """--only probes: the driver probes' table alone (no ETL, loader or footer reads were run)."""
    probes = sorted(probe["rows"] for probe in result["probes"])
    table, flagged = [], []
    for name, measured, options in probe_rows(result):
        k = slope([(n, v) for n, v in measured.items() if v is not None])
        noise = options.get("seconds", True) and max((v or 0) for v in measured.values()) < FLAG_FROM_SECONDS
        mark = "YES" if options.get("flag", True) and k is not None and k > SUPERLINEAR and not noise else ""
        flagged += [name] if mark else []
        table.append([name] + [fmt(measured.get(n), options.get("digits", 1)) for n in probes] + [fmt(k, 2), mark])
    print(f"Driver-only probes (slope = log-log growth between the two largest sizes; CPU seconds of this process, "
          f"of the process tree with the JVM for {', '.join(SPARK_STEPS)})")
    print_table(["step (seconds unless named)"] + [f"{n:,}" for n in probes] + ["slope", f"> {SUPERLINEAR}"], table)
    probe_notes(result)
    print(f"Grows faster than linearly (slope > {SUPERLINEAR}): {', '.join(flagged) if flagged else 'nothing'}")


def report(result: dict) -> None:
    if not result["etl"]:  # --only probes
        report_probes(result)
        return
    sizes = [etl["rows"] for etl in result["etl"]]
    probes = [probe["rows"] for probe in result["probes"]]
    columns = sorted(set(sizes) | set(probes))
    header = ["step (seconds unless named)"] + [f"{n:,}" for n in columns] + ["slope", "> 1.15"]
    etl_by = {etl["rows"]: etl for etl in result["etl"]}
    table, flagged = [], []

    def add(name, measured: dict, predict: bool = False, digits: int = 1, seconds: bool = True, flag: bool = True):
        points = [(n, v) for n, v in measured.items() if v is not None]
        k = slope(points)
        noise = seconds and (not points or max(points)[1] < FLAG_FROM_SECONDS)
        cells = []
        for n in columns:
            if n in measured and measured[n] is not None:
                cells.append(fmt(measured[n], digits))
            elif predict and len(points) >= 2 and n > max(measured):
                cells.append("~" + fmt(extrapolate(points, n), digits))
            else:
                cells.append("")
        mark = "YES" if flag and k is not None and k > SUPERLINEAR and not noise else ""
        if mark:
            flagged.append(name)
        table.append([name] + cells + [fmt(k, 2), mark])

    # wall seconds of the ETL depend on what else runs on the cores: its stages are flagged on CPU seconds
    cpu_measured = all(etl_by[n].get("stage_cpu") for n in sizes)
    for stage in ("manifest", "spark_start", "decode_write", "mean_image"):
        add(f"ETL {stage}", {n: etl_by[n]["seconds"].get(stage) for n in sizes}, predict=not cpu_measured,
            flag=not cpu_measured or stage not in ("decode_write", "mean_image"))
    add("ETL other (JVM launch, read-back, commit)", {n: etl_by[n]["other"] for n in sizes}, predict=not cpu_measured)
    add("ETL spark-submit wall", {n: etl_by[n]["wall"] for n in sizes}, predict=not cpu_measured, flag=not cpu_measured)
    table.append(["ETL decode+write img/s (2 cores)"] + [fmt(n / etl_by[n]["seconds"]["decode_write"])
                                                        if n in etl_by else "" for n in columns] + ["", ""])
    table.append(["ETL whole job img/s (2 cores)"] + [fmt(n / etl_by[n]["wall"]) if n in etl_by else ""
                                                     for n in columns] + ["", ""])
    add("ETL CPU seconds, whole job (all processes)", {n: etl_by[n].get("cpu") for n in sizes}, predict=True)
    for stage in ("decode_write", "mean_image"):
        add(f"ETL CPU seconds, {stage}", {n: etl_by[n].get("stage_cpu", {}).get(stage) for n in sizes}, predict=True)
    if cpu_measured:
        table.append([f"ETL share of the {SPARK_CORES} cores it got (CPU / wall)"]
                     + [f"{100 * etl_by[n]['cpu'] / etl_by[n]['wall'] / SPARK_CORES:.0f}%" if n in etl_by else ""
                        for n in columns] + ["", ""])
        cpu_points = sorted((n, etl_by[n]["cpu"]) for n in sizes)
        table.append([f"ETL wall on {SPARK_CORES} free cores, predicted (CPU / {SPARK_CORES})"]
                     + ["~" + fmt(extrapolate(cpu_points, n) / SPARK_CORES) if n > max(sizes) else ""
                        for n in columns] + ["", ""])
    add("ETL driver Python peak MB", {n: etl_by[n]["driver_python_peak_mb"] for n in sizes}, digits=0, seconds=False)
    for metric, label in MEMORY_LABELS.items():
        add(f"ETL {label}, peak MB", {n: etl_by[n]["executor_peak_mb"].get(metric) for n in sizes}, digits=0,
            seconds=False)
    for name, measured, options in probe_rows(result):
        add(name, measured, **options)
    footers = {f["rows"]: f for f in result["footers"]}
    add("files written (all splits)", {n: f["files"] for n, f in footers.items()}, digits=0, seconds=False)
    for piece in ("split_row_count", "written_rows", "loader_index"):
        if all("cpu" in f for f in footers.values()):
            add(f"footers {piece}, CPU s", {n: f["cpu"][piece] for n, f in footers.items()}, digits=2)
        else:
            add(f"footers {piece}", {n: f["seconds"][piece] for n, f in footers.items()}, digits=2)
    print(f"ETL stages at {max(sizes):,} rows (local[{SPARK_CORES}])")
    big = etl_by[max(sizes)]
    written = sum(big["rows_written"].values())
    stages = [("manifest", max(sizes)), ("spark_start", None), ("decode_write", max(sizes)),
              ("mean_image", big["rows_written"]["train"])]
    print_table(["stage", "seconds", "images/s", "share of wall"],
                [[stage, fmt(big["seconds"].get(stage)),
                  fmt(n / big["seconds"][stage]) if n and big["seconds"].get(stage) else "-",
                  f"{100 * big['seconds'].get(stage, 0) / big['wall']:.0f}%"] for stage, n in stages]
                + [["other (JVM launch, read-back, commit)", fmt(big["other"]), "-",
                    f"{100 * big['other'] / big['wall']:.0f}%"],
                   ["spark-submit wall", fmt(big["wall"]), fmt(written / big["wall"]), "100%"]])
    print("Scaling (measured; ~ = extrapolated from the two largest measured sizes; slope = log-log growth "
          "between them; flags and predictions rest on CPU seconds where wall time depends on what else ran)")
    print_table(header, table)
    if cpu_measured:
        (x1, y1), (x2, y2) = sorted((n, etl_by[n]["stage_cpu"]["decode_write"]) for n in sizes)[-2:]
        per_image = (y2 - y1) / (x2 - x1)
        print(f"decode+write, marginal CPU: {1000 * per_image:.1f} ms per image ({1 / per_image:.1f} img/s per core)")
    if all("cpu" in etl_by[n] for n in sizes[-2:]):
        (x1, c1), (x2, c2) = sorted((n, etl_by[n]["cpu"]) for n in sizes)[-2:]
        per_image_cpu = (c2 - c1) / (x2 - x1)
        print(f"whole ETL job, marginal CPU: {1000 * per_image_cpu:.1f} ms per image (all processes; "
              f"{1 / per_image_cpu:.1f} img/s per core when the job has the core to itself); "
              f"{', '.join(f'{n:,} images = {n * per_image_cpu / 3600:.1f} CPU-hours' for n in (112_120, 1_000_000))}")
    probe_notes(result)
    print()

    largest = max(sizes)
    print(f"Parquet layout of the {largest:,}-row dataset (from the footers)")
    layout = result["layout"][largest]
    print_table(["split", "rows", "files", "row groups", "rows/row group min/med/max", "MB/file min/med/max"],
                [[split, f"{v['rows']:,}", v["files"], v["row_groups"],
                  "/".join(fmt(v["rows_per_row_group"].get(k), 0) for k in ("min", "median", "max")),
                  "/".join(fmt(v["mb_per_file"].get(k)) for k in ("min", "median", "max"))]
                 for split, v in layout.items()])

    print(f"Loader: one pass of split=train ({largest:,}-row dataset), batch {BATCH}, shuffled and padded to full "
          "batches as training reads it, one process per rank")
    rows = []
    for run in result["loader"]:
        for r in run["ranks"]:
            rows.append([f"{run['world']} ranks", r["rank"], f"{r['rows']:,}", r["files"], r["row_groups"],
                         r["full_batches"], fmt(r["first_batch_s"], 2), fmt(r["seconds"]), fmt(r["rows_per_s"], 0),
                         fmt(r["rows"] / r["cpu"], 0) if r.get("cpu") else "-", r["peak_rss_mb"]])
        rows.append([f"{run['world']} ranks", "all", f"{sum(r['rows'] for r in run['ranks']):,}",
                     sum(r["files"] for r in run["ranks"]), sum(r["row_groups"] for r in run["ranks"]),
                     sum(r["full_batches"] for r in run["ranks"]), "", fmt(run["wall"]), fmt(run["rows_per_s"], 0),
                     fmt(sum(r["rows"] for r in run["ranks"]) / sum(r["cpu"] for r in run["ranks"]), 0)
                     if run["ranks"][0].get("cpu") else "-", ""])
    print_table(["run", "rank", "rows", "files", "row groups", "full batches", "1st batch s", "pass s", "rows/s",
                 "rows/CPU-s", "peak RSS MB"], rows)

    for run in result["loader"]:
        rows_per_rank = [r["rows"] for r in run["ranks"]]
        print(f"{run['world']} ranks: {run['steps']} steps on every rank; rows per rank "
              f"{min(rows_per_rank)}-{max(rows_per_rank)} (train's row groups hold "
              f"{layout['train']['rows_per_row_group']['min']}-{layout['train']['rows_per_row_group']['max']} rows); "
              f"of {run['train_rows']:,} train rows {run['unread']} unread, {run['repeated']} read twice to fill "
              "the last batches" + (f"; load average {run['load']:.1f} during the pass" if run.get("load") else ""))
    print()
    print(f"Grows faster than linearly (slope > {SUPERLINEAR}): {', '.join(flagged) if flagged else 'nothing'}")
    print(f"Total wall time of this benchmark: {result['total_seconds'] / 60:.1f} min "
          f"(load average over its last 15 min {result['load_average_15min']:.1f} on {result['cores']} cores: "
          "other work on this machine shares them)")


# ---------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2500,5000,20000", help="rows of the ETL runs (default 2500,5000,20000)")
    parser.add_argument("--probe-rows", default="20000,112120,1000000",
                        help="rows of the driver-only probes (default 20000,112120,1000000)")
    parser.add_argument("--ranks", default="2,4", help="loader world sizes (default 2,4)")
    parser.add_argument("--work", default="/tmp/cxr-bench-scale", help="scratch folder (default /tmp/cxr-bench-scale)")
    parser.add_argument("--print-only", action="store_true", help="print the table of WORK/scale.json again")
    parser.add_argument("--only", choices=("probes",),
                        help="probes: only the driver-only probes at --probe-rows (section 4, no ETL, loader or "
                             "footer reads; WORK/scale_probes.json)")
    args = parser.parse_args(argv)
    saved = Path(args.work) / ("scale_probes.json" if args.only else "scale.json")
    if args.print_only:
        report(json.loads(saved.read_text(), object_hook=_int_keys))
        return
    if not (NIH / "images").exists() or not (NIH / "Data_Entry_2017_v2020.csv.gz").exists():
        raise SystemExit(f"real NIH images or Data_Entry_2017_v2020.csv.gz not found in {NIH}; "
                         "set CXR_SHARED_DATA to the shared/data folder")
    sizes = [] if args.only == "probes" else sorted(int(n) for n in args.sizes.split(","))
    probe_rows = sorted(int(n) for n in args.probe_rows.split(","))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict = {"sizes": sizes,
                    "probe_rows": probe_rows, "cores": os.cpu_count(), "etl": [], "layout": {},
                    "loader": [], "probes": [], "footers": [], "build_seconds": {}}

    for rows in sizes:
        progress(f"data root of {rows:,} rows (symlinks to the real PNGs)...")
        root = timed(result["build_seconds"], rows, build, NIH, work / f"nih_{rows}", rows, full_table=True)
        progress(f"ETL of {rows:,} rows to {SIZE} px on local[{SPARK_CORES}]...")
        etl = spark_etl(root, work / f"nih_{rows}_{SIZE}", work, rows)
        if "error" in etl:
            raise SystemExit(f"the ETL of {rows} rows failed: {etl['error']}; its log: {etl['log']}")
        result["etl"].append(etl)
        result["layout"][rows] = file_layout(versions.resolve(work / f"nih_{rows}_{SIZE}").path)
        progress(f"  {etl['wall']:.0f} s wall, decode+write {etl['seconds']['decode_write']:.1f} s "
                 f"({rows / etl['seconds']['decode_write']:.1f} img/s), stages {fmt_seconds(etl['seconds'])}, "
                 f"driver Python {etl['driver_python_peak_mb']:.0f} MB, JVM {etl['executor_peak_mb']}")
        if rows != sizes[-1]:  # only the largest is read again (loader, footer template)
            shutil.rmtree(work / f"nih_{rows}_{SIZE}")

    dataset = versions.resolve(work / f"nih_{sizes[-1]}_{SIZE}").path if sizes else None
    for world in (int(n) for n in args.ranks.split(",")) if sizes else ():
        progress(f"loader: one pass of split=train with {world} ranks...")
        run = loader_pass(dataset, world, result["layout"][sizes[-1]]["train"]["rows"])
        result["loader"].append(run)
        progress(f"  steps {run['steps']}, rows/s {run['rows_per_s']:.0f}, rows per rank "
                 f"{[r['rows'] for r in run['ranks']]}, row groups {[r['row_groups'] for r in run['ranks']]}")

    layout = result["layout"][sizes[-1]] if sizes else None
    for rows in probe_rows:
        root = work / f"nih_{rows}"
        if not (root / "Data_Entry_2017.csv").exists() or rows not in sizes:
            progress(f"probe data root of {rows:,} rows (labels and symlinks only)...")
            timed(result["build_seconds"], rows, build, NIH, root, rows, full_table=True)
        progress(f"driver probe at {rows:,} rows: manifest, splits, manifest into Spark (no decoding)...")
        probe = run_driver_probe(root, rows, work)
        result["probes"].append(probe)
        progress(f"  {fmt_seconds(probe['seconds'])}, driver Python peak {probe['python_peak_mb']} MB"
                 + (f", Spark failed: {probe['spark_error']}" if "spark_error" in probe else ""))
        if sizes:  # the footer probe copies a file of the largest ETL dataset
            files = files_written(rows, layout, sizes[-1])
            progress(f"footer probe: {sum(files.values()):,} files ({files})...")
            footers = footer_probe(dataset, files, work)
            result["footers"].append({"rows": rows, **footers})
            progress(f"  {fmt_seconds(footers['seconds'])}")
        if rows not in sizes:
            shutil.rmtree(root)  # up to a million symlinks: not kept

    result["total_seconds"] = time.perf_counter() - started
    result["load_average_15min"] = os.getloadavg()[2]
    saved.write_text(json.dumps(result, indent=2, default=str))
    print()
    report(result)
    print(f"(JSON: {saved})")


def _int_keys(mapping: dict) -> dict:
    return {int(key) if key.isdigit() else key: value for key, value in mapping.items()}


def fmt_seconds(seconds: dict) -> str:
    return ", ".join(f"{name} {value:.2f}" for name, value in seconds.items())


if __name__ == "__main__":
    main()
