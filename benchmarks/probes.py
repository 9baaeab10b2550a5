"""Section 4 of `make bench-scale` (benchmarks/scale.py): driver-only probes, no pixels decoded. The ETL
driver's work for a number of rows (manifest, splits, the manifest into Spark and its shuffle by patient)
in a fresh process, and the footer reads of a dataset of as many files as the ETL would write."""
from __future__ import annotations

import multiprocessing
import os
import resource
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.etl_job import ROWS_PER_FILE, SIZE, SPARK_CORES, fresh, spark_env
from benchmarks.sampler import Sampler, Stopwatch
from benchmarks.spark_events import EVENT_CONF, executor_peaks, spark_stages
from cxr_pipeline.schema import SPLITS, read_dataset_spec, split_dir

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
    from cxr_pipeline.etl.sources import nih
    from cxr_pipeline.etl.sources.manifest import index_images
    from cxr_pipeline.etl.splits import assign_splits, check_patient_disjoint, parse_fractions
    from cxr_pipeline.etl.uncertainty import spec_label_fields
    from cxr_pipeline.schema import DatasetSpec, metadata_columns

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
    that each loader rank reads once (training/data/shards.py; the links repeat ids, so it is read here without
    the index's uniqueness check)."""
    from cxr_pipeline.etl.preprocess import written_rows
    from cxr_pipeline.training.data.reader import split_row_count

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
