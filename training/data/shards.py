"""Which rows each rank reads in one pass over a split: every row once, at any number of ranks.

Petastorm deals whole row groups to ranks (row group i to rank i mod N), and the ETL's row groups are
unequal (a file ends wherever a Spark partition's rows end): with 4 ranks that stop together
when the first runs out, a fifth of an epoch's rows went unread. Here every rank lays out the same
sequence of the split's rows instead (files in a seeded order, each file's rows in stored order, each
repeated by its oversampling copies) and takes one contiguous slice of it, so the shares differ by at most
one row whatever the row groups hold. A rank opens only the files its slice touches; the two ranks that
share a file each keep their own rows of it (by image_id). Training passes are padded up to a whole
number of batches on every rank with rows from the start of the sequence, as torch's DistributedSampler
does: every row at least once, the few repeats counted (`RankShard.padding`). Evaluation passes are not
padded: every row exactly once.

Every rank computes the same plan from the same inputs (the sorted file list, the seed), so nothing is
communicated. The split's image ids (and labels, when oversampling) are read once per process.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


@dataclass(frozen=True)
class SplitIndex:
    """The Parquet files of a split (sorted) and the image ids of their rows, in stored order."""

    files: tuple[str, ...]
    offsets: np.ndarray  # row number of each file's first row; offsets[-1] is the row count
    image_ids: np.ndarray  # object array of every row's image_id

    @property
    def rows(self) -> int:
        return int(self.offsets[-1])

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """(rows, L) labels, for the oversampler's copies."""
        tables = [pq.read_table(path, columns=["labels"]).column("labels").combine_chunks() for path in self.files]
        width = next((len(table[0]) for table in tables if len(table)), 0)
        return np.concatenate([np.asarray(t.flatten(), dtype=np.float64).reshape(-1, width) for t in tables]
                              or [np.zeros((0, width))])


@functools.lru_cache(maxsize=8)
def _index(folder: str, names: tuple[str, ...]) -> SplitIndex:
    files = tuple(str(Path(folder) / name) for name in names)
    ids = [pq.read_table(path, columns=["image_id"]).column("image_id").to_numpy(zero_copy_only=False)
           for path in files]
    image_ids = np.concatenate(ids) if ids else np.array([], dtype=object)
    if len(set(image_ids)) != len(image_ids):
        raise ValueError(f"image_id repeats within {folder}: the loader tells rows apart by image_id "
                         "(the ETL writes each image once per split)")
    return SplitIndex(files, np.cumsum([0] + [len(i) for i in ids]), image_ids)


def split_index(folder: Path) -> SplitIndex:
    """The index of a split folder, cached per process (a rewritten folder has new file names)."""
    folder = Path(folder).resolve()
    return _index(str(folder), tuple(sorted(path.name for path in folder.glob("*.parquet"))))


@dataclass(frozen=True)
class RankShard:
    """One rank's part of one pass."""

    files: list[str]  # the files its slice touches, in the pass's order
    copies: dict[str, int]  # image_id -> times this rank yields the row
    rows: int  # rows this rank yields (sum of copies)
    pass_rows: int  # rows of the whole pass before padding, all ranks
    padding: int  # rows the whole pass repeats to give every rank whole batches

    def counts(self, image_ids) -> np.ndarray:
        """Copies this rank yields of each row of a row group it reads."""
        return np.fromiter((self.copies.get(image_id, 0) for image_id in image_ids), dtype=np.int64,
                           count=len(image_ids))


def plan_pass(index: SplitIndex, rank: int, world_size: int, order_seed: int | None = None,
              copies: Callable[[SplitIndex], np.ndarray] | None = None, multiple: int = 1) -> RankShard:
    """This rank's share of one pass.

    `order_seed`: shuffle the file order with it (None: sorted order). `copies(index)`: copies of each row
    (oversampling), the same on every rank. `multiple`: pad the pass so it divides into `world_size`
    shares of a multiple of this many rows (the batch size of training; 1: no padding).
    """
    file_order = (np.arange(len(index.files)) if order_seed is None
                  else np.random.default_rng(order_seed).permutation(len(index.files)))
    row_copies = np.ones(index.rows, dtype=np.int64) if copies is None else np.asarray(copies(index), dtype=np.int64)
    sequence = np.concatenate([np.repeat(np.arange(index.offsets[f], index.offsets[f + 1]),
                                         row_copies[index.offsets[f]:index.offsets[f + 1]])
                               for f in file_order] or [np.array([], dtype=np.int64)])
    pass_rows = len(sequence)
    unit = world_size * multiple
    padded = -(-pass_rows // unit) * unit if multiple > 1 and pass_rows else pass_rows
    if padded > pass_rows:
        sequence = np.concatenate([sequence, np.resize(sequence, padded - pass_rows)])
    start, stop = rank * padded // world_size, (rank + 1) * padded // world_size
    mine = sequence[start:stop]
    rows, counts = np.unique(mine, return_counts=True)
    file_of_row = np.searchsorted(index.offsets, mine, side="right") - 1
    files = [index.files[f] for f in dict.fromkeys(file_of_row.tolist())]
    return RankShard(files, dict(zip(index.image_ids[rows].tolist(), counts.tolist())), len(mine), pass_rows,
                     padded - pass_rows)
