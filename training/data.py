"""Stream one split of the ETL's Parquet into torch batches with Petastorm.

Each rank reads its own share of row groups (`make_batch_reader(cur_shard=rank,
shard_count=world_size)`), so the ranks together read every row exactly once per pass.
Sizes, label names and normalisation come from the dataset's own metadata
(:func:`etl.schema.read_dataset_spec`), never from flags.
"""
from __future__ import annotations

import queue
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from etl.schema import LABEL_MASK_COLUMN, DatasetSpec, split_dir

# The non-image inputs of fusion models (training.models.metadata_features), as the ETL names them.
METADATA_COLUMNS = ("age", "sex", "view_position")

# Petastorm 0.13.1 drives pyarrow 14 through its legacy dataset API: one warning per call.
warnings.filterwarnings("ignore", category=FutureWarning, module="petastorm")


@dataclass
class Batch:
    images: torch.Tensor  # (N, 3, H, W) float32, normalised
    labels: torch.Tensor  # (N, num_labels) float32, as stored (training.targets says how to read them)
    mask: torch.Tensor  # (N, num_labels) float32: 1 where a label counts, 0 where a policy masked it
    image_ids: list[str]
    patient_ids: list[str]
    # METADATA_COLUMNS name -> values, only when the reader was asked for them (fusion models)
    metadata: dict[str, list] | None = None


def split_row_count(dataset_dir: str | Path, split: str) -> int:
    """Rows of a split, from the Parquet footers (no data read)."""
    return sum(pq.ParquetFile(path).metadata.num_rows for path in split_dir(dataset_dir, split).glob("*.parquet"))


def split_row_groups(dataset_dir: str | Path, split: str) -> int:
    return sum(pq.ParquetFile(path).metadata.num_row_groups for path in split_dir(dataset_dir, split).glob("*.parquet"))


def label_table(dataset_dir: str | Path, split: str, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) labels and mask of a split (reads only those columns; mask all ones without one)."""
    columns = ["labels", LABEL_MASK_COLUMN] if spec.has_mask else ["labels"]
    table = pq.read_table(split_dir(dataset_dir, split), columns=columns)
    labels = np.asarray(table.column("labels").to_pylist(), dtype=np.float64).reshape(-1, spec.num_labels)
    if not spec.has_mask:
        return labels, np.ones_like(labels)
    return labels, np.asarray(table.column(LABEL_MASK_COLUMN).to_pylist(), dtype=np.float64).reshape(labels.shape)


def to_tensors(pixels: np.ndarray, labels: np.ndarray, spec: DatasetSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored pixel bytes of N rows (an array of `bytes`) -> model input and (N, L) float32 labels."""
    dtype = np.uint8 if spec.pixel_dtype == "uint8" else np.float32
    buffer = bytearray(b"".join(pixels))  # one copy, writable, so torch can own it
    stored = np.frombuffer(buffer, dtype=dtype).reshape(len(pixels), *spec.pixel_shape)
    return model_input(torch.from_numpy(stored), spec), label_tensor(labels)


def label_tensor(rows: np.ndarray) -> torch.Tensor:
    """An object array of N per-row lists (as Petastorm yields list columns) -> (N, L) float32."""
    return torch.as_tensor(np.asarray(rows.tolist() if rows.dtype == object else rows, dtype=np.float32))


def model_input(stored: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """(N, *spec.pixel_shape) as stored -> normalised (N, 3, H, W) float32."""
    if spec.pixel_dtype != "uint8":
        return stored  # normalised by the ETL
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (stored.float().div_(255.0) - mean).div_(std)  # broadcasts 1 grey channel to 3


class SplitReader:
    """Iterable of :class:`Batch` for one rank over one split (one pass per iteration).

    Row groups are shuffled by Petastorm (seeded) and rows within a buffer of
    `shuffle_rows` by this class. A rank whose shard has no row group yields nothing.

    `pool` is Petastorm's reader pool. The default `dummy` reads in the calling thread (run
    it under :func:`prefetch` to overlap with compute). Petastorm 0.13.1's `thread` pool
    returned fewer rows than the files hold in about 1 pass in 3 here (pyarrow 14, 1 or 2
    workers), so it is only an option; `process` is exact but starts slowly.
    """

    def __init__(self, dataset_dir, split: str, spec: DatasetSpec, batch_size: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                 shuffle_rows: int = 256, pool: str = "dummy", workers: int = 2, with_metadata: bool = False,
                 oversampler=None):
        # Not Path.as_uri(): it escapes the "=" of "split=train", which Petastorm then cannot find.
        self.url = "file://" + str(split_dir(dataset_dir, split).resolve())
        self.spec, self.batch_size, self.rank, self.world_size = spec, batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.shuffle_rows, self.pool, self.workers = max(shuffle_rows, batch_size), pool, workers
        self.columns = [spec.pixel_column, "labels", "image_id", "patient_id"]
        self.columns += [LABEL_MASK_COLUMN] if spec.has_mask else []
        self.columns += list(METADATA_COLUMNS) if with_metadata else []
        self.oversampler = oversampler  # training.sampling.Oversampler: rows of rare classes repeated

    def _row_groups(self):
        from petastorm import make_batch_reader
        from petastorm.errors import NoDataAvailableError

        try:
            reader = make_batch_reader(
                self.url, schema_fields=self.columns,
                cur_shard=self.rank, shard_count=self.world_size, num_epochs=1,
                shuffle_row_groups=self.shuffle, seed=self.seed, reader_pool_type=self.pool,
                workers_count=self.workers,
            )
        except NoDataAvailableError:  # fewer row groups than ranks: this rank's share is empty
            return
        try:
            for group in reader:
                yield {column: getattr(group, column) for column in self.columns}
        finally:  # what `with reader:` does, minus its print() about a cache we do not use
            reader.stop()
            reader.join()

    def __iter__(self):
        rng = np.random.default_rng(self.seed + 7919 * self.rank)
        pool = None  # column name -> values of rows read but not yet batched
        exhausted = False
        groups = self._row_groups()
        while True:
            while not exhausted and (pool is None or len(pool["labels"]) < self.shuffle_rows):
                group = next(groups, None)
                if group is None:
                    exhausted = True
                    continue
                if self.oversampler is not None:
                    copies = self.oversampler.repeats(np.stack(group["labels"]), rng)
                    group = {column: np.repeat(values, copies, axis=0) for column, values in group.items()}
                pool = group if pool is None else {c: np.concatenate([pool[c], group[c]]) for c in self.columns}
            rows = 0 if pool is None else len(pool["labels"])
            if rows == 0 or (rows < self.batch_size and (self.drop_last or not exhausted)):
                return
            if self.shuffle:
                order = rng.permutation(rows)
                pool = {column: values[order] for column, values in pool.items()}
            take = min(self.batch_size, rows)
            yield self._batch({column: values[:take] for column, values in pool.items()})
            pool = {column: values[take:] for column, values in pool.items()}

    def _batch(self, rows: dict[str, np.ndarray]) -> Batch:
        images, targets = to_tensors(rows[self.spec.pixel_column], rows["labels"], self.spec)
        mask = label_tensor(rows[LABEL_MASK_COLUMN]) if self.spec.has_mask else torch.ones_like(targets)
        metadata = {column: rows[column].tolist() for column in METADATA_COLUMNS if column in rows} or None
        return Batch(images, targets, mask, [str(i) for i in rows["image_id"]], [str(p) for p in rows["patient_id"]],
                     metadata)


def prefetch(iterable, depth: int = 2):
    """Produce items of `iterable` in a background thread, `depth` ahead of the consumer.

    Closing the returned generator early (an epoch cut short) stops the producer and closes
    `iterable`, so its Petastorm reader shuts down instead of leaking threads.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        iterator = iter(iterable)
        try:
            for item in iterator:
                items.put(item)
                if stop.is_set():
                    break
        except BaseException as exc:  # re-raised in the consumer
            items.put(exc)
        finally:
            getattr(iterator, "close", lambda: None)()
            items.put(done)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while producer.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get(timeout=0.1)
            except queue.Empty:
                pass
