"""`make bench`: each figure against its limit, measured on this machine in this run.

    python -m benchmarks.run [--rows 1000] [--repeats 3] [--work /tmp/cxr-bench]

1. ETL: real 1024 px NIH PNGs, repeated to --rows and to 3 x --rows, to 512 px Parquet with
   local[2]; images/s per core of the Spark decode+write stage vs a bare Python loop with
   Pillow doing decode + grey + resize + normalise over the same files (limit: ratio >= 0.8).
   Each job also pays a fixed cost (JVM warm-up, the shuffle stage, Python workers) that a
   real dataset amortises, so the figure is the marginal rate of the two sizes, with the fixed
   cost and the whole-stage rate of --rows reported beside it.
   Decode: OpenCV vs Pillow decode + resize of the real PNGs, images/s and pixel difference
   (benchmarks/decode.py).
2. Storage: Parquet bytes per image at 512 vs 512*512 (limit <= 1.05), per --dtype.
3. Loader: rows/s of ready-to-copy uint8 batches (pixels as stored, labels as float32 tensors)
   through Petastorm (the training reader) vs plain pyarrow reading the same columns of the same
   files, at 224 and 512 px (limit >= 0.8). Normalisation runs on the device (training/data/inputs.py).
4. Data stall: fraction of step time train.py waits for data, small CNN at 224 (limit <= 5%).
5. GPU: DenseNet-121 at 224, AMP + channels-last, training images/s through the loader vs
   synthetic tensors already on the GPU (limit >= 0.9; benchmarks/gpu.py). Only with a CUDA
   device; otherwise the table says it was not measured.
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

from benchmarks import gpu
from benchmarks.decode import add_figures as add_decode_figures
from benchmarks.nih_repeat import build
from cxr_pipeline.etl import versions
from cxr_pipeline.etl.images import decode_resize, normalise
from cxr_pipeline.schema import IMAGENET_MEAN, IMAGENET_STD, read_dataset_spec, split_dir

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
    return json.loads((versions.resolve(output).path / "_etl_summary.json").read_text())


def parquet_bytes(dataset: Path) -> int:
    return sum(path.stat().st_size for path in versions.resolve(dataset).path.glob("split=*/*.parquet"))


def arrow_pixels(column, spec) -> np.ndarray:
    """A binary column's values as one (N, *shape) array, straight from the Arrow buffers (no copy)."""
    column = column.combine_chunks()
    _, offsets, data = column.buffers()
    start, stop = np.frombuffer(offsets, np.int32)[[column.offset, column.offset + len(column)]]
    dtype = np.uint8 if spec.pixel_dtype == "uint8" else np.float32
    return np.frombuffer(data, np.uint8)[start:stop].view(dtype).reshape(len(column), *spec.pixel_shape)


def loader_rates(dataset: Path, split: str = "train") -> tuple[float, float]:
    """(Petastorm rows/s, plain pyarrow rows/s), both ending in uint8 pixel and float32 label tensors."""
    from cxr_pipeline.training.data.reader import SplitReader, prefetch

    dataset = versions.resolve(dataset).path
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
                with warnings.catch_warnings():  # a view of read-only Arrow memory, only read here
                    warnings.simplefilter("ignore", UserWarning)
                    torch.from_numpy(arrow_pixels(chunk.column(spec.pixel_column), spec))
                torch.as_tensor(np.asarray(chunk.column("labels").to_pylist(), np.float32))
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
    large_root = build(NIH, work / "nih_repeat_large", 3 * args.rows)
    files = sorted((data_root / "images").iterdir())
    table = []

    def add(figure, value, limit, ratio, target=None):
        """target > 0: ratio must be at least target; < 0: at most -target; None: reported only."""
        if target is None:
            table.append((figure, value, limit, "-" if ratio is None else f"{ratio:.2f}", "-", "-"))
            return
        met = ratio >= target if target > 0 else ratio <= -target
        table.append((figure, value, limit, f"{ratio:.2f}", ("≥ " if target > 0 else "≤ ") + f"{abs(target):g}",
                      "yes" if met else "NO"))

    bare, whole, marginal, fixed, summaries = [], [], [], [], []
    for repeat in range(args.repeats):
        print(f"ETL run {repeat + 1}/{args.repeats}...", flush=True)
        bare.append(bare_loop(files, 512))
        small = spark_etl(data_root, work / "nih_512", 512)["seconds"]["decode_write"]
        large = spark_etl(large_root, work / "nih_512_large", 512)["seconds"]["decode_write"]
        summaries.append((small, large))
        rate = 2 * args.rows / (large - small)  # images/s on 2 cores, fixed cost removed
        whole.append(args.rows / small / 2)
        marginal.append(rate / 2)
        fixed.append(small - args.rows / rate)
    bare_rate = statistics.median(bare)
    add("ETL img/s per core (Spark local[2], decode+write, marginal)", f"{statistics.median(marginal):.1f}",
        f"bare loop {bare_rate:.1f}", statistics.median(marginal) / bare_rate, 0.8)
    add(f"ETL img/s per core, whole stage of {args.rows} rows (reported)", f"{statistics.median(whole):.1f}",
        f"bare loop {bare_rate:.1f}", statistics.median(whole) / bare_rate)
    add("ETL fixed cost per job (reported)", f"{statistics.median(fixed):.1f} s", "-", None)
    add_decode_figures(add, NIH / "images", args.repeats)

    uint8_bytes = parquet_bytes(work / "nih_512") / args.rows
    add("Parquet bytes per image, --dtype uint8", f"{uint8_bytes / 1e3:.0f} kB", "512*512 = 262 kB",
        uint8_bytes / 512**2, -1.05)
    subset = build(NIH, work / "nih_float", 100)
    spark_etl(subset, work / "nih_512_f32", 512, "--dtype", "float32")
    float_bytes = parquet_bytes(work / "nih_512_f32") / 100
    add("Parquet bytes per image, --dtype float32 (reported)", f"{float_bytes / 1e6:.2f} MB", "512*512 = 262 kB",
        float_bytes / 512**2)

    spark_etl(data_root, work / "nih_224", 224)
    for size in (224, 512):
        loader_rates(work / f"nih_{size}")  # warm-up, not counted: imports and a cold file cache
        rates = [loader_rates(work / f"nih_{size}") for _ in range(args.repeats)]
        petastorm_rate = statistics.median(r[0] for r in rates)
        arrow_rate = statistics.median(r[1] for r in rates)
        add(f"Loader rows/s, uint8 batches (Petastorm, {size} px)", f"{petastorm_rate:.0f}",
            f"pyarrow {arrow_rate:.0f}", petastorm_rate / arrow_rate, 0.8)

    stall = statistics.median(data_stall(work / "nih_224", work) for _ in range(args.repeats))
    add("Data stall, small CNN at 224 (CPU)", f"{100 * stall:.1f}%", "step time", stall, -0.05)

    if torch.cuda.is_available():
        rates = gpu.measure(work / "nih_224", "densenet121", 64, 60, 10, "bf16", True, torch.device("cuda"))
        add(f"GPU img/s, DenseNet-121 224 bf16 channels-last ({rates['device']})", f"{rates['loader']:.0f}",
            f"synthetic {rates['synthetic']:.0f}", rates["loader"] / rates["synthetic"], 0.9)

    widths = [max(len(str(row[i])) for row in table + [("figure", "value", "limit", "ratio", "target", "met")])
              for i in range(6)]
    print()
    for row in [("figure", "value", "limit", "ratio", "target", "met")] + table:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
    if not torch.cuda.is_available():
        print("GPU throughput (DenseNet-121, AMP + channels-last, loader vs synthetic): not measured, no CUDA "
              "device on this machine (python -m benchmarks.gpu on one)")
    print(f"(medians of {args.repeats} runs; decode+write seconds of {args.rows} / {3 * args.rows} rows: "
          f"{[(round(small, 1), round(large, 1)) for small, large in summaries]}; Spark start not counted)")


if __name__ == "__main__":
    main()
