"""What the Spark jobs of `make bench-scale` (benchmarks/scale.py) leave behind, read back: the event log
(executor memory peaks, stages, the stage that did not finish) and the ETL's console log (stage windows)."""
from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

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
    "ProcessTreeOtherRSSMemory": "'other' RSS (JVM forks, see code)",  # the code: executor_peaks
}


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
                # "Other" is left out: it holds JVM threads that fork a command (comm "Executor task l...",
                # java's command line), each counted for an instant at the whole JVM's size
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
