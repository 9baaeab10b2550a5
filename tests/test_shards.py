"""Every train row once per epoch at any number of ranks (training/data/shards.py), whatever the row groups hold:
the plan on its own for 1 to 16 ranks, the loader on real partitions, and real Horovod ranks over Gloo."""
import collections
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import BIN, run_cli
from cxr_pipeline.schema import read_dataset_spec, split_dir
from cxr_pipeline.training.data.reader import SplitReader, split_row_count
from cxr_pipeline.training.data.shards import SplitIndex, plan_pass, split_index

UNEQUAL = [1, 7, 2, 30, 3, 11, 5, 1, 19, 4]  # rows per row group, deliberately unequal


def synthetic_index(sizes) -> SplitIndex:
    ids = np.array([f"img{i:04d}" for i in range(sum(sizes))], dtype=object)
    return SplitIndex(tuple(f"f{i}.parquet" for i in range(len(sizes))), np.cumsum([0] + list(sizes)), ids)


def pass_of(index, world, **options):
    shards = [plan_pass(index, rank, world, **options) for rank in range(world)]
    return shards, collections.Counter({i: 0 for i in index.image_ids}) + sum(
        (collections.Counter(s.copies) for s in shards), collections.Counter())


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8, 16])
def test_evaluation_pass_reads_every_row_exactly_once(world):
    index = synthetic_index(UNEQUAL)
    shards, seen = pass_of(index, world, order_seed=3)
    assert set(seen.values()) == {1} and set(seen) == set(index.image_ids)
    assert max(s.rows for s in shards) - min(s.rows for s in shards) <= 1
    assert all(s.padding == 0 for s in shards)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8, 16])
def test_training_pass_gives_every_rank_whole_batches_and_repeats_fewer_than_one_round(world):
    batch = 4
    index = synthetic_index(UNEQUAL)
    shards, seen = pass_of(index, world, order_seed=3, multiple=batch)
    assert len({s.rows for s in shards}) == 1 and shards[0].rows % batch == 0  # same full batches on every rank
    assert min(seen.values()) == 1  # every row at least once
    repeated = sum(seen.values()) - index.rows
    assert repeated == shards[0].padding < world * batch
    assert max(seen.values()) <= 1 + -(-repeated // index.rows)


def test_oversampled_copies_are_split_across_ranks_without_loss():
    index = synthetic_index(UNEQUAL)
    copies = np.random.default_rng(0).integers(1, 4, index.rows)
    shards, seen = pass_of(index, 3, order_seed=1, copies=lambda _: copies)
    assert [seen[i] for i in index.image_ids] == copies.tolist()
    assert shards[0].pass_rows == copies.sum()


def test_seed_changes_the_order_and_ranks_open_only_the_files_their_rows_are_in():
    index = synthetic_index(UNEQUAL)
    orders = [[f for s in (plan_pass(index, r, 4, order_seed=seed) for r in range(4)) for f in s.files]
              for seed in (1, 1, 2)]
    assert orders[0] == orders[1] != orders[2]
    shard = plan_pass(index, 1, 4, order_seed=1)
    rows_of = dict(zip(index.files, np.diff(index.offsets)))
    assert sum(rows_of[f] for f in shard.files) < index.rows  # not every file
    assert shard.rows <= sum(rows_of[f] for f in shard.files)


@pytest.fixture(scope="module")
def unequal_dataset(nih_dataset, tmp_path_factory):
    """The real NIH partitions with train rewritten into files of deliberately unequal row groups (several
    row groups in some files)."""
    dataset = tmp_path_factory.mktemp("unequal") / "nih_unequal"
    shutil.copytree(nih_dataset, dataset)
    folder = split_dir(dataset, "train")
    table = pq.read_table(folder)
    for path in folder.glob("*.parquet"):
        path.unlink()
    start = 0
    for number, (rows, group) in enumerate([(9, 1), (2, 2), (17, 5), (1, 1), (12, 3), (30, 30)]):
        rows = min(rows, table.num_rows - start) if number < 5 else table.num_rows - start
        pq.write_table(table.slice(start, rows), folder / f"part-{number:05d}.parquet", row_group_size=group)
        start += rows
    groups = [pq.ParquetFile(p).metadata.row_group(i).num_rows for p in sorted(folder.glob("*.parquet"))
              for i in range(pq.ParquetFile(p).metadata.num_row_groups)]
    assert len(set(groups)) > 3 and start == table.num_rows
    return dataset


def test_loader_ranks_cover_a_split_of_unequal_row_groups_exactly(unequal_dataset):
    spec = read_dataset_spec(unequal_dataset)
    total = split_row_count(unequal_dataset, "train")
    for world in (2, 3, 4):
        shares = [[i for b in SplitReader(unequal_dataset, "train", spec, 4, rank, world, shuffle=True, seed=2)
                   for i in b.image_ids] for rank in range(world)]
        seen = collections.Counter(i for share in shares for i in share)
        assert len(seen) == total and set(seen.values()) == {1}
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_a_split_with_a_repeated_image_id_is_refused(unequal_dataset, tmp_path):
    folder = tmp_path / "split=train"
    folder.mkdir()
    table = pq.read_table(split_dir(unequal_dataset, "train")).slice(0, 3)
    pq.write_table(table, folder / "a.parquet")
    pq.write_table(table.slice(0, 1), folder / "b.parquet")
    with pytest.raises(ValueError, match="image_id repeats"):
        split_index(folder)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_horovod_ranks_read_every_train_row_once_per_epoch(unequal_dataset, tmp_path, world):
    """Real Horovod ranks over Gloo, each reading its share as train_one_epoch does."""
    out = tmp_path / "shares.json"
    run_cli(BIN / "horovodrun", "-np", world, "-H", f"localhost:{world}", BIN / "python", "tests/rank_epoch.py",
            unequal_dataset, out, timeout=300)
    shares = json.loads(out.read_text())
    assert len({len(s["batches"]) for s in shares}) == 1  # every rank takes the same number of steps
    assert all(len(s["batches"]) == s["planned"] and all(len(b) == 4 for b in s["batches"]) for s in shares)
    seen = collections.Counter(i for s in shares for b in s["batches"] for i in b)
    train_ids = pq.read_table(split_dir(unequal_dataset, "train"), columns=["image_id"]).column(0).to_pylist()
    assert set(seen) == set(train_ids)  # none unread
    repeated = sum(seen.values()) - len(train_ids)
    assert repeated == shares[0]["padding"] < world * 4 and max(seen.values()) <= 2
