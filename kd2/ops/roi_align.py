"""``roi_align``: RoIAlign in pure PyTorch (bilinear sampling with ``grid_sample``).

The same values as ``torchvision.ops.roi_align`` / Detectron2's ``ROIAlignV2`` (``aligned=True``,
fixed ``sampling_ratio``; tested against torchvision), without importing a framework, so that
:mod:`kd2.losses` can pool instance features (GID). Gradients reach ``features``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["roi_align"]


def _normalise(coord: Tensor, size: int) -> Tensor:
    """Pixel-centre coordinates in ``[0, size − 1]`` -> ``grid_sample``'s ``[−1, 1]``
    (``align_corners=True``)."""
    if size == 1:
        return torch.zeros_like(coord)
    return coord * (2.0 / (size - 1)) - 1.0


def roi_align(
    features: Tensor,
    boxes: Tensor,
    batch_index: Tensor,
    spatial_scale: float,
    output_size: int,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> Tensor:
    """Pool each box of ``features`` to ``output_size × output_size`` bins.

    Each bin averages ``sampling_ratio²`` bilinear samples at the sub-bin centres; a sample more
    than one cell outside the map counts as 0, one closer is clamped to the border (RoIAlign's
    rule). ``aligned`` shifts the box by half a cell (pixel centres at ``i + 0.5``), as
    ``ROIAlignV2``.

    Args:
        features: ``(N, C, H, W)``.
        boxes: ``(M, 4)`` XYXY in input pixels.
        batch_index: ``(M,)`` long, the image of each box.
        spatial_scale: ``1 / stride`` of the map.
        output_size: bins per side ``P``.
        sampling_ratio: samples per bin side (``> 0``).
        aligned: the half-cell shift of ``ROIAlignV2``.

    Returns:
        ``(M, C, P, P)``.
    """
    if sampling_ratio <= 0:
        raise ValueError(
            f"sampling_ratio must be > 0 (adaptive sampling is not offered), got {sampling_ratio}"
        )
    n, c, h, w = features.shape
    m = boxes.shape[0]
    p, s = int(output_size), int(sampling_ratio)
    out = features.new_zeros((m, c, p, p))
    if m == 0:
        return out + features.sum() * 0.0
    b = boxes.to(features.dtype) * spatial_scale - (0.5 if aligned else 0.0)
    size = b[:, 2:] - b[:, :2]  # (M, 2) width, height
    if not aligned:
        size = size.clamp(min=1.0)
    steps = (torch.arange(p * s, device=features.device, dtype=features.dtype) + 0.5) / s
    xs = b[:, 0:1] + steps[None] * (size[:, 0:1] / p)  # (M, P s)
    ys = b[:, 1:2] + steps[None] * (size[:, 1:2] / p)
    inside = ((ys >= -1.0) & (ys <= h))[:, :, None] & ((xs >= -1.0) & (xs <= w))[:, None, :]
    gx = _normalise(xs.clamp(0, w - 1), w)
    gy = _normalise(ys.clamp(0, h - 1), h)
    grid = torch.stack(
        [gx[:, None, :].expand(-1, p * s, -1), gy[:, :, None].expand(-1, -1, p * s)], dim=-1
    )  # (M, P s, P s, 2)
    parts, order = [], []
    for img in torch.unique(batch_index).tolist():
        sel = (batch_index == img).nonzero().flatten()
        g = grid[sel].reshape(1, -1, p * s, 2)  # boxes stacked along the rows
        sampled = F.grid_sample(
            features[img : img + 1], g, mode="bilinear", padding_mode="border", align_corners=True
        )  # (1, C, M_i P s, P s)
        sampled = sampled.view(c, sel.numel(), p * s, p * s).transpose(0, 1)
        sampled = sampled * inside[sel][:, None].to(sampled.dtype)
        parts.append(F.avg_pool2d(sampled, kernel_size=s))
        order.append(sel)
    return out.index_copy(0, torch.cat(order), torch.cat(parts))
