"""Chest X-rays -> Parquet partitioned by patient-level split (Spark job).

    spark-submit etl/preprocess.py --source nih --data-root /data/nih --output /data/nih_512 --size 512

The driver builds a manifest (labels joined to file paths, no pixels), assigns splits by
patient and rejects rows it can already judge (missing file, unknown label...). Executors
then decode, convert to grey 8-bit and resize in `mapInPandas`. Rows that fail to decode
are quarantined, not dropped: `_quarantine/rejects.parquet` lists every row not
written with its reason, and `_etl_summary.json` reconciles the counts
(rows read = rows written + rows quarantined). Each run writes a new immutable version of
OUTPUT (`OUTPUT/_versions/ID`, etl/versions.py) and makes it current in one step only when
complete; training runs that read an older version keep it, and versions no run may still
read are pruned after --keep-days.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxr_pipeline.config import dump_config, parse_args
from cxr_pipeline.etl import versions
from cxr_pipeline.etl.hold_points import hold_at
from cxr_pipeline.etl.images import DecoderChoiceError, ImageError, choose_decoder, decode_resize, normalise
from cxr_pipeline.etl.mean_image import compute_mean_image, write_mean_image
from cxr_pipeline.etl.sessions import session_builder
from cxr_pipeline.schema import (FOLD_COLUMN, PIXEL_DTYPES, SPEC_METADATA_KEY, SPLITS, DatasetSpec, metadata_columns,
                                 split_dir)
from cxr_pipeline.etl.sources import SOURCES, get_source, manifest_options, side_tables
from cxr_pipeline.etl.sources.manifest import REJECT_COLUMNS, resolve_inside
from cxr_pipeline.etl.splits import assign_folds, assign_splits, check_patient_disjoint, fold_split, parse_fractions
from cxr_pipeline.etl.subsets import balanced_subset, class_membership, parse_targets
from cxr_pipeline.etl.uncertainty import BLANK_POLICIES, spec_label_fields

log = logging.getLogger("etl")
QUARANTINE_SPLIT = "quarantine"
SIZES = (224, 256, 512, 1024)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", choices=sorted(SOURCES), help="dataset layout of --data-root")
    parser.add_argument("--data-root", help="folder of the download (images and label files below it)")
    parser.add_argument("--labels-csv", help="label table, if not in DATA_ROOT (nih: Data_Entry_2017*.csv, "
                                             "chexpert: train.csv, dicom: labels.csv)")
    parser.add_argument("--no-finding-class", action="store_true",
                        help="nih: 15 classes, 'No Finding' as a class of its own (default: the 14 findings)")
    parser.add_argument("--frontal-only", action="store_true", help="chexpert: leave lateral images out")
    parser.add_argument("--uncertainty-policy",
                        help="chexpert: what uncertain (-1) labels become: U-Zeros (default), U-Ones, U-Ignore, "
                             "U-MultiClass or U-SelfTrained for all labels, or a default then per-label choices, "
                             "e.g. 'U-Zeros,Atelectasis=U-Ones,Cardiomegaly=U-MultiClass' (etl/uncertainty.py)")
    parser.add_argument("--blank-policy", choices=BLANK_POLICIES,
                        help="chexpert: blank (unmentioned) labels are negative (U-Zeros, default) "
                             "or masked (U-Ignore)")
    parser.add_argument("--folds", type=int,
                        help="K >= 2: K patient-disjoint train/val folds of the train_val part; rows carry a "
                             "`fold` column and split=train/val hold fold 0's division")
    parser.add_argument("--subset-targets",
                        help="balanced subset: images per class, e.g. '2000,No Finding=10000' (etl/subsets.py); "
                             "other images are left out before decoding")
    parser.add_argument("--output", help="dataset root: each run adds a version under it (Parquet, partitioned by "
                                         "split) and makes it current; training reads the current one")
    parser.add_argument("--size", type=int, default=512,
                        help=f"square output size in pixels; the reports used {SIZES} (default 512)")
    parser.add_argument("--dtype", choices=PIXEL_DTYPES, default="uint8",
                        help="uint8: grey bytes, normalised by the loader (compact, default); "
                             "float32: 3-channel ImageNet-normalised floats (12x larger)")
    parser.add_argument("--no-mean-image", action="store_true",
                        help="skip the train split's average image (OUTPUT/_mean_image.npz, one more pass over "
                             "the train pixels), which training's --normalisation mean-image needs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient-level split (default 0)")
    parser.add_argument("--split-fractions", default="0.7,0.1,0.2",
                        help="train,val,test fractions of patients when the dataset has no official "
                             "test list; with one, train:val divides the official train_val part")
    parser.add_argument("--rows-per-file", type=int, default=256,
                        help="rows per Parquet file; each file is one or more row groups, the unit "
                             "Petastorm shards across training ranks (default 256)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.05,
                        help="fail the job when more than this fraction of rows is quarantined "
                             "(default 0.05; the version is still written for inspection, not made current)")
    parser.add_argument("--overwrite", action="store_true",
                        help="--output holds a dataset: write a new version and make it current (runs reading "
                             "the old one keep it)")
    parser.add_argument("--keep-days", type=float, default=versions.DEFAULT_KEEP_DAYS,
                        help="after committing, prune the versions no training run started within this many days "
                             f"may read (default {versions.DEFAULT_KEEP_DAYS:g}; python -m etl.versions lists them)")
    parser.add_argument("--master", help="Spark master when run without spark-submit (default local[*])")
    return parser


def spark_session(master: str | None):
    spark = (
        session_builder("cxr-preprocess", master).config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "64")
        .config("spark.ui.showConsoleProgress", "true")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("WARN")
    return spark


def decode_batches(data_root: str, spec: DatasetSpec):
    """The mapInPandas function: adds the pixel column; failures go to the quarantine split."""
    root = Path(data_root)

    def decode(frames):
        for frame in frames:
            pixels, reasons, details = [], [], []
            for relative in frame["source_path"]:
                try:
                    grey = decode_resize(resolve_inside(root, relative).read_bytes(), spec.image_size, spec.decoder)
                    data = grey if spec.pixel_dtype == "uint8" else normalise(grey, spec.mean, spec.std)
                    pixels.append(data.tobytes())
                    reasons.append(None)
                    details.append(None)
                except (ImageError, OSError, ValueError) as exc:
                    pixels.append(None)
                    reasons.append(getattr(exc, "reason", None) or failure_reason(exc))
                    details.append(str(exc))
            failed = pd.Series(reasons, index=frame.index).notna()
            yield frame.assign(**{
                spec.pixel_column: pixels,
                "quarantine_reason": reasons,
                "quarantine_detail": details,
                "split": frame["split"].where(~failed, QUARANTINE_SPLIT),
            })

    return decode


def failure_reason(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "image_missing"
    if isinstance(exc, ValueError):
        return "path_escapes_root"
    return "unreadable_file"


def output_schema(spec: DatasetSpec):
    from pyspark.sql.types import BinaryType, StringType, StructField, StructType, _parse_datatype_string

    columns = _parse_datatype_string(", ".join(f"{name} {kind}" for name, kind in metadata_columns(spec).items()))
    return StructType(list(columns.fields) + [
        StructField("split", StringType()),
        StructField(spec.pixel_column, BinaryType(), metadata={SPEC_METADATA_KEY: spec.to_json()}),
        StructField("quarantine_reason", StringType()),
        StructField("quarantine_detail", StringType()),
    ])


def write_parquet(spark, rows: pd.DataFrame, data_root: str, spec: DatasetSpec, staging: Path, rows_per_file: int):
    """Decode and write all rows; returns nothing, the files are the result."""
    schema = output_schema(spec)
    input_columns = set(metadata_columns(spec)) | {"split"}
    input_schema = [field.name for field in schema.fields if field.name in input_columns]
    input_struct = _input_struct(schema, input_schema)
    # The manifest reaches Spark as a Parquet file the driver writes and executors read: driver memory and
    # time stay linear in rows (createDataFrame from pandas, above Spark's 48 MB Arrow local-relation
    # threshold, made one partition per 64-row Arrow batch: 15,625 tasks and a full driver heap at 1M rows).
    manifest_path = manifest_file(staging)
    try:
        write_manifest(rows, input_struct, manifest_path)
        manifest = spark.read.schema(input_struct).parquet(str(manifest_path))
        partitions = max(2 * spark.sparkContext.defaultParallelism, -(-len(rows) // rows_per_file))
        (
            manifest.repartition(partitions, "patient_id")
            .mapInPandas(decode_batches(data_root, spec), schema)
            # A fixed row order makes reruns byte-identical and satisfies the writer's sort.
            .sortWithinPartitions("split", "image_id")
            .write.partitionBy("split")
            .option("maxRecordsPerFile", rows_per_file)
            # Every image is distinct: a dictionary never pays off, and trying one cost 5-12% of the stage.
            .option(f"parquet.enable.dictionary#{spec.pixel_column}", "false")
            .parquet(str(staging))
        )
    finally:
        manifest_path.unlink(missing_ok=True)


MANIFEST_ROW_GROUP_ROWS = 65_536  # row groups Spark can split the manifest read on; also the conversion's slice


def manifest_file(staging: Path) -> Path:
    """Where write_parquet puts the manifest for the executors: beside the version folder being written (Spark
    creates that folder itself), removed when the write ends, failed or not (etl.versions prunes what a killed
    job leaves)."""
    return staging.with_name(f"{staging.name}.manifest.parquet")


def write_manifest(rows: pd.DataFrame, input_struct, path: Path) -> None:
    """The columns of `input_struct` of `rows` as Parquet, with the Arrow types of that Spark schema,
    converted one row group at a time (driver memory: the pandas frame plus one slice)."""
    from pyspark.sql.pandas.types import to_arrow_schema

    arrow_schema = to_arrow_schema(input_struct)
    with pq.ParquetWriter(str(path), arrow_schema) as writer:
        for start in range(0, max(len(rows), 1), MANIFEST_ROW_GROUP_ROWS):
            piece = rows.iloc[start:start + MANIFEST_ROW_GROUP_ROWS]
            writer.write_table(pa.Table.from_pandas(piece, schema=arrow_schema, preserve_index=False),
                               row_group_size=MANIFEST_ROW_GROUP_ROWS)


def _input_struct(schema, names):
    from pyspark.sql.types import StructType

    return StructType([schema[name] for name in names])


def collect_decode_rejects(staging: Path) -> pd.DataFrame:
    """Rows the executors quarantined, as reject records; removes their partition folder."""
    folder = split_dir(staging, QUARANTINE_SPLIT)
    if not folder.exists():
        return pd.DataFrame(columns=REJECT_COLUMNS)
    table = pq.read_table(folder, columns=["image_id", "source_path", "source_row", "quarantine_reason",
                                           "quarantine_detail"])
    shutil.rmtree(folder)
    frame = table.to_pandas().rename(columns={"quarantine_reason": "reason", "quarantine_detail": "detail"})
    return frame[REJECT_COLUMNS]


def written_rows(staging: Path) -> pd.DataFrame:
    """patient_id and split of every row written (read back from the files, not trusted)."""
    frames = []
    for split in SPLITS:
        folder = split_dir(staging, split)
        if folder.exists():
            ids = pq.read_table(folder, columns=["patient_id"]).column("patient_id").to_pandas()
            frames.append(pd.DataFrame({"patient_id": ids, "split": split}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["patient_id", "split"])


def run(args: argparse.Namespace) -> dict:
    missing = [flag for flag in ("source", "data_root", "output") if not getattr(args, flag)]
    if missing:
        raise SystemExit(f"missing --{', --'.join(m.replace('_', '-') for m in missing)} (or set them in --config)")
    output = Path(args.output).resolve()
    if versions.has_data(output) and not args.overwrite:
        raise SystemExit(f"{output} holds a dataset; pass --overwrite to write a new version and make it current "
                         "(training runs reading the current one keep it)")
    timings: dict[str, float] = {}
    created = versions.now_utc()

    started = time.perf_counter()
    try:
        options = manifest_options(args.source, {
            "labels_csv": args.labels_csv, "no_finding_class": args.no_finding_class, "frontal_only": args.frontal_only,
            "uncertainty_policy": args.uncertainty_policy, "blank_policy": args.blank_policy})
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    manifest = get_source(args.source).build_manifest(args.data_root, **options)
    extra_tables = side_tables(args.source, args.data_root)
    rows_read, left_out_by_subset = manifest.rows_read, 0
    if args.subset_targets:
        membership = class_membership(manifest.rows, manifest.label_names)
        keep = balanced_subset(membership, parse_targets(args.subset_targets, list(membership.columns)),
                               manifest.rows["image_id"], args.seed)
        left_out_by_subset = int((~keep).sum())
        manifest.rows = manifest.rows[keep].reset_index(drop=True)
    if rows_read == 0:
        raise SystemExit(f"nothing to do: no label rows and no images under {args.data_root}; "
                         f"check --data-root and --source {args.source}")
    rows = manifest.rows
    rows["split"] = assign_splits(rows["patient_id"], args.seed, parse_fractions(args.split_fractions),
                                  rows["official_split"] if rows["official_split"].notna().any() else None)
    if args.folds:
        rows[FOLD_COLUMN] = assign_folds(rows["patient_id"], args.seed, args.folds).where(rows["split"] != "test")
        rows[FOLD_COLUMN] = rows[FOLD_COLUMN].astype("Int32")
        rows["split"] = fold_split(rows["split"], rows[FOLD_COLUMN], 0)
    check_patient_disjoint(rows["patient_id"], rows["split"])
    timings["manifest"] = time.perf_counter() - started
    log.info("manifest: %d rows read, %d to decode (%s), %d rejected before decoding, %d left out by the subset, "
             "%.1fs", rows_read, len(rows), rows["split"].value_counts().to_dict(), len(manifest.rejects),
             left_out_by_subset, timings["manifest"])

    try:
        decoder = choose_decoder()
    except DecoderChoiceError as exc:
        raise SystemExit(str(exc)) from None
    spec = DatasetSpec(manifest.dataset, manifest.label_names, args.size, args.dtype, **spec_label_fields(manifest),
                       folds=args.folds or 0, decoder=decoder)
    with versions.writing(output) as (version, staging):
        if len(rows):
            started = time.perf_counter()
            spark = spark_session(args.master)
            timings["spark_start"] = time.perf_counter() - started
            started = time.perf_counter()
            write_parquet(spark, rows, str(Path(args.data_root).resolve()), spec, staging, args.rows_per_file)
            timings["decode_write"] = time.perf_counter() - started
        staging.mkdir(exist_ok=True)  # Spark creates it, unless there was nothing to decode
        rejects = pd.concat([manifest.rejects, collect_decode_rejects(staging)], ignore_index=True)
        written = written_rows(staging)
        check_patient_disjoint(written["patient_id"], written["split"])
        if len(rows) and spec.pixel_dtype == "uint8" and not args.no_mean_image:
            started = time.perf_counter()
            mean = compute_mean_image(spark, staging, spec.pixel_column, spec.image_size)
            timings["mean_image"] = time.perf_counter() - started
            if mean is not None:
                write_mean_image(mean, staging)
                log.info("mean image of %d train images (pixel std around it %.4f), %.1fs", mean.rows, mean.std,
                         timings["mean_image"])
        summary = {
            "dataset": spec.dataset,
            "rows_read": rows_read,
            "rows_written": {split: int((written["split"] == split).sum()) for split in SPLITS},
            "rows_quarantined": len(rejects),
            "rows_left_out_by_subset": left_out_by_subset,
            "quarantined_by_reason": rejects["reason"].value_counts().to_dict(),
            "values_kept_as_null": manifest.warnings["field"].value_counts().to_dict(),
            "patients": {split: int(written.loc[written["split"] == split, "patient_id"].nunique())
                         for split in SPLITS},
            "seconds": timings,
            # the driver's own peak (manifest, pandas, reads of the written footers); executors run elsewhere
            "driver_python_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        if (sum(summary["rows_written"].values()) + summary["rows_quarantined"] + left_out_by_subset
                != summary["rows_read"]):
            raise RuntimeError(f"row counts do not reconcile, nothing committed: {summary}")
        seconds = timings.get("decode_write", 0.0)
        log.info("decode+write: %s rows written, %d quarantined %s, %.1fs (%.1f img/s; Spark start %.1fs)",
                 summary["rows_written"], len(rejects), summary["quarantined_by_reason"], seconds,
                 len(rows) / max(seconds, 1e-9), timings.get("spark_start", 0.0))
        (staging / "_quarantine").mkdir()
        pq.write_table(pa.Table.from_pandas(rejects.astype({"source_row": "Int64"}), preserve_index=False),
                       staging / "_quarantine" / "rejects.parquet")
        pq.write_table(pa.Table.from_pandas(manifest.warnings.astype({"source_row": "Int64"}), preserve_index=False),
                       staging / "_quarantine" / "field_warnings.parquet")
        (staging / "_etl_summary.json").write_text(json.dumps(summary, indent=2))
        dump_config(args, staging / "_etl_config.yaml")
        for name, table in extra_tables.items():  # e.g. NIH bounding boxes, for localisation checks
            (staging / "_side").mkdir(exist_ok=True)
            pq.write_table(pa.Table.from_pandas(table, preserve_index=False), staging / "_side" / f"{name}.parquet")
        bad_fraction = summary["rows_quarantined"] / max(summary["rows_read"], 1)
        accepted = bad_fraction <= args.max_bad_fraction
        hold_at("etl:before-commit")  # fault tests: killed here, nothing may become current at OUTPUT
        committed = versions.commit(output, version, {
            "created": created.isoformat(), "dataset": spec.dataset, "image_size": spec.image_size,
            "rows_written": summary["rows_written"], "rows_quarantined": summary["rows_quarantined"],
            "etl_config": vars(args)}, make_current=accepted)
    log.info("committed version %s of %s%s (quarantine: %s)", version, output, "" if accepted else ", not current",
             committed / "_quarantine" / "rejects.parquet")
    pruned = versions.prune(output, args.keep_days)
    log.info("versions: %d pruned (%s), %d kept (python -m etl.versions list %s)", len(pruned),
             ", ".join(pruned) or "none older than --keep-days", len(versions.list_versions(output)), output)
    if not accepted:
        raise SystemExit(
            f"{bad_fraction:.1%} of rows were quarantined (limit --max-bad-fraction {args.max_bad_fraction}): "
            f"{summary['quarantined_by_reason']}; see {committed / '_quarantine' / 'rejects.parquet'}. Version "
            f"{version} is kept for inspection but not made current: training still reads "
            f"{versions.current_id(output) or 'no version'}"
        )
    return summary


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run(parse_args(build_parser(), "etl", argv))


if __name__ == "__main__":
    main()
