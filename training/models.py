"""Model registry: a backbone with its classification head replaced by `num_labels` outputs.

Weights: `imagenet` (torchvision download, needs internet once), `none` (random init) or
the path of a local checkpoint (a torchvision state dict or this project's checkpoint).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv layers and a linear head: the baseline of the reports. The 4x4 pooled map
    keeps coarse position, which a single global average would throw away."""

    def __init__(self, num_labels: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 5, stride=2, padding=2), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Linear(64 * 16, num_labels)

    def forward(self, images):
        return self.classifier(torch.flatten(self.features(images), 1))


def _densenet121(num_labels, imagenet):
    from torchvision.models import DenseNet121_Weights, densenet121

    model = densenet121(weights=DenseNet121_Weights.IMAGENET1K_V1 if imagenet else None)
    model.classifier = nn.Linear(model.classifier.in_features, num_labels)  # CheXNet head
    return model


def _resnet50(num_labels, imagenet):
    from torchvision.models import ResNet50_Weights, resnet50

    model = resnet50(weights=ResNet50_Weights.IMAGENET1K_V2 if imagenet else None)
    model.fc = nn.Linear(model.fc.in_features, num_labels)
    return model


def _small_cnn(num_labels, imagenet):
    if imagenet:
        raise ValueError("small_cnn has no ImageNet weights; use --weights none or a checkpoint path")
    return SmallCNN(num_labels)


# name -> (constructor, name of the head module that knowledge transfer trains)
MODELS = {
    "densenet121": (_densenet121, "classifier"),
    "resnet50": (_resnet50, "fc"),
    "small_cnn": (_small_cnn, "classifier"),
}


def build_model(name: str, num_labels: int, weights: str = "none") -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    constructor, head = MODELS[name]
    model = constructor(num_labels, weights == "imagenet")
    if weights not in ("imagenet", "none"):
        load_backbone(model, Path(weights), head)
    return model


def load_backbone(model: nn.Module, path: Path, head: str) -> None:
    """Load a local checkpoint; head weights whose shape differs (another label set) are skipped."""
    if not path.exists():
        raise FileNotFoundError(f"--weights {path}: no such file (use 'imagenet', 'none' or a checkpoint path)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    own = model.state_dict()
    skipped = [k for k in state if k.startswith(head + ".") and k in own and state[k].shape != own[k].shape]
    for key in skipped:
        del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    backbone_missing = [k for k in missing if not k.startswith(head + ".")]
    if backbone_missing or unexpected:
        raise ValueError(
            f"{path} does not fit this model: missing {backbone_missing[:5]}, unexpected {unexpected[:5]}"
        )


def head_name(model_name: str) -> str:
    return MODELS[model_name][1]


def set_backbone_trainable(model: nn.Module, model_name: str, trainable: bool) -> None:
    """Freeze (knowledge transfer) or unfreeze (fine-tune) everything but the head."""
    head = head_name(model_name)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = trainable or name.startswith(head + ".")
