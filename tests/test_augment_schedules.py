"""Loader-side augmentation and the learning-rate schedules (plain torch, no ranks)."""
from __future__ import annotations

import pytest
import torch

import numpy as np

from cxr_pipeline.training.data.augment import Augmentation, augment_rows, batch_generator
from cxr_pipeline.training.data.sampling import Oversampler
from cxr_pipeline.training.loop.schedules import LearningRate, build_optimizer

STILL = dict(flip=0.0, rotate_degrees=0.0, zoom=0.0, shift=0.0, brightness=0.0, contrast=0.0)


def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_augmentation_repeats_by_seed_epoch_and_rank_and_differs_otherwise():
    augment = Augmentation()
    first = augment(images(), batch_generator(0, 1, 0))
    assert first.shape == images().shape and not torch.allclose(first, images())
    assert torch.equal(first, augment(images(), batch_generator(0, 1, 0)))
    for other in (batch_generator(0, 2, 0), batch_generator(0, 1, 1), batch_generator(1, 1, 0)):
        assert not torch.allclose(first, augment(images(), other))


def test_each_transform_does_what_it_says():
    still = Augmentation(**STILL)(images(), batch_generator(0, 0, 0))
    assert torch.allclose(still, images(), atol=1e-5)
    flipped = Augmentation(**{**STILL, "flip": 1.0})(images(), batch_generator(0, 0, 0))
    assert torch.allclose(flipped, images().flip(-1), atol=1e-5)
    brighter = Augmentation(**{**STILL, "brightness": 0.5})(images(), batch_generator(0, 0, 0))
    offsets = (brighter - images()).flatten(1)
    assert torch.allclose(offsets, offsets[:, :1].expand_as(offsets), atol=1e-5)  # one offset per image
    assert offsets[:, 0].abs().max() <= 0.5 and offsets[:, 0].abs().min() > 0
    rotated = Augmentation(**{**STILL, "rotate_degrees": 30.0})(images(), batch_generator(0, 0, 0))
    assert not torch.allclose(rotated, images(), atol=1e-2)


def box_extent(batch: torch.Tensor) -> list[tuple[int, int]]:
    """(rows, columns) the bright box of each image covers."""
    inside = batch[:, 0] > 0.5
    return [(int(image.any(1).sum()), int(image.any(0).sum())) for image in inside]


def test_zoom_out_shrinks_and_aspect_stretches_the_content():
    box = torch.zeros(64, 1, 64, 64)
    box[..., 16:48, 16:48] = 1.0  # 32 x 32
    zoom_in = box_extent(Augmentation(**{**STILL, "zoom": 0.3})(box, batch_generator(0, 0, 0)))
    zoom_out = box_extent(Augmentation(**{**STILL, "zoom_out": 0.3})(box, batch_generator(0, 0, 0)))
    assert all(rows == columns >= 32 for rows, columns in zoom_in) and max(r for r, _ in zoom_in) > 36
    assert all(rows == columns <= 32 for rows, columns in zoom_out) and min(r for r, _ in zoom_out) < 28
    stretched = box_extent(Augmentation(**{**STILL, "aspect": 0.3})(box, batch_generator(0, 0, 0)))
    ratios = [columns / rows for rows, columns in stretched]
    assert min(ratios) < 0.85 and max(ratios) > 1.15 and all(1 / 1.4 < r < 1.4 for r in ratios)
    # without the new options the random stream, and so every earlier run's augmentations, are unchanged
    plain = Augmentation()(images(), batch_generator(0, 0, 0))
    assert torch.equal(plain, Augmentation(zoom_out=0.0, aspect=0.0)(images(), batch_generator(0, 0, 0)))


def test_minority_only_augmentation_leaves_the_majority_rows_as_stored():
    """Report 003: the rarer NORMAL images (no positive label) are augmented, pneumonia rows are not."""
    labels = np.array([[1.0], [0.0], [1.0], [0.0], [1.0], [1.0]])
    oversampler = Oversampler(np.r_[labels, [[1.0]] * 6], np.ones((12, 1)), [0], 1.0)
    minority = torch.from_numpy(oversampler.row_factors(labels) > 1)
    assert minority.tolist() == [False, True, False, True, False, False]
    out = augment_rows(Augmentation(**{**STILL, "flip": 1.0}), images(), minority, batch_generator(0, 0, 0))
    assert torch.equal(out[~minority], images()[~minority])
    assert torch.allclose(out[minority], images()[minority].flip(-1), atol=1e-5)


def test_augmentation_text_parses_and_bad_text_says_what_is_allowed():
    assert Augmentation.parse("none") is None and Augmentation.parse("default") == Augmentation()
    assert Augmentation.parse("flip=0,rotate_degrees=10") == Augmentation(flip=0.0, rotate_degrees=10.0)
    with pytest.raises(ValueError, match="rotate_degrees"):
        Augmentation.parse("rotation=10")


def schedule(kind, **options) -> LearningRate:
    optimizer = build_optimizer("sgd", [torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    return LearningRate(optimizer, kind, epochs=4, **options)


def test_warmup_then_step_drops():
    rate = schedule("step", warmup_steps=4, gamma=0.1, step_epochs=2)
    assert rate.lr == pytest.approx(0.0025)
    for _ in range(3):
        rate.step()
    assert rate.lr == pytest.approx(0.01)
    rate.end_epoch(0.7)
    assert rate.lr == pytest.approx(0.01)
    rate.end_epoch(0.7)
    assert rate.lr == pytest.approx(0.001)


def test_plateau_drops_after_patience_and_resumes_from_its_state():
    rate = schedule("plateau", gamma=0.5, patience=2)
    for auroc, expected in [(0.70, 0.01), (0.69, 0.01), (0.70, 0.005), (0.80, 0.005), (0.79, 0.005)]:
        rate.end_epoch(auroc)
        assert rate.lr == pytest.approx(expected)
    resumed = schedule("plateau", gamma=0.5, patience=2)
    resumed.load_state_dict(rate.state_dict())
    rate.end_epoch(0.78)
    resumed.end_epoch(0.78)
    assert resumed.lr == rate.lr == pytest.approx(0.0025)


def test_cosine_reaches_zero_at_the_last_epoch_and_adam_uses_chexpert_betas():
    rate = schedule("cosine")
    rate.end_epoch(None)
    rate.end_epoch(None)
    assert rate.lr == pytest.approx(0.005)
    rate.end_epoch(None)
    rate.end_epoch(None)
    assert rate.lr == pytest.approx(0.0, abs=1e-12)
    adam = build_optimizer("adam", [torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    assert adam.param_groups[0]["betas"] == (0.9, 0.999)
