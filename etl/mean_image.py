"""The train split's average image (report 002's "average" image), stored with the dataset.

The ETL computes it after writing, from the stored uint8 pixels of `split=train` only (val and
test never leak into it), together with the standard deviation of all train pixels around it,
and writes both to `<dataset>/_mean_image.npz`. Training selects it with
`--normalisation mean-image` (training/data/inputs.py): x -> (x - mean image) / std, on [0, 1] pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_pipeline.schema import split_dir

MEAN_IMAGE_FILE = "_mean_image.npz"


@dataclass(frozen=True)
class MeanImage:
    image: np.ndarray  # (H, W) float32 in [0, 1]
    std: float  # of the train pixels around the mean image, on [0, 1]
    rows: int  # train images averaged


def compute_mean_image(spark, dataset_dir: Path, pixel_column: str, size: int) -> MeanImage | None:
    """One Spark pass over the train split's files: exact integer per-pixel sums and the sum of
    squares. Each task reads its files with pyarrow in batches of 16 rows: Spark's own Parquet
    reader wants one array per row group (67 MB of 512 px pixels) and ran the driver JVM out of
    memory at 5,000 images (`make bench-scale`). None when the split has no rows."""
    files = sorted(str(path) for path in split_dir(dataset_dir, "train").glob("*.parquet"))
    if not files:
        return None

    def partition_sums(paths):
        import pyarrow.parquet as pq

        total, squares, count = np.zeros(size * size, np.uint64), 0, 0
        for path in paths:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=16, columns=[pixel_column]):
                pixels = np.frombuffer(b"".join(batch.column(0).to_pylist()), np.uint8).reshape(-1, size * size)
                total += pixels.sum(axis=0, dtype=np.uint64)
                squares += int(np.square(pixels, dtype=np.uint32).sum(dtype=np.uint64))
                count += len(pixels)
        yield total, squares, count

    def add(left, right):
        return left[0] + right[0], left[1] + right[1], left[2] + right[2]

    tasks = min(len(files), 2 * spark.sparkContext.defaultParallelism)
    total, squares, count = spark.sparkContext.parallelize(files, tasks).mapPartitions(partition_sums).treeReduce(add)
    if count == 0:
        return None
    mean = total.astype(np.float64) / count  # grey levels 0..255
    # sum over images of (x - m)^2 = sum x^2 - count * sum m^2, over all pixels
    variance = max(squares - count * float(np.square(mean).sum()), 0.0) / (count * size * size)
    return MeanImage((mean / 255.0).reshape(size, size).astype(np.float32), float(np.sqrt(variance)) / 255.0,
                     int(count))


def write_mean_image(mean: MeanImage, dataset_dir: Path) -> None:
    np.savez(Path(dataset_dir) / MEAN_IMAGE_FILE, image=mean.image, std=mean.std, rows=mean.rows)


def read_mean_image(dataset_dir: str | Path) -> MeanImage:
    path = Path(dataset_dir) / MEAN_IMAGE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the dataset was written without a mean image (an ETL older "
                                "than this option, --no-mean-image, or a float32 dataset); rerun etl/preprocess.py")
    with np.load(path) as stored:
        return MeanImage(stored["image"], float(stored["std"]), int(stored["rows"]))
