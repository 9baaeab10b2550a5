"""Stored pixels -> model input: the one preprocessing path of training, evaluation, predict and serving.

Loaders hand over pixels as stored (grey uint8, (N, 1, H, W)), so the host only moves bytes
(a quarter of float32's) and this transform does the float work where the model runs: on the
GPU it costs microseconds. Steps, in order:

1. uint8 -> [0, 1] floats;
2. normalisation: `dataset` (the spec's per-channel mean and std; ImageNet's for the pretrained
   backbones) or `mean-image` (report 002: the train split's average image subtracted, divided by
   the train pixels' std around it; etl/mean_image.py);
3. evaluation only, when set: resize to `eval_resize` and centre-crop `eval_crop` (CheXNet-style
   evaluation of a model trained on zoomed crops);
4. 1 grey channel -> the 3 channels the backbones take.

Datasets the ETL stored as float32 are normalised already and pass through unchanged. The
checkpoint keeps :meth:`InputTransform.state`, so predict and serving rebuild exactly this.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cxr_pipeline.etl.mean_image import read_mean_image
from cxr_pipeline.schema import DatasetSpec

NORMALISATIONS = ("dataset", "mean-image")


@dataclass
class InputTransform:
    spec: DatasetSpec
    normalisation: str = "dataset"
    mean_image: torch.Tensor | None = None  # (1, H, W) in [0, 1]: `mean-image` only
    mean_image_std: float = 1.0
    eval_resize: int = 0  # 0: evaluate at the stored size
    eval_crop: int = 0  # 0: no crop

    def __post_init__(self):
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")
        if self.normalisation == "mean-image" and (self.mean_image is None or self.spec.pixel_dtype != "uint8"):
            raise ValueError("mean-image normalisation needs a uint8 dataset with its _mean_image.npz")
        if self.eval_crop > (self.eval_resize or self.spec.image_size):
            raise ValueError(f"--eval-crop {self.eval_crop} is larger than the image it crops "
                             f"({self.eval_resize or self.spec.image_size} px)")
        self._device_constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def for_dataset(cls, dataset_dir, spec: DatasetSpec, normalisation: str = "dataset", eval_resize: int = 0,
                    eval_crop: int = 0) -> "InputTransform":
        if normalisation != "mean-image":
            return cls(spec, normalisation, eval_resize=eval_resize, eval_crop=eval_crop)
        mean = read_mean_image(dataset_dir)
        return cls(spec, normalisation, torch.from_numpy(mean.image)[None], mean.std, eval_resize, eval_crop)

    def state(self) -> dict:
        """What a checkpoint stores to rebuild this transform (with its dataset spec)."""
        return {"normalisation": self.normalisation, "mean_image": self.mean_image,
                "mean_image_std": self.mean_image_std, "eval_resize": self.eval_resize, "eval_crop": self.eval_crop}

    @classmethod
    def from_state(cls, spec: DatasetSpec, state: dict | None) -> "InputTransform":
        """Checkpoints written before the transform was stored normalised by the spec alone."""
        return cls(spec, **(state or {}))

    def __call__(self, stored: torch.Tensor, evaluation: bool = False) -> torch.Tensor:
        """(N, *spec.pixel_shape) as stored, on any device -> (N, 3, h, w) float32 on that device."""
        if self.spec.pixel_dtype != "uint8":
            images = stored
        else:
            offset, scale = self._constants(stored.device)
            images = (stored.float().div_(255.0) - offset).div_(scale)
        if evaluation:
            images = self._resize_and_crop(images)
        return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(offset, scale) on `device`, built once per device (the mean image is H x W floats)."""
        if device not in self._device_constants:
            if self.normalisation == "mean-image":
                offset, scale = self.mean_image, torch.tensor(self.mean_image_std)
            else:  # 3 per-channel values broadcast the grey channel to 3
                offset = torch.tensor(self.spec.mean).view(-1, 1, 1)
                scale = torch.tensor(self.spec.std).view(-1, 1, 1)
            self._device_constants[device] = (offset.to(device, torch.float32), scale.to(device, torch.float32))
        return self._device_constants[device]

    def _resize_and_crop(self, images: torch.Tensor) -> torch.Tensor:
        if self.eval_resize and self.eval_resize != images.shape[-1]:
            images = F.interpolate(images, size=(self.eval_resize, self.eval_resize), mode="bilinear",
                                   align_corners=False, antialias=True)
        if self.eval_crop:
            top = (images.shape[-2] - self.eval_crop) // 2
            left = (images.shape[-1] - self.eval_crop) // 2
            images = images[..., top:top + self.eval_crop, left:left + self.eval_crop]
        return images


def stored_pixels(grey: np.ndarray) -> torch.Tensor:
    """One decoded (H, W) uint8 image (etl.images.decode_resize) -> a stored-layout (1, 1, H, W) batch."""
    return torch.from_numpy(np.ascontiguousarray(grey)[None, None])
