"""kd2's training targets in the label format of transformers' DETR-family detectors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from kd2.losses.query_matching import normalized_cxcywh

__all__ = ["to_hf_labels"]


def to_hf_labels(
    targets: Sequence[Mapping[str, Tensor]],
    image_sizes: Sequence[tuple[int, int]],
    label_offset: int = 0,
) -> list[dict[str, Tensor]]:
    """One ``{"class_labels", "boxes"}`` dict per image, as ``<Model>ForObjectDetection(labels=)``
    reads them.

    Args:
        targets: per image ``boxes`` ``(N, 4)`` absolute ``x1, y1, x2, y2`` in pixels of the
            network input and ``labels`` ``(N,)`` class indices.
        image_sizes: per image ``(height, width)`` of the network input the boxes refer to.
        label_offset: subtracted from ``labels`` (1 where kd2's labels count a background
            class first, as torchvision's two-stage detectors do), so ``class_labels`` start at 0.

    Returns:
        per image ``class_labels`` int64 ``(N,)`` and ``boxes`` float32 ``(N, 4)``: normalised
        ``cx, cy, w, h`` in ``[0, 1]`` (clipped to the image).
    """
    if len(targets) != len(image_sizes):
        raise ValueError(f"{len(targets)} targets for {len(image_sizes)} image sizes")
    out = []
    for target, (h, w) in zip(targets, image_sizes):
        cxcywh = normalized_cxcywh(target["boxes"].to(torch.float32).reshape(-1, 4), h, w)
        labels = target["labels"].to(torch.int64).reshape(-1) - int(label_offset)
        if bool((labels < 0).any()):
            raise ValueError(f"a label below label_offset {label_offset}: {labels.min().item()}")
        out.append({"class_labels": labels, "boxes": cxcywh})
    return out
