"""Another fold's train/val division of a dataset written with `--folds K`, without decoding again.

The ETL writes every train_val row with its `fold` (0..K-1, by patient) and divides them as
fold 0 says (split=val is fold 0). For fold i this writes a dataset whose split=val holds the
rows of fold i and split=train the other folds; split=test and everything else is copied.

    python -m etl.folds --dataset /data/nih_224 --fold 2 --output /data/nih_224_fold2
    horovodrun -np 4 python training/train.py --config conf/nih.yaml --dataset /data/nih_224_fold2
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxr_pipeline.etl import versions
from cxr_pipeline.schema import FOLD_COLUMN, read_dataset_spec, split_dir

TRAIN_VAL = ("train", "val")


def write_fold(dataset: str | Path, fold: int, output: str | Path, overwrite: bool = False) -> dict:
    """Write a new version of `output` (current once complete, etl/versions.py); returns rows per split."""
    read, output = versions.resolve(dataset), Path(output).resolve()
    dataset = read.path
    spec = read_dataset_spec(dataset)
    if not spec.folds:
        raise ValueError(f"{dataset} has no folds: run the ETL with --folds K first")
    if not 0 <= fold < spec.folds:
        raise ValueError(f"--fold must be in 0..{spec.folds - 1} for {dataset}, got {fold}")
    if versions.has_data(output) and not overwrite:
        raise FileExistsError(f"{output} holds a dataset; pass --overwrite to write a new version of it")
    rows = {"train": 0, "val": 0, "test": 0}
    with versions.writing(output) as (version, staging):
        versions.copy_unchanged(dataset, staging, {f"split={split}" for split in TRAIN_VAL})
        rows["test"] = sum(pq.ParquetFile(f).metadata.num_rows for f in split_dir(staging, "test").glob("*.parquet"))
        for split in TRAIN_VAL:
            split_dir(staging, split).mkdir()
        for origin in TRAIN_VAL:
            for file in sorted(split_dir(dataset, origin).glob("*.parquet")):
                source = pq.ParquetFile(file)
                table = source.read()
                in_fold = pc.equal(table[FOLD_COLUMN], fold)
                group_rows = max(source.metadata.row_group(0).num_rows if source.metadata.num_row_groups else 1, 1)
                divided = {"val": table.filter(in_fold), "train": table.filter(pc.invert(in_fold))}
                for split, rows_of_split in divided.items():
                    if rows_of_split.num_rows:
                        pq.write_table(rows_of_split, split_dir(staging, split) / f"{origin}-{file.name}",
                                       row_group_size=group_rows, compression="snappy")
                        rows[split] += rows_of_split.num_rows
        summary = {"dataset": str(dataset), "dataset_version": read.version, "fold": fold, "folds": spec.folds,
                   "rows": rows}
        (staging / "_fold.json").write_text(json.dumps(summary, indent=2))
        versions.commit(output, version, {"created": versions.now_utc().isoformat(), "derived_from": summary,
                                          "rows_written": rows})
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="dataset folder written by etl/preprocess.py --folds K")
    parser.add_argument("--fold", type=int, required=True, help="the fold to hold out as split=val (0..K-1)")
    parser.add_argument("--output", required=True, help="dataset root: the fold becomes its current version")
    parser.add_argument("--overwrite", action="store_true", help="--output holds a dataset: add a new version")
    args = parser.parse_args(argv)
    try:
        summary = write_fold(args.dataset, args.fold, args.output, args.overwrite)
    except (ValueError, FileExistsError) as exc:
        raise SystemExit(str(exc)) from None
    print(f"fold {summary['fold']} of {summary['folds']}: {summary['rows']} rows per split in {args.output}")
    return summary


if __name__ == "__main__":
    main()
