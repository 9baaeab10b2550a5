"""The attention DenseNets of report 004: DenseNet-121 whose transition outputs are pooled by attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
