"""Stream one split of the ETL's Parquet into torch batches with Petastorm.

Each rank reads its share of the split's rows (training/data/shards.py: every row once per pass at any
number of ranks, training passes padded to whole batches), opening only the files that share touches.
Sizes and label names come from the dataset's own metadata
(:func:`cxr_pipeline.schema.read_dataset_spec`), never from flags. Batches carry the pixels as stored
(grey uint8), pinned when a GPU will receive them; training.data.inputs turns them into model input
on the device.
"""
from __future__ import annotations

import functools
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
from cxr_pipeline.training.data import petastorm_fixes
from cxr_pipeline.training.data.shards import RankShard, plan_pass, split_index

# The non-image inputs of fusion models (training.models.registry.metadata_features), as the ETL names them.
METADATA_COLUMNS = ("age", "sex", "view_position")

# Petastorm 0.13.1 drives pyarrow 14 through its legacy dataset API: one warning per call.
warnings.filterwarnings("ignore", category=FutureWarning, module="petastorm")


@dataclass
class Batch:
    images: torch.Tensor  # (N, *spec.pixel_shape) as stored: grey uint8 (N, 1, H, W); training.data.inputs normalises
    labels: torch.Tensor  # (N, num_labels) float32, as stored (training.data.targets says how to read them)
    mask: torch.Tensor  # (N, num_labels) float32: 1 where a label counts, 0 where a policy masked it
    image_ids: list[str]
    patient_ids: list[str]
    # METADATA_COLUMNS name -> values, only when the reader was asked for them (fusion models)
    metadata: dict[str, list] | None = None


def split_row_count(dataset_dir: str | Path, split: str) -> int:
    """Rows of a split, from the Parquet footers (no data read)."""
    return sum(pq.ParquetFile(path).metadata.num_rows for path in split_dir(dataset_dir, split).glob("*.parquet"))


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

    The rank's share and the file order come from :func:`training.data.shards.plan_pass` (seeded with `seed`
    when `shuffle`); rows within a buffer of `shuffle_rows` are shuffled here. `full_batches` (training):
    the pass is padded so that every rank yields the same number of full batches, every row at least
    once (`shard.padding` rows repeated); else every row exactly once, the last batch short.
    `oversampler` repeats rows of rare classes, decided once for the whole pass.

    `pool` is Petastorm's reader pool. The default `dummy` reads in the calling thread (run
    it under :func:`prefetch` to overlap with compute). Petastorm 0.13.1's `thread` pool
    returned fewer rows than the files hold in about 1 pass in 3 here (pyarrow 14, 1 or 2
    workers), so it is only an option, and a pass that yields fewer rows than planned raises;
    `process` is exact but starts slowly.
    """

    def __init__(self, dataset_dir, split: str, spec: DatasetSpec, batch_size: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = False, seed: int = 0, full_batches: bool = False,
                 shuffle_rows: int = 256, pool: str = "dummy", workers: int = 2, with_metadata: bool = False,
                 oversampler=None, pin_memory: bool = False):
        self.folder = split_dir(dataset_dir, split)
        self.spec, self.batch_size, self.rank, self.world_size = spec, batch_size, rank, world_size
        self.shuffle, self.seed, self.full_batches = shuffle, seed, full_batches
        self.shuffle_rows, self.pool, self.workers = max(shuffle_rows, batch_size), pool, workers
        self.columns = [spec.pixel_column, "labels", "image_id", "patient_id"]
        self.columns += [LABEL_MASK_COLUMN] if spec.has_mask else []
        self.columns += list(METADATA_COLUMNS) if with_metadata else []
        self.oversampler = oversampler  # training.data.sampling.Oversampler: rows of rare classes repeated
        self.pin_memory = pin_memory

    @functools.cached_property
    def shard(self) -> RankShard:
        return plan_pass(split_index(self.folder), self.rank, self.world_size, self.seed if self.shuffle else None,
                         None if self.oversampler is None else self._oversampled_copies,
                         self.batch_size if self.full_batches else 1)

    def _oversampled_copies(self, index) -> np.ndarray:
        """Copies of each row of the split this pass: the same draw on every rank."""
        return self.oversampler.repeats(index.labels, np.random.default_rng(self.seed))

    def __len__(self) -> int:
        """Batches this rank yields in a pass."""
        return -(-self.shard.rows // self.batch_size)

    def _row_groups(self):
        from petastorm import make_batch_reader

        petastorm_fixes.apply()
        shard = self.shard
        if not shard.files:  # more ranks than rows
            return
        reader = make_batch_reader(
            # Not Path.as_uri(): it escapes the "=" of "split=train", which Petastorm then cannot find.
            ["file://" + path for path in shard.files], schema_fields=self.columns, num_epochs=1,
            shuffle_row_groups=False, reader_pool_type=self.pool, workers_count=self.workers,
        )
        delivered = 0
        try:
            for group in reader:
                rows = {column: getattr(group, column) for column in self.columns}
                counts = shard.counts(rows["image_id"])
                if not (counts == 1).all():  # rows of another rank's slice, or repeated ones
                    rows = {column: np.repeat(values, counts, axis=0) for column, values in rows.items()}
                delivered += len(rows["labels"])
                yield rows
        finally:  # what `with reader:` does, minus its print() about a cache we do not use
            reader.stop()
            reader.join()
        if delivered != shard.rows:
            raise RuntimeError(f"{self.folder} rank {self.rank}: read {delivered} rows where the plan holds "
                               f"{shard.rows} (Petastorm's {self.pool} pool lost row groups; use the dummy pool)")

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
                pool = group if pool is None else {c: np.concatenate([pool[c], group[c]]) for c in self.columns}
            rows = 0 if pool is None else len(pool["labels"])
            if rows == 0:
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
