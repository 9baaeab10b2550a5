"""Two costs of Petastorm 0.13.1 (its last release) that the loader benchmark measured, removed.

1. Its dummy pool sleeps 0.1 s whenever its ventilator thread has not queued the next row group
   yet, which happened about twice a pass: a fixed cost per pass larger than reading a small
   shard. The same wait in 1 ms steps keeps its logic.
2. Its Arrow worker copies every row group it reads (`table.take(arange(n))`) even when it is not
   asked to shuffle rows, which the loader does not ask (it shuffles across row groups itself):
   a quarter of the reading time at 224 px. Without row shuffling or row dropping the table is
   returned as read.

Applied once, only to petastorm 0.13.1, so another release is used as it comes.
"""
from __future__ import annotations

import time
import warnings

PATCHED_VERSION = "0.13.1"
_applied = False


def apply() -> None:
    global _applied
    import petastorm

    if _applied or petastorm.__version__ != PATCHED_VERSION:
        return
    from petastorm.arrow_reader_worker import ArrowReaderWorker
    from petastorm.workers_pool import dummy_pool

    dummy_pool.sleep = lambda seconds: time.sleep(min(seconds, 0.001))
    shuffling_read = ArrowReaderWorker._read_with_shuffle_row_drop

    def read(self, piece, pq_file, column_names, shuffle_row_drop_partition):
        if self._shuffle_rows or shuffle_row_drop_partition[1] > 1:
            return shuffling_read(self, piece, pq_file, column_names, shuffle_row_drop_partition)
        with warnings.catch_warnings():  # a deprecated pyarrow attribute, read by the upstream code too
            warnings.simplefilter("ignore", FutureWarning)
            partitions = self._dataset.partitions
        table = piece.read(columns=column_names - (partitions.partition_names if partitions else set()),
                           partitions=partitions)
        unasked = set(table.column_names) - column_names  # partition values pyarrow adds
        return table.drop(list(unasked)) if unasked else table

    ArrowReaderWorker._read_with_shuffle_row_drop = read
    _applied = True
