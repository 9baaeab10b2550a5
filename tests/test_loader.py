"""Petastorm reading the ETL's partitions back into stored-pixel batches, sharded by rank."""
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cxr_pipeline.etl.mean_image import MEAN_IMAGE_FILE
from cxr_pipeline.schema import read_dataset_spec
from cxr_pipeline.training.data.inputs import InputTransform
from cxr_pipeline.training.data.reader import SplitReader, prefetch, split_row_count


def test_batches_carry_the_stored_uint8_pixels(nih_dataset):
    spec = read_dataset_spec(nih_dataset)
    stored = pq.read_table(nih_dataset / "split=train", columns=["image_id", "pixels_u8"]).to_pandas()
    stored = stored.set_index("image_id")["pixels_u8"]
    batches = list(SplitReader(nih_dataset, "train", spec, batch_size=16))
    assert sum(len(b.image_ids) for b in batches) == split_row_count(nih_dataset, "train")
    batch = batches[0]
    assert batch.images.dtype == torch.uint8 and tuple(batch.images.shape) == (16, 1, 64, 64)
    assert tuple(batch.labels.shape) == (16, 14)
    expected = np.stack([np.frombuffer(stored[i], np.uint8).reshape(1, 64, 64) for i in batch.image_ids])
    np.testing.assert_array_equal(batch.images.numpy(), expected)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_ranks_read_disjoint_shards_covering_the_split_exactly(nih_dataset, split):
    spec = read_dataset_spec(nih_dataset)
    shards = [[i for b in SplitReader(nih_dataset, split, spec, 4, rank, 2) for i in b.image_ids] for rank in (0, 1)]
    assert not set(shards[0]) & set(shards[1])
    assert len(shards[0]) + len(shards[1]) == split_row_count(nih_dataset, split)


def test_repeated_passes_are_exact_and_shuffle_is_seeded(nih_dataset):
    spec = read_dataset_spec(nih_dataset)
    expected = split_row_count(nih_dataset, "train")

    def ids(seed):
        return [i for b in prefetch(SplitReader(nih_dataset, "train", spec, 8, shuffle=True, seed=seed)) for i in b.image_ids]

    passes = [ids(seed) for seed in (1, 1, 1, 2)]
    assert all(len(p) == expected and len(set(p)) == expected for p in passes)
    assert passes[0] == passes[1] == passes[2] and passes[0] != passes[3]


def test_full_batches_fill_the_last_batch_from_the_start_of_the_pass(nih_dataset):
    spec = read_dataset_spec(nih_dataset)
    rows = split_row_count(nih_dataset, "train")
    reader = SplitReader(nih_dataset, "train", spec, 16, shuffle=True, seed=1, full_batches=True)
    batches = [b.image_ids for b in reader]
    ids = [i for b in batches for i in b]
    assert {len(b) for b in batches} == {16} and len(batches) == len(reader) == -(-rows // 16)
    assert len(set(ids)) == rows and len(ids) - rows == reader.shard.padding < 16


def test_float32_dataset_gives_the_same_model_input_as_uint8(nih_dataset, tmp_path):
    """--dtype float32 stores what the input transform computes from uint8: same model input either way."""
    from conftest import NIH, current, spark_etl

    floats = tmp_path / "nih_f32"
    spark_etl("--source", "nih", "--data-root", NIH, "--labels-csv", NIH / "Data_Entry_sample.csv",
              "--output", floats, "--size", 64, "--rows-per-file", 8, "--dtype", "float32")
    floats = current(floats)
    spec = read_dataset_spec(floats)
    assert spec.pixel_column == "pixels_f32" and spec.pixel_shape == (3, 64, 64)
    assert not (floats / MEAN_IMAGE_FILE).exists()  # the mean image is only for uint8 datasets

    def by_id(dataset):
        spec = read_dataset_spec(dataset)
        transform = InputTransform(spec)
        return {i: image for b in SplitReader(dataset, "val", spec, 4)
                for i, image in zip(b.image_ids, transform(b.images))}

    grey, stored = by_id(nih_dataset), by_id(floats)
    assert grey.keys() == stored.keys() and grey
    for image_id, image in grey.items():
        np.testing.assert_allclose(stored[image_id].numpy(), image.numpy(), atol=1e-5)
