"""Stream one split of the ETL's Parquet into torch batches with Petastorm.

Each rank reads its own share of row groups (`make_batch_reader(cur_shard=rank,
shard_count=world_size)`), so the ranks together read every row exactly once per pass.
Sizes and label names come from the dataset's own metadata
(:func:`cxr_pipeline.schema.read_dataset_spec`), never from flags. Batches carry the pixels as stored
(grey uint8), pinned when a GPU will receive them; training.inputs turns them into model input
on the device.
"""
from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from cxr_pipeline.schema import LABEL_MASK_COLUMN, DatasetSpec, split_dir
from cxr_pipeline.training import petastorm_fixes

# The non-image inputs of fusion models (training.models.metadata_features), as the ETL names them.
METADATA_COLUMNS = ("age", "sex", "view_position")

# Petastorm 0.13.1 drives pyarrow 14 through its legacy dataset API: one warning per call.
warnings.filterwarnings("ignore", category=FutureWarning, module="petastorm")


@dataclass
class Batch:
    images: torch.Tensor  # (N, *spec.pixel_shape) as stored: grey uint8 (N, 1, H, W); training.inputs normalises
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


def stored_tensor(pixels: Sequence[bytes], spec: DatasetSpec, pin: bool = False) -> torch.Tensor:
    """Stored pixel bytes of N rows -> one (N, *spec.pixel_shape) tensor, in
    page-locked memory when `pin` (so a copy to the GPU can run asynchronously)."""
    dtype = torch.uint8 if spec.pixel_dtype == "uint8" else torch.float32
    stored = torch.empty((len(pixels), *spec.pixel_shape), dtype=dtype, pin_memory=pin)
    rows = stored.view(torch.uint8).numpy().reshape(len(pixels), -1)
    for row, data in zip(rows, pixels):  # each row's bytes copied once, straight into the tensor
        row[:] = np.frombuffer(data, np.uint8)
    return stored


def label_tensor(rows: np.ndarray) -> torch.Tensor:
    """An object array of N per-row lists (as Petastorm yields list columns) -> (N, L) float32."""
    return torch.as_tensor(np.asarray(rows.tolist() if rows.dtype == object else rows, dtype=np.float32))


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
                 oversampler=None, pin_memory: bool = False):
        # Not Path.as_uri(): it escapes the "=" of "split=train", which Petastorm then cannot find.
        self.url = "file://" + str(split_dir(dataset_dir, split).resolve())
        self.spec, self.batch_size, self.rank, self.world_size = spec, batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.shuffle_rows, self.pool, self.workers = max(shuffle_rows, batch_size), pool, workers
        self.columns = [spec.pixel_column, "labels", "image_id", "patient_id"]
        self.columns += [LABEL_MASK_COLUMN] if spec.has_mask else []
        self.columns += list(METADATA_COLUMNS) if with_metadata else []
        self.oversampler = oversampler  # training.sampling.Oversampler: rows of rare classes repeated
        self.pin_memory = pin_memory

    def _row_groups(self):
        from petastorm import make_batch_reader
        from petastorm.errors import NoDataAvailableError

        petastorm_fixes.apply()

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
        images = stored_tensor(rows[self.spec.pixel_column], self.spec, self.pin_memory)
        targets = label_tensor(rows["labels"])
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
