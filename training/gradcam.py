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


# The layer whose activations are weighed, per model: norm5 for DenseNet (as CheXNet) and the
# attention DenseNets whose classifier sees g; transition3 for the report's attention DenseNets,
# where no output depends on norm5 (report 004 took norm5, which gets no gradient there): the
# deepest map their attention reads. The last residual stage for ResNet, the last conv block's
# activation (before pooling) for the small CNN, the VGGs and the 24-layer pneumonia CNN.
TARGET_LAYERS = {
    "densenet121": "features.norm5", "densenet121_attA_g": "features.norm5", "densenet121_attB_g": "features.norm5",
    "densenet121_attA": "features.transition3", "densenet121_attB": "features.transition3",
    "resnet18": "layer4", "resnet18_half": "layer4", "resnet50": "layer4", "small_cnn": "features.6",
    "vgg_like": "features.26", "vgg16_partial": "features.29", "pneumonia_cnn24": "separable.16",
}
# Heads that keep position (flattened maps) rather than average it away: HiResCAM is exact there.
POSITIONAL_HEADS = ("small_cnn", "vgg_like", "vgg16_partial", "pneumonia_cnn24")
METHODS = ("gradcam", "hirescam")
FUSED_SUFFIX = "+meta"


def target_layer(model: nn.Module, model_name: str) -> nn.Module:
    base = model_name.removesuffix(FUSED_SUFFIX)
    if base not in TARGET_LAYERS:
        raise ValueError(f"no Grad-CAM target layer known for {model_name!r}")
    prefix = "backbone." if model_name.endswith(FUSED_SUFFIX) else ""  # training.models.MetadataFusion
    return model.get_submodule(prefix + TARGET_LAYERS[base])


def default_method(model_name: str) -> str:
    return "hirescam" if model_name.removesuffix(FUSED_SUFFIX) in POSITIONAL_HEADS else "gradcam"


def class_activation_map(model: nn.Module, layer: nn.Module, images: torch.Tensor, logit_index: int,
                         method: str = "gradcam", extra_inputs: tuple = ()) -> np.ndarray:
    """(N, 3, H, W) normalised images -> (N, H, W) heatmaps in [0, 1] for one output logit
    (training.targets.LabelLayout.positive_logit). `extra_inputs` follow the images in the
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
                             "take the layer from training.gradcam.target_layer(model, model_name)")
        activations = captured["activations"]
        gradients, = torch.autograd.grad(logits[:, logit_index].sum(), activations)
    finally:
        forward_hook.remove()
    weights = gradients.mean(dim=(2, 3), keepdim=True) if method == "gradcam" else gradients
    cam = F.relu((weights * activations).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).detach().cpu().numpy()


def overlay(grey_u8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Grey (H, W) uint8 image and (H, W) heatmap in [0, 1] -> (H, W, 3) uint8 jet overlay."""
    colours = colormaps["jet"](heatmap)[..., :3]
    grey = np.repeat(grey_u8[..., None] / 255.0, 3, axis=2)
    return np.clip(255 * ((1 - alpha) * grey + alpha * colours), 0, 255).astype(np.uint8)


def peak_inside(heatmap: np.ndarray, box: tuple[float, float, float, float]) -> bool:
    """Pointing game: is the heatmap's maximum inside the (x, y, width, height) box?"""
    y, x = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    left, top, width, height = box
    return left <= x <= left + width and top <= y <= top + height
