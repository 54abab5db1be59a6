#!/usr/bin/env python
"""Show a detector's FRS feature-richness maps on one image.

Builds the (torchvision-backend) detector described by a kd2 config, loads its weights, runs
``transform -> backbone -> head`` in eval mode (the RetinaNet/FCOS head, or the RPN of a Faster
R-CNN) and computes, per FPN level, the feature-richness score ``max_j σ(z_j)`` over all
classification channels (:func:`kd2.losses.frs.feature_richness`). Writes one PNG: the image, then
one panel per level with the map upsampled to the image and overlaid, titled with the stride.

Usage::

    python tools/show_richness.py --config-file CFG --image PATH [--weights W] \
        [--output out.png] [KEY VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from kd2.data import read_image  # noqa: E402
from kd2.engine import setup_cfg  # noqa: E402
from kd2.losses.frs import feature_richness  # noqa: E402
from kd2.tv.build import build_plain_detector, load_checkpoint_state  # noqa: E402
from kd2.tv.record import features_by_stride, model_strides, run_dense_head, run_rpn  # noqa: E402
from kd2.utils.errors import run_main  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True, help="kd2 config of the detector")
    p.add_argument("--image", required=True, help="image file (read with OpenCV)")
    p.add_argument("--weights", default="", help="checkpoint (default: MODEL.WEIGHTS)")
    p.add_argument("--output", default="richness.png", help="PNG to write")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides")
    return p.parse_args(argv)


@torch.no_grad()
def richness_maps(model: nn.Module, image: Tensor) -> tuple[list[int], list[Tensor]]:
    """Feature-richness maps of one image, per FPN level.

    Args:
        model: a torchvision FasterRCNN / RetinaNet / FCOS built by kd2 (put in eval mode).
        image: ``(3, H, W)`` RGB in ``[0, 1]``.

    Returns:
        ``(strides, maps)``: per level its stride and a ``(H, W)`` map in ``[0, 1]`` resized to
        the original image (the padding of the network input is cropped away first).
    """
    model.eval()
    strides, _ = model_strides(model)
    device = next(model.parameters()).device
    images, _ = model.transform([image.to(device)])
    feats = model.backbone(images.tensors)
    if hasattr(model, "rpn"):
        head, _, _ = run_rpn(model.rpn, images, feats, strides, need_proposals=False)
    else:
        head, _, _ = run_dense_head(model, images, list(feats.values()), strides)
    by_stride = features_by_stride(feats, strides)
    padded_hw = tuple(images.tensors.shape[-2:])
    valid_h, valid_w = images.image_sizes[0]
    out_hw = tuple(image.shape[-2:])
    maps = []
    for stride, logits in zip(head.strides, head.level_maps(head.cls_logits)):
        if stride not in by_stride:
            raise ValueError(f"head level of stride {stride} has no FPN map")
        score = feature_richness(logits[:1])  # (1, 1, H_l, W_l)
        full = F.interpolate(score, size=padded_hw, mode="bilinear", align_corners=False)
        full = full[..., :valid_h, :valid_w]
        full = F.interpolate(full, size=out_hw, mode="bilinear", align_corners=False)
        maps.append(full[0, 0].clamp(0.0, 1.0).cpu())
    return list(head.strides), maps


def save_figure(image: Tensor, strides: list[int], maps: list[Tensor], path: str) -> int:
    """Write the image plus one overlay panel per level; returns the number of panels."""
    panels = 1 + len(maps)
    fig, axes = plt.subplots(1, panels, figsize=(3.0 * panels, 3.2), squeeze=False)
    rgb = image.permute(1, 2, 0).clamp(0.0, 1.0).cpu().numpy()
    axes[0, 0].imshow(rgb)
    axes[0, 0].set_title("image")
    for ax, stride, m in zip(axes[0, 1:], strides, maps):
        ax.imshow(rgb)
        ax.imshow(m.numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        ax.set_title(f"stride {stride} (max {float(m.max()):.2f})")
    for ax in axes[0]:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return panels


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = setup_cfg(args.config_file, args.opts)
    model = build_plain_detector(cfg)
    weights = args.weights or cfg.MODEL.WEIGHTS
    if not weights:
        print(
            "show_richness: give --weights or MODEL.WEIGHTS (a trained checkpoint)", file=sys.stderr
        )
        return 2
    model.load_state_dict(load_checkpoint_state(weights, "show_richness --weights"))
    image = read_image(args.image)
    strides, maps = richness_maps(model, image)
    panels = save_figure(image, strides, maps, args.output)
    print(f"show_richness: wrote {args.output} with {panels} panels (strides {strides})")
    return 0


if __name__ == "__main__":
    run_main(main)
