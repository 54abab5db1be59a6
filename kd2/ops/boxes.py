"""``box_mean_pool``: the mean feature of each box, with integral images."""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

from kd2.ops import _ext, reference

__all__ = ["box_mean_pool"]


def box_mean_pool(features: Tensor, boxes: Tensor, batch_index: Tensor, stride: float) -> Tensor:
    """Average the feature-map cells covered by each box.

    Box ``m`` on image ``n = batch_index[m]`` averages ``features[n, :, r0:r1+1, c0:c1+1]``, the
    cells from row ``⌊|y1|/stride⌋`` to ``⌊|y2|/stride⌋`` and from column ``⌊|x1|/stride⌋`` to
    ``⌊|x2|/stride⌋``, both ends inclusive, where:

    * **floor of the absolute value.** Indices are ``floor(|coord| / stride)`` (the division in
      double precision), as in the Global-Knowledge (ECCV 2022) code's
      ``int(abs(coord) / stride)``. For coordinates ≥ 0 this is the usual ``⌊coord/stride⌋``; a
      negative coordinate is mirrored (``y1 = -20, stride = 8`` gives row 2, not row 0).
    * **clamped into the map.** Each index is clamped to ``[0, H - 1]`` (rows) or ``[0, W - 1]``
      (columns) *before* the range is formed, so a box partly outside the map averages the cells
      inside it, and a box fully outside collapses onto the nearest border cell(s) — e.g. a box
      entirely below the map averages cells of row ``H - 1`` — and still averages ≥ 1 cell.
    * **sorted ends.** The two row indices (and the two column indices) are sorted, so an inverted
      box (``y2 < y1``, or ``|y2| < |y1|`` after the absolute value) covers the cells between its
      edges. A degenerate box (``x1 == x2``) covers one column.

    NaN coordinates map to index 0 and ±inf to the last index (kept in bounds, not supported).
    The kernels build one summed-area table per (image, channel) in float64, so the cost is
    O(N·C·H·W + M·C) regardless of the box sizes; the backward pass spreads ``grad / count``
    over each box with a 2-D difference array and cumulative sums, at the same cost.

    Args:
        features: (N, C, H, W) floating-point feature maps.
        boxes: (M, 4) floating-point boxes ``(x1, y1, x2, y2)`` in input-image pixels.
        batch_index: (M,) int64: the image of each box, in ``[0, N)``.
        stride: the feature map's stride in pixels (> 0), e.g. 8 for an FPN level P3.

    Returns:
        (M, C) tensor of ``features``' dtype and device; (0, C) when M = 0. Differentiable with
        respect to ``features`` (twice); the boxes get no gradient.
    """
    _check_args(features, boxes, batch_index, stride)
    compiled = _ext.extension_available()
    if features.device.type == "cpu" or not compiled:  # (the CUDA kernels check it themselves)
        _check_batch_index_range(batch_index, features.shape[0])
    if compiled:
        return torch.ops.kd2.box_mean_pool(features, boxes, batch_index, float(stride))
    _ext.warn_fallback()
    return reference.box_mean_pool_torch(features, boxes, batch_index, float(stride))


def _check_args(features: Tensor, boxes: Tensor, batch_index: Tensor, stride: float) -> None:
    for name, t in (("features", features), ("boxes", boxes), ("batch_index", batch_index)):
        if not isinstance(t, Tensor):
            raise TypeError(f"box_mean_pool: {name} must be a torch.Tensor, got {type(t).__name__}")
    if features.dim() != 4:
        raise ValueError(
            f"box_mean_pool: features must be (N, C, H, W), got shape {tuple(features.shape)}; "
            "add a batch dimension with features[None] for a single map"
        )
    if not features.is_floating_point():
        raise TypeError(
            f"box_mean_pool: features must be floating point, got {features.dtype}; "
            "convert with features.float()"
        )
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"box_mean_pool: boxes must be (M, 4) XYXY, got shape {tuple(boxes.shape)}; "
            "pass all boxes as one tensor with their image in batch_index"
        )
    if not boxes.is_floating_point():
        raise TypeError(
            f"box_mean_pool: boxes must be floating point, got {boxes.dtype}; use boxes.float()"
        )
    if batch_index.dim() != 1 or batch_index.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"box_mean_pool: batch_index must be (M,) with M = {boxes.shape[0]} (one image index "
            f"per box), got shape {tuple(batch_index.shape)}"
        )
    if batch_index.dtype != torch.long:
        raise TypeError(
            f"box_mean_pool: batch_index must be int64 (long), got {batch_index.dtype}; "
            "pass batch_index.long()"
        )
    if boxes.device != features.device or batch_index.device != features.device:
        raise ValueError(
            "box_mean_pool: features, boxes and batch_index must be on one device, got "
            f"{features.device}, {boxes.device}, {batch_index.device}; move them with .to()"
        )
    if isinstance(stride, bool) or not isinstance(stride, Real):
        raise TypeError(f"box_mean_pool: stride must be a number, got {type(stride).__name__}")
    if not (math.isfinite(stride) and stride > 0):
        raise ValueError(f"box_mean_pool: stride must be a finite number > 0, got {stride}")
    if (
        boxes.shape[0] > 0
        and features.shape[1] > 0
        and (features.shape[2] == 0 or features.shape[3] == 0)
    ):
        raise ValueError(
            f"box_mean_pool: the feature maps are empty (H, W = {tuple(features.shape[2:])}), "
            "so a box has no cell to average"
        )


def _check_batch_index_range(batch_index: Tensor, n: int) -> None:
    if batch_index.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(batch_index.min()), int(batch_index.max())
    if lo < 0 or hi >= n:
        raise ValueError(
            f"box_mean_pool: batch_index values must lie in [0, {n}) for {n} feature maps, "
            f"got values in [{lo}, {hi}]"
        )
