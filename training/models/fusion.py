"""Age, sex and view position fused with the image features: every registered model `<name>` comes as
`<name>+meta`, called `model(images, metadata)` with `metadata = metadata_features(age, sex, view_position)`."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

# Non-image inputs. Age is standardised with the mean and standard deviation over the images of
# the full NIH ChestX-ray14 table (Data_Entry_2017_v2020.csv, 112,120 rows, ages 1-95), so a
# missing age becomes 0, the mean. Categories outside these lists (unknown sex, other views,
# missing values) are all-zero one-hots.
AGE_MEAN, AGE_STD = 46.63, 16.60
SEXES = ("M", "F")
VIEW_POSITIONS = ("PA", "AP", "LL", "LATERAL")
METADATA_WIDTH = 1 + len(SEXES) + len(VIEW_POSITIONS)
METADATA_EMBEDDING = 3


def metadata_features(age: Sequence, sex: Sequence, view_position: Sequence) -> torch.Tensor:
    """The dataset's `age`, `sex`, `view_position` columns (equal-length sequences, None or NaN
    where missing) -> (N, METADATA_WIDTH) float32: standardised age, sex one-hot (M, F), view
    one-hot (PA, AP, LL, LATERAL)."""
    if not len(age) == len(sex) == len(view_position):
        raise ValueError(f"age, sex and view_position differ in length: {len(age)}, {len(sex)}, {len(view_position)}")
    ages = torch.tensor([math.nan if a is None else float(a) for a in age], dtype=torch.float32)
    return torch.cat([((ages - AGE_MEAN) / AGE_STD).nan_to_num(0.0)[:, None],
                      _one_hot(sex, SEXES), _one_hot(view_position, VIEW_POSITIONS)], dim=1)


def _one_hot(values: Sequence, categories: Sequence[str]) -> torch.Tensor:
    encoded = torch.zeros(len(values), len(categories))
    for row, value in enumerate(values):
        if isinstance(value, str) and value in categories:
            encoded[row, categories.index(value)] = 1.0
    return encoded


class MetadataFusion(nn.Module):
    """A backbone (`build`, as a registry entry's) whose output layer (`output`, its dotted name) is removed,
    its pooled image features concatenated with Linear(metadata, 3) -> ReLU, then a linear head to the label
    logits. `size` (image_size=, for sized backbones) goes on to the backbone's builder."""

    def __init__(self, build: Callable[..., nn.Module], output: str, num_labels: int, imagenet: bool, **size):
        super().__init__()
        self.backbone = build(num_labels, imagenet, **size)
        image_width = self.backbone.get_submodule(output).in_features
        parent, _, leaf = output.rpartition(".")
        setattr(self.backbone.get_submodule(parent), leaf, nn.Identity())
        self.metadata_encoder = nn.Sequential(nn.Linear(METADATA_WIDTH, METADATA_EMBEDDING), nn.ReLU())
        self.head = nn.Linear(image_width + METADATA_EMBEDDING, num_labels)

    def forward(self, images, metadata=None):
        if metadata is None:
            raise ValueError("this model fuses image and metadata features: call model(images, metadata) with "
                             "metadata = training.models.fusion.metadata_features(age, sex, view_position)")
        return self.head(torch.cat([self.backbone(images), self.metadata_encoder(metadata)], 1))
