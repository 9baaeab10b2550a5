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
(training/serving.py): the driver resolves the URI to a fixed version (`models:/NAME@alias` and
`models:/NAME/latest` become `models:/NAME/<version>`), downloads it once and ships it to the executors,
where each Python worker loads it once (training.serving.cached_model) and scores Arrow batches of
--batch-size images in mapInPandas.

Output rows: image_id, path, model_uri, the calibrated probability of each label (a column per label,
named as the label with characters other than letters, digits and _ replaced by _), `<label>_positive`
at the run's operating point, `error` (why an image could not be scored: missing, empty, not an image,
...; such images get a row with empty scores, never a failed job) and scored_at.

One row per (image_id, model_uri), however often the job runs: images the table already holds for this
model version are not scored again (with --rescore-errors, those whose row has an error are, and the new
row replaces it: a file fixed since). Engines as for the AUROC rows (training/results.py; `auto`, the default,
takes delta-spark for a catalog table name or on Databricks, else deltalake):
- `deltalake` (delta-rs; no Delta jars): the scores are collected to the driver and appended
  (with --rescore-errors, replacing error rows rewrites this model's rows in one commit). Not delta-rs's MERGE: with
  deltalake 1.6 it writes string_view Parquet that pyarrow 14 (petastorm's limit) cannot open.
- `delta-spark` (a Spark session with Delta, as on Databricks, where --table may be a Unity Catalog table
  name): a MERGE on (image_id, model_uri) from the executors.
A second job on the same table and model at the same time could add a row twice with `deltalake`; the
bundle's job runs one at a time. Before any model version carries the alias asked for (a new deployment, before
the first promotion), the job logs that plainly and ends with success, scoring nothing.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa

from cxr_pipeline.etl import versions
from cxr_pipeline.etl.sessions import session_builder
from cxr_pipeline.schema import SPLITS, DatasetSpec, read_dataset_spec, split_dir
from cxr_pipeline.training.label_files import DECISION_SUFFIX, ERROR_COLUMN
from cxr_pipeline.training.results import (ENGINES, delta_table, is_table_name, quoted, read_with_spark,
                                           resolve_engine, save_delta, table_exists)

log = logging.getLogger("score")
KEY = ("image_id", "model_uri")
MERGE_PREDICATE = " AND ".join(f"t.{column} = s.{column}" for column in KEY)
RETRY_ERRORS = "t.error <> ''"  # only an error row is ever replaced (--rescore-errors); a scored one stays
SCORING_FAILED = "scoring_failed"


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
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="auto (default): delta-spark for a catalog table name or on Databricks, else deltalake "
                             "(delta-rs); or name one")
    parser.add_argument("--batch-size", type=int, default=32, help="images per Arrow batch and model call (32)")
    parser.add_argument("--partitions", type=int, default=0,
                        help="Spark partitions of the image list (default: the cluster's default parallelism)")
    parser.add_argument("--rescore-errors", action="store_true",
                        help="also score again the images whose row for this model has an error (a file fixed "
                             "since), replacing that row; without it every image is scored once per model version")
    parser.add_argument("--master", help="Spark master, e.g. local[2] (default: the session's, else local[*])")
    return parser


# ---- the model --------------------------------------------------------------------------------------------
class NoModelVersion(Exception):
    """The registry has no version under the name and alias (or `latest`) asked for: nothing to score with yet."""


def pin_registry() -> None:
    """MLflow's registry for resolving and downloading `models:/` URIs: the one training registers in
    (training.tracking.registry_uri: Unity Catalog when tracking goes to Databricks)."""
    import mlflow

    from cxr_pipeline.training.tracking import registry_uri

    registry = registry_uri(mlflow.get_tracking_uri())
    if registry:
        mlflow.set_registry_uri(registry)


def resolve_model_uri(uri: str) -> str:
    """A URI that names one immutable model: registry aliases and `latest` become the version they point at;
    a local folder becomes its absolute path. NoModelVersion when none exists yet."""
    if "://" not in uri and not uri.startswith(("models:", "runs:")):
        return str(Path(uri).resolve())
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(latest))", uri)
    if not match:
        return uri
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    name, alias = match.group(1), match.group(2)
    if alias:
        try:
            version = client.get_model_version_by_alias(name, alias).version
        except MlflowException as exc:
            # No such alias: INVALID_PARAMETER_VALUE (SQL store) or RESOURCE_DOES_NOT_EXIST / NOT_FOUND (a missing
            # model, Unity Catalog); anything else (credentials, network) is a real failure.
            if exc.error_code not in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise
            raise NoModelVersion(f"no version of {name!r} carries the alias {alias!r} yet ({exc.error_code}). "
                                 f"Promote one: MlflowClient().set_registered_model_alias({name!r}, {alias!r}, "
                                 "VERSION), or in Catalog Explorer") from None
    else:
        versions = client.search_model_versions(f"name = {quoted(name)}")
        if not versions:
            raise NoModelVersion(f"the registry has no version of {name!r} yet: register one with train.py "
                                 "--register-model")
        version = max(int(v.version) for v in versions)
    return f"models:/{name}/{version}"


def download_model(uri: str, scratch: Path) -> Path:
    """The model's folder on the driver, under a name of its own (executors find it by that name in SparkFiles)."""
    import mlflow

    folder = scratch / f"cxr-model-{uuid.uuid4().hex[:12]}"
    folder.mkdir(parents=True)
    mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder))
    return folder


def model_spec(folder: Path) -> DatasetSpec:
    from mlflow.models import Model

    spec = (Model.load(str(folder / "MLmodel")).metadata or {}).get("dataset_spec")
    if not spec:
        raise SystemExit(f"{folder}: not a model logged by training/serving.py (no dataset_spec in its metadata)")
    return DatasetSpec.from_json(spec)


# ---- output columns -------------------------------------------------------------------------------------------
def column_name(label: str) -> str:
    return re.sub(r"\W", "_", label, flags=re.ASCII)


def score_columns(spec: DatasetSpec) -> dict[str, str]:
    """Model output column -> table column, for labels and decisions."""
    names = {label: column_name(label) for label in spec.label_names}
    if len(set(names.values())) != len(names):
        raise SystemExit(f"labels {list(names)} give clashing column names {list(names.values())}")
    return {**names, **{f"{label}{DECISION_SUFFIX}": f"{column}{DECISION_SUFFIX}" for label, column in names.items()}}


def arrow_schema(spec: DatasetSpec) -> pa.Schema:
    columns = score_columns(spec)
    labels = [columns[label] for label in spec.label_names]
    return pa.schema([("image_id", pa.string()), ("path", pa.string()), ("model_uri", pa.string()),
                      *((name, pa.float64()) for name in labels),
                      *((f"{name}{DECISION_SUFFIX}", pa.int32()) for name in labels),
                      (ERROR_COLUMN, pa.string()), ("scored_at", pa.timestamp("us", tz="UTC"))])


def spark_schema(spec: DatasetSpec) -> str:
    """The rows mapInPandas yields (scored_at is added after)."""
    kinds = {pa.string(): "string", pa.float64(): "double", pa.int32(): "int"}
    return ", ".join(f"`{field.name}` {kinds[field.type]}" for field in arrow_schema(spec) if field.name != "scored_at")


# ---- executors --------------------------------------------------------------------------------------------
def predict_or_explain(model, frame: pd.DataFrame, batch_size: int) -> pd.DataFrame:
    """model.predict on a batch; if the batch fails as a whole, row by row, a row that still fails getting
    its reason in `error`: a bad image must never fail the job."""
    try:
        return model.predict(frame, params={"batch_size": batch_size})
    except Exception:  # noqa: BLE001 - retried row by row below, where each failure is reported
        rows = []
        for index in range(len(frame)):
            try:
                rows.append(model.predict(frame.iloc[index:index + 1], params={"batch_size": 1}))
            except Exception as exc:  # noqa: BLE001
                rows.append(pd.DataFrame({ERROR_COLUMN: [f"{SCORING_FAILED}: {type(exc).__name__}: {exc}"]},
                                         index=frame.index[index:index + 1]))
        return pd.concat(rows)


def partition_scorer(model_folder_name: str, model_uri: str, input_column: str, spec: DatasetSpec, batch_size: int):
    """The function mapInPandas runs: (image_id, path, input) batches -> table rows (without scored_at)."""
    columns = score_columns(spec)
    names = [field.name for field in arrow_schema(spec) if field.name != "scored_at"]

    def score(batches):
        from pyspark import SparkFiles

        from cxr_pipeline.training.serving import cached_model

        model = cached_model(SparkFiles.get(model_folder_name))  # once per Python worker
        for batch in batches:
            scored = predict_or_explain(model, batch[[input_column]], batch_size).rename(columns=columns)
            scored = scored.reindex(columns=names)
            scored["image_id"], scored["path"], scored["model_uri"] = (batch["image_id"].to_numpy(),
                                                                       batch["path"].to_numpy(), model_uri)
            for name in names:
                if name.endswith(DECISION_SUFFIX):
                    scored[name] = scored[name].astype("Int32")
            scored[ERROR_COLUMN] = scored[ERROR_COLUMN].fillna("")
            yield scored[names]
    return score


# ---- driver ---------------------------------------------------------------------------------------------------
def spark_session(args):
    spark = session_builder("cxr-score", args.master, delta=args.engine == "delta-spark").getOrCreate()
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(args.batch_size))
    spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
    if args.engine == "delta-spark":  # a model with new labels adds their columns to the table
        spark.conf.set("spark.databricks.delta.schema.autoMerge.enabled", "true")
    return spark


def images_to_score(args, done: set[str]) -> tuple[pd.DataFrame, int]:
    """(image_id and path of the listed images not in `done`, how many were), on the driver: no Spark needed."""
    from cxr_pipeline.training.predict import image_paths

    listed = pd.DataFrame([(image_id, str(path)) for image_id, path in image_paths(args.images)],
                          columns=["image_id", "path"]).drop_duplicates("image_id")
    if listed.empty:
        raise SystemExit(f"no image found in {args.images}")
    todo = listed[~listed["image_id"].isin(done)]
    return todo, len(listed) - len(todo)


def dataset_frame(spark, args, spec: DatasetSpec, done: set[str]):
    """image_id, path (split/image_id, as predict names them) and stored pixels of the ETL rows not in `done`."""
    dataset = versions.resolve(args.dataset).path  # the current version, once
    stored = read_dataset_spec(dataset)
    if (stored.image_size, stored.pixel_dtype) != (spec.image_size, spec.pixel_dtype):
        raise SystemExit(f"{args.dataset} holds {stored.image_size} px {stored.pixel_dtype} pixels, the model "
                         f"takes {spec.image_size} px {spec.pixel_dtype}: rerun the ETL at that size, or pass "
                         "the image files with --images")
    from pyspark.sql import functions as F

    splits = [s for s in (args.split or SPLITS) if split_dir(dataset, s).exists()]
    frame = spark.read.option("basePath", str(dataset)).parquet(*(str(split_dir(dataset, s)) for s in splits))
    frame = frame.select("image_id", F.concat_ws("/", "split", "image_id").alias("path"), spec.pixel_column)
    if done:
        frame = frame.join(spark.createDataFrame([(i,) for i in done], "image_id string"), "image_id", "left_anti")
    return frame


def earlier_rows(spark, args, model_uri: str) -> pd.DataFrame:
    """image_id and error of the rows the table already holds for this model (none when there is no table)."""
    if args.engine == "deltalake":
        import pyarrow.dataset as ds
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        if is_table_name(args.table):
            raise SystemExit(f"{args.table!r} is a catalog table name: use --engine delta-spark, or give a folder "
                             "path")
        try:
            dataset = DeltaTable(args.table).to_pyarrow_dataset()
        except TableNotFoundError:
            return pd.DataFrame({"image_id": [], ERROR_COLUMN: []})
        return dataset.to_table(filter=ds.field("model_uri") == model_uri,
                                columns=["image_id", ERROR_COLUMN]).to_pandas()
    if not table_exists(spark, args.table):
        return pd.DataFrame({"image_id": [], ERROR_COLUMN: []})
    rows = read_with_spark(spark, args.table).filter(f"model_uri = {quoted(model_uri)}")
    return rows.select("image_id", ERROR_COLUMN).toPandas()


def write_deltalake_rows(table_uri: str, rows: pa.Table, model_uri: str, rescored: set[str]) -> None:
    """Append the new rows; where they replace rows that had an error, rewrite this model's rows in one commit
    (every file holds one model's rows, so the predicate removes whole files and nothing is rewritten)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    from deltalake import DeltaTable, write_deltalake
    from deltalake.exceptions import TableNotFoundError

    if not rescored:
        write_deltalake(table_uri, rows, mode="append", schema_mode="merge")
        return
    try:
        earlier = DeltaTable(table_uri).to_pyarrow_dataset().to_table(filter=ds.field("model_uri") == model_uri)
    except TableNotFoundError:
        earlier = rows.schema.empty_table()
    kept = earlier.filter(pc.invert(pc.is_in(earlier["image_id"], pa.array(sorted(rescored)))))
    kept = kept.select(rows.schema.names).cast(rows.schema)  # one model: the same labels, the same columns
    write_deltalake(table_uri, pa.concat_tables([kept, rows]), mode="overwrite",
                    predicate=f"model_uri = {quoted(model_uri)}", schema_mode="merge")


def merge_spark(spark, scored, table_uri: str) -> None:
    """MERGE on (image_id, model_uri) through Delta on Spark (Databricks): by table name, or by path."""
    if not table_exists(spark, table_uri):
        save_delta(scored.write.format("delta").mode("errorifexists"), table_uri)
        return
    (delta_table(spark, table_uri).alias("t").merge(scored.alias("s"), MERGE_PREDICATE)
     .whenMatchedUpdateAll(condition=RETRY_ERRORS).whenNotMatchedInsertAll().execute())


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    started = time.perf_counter()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
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
    spark = spark_session(args) if args.engine == "delta-spark" else None  # deltalake: not before it is needed
    earlier = earlier_rows(spark, args, model_uri)
    failed = set(earlier.loc[earlier[ERROR_COLUMN] != "", "image_id"]) if args.rescore_errors else set()
    done = set(earlier["image_id"]) - failed
    if args.images:
        todo, skipped = images_to_score(args, done)
        if todo.empty:
            log.info("%s already holds every image of %s for %s: nothing to score", args.table, args.images,
                     model_uri)
            scratch.cleanup()
            return {"model_uri": model_uri, "scored": 0, "unreadable": 0, "skipped": skipped, "added": 0,
                    "rescored": 0, "already_in_table": len(done)}
    spark = spark or spark_session(args)
    spark.sparkContext.addFile(str(folder), recursive=True)
    if args.images:
        partitions = max(1, min(len(todo), args.partitions or spark.sparkContext.defaultParallelism))
        inputs, column = spark.createDataFrame(todo, "image_id string, path string").repartition(partitions), "path"
    else:
        inputs, column, skipped = dataset_frame(spark, args, spec, done), spec.pixel_column, None
    scored_at = datetime.now(timezone.utc)
    scored = inputs.mapInPandas(partition_scorer(folder.name, model_uri, column, spec, args.batch_size),
                                spark_schema(spec))
    if args.engine == "deltalake":
        frame = scored.toPandas().drop_duplicates(list(KEY))
        frame["scored_at"] = pd.Timestamp(scored_at)
        schema = arrow_schema(spec)
        for field in schema:
            if field.type == pa.int32():
                frame[field.name] = frame[field.name].astype("Int32")
        rows = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
        if rows.num_rows:
            write_deltalake_rows(args.table, rows, model_uri, failed & set(frame["image_id"]))
        counts = {"scored": rows.num_rows, "unreadable": int((frame[ERROR_COLUMN] != "").sum())}
        rescored = len(failed & set(frame["image_id"]))
    else:
        from pyspark.sql import functions as F

        scored = scored.withColumn("scored_at", F.lit(scored_at)).persist()
        counts = {"scored": scored.count(), "unreadable": scored.filter(F.col(ERROR_COLUMN) != "").count()}
        rescored = scored.filter(F.col("image_id").isin(list(failed))).count() if failed else 0
        if counts["scored"]:
            merge_spark(spark, scored, args.table)
        scored.unpersist()
    scratch.cleanup()
    result = {"model_uri": model_uri, **counts, "skipped": skipped, "added": counts["scored"] - rescored,
              "rescored": rescored, "already_in_table": len(done)}
    log.info("%d images scored with %s in %.1f s (%d unreadable, listed with their reason); %s: rows added %d, "
             "earlier error rows replaced %d, rows of this model kept as they were %d", counts["scored"], model_uri,
             time.perf_counter() - started, counts["unreadable"], args.table, result["added"], rescored, len(done))
    return result


if __name__ == "__main__":
    main()
