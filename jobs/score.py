"""Score images on Spark with a logged MLflow model, into a Delta table: one row per image and model version.

    spark-submit --master 'local[2]' jobs/score.py --model-uri models:/cxr-nih/3 --images /data/incoming \\
        --table outputs/scores_delta
    python jobs/score.py --model-uri runs:/RUN_ID/model --dataset /data/nih_224 --split test \\
        --table outputs/scores_delta
    python jobs/score.py --model-uri models:/main.cxr.cxr_densenet121@champion --images /Volumes/main/cxr/incoming \\
        --table main.cxr.image_scores                                     # on Databricks: Delta on Spark

Inputs: image files (--images: folders searched recursively, glob patterns, .txt lists of paths; ids as
training.predict gives them: the path relative to the folder given), or the rows of an ETL dataset
(--dataset, --split): pixels as stored, at the model's size. The model is the pyfunc that train.py logs
(training/serving/mlflow_model.py): the driver resolves the URI to a fixed version (`models:/NAME@alias` and
`models:/NAME/latest` become `models:/NAME/<version>`), downloads it once and ships it to the executors,
where each Python worker loads it once (training.serving.mlflow_model.cached_model) and scores Arrow batches of
--batch-size images in mapInPandas. The executors read the image files themselves and give the model their
bytes: the model reads no paths (a scoring server must not read its files for a client).

Output rows: the columns of training/serving/predictions.py, as `training.predict --output` writes them (label
columns named as the label with characters other than letters, digits and _ replaced by _): image_id, path, the
calibrated probability of each label, `<label>_positive` at the run's operating point, `error` (why an image
could not be scored: missing, empty, not an image, ...; such images get a row with empty scores, never a failed
job), the model's identity (checkpoint sha256, the pinned model_uri, the training run and its dataset version)
and scored_at.

One row per (image_id, model_uri), however often the job runs: images the table already holds for this
model version are not scored again (with --rescore-errors, those whose row has an error are, and the new
row replaces it: a file fixed since). Engines as for the AUROC rows (training/evaluation/results.py; `auto`, the
default, takes delta-spark for a catalog table name or on Databricks, else deltalake), writing as
training/serving/prediction_table.py says:
- `deltalake` (delta-rs; no Delta jars): the scores are collected to the driver and appended (with
  --rescore-errors, replacing error rows rewrites this model's rows in one commit).
- `delta-spark` (a Spark session with Delta, as on Databricks, where --table may be a Unity Catalog table
  name): a MERGE on (image_id, model_uri) from the executors.
A second job on the same table and model at the same time could add a row twice with `deltalake`; the
bundle's job runs one at a time. Before any model version carries the alias asked for (a new deployment, before
the first promotion), the job logs that plainly and ends with success, scoring nothing.

Shift monitor (--monitor-table; default none: no monitor): after writing the scores, this run's rows (only
those scored now) are compared with the model's val split (its val prevalence and score deciles, in the logged
model's metadata) by training/serving/monitor.py, one row per label appended to that Delta table: estimated
prevalence with its interval, mean score, PSI, unreadable share, and flags with their reasons. The log names
every flagged label and why, and the job then exits non-zero (after the scores and the monitor rows are written)
unless --monitor-warn-only. A run that scores nothing new (a retry of a flagged night, a night without images)
repeats the verdict of the last run the monitor holds for the model, so a retry cannot turn a flagged night
into a success. `python -m training.monitor --table T` shows the runs.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from cxr_pipeline.etl import versions
from cxr_pipeline.etl.sessions import session_builder
from cxr_pipeline.jobs import score_monitor
from cxr_pipeline.jobs.score_executors import partition_scorer
from cxr_pipeline.jobs.score_model import (NoModelVersion, download_model, model_spec, pin_registry,
                                           resolve_model_uri)
from cxr_pipeline.schema import SPLITS, DatasetSpec, read_dataset_spec, split_dir
from cxr_pipeline.training.evaluation.results import add_engine_argument, resolve_engine
from cxr_pipeline.training.serving.prediction_table import earlier_rows, merge_spark, write_deltalake_rows
from cxr_pipeline.training.serving.predictions import (ERROR_COLUMN, KEY, SCORED_AT, label_columns, spark_schema,
                                                       to_arrow)

log = logging.getLogger("score")
RETRY_ERRORS = "t.error <> ''"  # only an error row is ever replaced (--rescore-errors); a scored one stays


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", required=True,
                        help="models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/latest, runs:/RUN_ID/model, "
                             "or a model folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", help="image files, folders, glob patterns or .txt lists of paths")
    source.add_argument("--dataset", help="an ETL output folder (etl/preprocess.py --output)")
    parser.add_argument("--split", action="append", choices=SPLITS, help="with --dataset: split(s) (default: all)")
    parser.add_argument("--table", required=True, help="Delta table of scores: a folder, or a catalog table name "
                                                       "(catalog.schema.table, through Spark)")
    add_engine_argument(parser, "--engine")
    parser.add_argument("--batch-size", type=int, default=32, help="images per Arrow batch and model call (32)")
    parser.add_argument("--partitions", type=int, default=0,
                        help="Spark partitions of the image list (default: the cluster's default parallelism)")
    parser.add_argument("--rescore-errors", action="store_true",
                        help="also score again the images whose row for this model has an error (a file fixed "
                             "since), replacing that row; without it every image is scored once per model version")
    parser.add_argument("--master", help="Spark master, e.g. local[2] (default: the session's, else local[*])")
    score_monitor.add_arguments(parser)
    return parser


def spark_session(args):
    delta = "delta-spark" in (args.engine, args.monitor_engine)  # either table through Delta on Spark
    spark = session_builder("cxr-score", args.master, delta=delta).getOrCreate()
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(args.batch_size))
    spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
    return spark


def images_to_score(args, done: set[str]) -> tuple[pd.DataFrame, int]:
    """(image_id and path of the listed images not in `done`, how many were), on the driver: no Spark needed."""
    from cxr_pipeline.training.serving.scorer import image_paths

    listed = pd.DataFrame([(image_id, str(path)) for image_id, path in image_paths(args.images)],
                          columns=["image_id", "path"]).drop_duplicates("image_id")
    if listed.empty:
        raise SystemExit(f"no image found in {args.images}")
    todo = listed[~listed["image_id"].isin(done)]
    return todo, len(listed) - len(todo)


def dataset_frame(spark, args, spec: DatasetSpec, done: set[str]):
    """image_id, path (split/image_id, as predict names them) and stored pixels of the ETL rows not in `done`."""
    from pyspark.sql import functions as F

    from cxr_pipeline.training.serving.scorer import check_pixels

    dataset = versions.resolve(args.dataset).path  # the current version, once
    check_pixels(spec, read_dataset_spec(dataset), args.dataset, instead="pass the image files with --images")
    splits = [s for s in (args.split or SPLITS) if split_dir(dataset, s).exists()]
    frame = spark.read.option("basePath", str(dataset)).parquet(*(str(split_dir(dataset, s)) for s in splits))
    frame = frame.select("image_id", F.concat_ws("/", "split", "image_id").alias("path"), spec.pixel_column)
    if done:
        frame = frame.join(spark.createDataFrame([(i,) for i in done], "image_id string"), "image_id", "left_anti")
    return frame


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    started = time.perf_counter()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args.monitor_engine = resolve_engine(args.engine, args.monitor_table) if args.monitor_table else None
    args.engine = resolve_engine(args.engine, args.table)
    pin_registry()
    try:
        model_uri = resolve_model_uri(args.model_uri)
    except NoModelVersion as exc:
        # Before the first promotion the nightly job has nothing to score with: say so and end without failing
        # the schedule (a failed run would page someone every night until then).
        log.warning("%s: nothing scored, %s left as it was", exc, args.table)
        return {"model_uri": None, "scored": 0, "unreadable": 0, "skipped": None, "added": 0, "rescored": 0,
                "already_in_table": None}
    scratch = tempfile.TemporaryDirectory(prefix="cxr-score-")
    folder = download_model(model_uri, Path(scratch.name))
    spec = model_spec(folder)
    reference = score_monitor.val_reference(folder, spec) if args.monitor_table else None
    spark = spark_session(args) if args.engine == "delta-spark" else None  # deltalake: not before it is needed
    earlier = earlier_rows(args.table, model_uri, args.engine, spark)
    failed = set(earlier.loc[earlier[ERROR_COLUMN] != "", "image_id"]) if args.rescore_errors else set()
    done = set(earlier["image_id"]) - failed
    if args.images:
        todo, skipped = images_to_score(args, done)
        if todo.empty:
            log.info("%s already holds every image of %s for %s: nothing to score", args.table, args.images,
                     model_uri)
            scratch.cleanup()
            flagged = score_monitor.judge_last_run(args, model_uri) if args.monitor_table else []
            return {"model_uri": model_uri, "scored": 0, "unreadable": 0, "skipped": skipped, "added": 0,
                    "rescored": 0, "already_in_table": len(done), "flagged": flagged}
    spark = spark or spark_session(args)
    spark.sparkContext.addFile(str(folder), recursive=True)
    if args.images:
        partitions = max(1, min(len(todo), args.partitions or spark.sparkContext.defaultParallelism))
        inputs, column = spark.createDataFrame(todo, "image_id string, path string").repartition(partitions), "path"
    else:
        inputs, column, skipped = dataset_frame(spark, args, spec, done), spec.pixel_column, None
    scored_at = datetime.now(timezone.utc)
    scored = inputs.mapInPandas(partition_scorer(folder.name, model_uri, column, spec, args.batch_size),
                                spark_schema(spec.label_names, without=(SCORED_AT,)))
    if args.engine == "deltalake":
        frame = scored.toPandas().drop_duplicates(list(KEY))
        frame[SCORED_AT] = pd.Timestamp(scored_at)
        rows = to_arrow(frame, spec.label_names, table=True)
        if rows.num_rows:
            write_deltalake_rows(args.table, rows, model_uri)
        counts = {"scored": rows.num_rows, "unreadable": int((frame[ERROR_COLUMN] != "").sum())}
        rescored = len(failed & set(frame["image_id"]))
        scores = frame  # this run's rows, for the monitor
    else:
        from pyspark.sql import functions as F

        scored = scored.withColumn(SCORED_AT, F.lit(scored_at)).persist()
        counts = {"scored": scored.count(), "unreadable": scored.filter(F.col(ERROR_COLUMN) != "").count()}
        rescored = scored.filter(F.col("image_id").isin(list(failed))).count() if failed else 0
        if counts["scored"]:
            merge_spark(spark, scored, args.table, RETRY_ERRORS)
        # this run's label columns (N x L doubles), for the monitor
        scores = scored.select(*label_columns(spec.label_names, table=True)).toPandas() if args.monitor_table else None
        scored.unpersist()
    scratch.cleanup()
    result = {"model_uri": model_uri, **counts, "skipped": skipped, "added": counts["scored"] - rescored,
              "rescored": rescored, "already_in_table": len(done), "flagged": []}
    log.info("%d images scored with %s in %.1f s (%d unreadable, listed with their reason); %s: rows added %d, "
             "earlier error rows replaced %d, rows of this model kept as they were %d", counts["scored"], model_uri,
             time.perf_counter() - started, counts["unreadable"], args.table, result["added"], rescored, len(done))
    if args.monitor_table and counts["scored"]:
        watched = score_monitor.watch_run(args, reference, spec, model_uri, scored_at, scores)
        result["flagged"] = score_monitor.judge(args, watched, score_monitor.THIS_RUN)
    elif args.monitor_table:
        result["flagged"] = score_monitor.judge_last_run(args, model_uri)
    return result


if __name__ == "__main__":
    main()
