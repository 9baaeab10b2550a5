"""The networks of the registry (training/models/registry.py) other than the attention DenseNets: torchvision's
DenseNet-121 and ResNets with a new head, and the from-scratch nets of the reports."""
from __future__ import annotations

from functools import partial
from typing import Sequence

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


def xavier_init(model: nn.Module) -> None:
    """Glorot-uniform weights and zero biases for every conv and linear layer (Keras' defaults, which
    the from-scratch networks of reports 002 and 003 start from)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class VGGLike(nn.Module):
    """The from-scratch VGG-like net of one report: blocks of two 3x3 convs (BatchNorm, ReLU)
    and a 2x2 max pooling, 32-64-128-256 channels, a 4x4 adaptive pooling (coarse position, as
    the small CNN), a 2048-unit fully connected layer with dropout, then the head. Conv and
    linear weights start Xavier (Glorot) uniform, as in the report.

    It reads the first channel only: the report's net takes grey images, and the loader's three
    channels are the same grey image, each only shifted and scaled by ImageNet normalisation,
    so channel 0 holds all there is."""

    def __init__(self, num_labels: int, widths: Sequence[int] = (32, 64, 128, 256), hidden: int = 2048):
        super().__init__()
        layers, channels = [], 1
        for width in widths:
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(channels * 16, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5))
        self.classifier = nn.Linear(hidden, num_labels)
        xavier_init(self)

    def forward(self, images):
        return self.classifier(self.fc(self.features(images[:, :1])))


def build_densenet121(num_labels, imagenet):
    from torchvision.models import DenseNet121_Weights, densenet121

    model = densenet121(weights=DenseNet121_Weights.IMAGENET1K_V1 if imagenet else None)
    model.classifier = nn.Linear(model.classifier.in_features, num_labels)  # CheXNet head
    return model


def build_resnet(num_labels, imagenet, depth):
    from torchvision import models

    weights = {18: models.ResNet18_Weights.IMAGENET1K_V1, 50: models.ResNet50_Weights.IMAGENET1K_V2}[depth]
    model = getattr(models, f"resnet{depth}")(weights=weights if imagenet else None)
    model.fc = nn.Linear(model.fc.in_features, num_labels)
    return model


class HalfWidthResNet18(nn.Module):
    """ResNet-18's layout (7x7 stem, BasicBlocks 2-2-2-2, same module names) at half width,
    32-256 channels: a quarter of the compute and a quarter of the weights (2.8 M). Made for
    training from scratch on a few thousand images on CPUs, where it fits 3-4 times the epochs
    of ResNet-18 in the same time (the pneumonia recipe, conf/kermany.yaml)."""

    def __init__(self, num_labels: int, widths: Sequence[int] = (32, 64, 128, 256)):
        super().__init__()
        from torchvision.models.resnet import BasicBlock, conv1x1

        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        channels, stages = widths[0], []
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            shortcut = (nn.Sequential(conv1x1(channels, width, stride), nn.BatchNorm2d(width))
                        if stride != 1 or channels != width else None)
            stages.append(nn.Sequential(BasicBlock(channels, width, stride, shortcut), BasicBlock(width, width)))
            channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_labels)
        for module in self.modules():  # torchvision's ResNet initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images):
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_resnet18_half(num_labels, imagenet):
    if imagenet:
        raise ValueError("resnet18_half has no ImageNet weights; use --weights none or a checkpoint path")
    return HalfWidthResNet18(num_labels)


# Partial transfer: only the first two conv blocks of VGG16 (features[:10], four convs) get
# ImageNet weights; the rest of the net, deeper convs and fully connected layers, starts random.
VGG16_TRANSFERRED_LAYERS = 10
VGG16_FEATURE_LAYERS = 31  # len(torchvision vgg16().features)


def build_vgg16_partial(num_labels, imagenet):
    """torchvision VGG16 (its adaptive 7x7 average pooling lets 64 px inputs through)."""
    from torchvision.models import VGG16_Weights, vgg16

    model = vgg16(weights=None)
    if imagenet:
        _load_partial(model, VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True), VGG16_TRANSFERRED_LAYERS)
    model.classifier[6] = nn.Linear(model.classifier[6].in_features, num_labels)
    return model


def _load_partial(model: nn.Module, state_dict: dict, layers: int) -> None:
    """Copy the weights of `features[:layers]` from a VGG state dict; later layers keep theirs."""
    transferred = {key: value for key, value in state_dict.items()
                   if key.startswith("features.") and int(key.split(".")[1]) < layers}
    model.load_state_dict(transferred, strict=False)


class SeparableConv2d(nn.Module):
    """Keras' SeparableConv2D, 3x3 'same': a depthwise 3x3 conv without bias, then a 1x1 conv with bias
    (in x 9 + in x out + out weights)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class PneumoniaCNN24(nn.Module):
    """Report 003's 24-layer CNN (after Aakash Nain's Kaggle kernel), its first four convs starting from
    VGG16's ImageNet weights. The 24 layers, counted as Keras counts them (the input aside):

        block 1  conv1_1 64, conv1_2 64 (3x3, ReLU), max pool 2                                  3
        block 2  conv2_1 128, conv2_2 128 (3x3, ReLU), max pool 2                                3
        block 3  separable 256 + BN, separable 256 + BN, separable 256 (ReLU), max pool 2        6
        block 4  separable 512 + BN, separable 512 + BN, separable 512 (ReLU), max pool 2        6
        head     flatten, dense 1024 (ReLU), dropout 0.7, dense 512 (ReLU), dropout 0.5, dense   6

    `features` (blocks 1-2) is laid out as VGG16's features[:10], so `_load_partial` copies those four
    convs exactly. (The kernel's conv2_1/conv2_2 are separable, and its loading, `layer.set_weights = [w, b]`,
    assigns an attribute instead of calling it, so nothing loaded there; ordinary convs follow the report.)
    The report's softmax over (normal, pneumonia) is one sigmoid logit per label here: a two-way softmax
    is the sigmoid of the logits' difference, so the same classifier with 513 output weights, not 1026.
    Keras' defaults are kept: Glorot-uniform kernels, zero biases, BatchNorm after the ReLU with momentum
    0.99 (torch's 0.01) and eps 1e-3.

    The flatten width is 512 x (image_size // 16)^2, 100,352 at the kernel's 224 px, so the net is built
    for one input size, as in Keras: a lazy layer would get its weights only after Horovod and DDP
    broadcast them from rank 0. Weights at 224 px, L labels: 104,388,288 + 513 L.
    """

    def __init__(self, num_labels: int, image_size: int = 224):
        super().__init__()
        if image_size < 16:
            raise ValueError(f"pneumonia_cnn24 halves the image four times: image_size {image_size} is under 16 px")
        relu = partial(nn.ReLU, inplace=True)
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1), relu(), nn.Conv2d(64, 64, 3, padding=1), relu(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), relu(), nn.Conv2d(128, 128, 3, padding=1), relu(), nn.MaxPool2d(2))
        layers, channels = [], 128
        for width in (256, 512):
            for index in range(3):
                layers += [SeparableConv2d(channels, width), relu()]
                layers += [nn.BatchNorm2d(width, eps=1e-3, momentum=0.01)] if index < 2 else [nn.MaxPool2d(2)]
                channels = width
        self.separable = nn.Sequential(*layers)
        self.image_size, self.side = image_size, image_size // 16
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * self.side ** 2, 1024), relu(), nn.Dropout(0.7),
            nn.Linear(1024, 512), relu(), nn.Dropout(0.5), nn.Linear(512, num_labels))
        xavier_init(self)

    def forward(self, images):
        maps = self.separable(self.features(images))
        if maps.shape[-2:] != (self.side, self.side):
            raise ValueError(f"pneumonia_cnn24 was built for {self.image_size} px images, got "
                             f"{images.shape[-2]}x{images.shape[-1]}: build it with "
                             "build_model(..., image_size=<the dataset's image size>)")
        return self.classifier(maps)


def build_pneumonia_cnn24(num_labels, imagenet, image_size):
    from torchvision.models import VGG16_Weights

    model = PneumoniaCNN24(num_labels, image_size)
    if imagenet:
        _load_partial(model, VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True), VGG16_TRANSFERRED_LAYERS)
    return model


def build_small_cnn(num_labels, imagenet):
    if imagenet:
        raise ValueError("small_cnn has no ImageNet weights; use --weights none or a checkpoint path")
    return SmallCNN(num_labels)


def build_vgg_like(num_labels, imagenet):
    if imagenet:
        raise ValueError("vgg_like has no ImageNet weights; use --weights none or a checkpoint path")
    return VGGLike(num_labels)
