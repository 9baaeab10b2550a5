"""`make bench`: each figure against its limit, measured on this machine in this run.

    python -m benchmarks.run [--rows 1000] [--repeats 3] [--work /tmp/cxr-bench]

1. ETL: real 1024 px NIH PNGs, repeated to --rows, to 512 px Parquet with local[2]; images/s
   per core of the Spark decode+write stage vs a bare Python loop with Pillow doing decode +
   grey + resize + normalise over the same files (limit: ratio >= 0.8).
2. Storage: Parquet bytes per image at 512 vs 512*512 (limit <= 1.05), per --dtype.
3. Loader: rows/s as torch tensors through Petastorm (the training reader) vs plain pyarrow
   reading the same files with the same conversion (limit >= 0.8).
4. Data stall: fraction of step time train.py waits for data, small CNN at 224 (limit <= 5%).
5. GPU throughput: not measured yet (needs a lent GPU machine).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from benchmarks.nih_repeat import build
from etl.images import decode_resize, normalise
from etl.schema import IMAGENET_MEAN, IMAGENET_STD, read_dataset_spec, split_dir

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NIH = Path(os.environ.get("CXR_SHARED_DATA", ROOT.parent / "shared" / "data")) / "nih"


def bare_loop(files: list[Path], size: int) -> float:
    """Images/s on one core: read, decode, grey, resize, normalise."""
    started = time.perf_counter()
    for path in files:
        normalise(decode_resize(path.read_bytes(), size), IMAGENET_MEAN, IMAGENET_STD)
    return len(files) / (time.perf_counter() - started)


def spark_etl(data_root: Path, output: Path, size: int, *extra) -> dict:
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    subprocess.run([str(BIN / "spark-submit"), "--master", "local[2]", "etl/preprocess.py", "--source", "nih",
                    "--data-root", str(data_root), "--output", str(output), "--size", str(size), "--overwrite",
                    *map(str, extra)], cwd=ROOT, env=env, check=True, capture_output=True)
    return json.loads((output / "_etl_summary.json").read_text())


def parquet_bytes(dataset: Path) -> int:
    return sum(path.stat().st_size for path in dataset.glob("split=*/*.parquet"))


def arrow_pixels(column, spec) -> np.ndarray:
    """A binary column's values as one (N, *shape) array, straight from the Arrow buffers (no copy)."""
    column = column.combine_chunks()
    _, offsets, data = column.buffers()
    start, stop = np.frombuffer(offsets, np.int32)[[column.offset, column.offset + len(column)]]
    dtype = np.uint8 if spec.pixel_dtype == "uint8" else np.float32
    return np.frombuffer(data, np.uint8)[start:stop].view(dtype).reshape(len(column), *spec.pixel_shape)


def loader_rates(dataset: Path, split: str = "train") -> tuple[float, float]:
    """(Petastorm rows/s, plain pyarrow rows/s), both ending in the same normalised tensors."""
    from training.data import SplitReader, model_input, prefetch

    spec = read_dataset_spec(dataset)
    started = time.perf_counter()
    rows = sum(len(batch.image_ids) for batch in prefetch(SplitReader(dataset, split, spec, batch_size=32)))
    petastorm_rate = rows / (time.perf_counter() - started)
    started = time.perf_counter()
    rows = 0
    for path in sorted(split_dir(dataset, split).glob("*.parquet")):
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=[spec.pixel_column, "labels"])
            for start in range(0, table.num_rows, 32):
                chunk = table.slice(start, 32)
                with warnings.catch_warnings():  # read-only Arrow memory; model_input never writes to it
                    warnings.simplefilter("ignore", UserWarning)
                    pixels = torch.from_numpy(arrow_pixels(chunk.column(spec.pixel_column), spec))
                model_input(pixels, spec), torch.as_tensor(np.asarray(chunk.column("labels").to_pylist(), np.float32))
                rows += chunk.num_rows
    return petastorm_rate, rows / (time.perf_counter() - started)


def data_stall(dataset: Path, work: Path) -> float:
    runs = work / "stall_runs"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    subprocess.run([sys.executable, "training/train.py", "--dataset", str(dataset), "--output-dir", str(runs),
                    "--results-table", str(work / "stall_results"), "--model", "small_cnn", "--weights", "none",
                    "--stages", "finetune", "--epochs-finetune", "1", "--batch-size", "16"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    summary = sorted(runs.glob("*/summary.csv"))[-1].read_text().splitlines()
    header, last = summary[0].split(","), summary[-1].split(",")
    return float(last[header.index("data_wait_fraction")])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000, help="rows of the ETL benchmark (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; medians are reported (default 3)")
    parser.add_argument("--work", default="/tmp/cxr-bench", help="scratch folder (default /tmp/cxr-bench)")
    args = parser.parse_args(argv)
    if not (NIH / "images").exists():
        raise SystemExit(f"real NIH images not found in {NIH}; set CXR_SHARED_DATA to the shared/data folder")
    work = Path(args.work)
    data_root = build(NIH, work / "nih_repeat", args.rows)
    files = sorted((data_root / "images").iterdir())
    table = []

    def add(figure, value, limit, ratio, target=None):
        """target > 0: ratio must be at least target; < 0: at most -target; None: reported only."""
        if target is None:
            table.append((figure, value, limit, f"{ratio:.2f}", "-", "-"))
            return
        met = ratio >= target if target > 0 else ratio <= -target
        table.append((figure, value, limit, f"{ratio:.2f}", ("≥ " if target > 0 else "≤ ") + f"{abs(target):g}",
                      "yes" if met else "NO"))

    bare, spark, summaries = [], [], []
    for repeat in range(args.repeats):
        print(f"ETL run {repeat + 1}/{args.repeats}...", flush=True)
        bare.append(bare_loop(files, 512))
        summary = spark_etl(data_root, work / "nih_512", 512)
        summaries.append(summary)
        spark.append(args.rows / summary["seconds"]["decode_write"] / 2)
    bare_rate, spark_rate = statistics.median(bare), statistics.median(spark)
    add("ETL img/s per core (Spark local[2], decode+write stage)", f"{spark_rate:.1f}",
        f"bare loop {bare_rate:.1f}", spark_rate / bare_rate, 0.8)

    uint8_bytes = parquet_bytes(work / "nih_512") / args.rows
    add("Parquet bytes per image, --dtype uint8", f"{uint8_bytes / 1e3:.0f} kB", "512*512 = 262 kB",
        uint8_bytes / 512**2, -1.05)
    subset = build(NIH, work / "nih_float", 100)
    spark_etl(subset, work / "nih_512_f32", 512, "--dtype", "float32")
    float_bytes = parquet_bytes(work / "nih_512_f32") / 100
    add("Parquet bytes per image, --dtype float32 (reported)", f"{float_bytes / 1e6:.2f} MB", "512*512 = 262 kB",
        float_bytes / 512**2)

    rates = [loader_rates(work / "nih_512") for _ in range(args.repeats)]
    petastorm_rate = statistics.median(r[0] for r in rates)
    arrow_rate = statistics.median(r[1] for r in rates)
    add("Loader rows/s to tensors (Petastorm, 512 px)", f"{petastorm_rate:.0f}", f"pyarrow {arrow_rate:.0f}",
        petastorm_rate / arrow_rate, 0.8)

    spark_etl(data_root, work / "nih_224", 224)
    stall = statistics.median(data_stall(work / "nih_224", work) for _ in range(args.repeats))
    add("Data stall, small CNN at 224 (CPU)", f"{100 * stall:.1f}%", "step time", stall, -0.05)

    widths = [max(len(str(row[i])) for row in table + [("figure", "value", "limit", "ratio", "target", "met")])
              for i in range(6)]
    print()
    for row in [("figure", "value", "limit", "ratio", "target", "met")] + table:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
    print("GPU throughput (DenseNet-121, AMP + channels-last, loader vs synthetic): not measured by this harness "
          "yet; it needs a lent GPU machine")
    print(f"(medians of {args.repeats} runs; ETL runs: "
          f"{[round(args.rows / s['seconds']['decode_write'], 1) for s in summaries]} img/s on 2 cores, "
          f"Spark start {[round(s['seconds']['spark_start'], 1) for s in summaries]} s, not counted)")


if __name__ == "__main__":
    main()
