"""Model registry: a backbone with its classification head replaced by `num_labels` outputs.

Weights: `imagenet` (torchvision download, needs internet once), `none` (random init) or
the path of a local checkpoint (a torchvision state dict or this project's checkpoint).

Every model `<name>` also comes as `<name>+meta`, which fuses age, sex and view position with
the image features (`MetadataFusion`); those are called `model(images, metadata)` with
`metadata = metadata_features(age, sex, view_position)`, the others `model(images)`.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
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


class ProjectedAttention(nn.Module):
    """Attention A: a 1x1 conv maps the layer's map L to the global width (L'), the score of
    position i is <u, L'_i + g>, and the output is the softmax-weighted sum of the L'_i.
    Called without g, the score leaves out <u, g>: the same at every position, it cancels in the softmax."""

    def __init__(self, local_width: int, global_width: int):
        super().__init__()
        self.project = nn.Conv2d(local_width, global_width, 1, bias=False)
        self.u = nn.Parameter(torch.zeros(global_width))  # zero: starts as plain average pooling
        self.output_width = global_width

    def forward(self, local, g=None):
        local = self.project(local)
        weights = _softmax_over_positions(torch.einsum("c,nchw->nhw", self.u,
                                                       local if g is None else local + g[:, :, None, None]))
        return torch.einsum("nhw,nchw->nc", weights, local), weights


class ConcatAttention(nn.Module):
    """Attention B: the score of position i is <u, concat(L_i, g)> and the output is the
    softmax-weighted sum of the L_i themselves (the layer's own width)."""

    def __init__(self, local_width: int, global_width: int):
        super().__init__()
        self.u = nn.Parameter(torch.zeros(local_width + global_width))  # zero: starts as plain average pooling
        self.output_width = local_width

    def forward(self, local, g):
        both = torch.cat([local, g[:, :, None, None].expand(-1, -1, *local.shape[-2:])], 1)
        weights = _softmax_over_positions(torch.einsum("c,nchw->nhw", self.u, both))
        return torch.einsum("nhw,nchw->nc", weights, local), weights


class SplitConcatAttention(nn.Module):
    """Attention B of the report's model, with u held as (u_local, u_global): <u_global, g> is the same
    at every position and cancels in the softmax, so the score is <u_local, L_i> and u_global, never
    used, stays frozen. It is kept because Table 2 counts it."""

    def __init__(self, local_width: int, global_width: int):
        super().__init__()
        self.u_local = nn.Parameter(torch.zeros(local_width))  # zero: starts as plain average pooling
        self.u_global = nn.Parameter(torch.zeros(global_width), requires_grad=False)
        self.unused = ("u_global",)
        self.output_width = local_width

    def forward(self, local):
        weights = _softmax_over_positions(torch.einsum("c,nchw->nhw", self.u_local, local))
        return torch.einsum("nhw,nchw->nc", weights, local), weights


def _softmax_over_positions(scores):
    return F.softmax(scores.flatten(1), dim=1).view_as(scores)


class AttentionDenseNet(nn.Module):
    """DenseNet-121 with attention over the outputs of transition layers 1-3 (report 004, section 2.2).

    g is the global feature (norm5, ReLU, global average pooling, 1024 values); each transition output
    is pooled by its own attention module against g. The backbone stays torchvision's `features` (so
    ImageNet weights load unchanged), run layer by layer to tap the transition outputs. `last_attention`
    holds the (N, H, W) maps of the last forward pass, detached, for plotting.

    With `classify_global` False (the report's models) the classifier is a linear layer on
    concat(attended_1, attended_2, attended_3) alone. g enters every score only as a term that is the
    same at every position, so it cancels in the softmax and no output depends on denseblock4 and norm5:
    they are kept (Table 2 counts them; 7,920,527 weights for A, 6,971,279 for B with 15 outputs) but
    frozen, listed in `unused`, and not run. With `classify_global` True (the `_g` models, this project's
    first reading, not the report's) the classifier also sees g, concat(g, attended_1..3), which is what
    trains the backbone's last block: 1024 x num_labels more weights, 7,935,887 (A) and 6,986,639 (B)
    with 15 outputs. Their attention B keeps u whole, g part included, which still cancels.
    """

    def __init__(self, num_labels: int, imagenet: bool, attention: type[nn.Module], classify_global: bool):
        super().__init__()
        from torchvision.models import DenseNet121_Weights, densenet121

        self.features = densenet121(weights=DenseNet121_Weights.IMAGENET1K_V1 if imagenet else None).features
        global_width = self.features.norm5.num_features
        self.attention = nn.ModuleList(
            attention(getattr(self.features, f"transition{i}").conv.out_channels, global_width) for i in (1, 2, 3))
        self.classify_global = classify_global
        attended_width = sum(a.output_width for a in self.attention)
        self.classifier = nn.Linear(attended_width + (global_width if classify_global else 0), num_labels)
        self.unused = () if classify_global else ("features.denseblock4", "features.norm5")
        for name in self.unused:
            self.get_submodule(name).requires_grad_(False)
        self.last_attention: list[torch.Tensor] = []

    def forward(self, images):
        taps, x = [], images
        for name, layer in self.features.named_children():
            if name == "denseblock4" and not self.classify_global:
                break
            x = layer(x)
            if name.startswith("transition"):
                taps.append(x)
        if self.classify_global:
            g = F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1)
            attended, maps = zip(*(attend(local, g) for attend, local in zip(self.attention, taps)))
            pooled = (g, *attended)
        else:
            pooled, maps = zip(*(attend(local) for attend, local in zip(self.attention, taps)))
        self.last_attention = [m.detach() for m in maps]
        return self.classifier(torch.cat(pooled, 1))


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
    """A registered backbone whose output layer is removed, its pooled image features
    concatenated with Linear(metadata, 3) -> ReLU, then a linear head to the label logits.
    `size` (image_size=, for sized backbones) goes on to the backbone's builder."""

    def __init__(self, backbone_name: str, num_labels: int, imagenet: bool, **size):
        super().__init__()
        architecture = MODELS[backbone_name]
        self.backbone = architecture.build(num_labels, imagenet, **size)
        image_width = self.backbone.get_submodule(architecture.output).in_features
        parent, _, leaf = architecture.output.rpartition(".")
        setattr(self.backbone.get_submodule(parent), leaf, nn.Identity())
        self.metadata_encoder = nn.Sequential(nn.Linear(METADATA_WIDTH, METADATA_EMBEDDING), nn.ReLU())
        self.head = nn.Linear(image_width + METADATA_EMBEDDING, num_labels)

    def forward(self, images, metadata=None):
        if metadata is None:
            raise ValueError("this model fuses image and metadata features: call model(images, metadata) with "
                             "metadata = training.models.metadata_features(age, sex, view_position)")
        return self.head(torch.cat([self.backbone(images), self.metadata_encoder(metadata)], 1))


def _densenet121(num_labels, imagenet):
    from torchvision.models import DenseNet121_Weights, densenet121

    model = densenet121(weights=DenseNet121_Weights.IMAGENET1K_V1 if imagenet else None)
    model.classifier = nn.Linear(model.classifier.in_features, num_labels)  # CheXNet head
    return model


def _resnet(num_labels, imagenet, depth):
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


def _resnet18_half(num_labels, imagenet):
    if imagenet:
        raise ValueError("resnet18_half has no ImageNet weights; use --weights none or a checkpoint path")
    return HalfWidthResNet18(num_labels)


# Partial transfer: only the first two conv blocks of VGG16 (features[:10], four convs) get
# ImageNet weights; the rest of the net, deeper convs and fully connected layers, starts random.
VGG16_TRANSFERRED_LAYERS = 10
VGG16_FEATURE_LAYERS = 31  # len(torchvision vgg16().features)


def _vgg16_partial(num_labels, imagenet):
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


def _pneumonia_cnn24(num_labels, imagenet, image_size):
    from torchvision.models import VGG16_Weights

    model = PneumoniaCNN24(num_labels, image_size)
    if imagenet:
        _load_partial(model, VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True), VGG16_TRANSFERRED_LAYERS)
    return model


def _small_cnn(num_labels, imagenet):
    if imagenet:
        raise ValueError("small_cnn has no ImageNet weights; use --weights none or a checkpoint path")
    return SmallCNN(num_labels)


def _vgg_like(num_labels, imagenet):
    if imagenet:
        raise ValueError("vgg_like has no ImageNet weights; use --weights none or a checkpoint path")
    return VGGLike(num_labels)


class Architecture(NamedTuple):
    build: Callable[..., nn.Module]  # (num_labels, imagenet) -> model; sized ones also take image_size=
    output: str  # dotted name of the final Linear to the logits; fusion replaces it
    head: tuple[str, ...]  # module prefixes that knowledge transfer trains (the rest is frozen)
    metadata: bool = False  # called model(images, metadata)
    sized: bool = False  # flattens its last map, so it is built for one image size


def _fused(backbone_name: str) -> Architecture:
    """`<backbone>+meta`: knowledge transfer trains what it trains in the backbone, plus the
    metadata encoder and the fused head."""
    backbone_head = tuple(f"backbone.{prefix}" for prefix in MODELS[backbone_name].head)
    return Architecture(partial(MetadataFusion, backbone_name), "head", backbone_head + ("metadata_encoder", "head"),
                        metadata=True, sized=MODELS[backbone_name].sized)


# Knowledge transfer trains the output layer; also the attention modules of the attention
# DenseNets, and for vgg16_partial and pneumonia_cnn24 everything that did not come from ImageNet
# (the convs after VGG16's features[:10] and the whole fully connected classifier), since freezing
# random layers would leave random features. densenet121_attA/B are report 004's models, the `_g`
# ones this project's first reading, whose classifier also sees g (AttentionDenseNet).
MODELS: dict[str, Architecture] = {
    "densenet121": Architecture(_densenet121, "classifier", ("classifier",)),
    "densenet121_attA": Architecture(partial(AttentionDenseNet, attention=ProjectedAttention, classify_global=False),
                                     "classifier", ("attention", "classifier")),
    "densenet121_attB": Architecture(partial(AttentionDenseNet, attention=SplitConcatAttention,
                                             classify_global=False), "classifier", ("attention", "classifier")),
    "densenet121_attA_g": Architecture(partial(AttentionDenseNet, attention=ProjectedAttention, classify_global=True),
                                       "classifier", ("attention", "classifier")),
    "densenet121_attB_g": Architecture(partial(AttentionDenseNet, attention=ConcatAttention, classify_global=True),
                                       "classifier", ("attention", "classifier")),
    "pneumonia_cnn24": Architecture(_pneumonia_cnn24, "classifier.7", ("separable", "classifier"), sized=True),
    "resnet18": Architecture(partial(_resnet, depth=18), "fc", ("fc",)),
    "resnet18_half": Architecture(_resnet18_half, "fc", ("fc",)),
    "resnet50": Architecture(partial(_resnet, depth=50), "fc", ("fc",)),
    "small_cnn": Architecture(_small_cnn, "classifier", ("classifier",)),
    "vgg16_partial": Architecture(_vgg16_partial, "classifier.6", tuple(
        f"features.{i}" for i in range(VGG16_TRANSFERRED_LAYERS, VGG16_FEATURE_LAYERS)) + ("classifier",)),
    "vgg_like": Architecture(_vgg_like, "classifier", ("classifier",)),
}
MODELS.update({f"{name}+meta": _fused(name) for name in list(MODELS)})


def uses_metadata(model_name: str) -> bool:
    """Whether the model is called model(images, metadata) rather than model(images)."""
    return MODELS[model_name].metadata


def build_model(name: str, num_labels: int, weights: str = "none", image_size: int = 224) -> nn.Module:
    """`image_size`, the side of the (square) input images, shapes only the sized models
    (pneumonia_cnn24); the others take any size."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    size = {"image_size": image_size} if MODELS[name].sized else {}
    model = MODELS[name].build(num_labels, weights == "imagenet", **size)
    if weights not in ("imagenet", "none"):
        load_backbone(model, Path(weights), head_name(name))
    return model


def load_backbone(model: nn.Module, path: Path, head: tuple[str, ...]) -> None:
    """Load a local checkpoint; head weights whose shape differs (another label set) are skipped."""
    if not path.exists():
        raise FileNotFoundError(f"--weights {path}: no such file (use 'imagenet', 'none' or a checkpoint path)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    own = model.state_dict()
    skipped = [k for k in state if in_head(k, head) and k in own and state[k].shape != own[k].shape]
    for key in skipped:
        del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    backbone_missing = [k for k in missing if not in_head(k, head)]
    if backbone_missing or unexpected:
        raise ValueError(
            f"{path} does not fit this model: missing {backbone_missing[:5]}, unexpected {unexpected[:5]}"
        )


def head_name(model_name: str) -> tuple[str, ...]:
    """The module name prefixes knowledge transfer trains, as a tuple (`str.startswith` takes
    one); `in_head` matches whole name components, so `features.1` would not take `features.10`."""
    return MODELS[model_name].head


def in_head(name: str, head: tuple[str, ...]) -> bool:
    """Whether a parameter or module name lies in one of the head's modules."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in head)


def unused_parameters(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes of the parameters no output depends on, as the modules holding them list them
    (their `unused` attribute, relative names), e.g. norm5 of the report's attention DenseNets."""
    return tuple(f"{prefix}.{name}" if prefix else name
                 for prefix, module in model.named_modules() for name in getattr(module, "unused", ()))


def set_backbone_trainable(model: nn.Module, model_name: str, trainable: bool) -> None:
    """Freeze (knowledge transfer) or unfreeze (fine-tune) everything but the head. Unused
    parameters stay frozen in every stage: DDP fails on a trainable parameter without a gradient."""
    head, unused = head_name(model_name), unused_parameters(model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = (trainable or in_head(name, head)) and not in_head(name, unused)
