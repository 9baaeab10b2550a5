"""Section 3 of `make bench-scale` (benchmarks/scale.py): one pass of split=train by `world` ranks, one
process each, read as train_one_epoch reads it; which rows each rank read and how fast."""
from __future__ import annotations

import collections
import multiprocessing
import resource
import time
from pathlib import Path

from benchmarks.sampler import Sampler
from cxr_pipeline.schema import read_dataset_spec

BATCH = 32


def rank_pass(dataset: str, rank: int, world: int, barrier, results) -> None:
    """One rank's pass over split=train as train_one_epoch reads it; reports to `results`."""
    import torch

    from cxr_pipeline.training.data.reader import SplitReader, prefetch

    torch.set_num_threads(1)

    class CountingReader(SplitReader):  # counts the row groups Petastorm hands this rank
        groups = 0

        def _row_groups(self):
            for group in super()._row_groups():
                self.groups += 1
                yield group

    spec = read_dataset_spec(dataset)
    reader = CountingReader(dataset, "train", spec, BATCH, rank, world, shuffle=True, seed=0, full_batches=True)
    barrier.wait()
    started = time.time()
    first_batch, batches, image_ids = None, 0, []
    for batch in prefetch(reader):
        first_batch = first_batch if first_batch is not None else time.time() - started
        batches += 1
        image_ids += batch.image_ids
    ended = time.time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results.put({"cpu": usage.ru_utime + usage.ru_stime, "rank": rank, "rows": len(image_ids), "image_ids": image_ids,
                 "files": len(reader.shard.files), "row_groups": reader.groups, "full_batches": batches,
                 "started": started, "ended": ended, "first_batch_s": first_batch or 0.0,
                 "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})


def loader_pass(dataset: Path, world: int, train_rows: int) -> dict:
    """One pass of `world` ranks over split=train, of `train_rows` rows (file_layout's count)."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(world), context.Queue()
    workers = [context.Process(target=rank_pass, args=(str(dataset), rank, world, barrier, results))
               for rank in range(world)]
    with Sampler() as sampler:
        for worker in workers:
            worker.start()
        ranks = sorted((results.get(timeout=1200) for _ in workers), key=lambda r: r["rank"])
        for worker in workers:
            worker.join()
    steps = min(r["full_batches"] for r in ranks)  # train_one_epoch stops all ranks at the same step
    start = min(r["started"] for r in ranks)
    seen = collections.Counter(i for r in ranks for i in r.pop("image_ids")[:steps * BATCH])
    for r in ranks:
        r["seconds"] = r["ended"] - r["started"]
        r["rows_per_s"] = r["rows"] / r["seconds"]
        r["finished_after_s"] = r["ended"] - start
    wall = max(r["ended"] for r in ranks) - start
    return {"world": world, "steps": steps, "ranks": ranks, "wall": wall, "load": sampler.mean_load,
            "rows_per_s": sum(r["rows"] for r in ranks) / wall, "train_rows": train_rows,
            "unread": train_rows - len(seen), "repeated": sum(seen.values()) - len(seen)}
