"""Model registry: one entry per model (MODELS) holding everything other modules need, and building a model
from it: a backbone with its classification head replaced by `num_labels` outputs.

Weights: `imagenet` (torchvision download, needs internet once), `none` (random init) or
the path of a local checkpoint (a torchvision state dict or this project's checkpoint).

Every model `<name>` also comes as `<name>+meta`, which fuses age, sex and view position with
the image features (training/models/fusion.py); those are called `model(images, metadata)`, the others
`model(images)`.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn

from cxr_pipeline.training.models.attention import (AttentionDenseNet, ConcatAttention, ProjectedAttention,
                                                    SplitConcatAttention)
from cxr_pipeline.training.models.fusion import MetadataFusion
from cxr_pipeline.training.models.zoo import (VGG16_FEATURE_LAYERS, VGG16_TRANSFERRED_LAYERS, build_densenet121,
                                              build_pneumonia_cnn24, build_resnet, build_resnet18_half,
                                              build_small_cnn, build_vgg16_partial, build_vgg_like)


class Architecture(NamedTuple):
    """Everything the project needs to know about one model: adding a model is adding one entry to MODELS."""
    build: Callable[..., nn.Module]  # (num_labels, imagenet) -> model; sized ones also take image_size=
    output: str  # dotted name of the final Linear to the logits; fusion replaces it
    head: tuple[str, ...]  # module prefixes that knowledge transfer trains (the rest is frozen)
    cam_layer: str  # dotted name of the layer whose activations Grad-CAM weighs (training/explain/gradcam.py)
    positional_head: bool = False  # the head flattens its map (keeps position): HiResCAM is exact there
    metadata: bool = False  # called model(images, metadata)
    sized: bool = False  # flattens its last map, so it is built for one image size


FUSED_SUFFIX = "+meta"


def _fused(backbone: Architecture) -> Architecture:
    """`<backbone>+meta`: knowledge transfer trains what it trains in the backbone, plus the metadata encoder
    and the fused head; Grad-CAM weighs the backbone's layer."""
    return Architecture(partial(MetadataFusion, backbone.build, backbone.output), "head",
                        tuple(f"backbone.{prefix}" for prefix in backbone.head) + ("metadata_encoder", "head"),
                        cam_layer=f"backbone.{backbone.cam_layer}", positional_head=backbone.positional_head,
                        metadata=True, sized=backbone.sized)


# Knowledge transfer trains the output layer; also the attention modules of the attention
# DenseNets, and for vgg16_partial and pneumonia_cnn24 everything that did not come from ImageNet
# (the convs after VGG16's features[:10] and the whole fully connected classifier), since freezing
# random layers would leave random features. densenet121_attA/B are report 004's models, the `_g`
# ones this project's first reading, whose classifier also sees g (AttentionDenseNet).
#
# Grad-CAM's layer: norm5 for DenseNet (as CheXNet) and the attention DenseNets whose classifier sees g;
# transition3 for the report's attention DenseNets, where no output depends on norm5 (report 004 took norm5,
# which gets no gradient there): the deepest map their attention reads. The last residual stage for ResNet,
# the last conv block's activation (before pooling) for the small CNN, the VGGs and the 24-layer pneumonia CNN,
# whose heads flatten the map and so keep position.
_ATTENTION_HEAD = ("attention", "classifier")
MODELS: dict[str, Architecture] = {
    "densenet121": Architecture(build_densenet121, "classifier", ("classifier",), "features.norm5"),
    "densenet121_attA": Architecture(partial(AttentionDenseNet, attention=ProjectedAttention, classify_global=False),
                                     "classifier", _ATTENTION_HEAD, "features.transition3"),
    "densenet121_attB": Architecture(partial(AttentionDenseNet, attention=SplitConcatAttention,
                                             classify_global=False), "classifier", _ATTENTION_HEAD,
                                     "features.transition3"),
    "densenet121_attA_g": Architecture(partial(AttentionDenseNet, attention=ProjectedAttention, classify_global=True),
                                       "classifier", _ATTENTION_HEAD, "features.norm5"),
    "densenet121_attB_g": Architecture(partial(AttentionDenseNet, attention=ConcatAttention, classify_global=True),
                                       "classifier", _ATTENTION_HEAD, "features.norm5"),
    "pneumonia_cnn24": Architecture(build_pneumonia_cnn24, "classifier.7", ("separable", "classifier"), "separable.16",
                                    positional_head=True, sized=True),
    "resnet18": Architecture(partial(build_resnet, depth=18), "fc", ("fc",), "layer4"),
    "resnet18_half": Architecture(build_resnet18_half, "fc", ("fc",), "layer4"),
    "resnet50": Architecture(partial(build_resnet, depth=50), "fc", ("fc",), "layer4"),
    "small_cnn": Architecture(build_small_cnn, "classifier", ("classifier",), "features.6", positional_head=True),
    "vgg16_partial": Architecture(build_vgg16_partial, "classifier.6", tuple(
        f"features.{i}" for i in range(VGG16_TRANSFERRED_LAYERS, VGG16_FEATURE_LAYERS)) + ("classifier",),
        "features.29", positional_head=True),
    "vgg_like": Architecture(build_vgg_like, "classifier", ("classifier",), "features.26", positional_head=True),
}
MODELS.update({f"{name}{FUSED_SUFFIX}": _fused(architecture) for name, architecture in list(MODELS.items())})


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
