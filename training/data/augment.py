"""Loader-side augmentation of whole batches, reproducible by seed.

One affine warp per image (horizontal flip, small rotation, zoom in = resize + centre crop, optionally
zoom out and a change of aspect ratio, small shift) done for the batch in a single `grid_sample`, then
brightness and contrast.
The random numbers come from a generator seeded by (seed, epoch, rank), so a run repeats
exactly and ranks never draw the same augmentations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    flip: float = 0.5  # probability of a horizontal flip
    rotate_degrees: float = 7.0  # uniform in [-d, d]
    zoom: float = 0.1  # crop a centre region of side 1/s, s uniform in [1 - zoom_out, 1 + zoom], resized back
    # s < 1 shows more than the image (edges repeated): evaluation at s = 1 then sits inside the training
    # range rather than at its edge, where images framed differently elsewhere fall outside it
    zoom_out: float = 0.0
    aspect: float = 0.0  # width / height scaled by a factor log-uniform in [1 / (1 + aspect), 1 + aspect]
    shift: float = 0.05  # fraction of the image side, uniform in [-shift, shift] on each axis
    brightness: float = 0.1  # added, in units of the normalised image's std
    contrast: float = 0.1  # factor uniform in [1 - c, 1 + c]

    @classmethod
    def parse(cls, text: str) -> "Augmentation | None":
        """`none`, `default`, or overrides of the defaults: 'flip=0,rotate_degrees=10'."""
        if text == "none":
            return None
        if text == "default":
            return cls()
        fields = {}
        for item in text.split(","):
            name, _, value = item.partition("=")
            if name.strip() not in cls.__dataclass_fields__ or not value:
                raise ValueError(f"augmentation {item!r}: expected NAME=VALUE with NAME one of "
                                 f"{sorted(cls.__dataclass_fields__)}, or 'none' / 'default'")
            fields[name.strip()] = float(value)
        return cls(**fields)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(N, C, H, W) normalised images -> augmented images of the same shape."""
        n = len(images)

        def uniform(low, high):
            return low + (high - low) * torch.rand(n, generator=generator)

        flip = torch.where(torch.rand(n, generator=generator) < self.flip, -1.0, 1.0)
        angle = uniform(-self.rotate_degrees, self.rotate_degrees) * math.pi / 180
        scale = 1 / uniform(1.0 - self.zoom_out, 1.0 + self.zoom)
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        theta = torch.stack([
            torch.stack([cos * flip, -sin, uniform(-self.shift, self.shift) * 2], dim=1),
            torch.stack([sin * flip, cos, uniform(-self.shift, self.shift) * 2], dim=1),
        ], dim=1)  # (N, 2, 3), output -> input coordinates in [-1, 1]
        if self.aspect:  # drawn only when set, so runs without it keep their random stream
            half = math.log1p(self.aspect) / 2  # x scaled by 1 / stretch and y by stretch: the ratio by stretch²
            stretch = torch.exp(uniform(-half, half))
            theta[:, 0, :2] *= stretch.view(n, 1)  # output x -> input x: wider or narrower
            theta[:, 1, :2] /= stretch.view(n, 1)
        grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
        warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        contrast = uniform(1 - self.contrast, 1 + self.contrast).view(n, 1, 1, 1).to(images.device)
        brightness = uniform(-self.brightness, self.brightness).view(n, 1, 1, 1).to(images.device)
        return warped * contrast + brightness


def augment_rows(augmentation: Augmentation, images: torch.Tensor, rows: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """Augment only the `rows` (a boolean mask) of the batch, e.g. the minority class's (report 003)."""
    if not rows.any():
        return images
    augmented = images.clone()
    augmented[rows] = augmentation(images[rows], generator)
    return augmented


def batch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919 + rank)
