"""Oversampling rare classes: factors from the train split, seeded repeats, and the loader using them."""
from collections import Counter

import numpy as np
import pytest

from cxr_pipeline.schema import read_dataset_spec
from cxr_pipeline.training.data.reader import SplitReader, label_table
from cxr_pipeline.training.data.sampling import Oversampler


def test_binary_minority_is_repeated_up_to_the_majority():
    labels = np.r_[np.ones(740), np.zeros(260)][:, None]  # the pneumonia train split's mix: 74% positive
    sampler = Oversampler(labels, np.ones_like(labels), [0], target=1.0)
    assert sampler.row_factors(labels[[0, -1]]).tolist() == pytest.approx([1.0, 740 / 260])
    copies = sampler.repeats(labels, np.random.default_rng(0))
    negatives = copies[740:].sum()
    assert copies[:740].tolist() == [1] * 740 and set(copies[740:]) == {2, 3}
    assert negatives / (740 + negatives) == pytest.approx(0.5, abs=0.03)
    assert (sampler.repeats(labels, np.random.default_rng(0)) == copies).all()


def test_a_row_takes_the_largest_factor_of_its_labels_and_masked_entries_do_not_count():
    labels = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 0], [1, 1]], dtype=float)
    mask = np.array([[1, 1], [1, 1], [1, 1], [1, 1], [1, 1], [1, 0]], dtype=float)
    sampler = Oversampler(labels, mask, [0, 1], target=0.6)
    # shares: label 0 4/6, label 1 1/6 (row 5's is masked), no finding 1/6 (row 4): up to 0.6 x 4/6
    assert sampler.factors.tolist() == pytest.approx([1.0, 0.4 * 6, 0.4 * 6])
    assert sampler.row_factors(labels[:5]).tolist() == pytest.approx([1, 1, 1, 2.4, 2.4])
    with pytest.raises(ValueError, match="share"):
        Oversampler(labels, mask, [0, 1], target=1.5)


def test_loader_repeats_rare_label_rows(nih_dataset):
    spec = read_dataset_spec(nih_dataset)
    labels, mask = label_table(nih_dataset, "train", spec)
    sampler = Oversampler(labels, mask, list(range(spec.num_labels)), target=0.5)

    def seen(seed):
        reader = SplitReader(nih_dataset, "train", spec, 8, shuffle=True, seed=seed, oversampler=sampler)
        return [i for batch in reader for i in batch.image_ids]

    once = list(SplitReader(nih_dataset, "train", spec, 8))
    plain = [i for batch in once for i in batch.image_ids]
    passes = seen(3)
    assert passes == seen(3) and set(passes) == set(plain) and len(passes) > len(plain)
    positives = labels.sum(axis=0)
    rare = int(np.argmin(np.where(positives > 0, positives, np.inf)))  # the rarest label present
    assert sampler.factors[rare] >= 2
    rare_ids = {i for b in once for i, row in zip(b.image_ids, b.labels.numpy()) if row[rare] == 1}
    counts = Counter(passes)
    assert all(counts[i] >= np.floor(sampler.factors[rare]) for i in rare_ids)
