"""Class activation heatmaps from the last conv block, and overlays.

Grad-CAM (Selvaraju et al. 2017) weighs the target layer's channels by the spatial mean of
the class score's gradient. That is exact for heads that average-pool the map (DenseNet,
ResNet) but blurs position for heads that keep it (the small CNN's 4x4 flatten), where
HiResCAM (Draelos & Carin 2020) multiplies gradient and activation element-wise instead;
for average-pooling heads the two are the same map. On the demo data, where each finding's
zone is known, the small CNN's peak fell in the zone for 53 of 60 images with HiResCAM and
11 of 60 with Grad-CAM.

Written here rather than taken from the `grad-cam` package: that package needs
opencv-python-headless, whose current releases need numpy 2, which petastorm 0.13.1 cannot
load.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from torch import nn

from cxr_pipeline.training.models.registry import MODELS


METHODS = ("gradcam", "hirescam")


def target_layer(model: nn.Module, model_name: str) -> nn.Module:
    """The layer Grad-CAM weighs, as the model's registry entry names it."""
    return model.get_submodule(MODELS[model_name].cam_layer)


def default_method(model_name: str) -> str:
    """HiResCAM for heads that keep position (flattened maps), where it is exact; Grad-CAM otherwise."""
    return "hirescam" if MODELS[model_name].positional_head else "gradcam"


def class_activation_map(model: nn.Module, layer: nn.Module, images: torch.Tensor, logit_index: int,
                         method: str = "gradcam", extra_inputs: tuple = ()) -> np.ndarray:
    """(N, 3, H, W) normalised images -> (N, H, W) heatmaps in [0, 1] for one output logit
    (training.data.targets.LabelLayout.positive_logit). `extra_inputs` follow the images in the
    model call (the metadata of fusion models)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    captured = {}
    forward_hook = layer.register_forward_hook(lambda _m, _i, output: captured.update(activations=output))
    try:
        model.eval()
        images = images.clone().requires_grad_(True)  # gradients flow even through a frozen backbone
        logits = model(images, *extra_inputs)
        if "activations" not in captured:
            raise ValueError(f"the target layer ({type(layer).__name__}) did not run in the forward pass; "
                             "take the layer from training.explain.gradcam.target_layer(model, model_name)")
        activations = captured["activations"]
        gradients, = torch.autograd.grad(logits[:, logit_index].sum(), activations)
    finally:
        forward_hook.remove()
    weights = gradients.mean(dim=(2, 3), keepdim=True) if method == "gradcam" else gradients
    cam = F.relu((weights * activations).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).detach().cpu().numpy()


OVERLAY_MIN_SIDE = 448  # px on the long side: big enough to read whatever size the model was trained at


def overlay(grey_u8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4,
            min_side: int = OVERLAY_MIN_SIDE) -> np.ndarray:
    """Grey (H, W) uint8 image and (H, W) heatmap in [0, 1] -> (H', W', 3) uint8 jet overlay, upscaled (image
    bicubic, heatmap bilinear, before blending) so that its long side is at least `min_side`; H' / H is the
    factor to scale stored-pixel coordinates by (training.explain.overlays.draw does, for boxes)."""
    from PIL import Image

    height, width = grey_u8.shape
    factor = max(1.0, min_side / max(height, width))
    if factor > 1:
        size = (round(width * factor), round(height * factor))
        grey_u8 = np.asarray(Image.fromarray(np.ascontiguousarray(grey_u8, dtype=np.uint8)).resize(size, Image.BICUBIC))
        heatmap = np.asarray(Image.fromarray(np.asarray(heatmap, dtype=np.float32)).resize(size, Image.BILINEAR))
    colours = colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3]
    grey = np.repeat(grey_u8[..., None] / 255.0, 3, axis=2)
    return np.clip(255 * ((1 - alpha) * grey + alpha * colours), 0, 255).astype(np.uint8)


def peak_inside(heatmap: np.ndarray, box: tuple[float, float, float, float]) -> bool:
    """Pointing game: is the heatmap's maximum inside the (x, y, width, height) box?"""
    y, x = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    left, top, width, height = box
    return left <= x <= left + width and top <= y <= top + height
