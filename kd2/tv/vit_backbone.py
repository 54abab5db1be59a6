"""A DINOv2-architecture ViT backbone for kd2's torchvision detectors (``MODEL.BACKBONE.NAME
"dinov2_vit"``), trained from scratch like the other backbones.

The trunk is transformers' ``Dinov2Model`` built from ``MODEL.BACKBONE.VIT`` (never downloaded);
its last layer's patch tokens, after the final norm, are one map of stride ``PATCH_SIZE``. A
parameter-light pyramid in the style of ViTDet's simple feature pyramid makes the detector's
levels from that single map — 2× transposed convolutions for the finer strides, 2× max pools for
the coarser ones — and torchvision's ``FeaturePyramidNetwork`` (with its top-down path) and the
usual extra levels (P6/P7 for one-stage heads, a max-pooled P6 for Faster R-CNN) complete it.

Its ``body.vit`` is a plain transformers DINOv2 model, so a trained detector's trunk can teach any
student as a backbone-only foundation teacher (``KD.TEACHER.BACKEND foundation`` with the
detector's config and weights: :mod:`kd2.foundation.build`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List

from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

from kd2.utils.errors import ConfigError

__all__ = ["SimplePyramidViT", "ViTBackboneWithFPN", "build_vit_backbone"]


class SimplePyramidViT(nn.Module):
    """A DINOv2 ViT and its single-scale-to-multi-scale pyramid.

    Args:
        vit: a transformers ``Dinov2Model``.
        strides: the output strides (powers of two, each a power-of-two multiple or fraction of
            the patch size).

    ``forward(x)`` -> ``{"0": (N, D, H/s_0, W/s_0), "1": ...}`` finest first.
    """

    def __init__(self, vit: nn.Module, strides: List[int]):
        super().__init__()
        self.vit = vit
        self.patch = int(vit.config.patch_size)
        dim = int(vit.config.hidden_size)
        self.strides = list(strides)
        self.scales = nn.ModuleList()
        for s in self.strides:
            steps = round(math.log2(s / self.patch))
            if 2**steps * self.patch != s:
                raise ValueError(
                    f"stride {s} is not a power-of-two multiple or fraction of the patch size "
                    f"{self.patch}"
                )
            layers: List[nn.Module] = []
            for i in range(-steps):  # finer than the patch: transposed convs
                layers.append(nn.ConvTranspose2d(dim, dim, 2, stride=2))
                if i < -steps - 1:
                    layers.append(nn.GELU())
            layers += [nn.MaxPool2d(2) for _ in range(steps)]  # coarser: max pools
            self.scales.append(nn.Sequential(*layers))

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        n, _, h, w = x.shape
        tokens = self.vit(pixel_values=x).last_hidden_state[:, 1:]  # the final norm's patches
        grid = tokens.transpose(1, 2).reshape(n, -1, h // self.patch, w // self.patch)
        return OrderedDict((str(i), f(grid)) for i, f in enumerate(self.scales))


class ViTBackboneWithFPN(nn.Module):
    """``body`` (:class:`SimplePyramidViT`) + torchvision's FPN: the interface of torchvision's
    ``BackboneWithFPN`` (``out_channels``, an ordered dict of maps)."""

    def __init__(self, body: SimplePyramidViT, out_channels: int, extra_blocks):
        super().__init__()
        dim = int(body.vit.config.hidden_size)
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            [dim] * len(body.strides), out_channels, extra_blocks=extra_blocks
        )
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return self.fpn(self.body(x))


def build_vit_backbone(node, strides: List[int], out_channels: int, extra_blocks) -> nn.Module:
    """The backbone of ``MODEL.BACKBONE.VIT`` (``node``) at ``strides`` (finest first)."""
    from transformers import Dinov2Config, Dinov2Model

    heads = int(node.NUM_HEADS)
    dim = int(node.HIDDEN_SIZE)
    if dim % heads:
        raise ConfigError(
            f"MODEL.BACKBONE.VIT.HIDDEN_SIZE {dim} is not a multiple of NUM_HEADS {heads}",
            "give a width that the heads divide (e.g. 192 and 3)",
        )
    config = Dinov2Config(
        hidden_size=dim,
        num_hidden_layers=int(node.DEPTH),
        num_attention_heads=heads,
        mlp_ratio=int(node.MLP_RATIO),
        patch_size=int(node.PATCH_SIZE),
        image_size=int(node.IMAGE_SIZE),
        drop_path_rate=float(node.DROP_PATH),
    )
    body = SimplePyramidViT(Dinov2Model(config), strides)
    return ViTBackboneWithFPN(body, out_channels, extra_blocks)
