"""GFL's math, shared by both backends' GFL detectors (:mod:`kd2.tv.gfl`, :mod:`kd2.d2.gfl`):
the integral of the side-distance distributions, QFL and DFL, ATSS assignment, the per-batch
losses with their weights and normalisers, the box coder and the per-level ``Scale``. The
formulas and the official code they follow are in :mod:`kd2.tv.gfl`'s docstring. Plain
functions on plain tensors: nothing here knows a framework's data structures.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from kd2.losses.utils import aligned_box_iou, atss_candidates

__all__ = [
    "GFLBoxCoder",
    "Scale",
    "atss_assign",
    "box_centres",
    "distribution_focal_loss",
    "gfl_losses",
    "integral",
    "quality_focal_loss",
]

#: ATSS: a candidate's centre must lie at least this far inside the GT (mmdet ``> 0.01``).
_INSIDE_EPS = 0.01
#: DFL targets are clamped to ``reg_max - _DFL_EPS`` (mmdet ``bbox2distance(..., eps=0.1)``).
_DFL_EPS = 0.1


# -- tensor functions ---------------------------------------------------------------------


def integral(dist_logits: Tensor, reg_max: int) -> Tensor:
    """Expected side distances of GFL's discrete distributions.

    Args:
        dist_logits: ``(..., 4 * (reg_max + 1))`` logits, the four sides ``l, t, r, b`` in order.
        reg_max: the largest bin value ``n``; bins are ``0, 1, .., n``.

    Returns:
        ``(..., 4)`` fp32 ``Σ_i softmax(z)_i · i`` per side (in units of the level stride).
    """
    shape = dist_logits.shape[:-1]
    if dist_logits.shape[-1] != 4 * (reg_max + 1):
        raise ValueError(
            f"expected 4 * (reg_max + 1) = {4 * (reg_max + 1)} distribution logits, got "
            f"{dist_logits.shape[-1]}"
        )
    p = F.softmax(dist_logits.float().reshape(*shape, 4, reg_max + 1), dim=-1)
    bins = torch.arange(reg_max + 1, dtype=p.dtype, device=p.device)
    return (p * bins).sum(dim=-1)


def quality_focal_loss(logits: Tensor, labels: Tensor, scores: Tensor, beta: float = 2.0) -> Tensor:
    """QFL of ``M`` anchors (mmdet ``quality_focal_loss``), summed over the ``K`` classes.

    ``QFL(σ, y) = −|y − σ|^β · (y log σ + (1 − y) log(1 − σ))`` elementwise, where the target
    ``y`` is ``scores[m]`` at the class ``labels[m]`` of a positive and ``0`` everywhere else
    (so a negative's term is ``σ^β · BCE(σ, 0)``). The modulating factor is not detached.

    Args:
        logits: ``(M, K)`` raw logits.
        labels: ``(M,)`` class in ``[0, K)`` for a positive, anything else (``K``) for a negative.
        scores: ``(M,)`` quality targets in ``[0, 1]`` (read at positives only).
        beta: ``β``.

    Returns:
        ``(M,)`` fp32 loss per anchor.
    """
    x = logits.float()
    k = x.shape[-1]
    pos = (labels >= 0) & (labels < k)
    target = torch.zeros_like(x)
    target[pos, labels[pos]] = scores[pos].float()
    sig = x.sigmoid()
    bce = F.binary_cross_entropy_with_logits(x, target, reduction="none")
    return (bce * (target - sig).abs().pow(beta)).sum(dim=-1)


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """DFL of ``M`` side distributions (mmdet ``distribution_focal_loss``).

    ``DFL = −((y_r − y) log S_l + (y − y_l) log S_r)`` with ``y_l = ⌊y⌋``, ``y_r = y_l + 1``
    and ``S = softmax(logits)``.

    Args:
        logits: ``(M, reg_max + 1)``.
        target: ``(M,)`` real distances in ``[0, reg_max)``.

    Returns:
        ``(M,)`` fp32 loss.
    """
    x = logits.float()
    y = target.float()
    left = y.long()
    right = left + 1
    w_left = right.float() - y
    w_right = y - left.float()
    return (
        F.cross_entropy(x, left, reduction="none") * w_left
        + F.cross_entropy(x, right, reduction="none") * w_right
    )


def box_centres(boxes: Tensor) -> Tensor:
    return (boxes[:, :2] + boxes[:, 2:]) / 2


def atss_assign(
    anchors: Tensor, num_anchors_per_level: Sequence[int], gt_boxes: Tensor, topk: int = 9
) -> Tensor:
    """ATSS assignment of one image (mmdet ``ATSSAssigner.assign``).

    Args:
        anchors: ``(R, 4)`` XYXY anchors, levels concatenated.
        num_anchors_per_level: ``R_l`` of every level (``Σ R_l = R``).
        gt_boxes: ``(G, 4)`` XYXY.
        topk: candidates per level and GT, by centre distance.

    Returns:
        ``(R,)`` int64: the index of the assigned GT, ``-1`` for background.
    """
    r, g = anchors.shape[0], gt_boxes.shape[0]
    out = torch.full((r,), -1, dtype=torch.int64, device=anchors.device)
    if r == 0 or g == 0:
        return out
    anchors, gt_boxes = anchors.float(), gt_boxes.float()
    ious, cand, threshold = atss_candidates(anchors, num_anchors_per_level, gt_boxes, topk)
    a_ctr = box_centres(anchors)
    cand_iou = ious.gather(0, cand)
    is_pos = cand_iou >= threshold[None]
    cx, cy = a_ctr[cand, 0], a_ctr[cand, 1]  # (C, G)
    inside = torch.stack(
        [cx - gt_boxes[:, 0], cy - gt_boxes[:, 1], gt_boxes[:, 2] - cx, gt_boxes[:, 3] - cy]
    ).amin(dim=0)
    is_pos &= inside > _INSIDE_EPS
    gt_idx = torch.arange(g, device=anchors.device).expand_as(cand)
    best = torch.full_like(ious, -math.inf)
    best[cand[is_pos], gt_idx[is_pos]] = ious[cand[is_pos], gt_idx[is_pos]]
    max_iou, arg = best.max(dim=1)
    hit = max_iou != -math.inf
    out[hit] = arg[hit]
    return out


def gfl_losses(
    cls_logits: Tensor,
    dist_logits: Tensor,
    anchors: Tensor,
    anchor_strides: Tensor,
    labels: Tensor,
    matched_gt_boxes: Tensor,
    reg_max: int,
    qfl_beta: float = 2.0,
    loss_weights: Tuple[float, float, float] = (1.0, 0.25, 2.0),
) -> Dict[str, Tensor]:
    """``loss_qfl``, ``loss_dfl`` and ``loss_giou`` of a batch (the formulas of the module
    docstring), from canonical labels; shared by :meth:`GFLHead.compute_loss` and the
    Detectron2 ``kd2.d2.gfl.GFL``.

    Args:
        cls_logits: ``(N, R, K)`` joint class-quality logits, levels concatenated.
        dist_logits: ``(N, R, 4 (reg_max + 1))`` distribution logits (after the level's scale).
        anchors: ``(R, 4)`` XYXY ATSS squares, levels concatenated.
        anchor_strides: ``(R,)`` the stride of each anchor's level.
        labels: ``(N, R)`` ``-1`` ignore, ``0..K-1`` foreground, ``K`` background.
        matched_gt_boxes: ``(N, R, 4)`` the matched GT box (read at foreground anchors).
        reg_max: distribution bins ``0..reg_max``.
        qfl_beta: QFL's ``β``.
        loss_weights: ``(QFL, DFL, GIoU)`` weights.
    """
    cls_logits = cls_logits.float()  # (N, R, K)
    dist_logits = dist_logits.float()  # (N, R, 4 (n + 1))
    n, r, k = cls_logits.shape
    pos = (labels >= 0) & (labels < k)
    valid = labels >= 0
    num_pos = int(pos.sum(dim=1).clamp(min=1).sum())

    img, idx = torch.nonzero(pos, as_tuple=True)
    stride = anchor_strides[idx][:, None]
    centres = box_centres(anchors[idx].float()) / stride
    p_dist = dist_logits[img, idx]  # (P, 4 (n + 1))
    pred = integral(p_dist, reg_max)  # (P, 4)
    pred_boxes = torch.cat([centres - pred[:, :2], centres + pred[:, 2:]], dim=1)
    gt_boxes = matched_gt_boxes[img, idx].float() / stride
    weight = cls_logits.detach().sigmoid().amax(dim=-1)[img, idx]  # (P,)
    quality = torch.zeros((n, r), dtype=cls_logits.dtype, device=cls_logits.device)
    quality[img, idx] = aligned_box_iou(pred_boxes.detach(), gt_boxes)

    w_qfl, w_dfl, w_giou = loss_weights
    qfl = quality_focal_loss(cls_logits[valid], labels[valid], quality[valid], qfl_beta)
    loss_qfl = w_qfl * qfl.sum() / float(num_pos)
    if idx.numel() == 0:
        zero = dist_logits.sum() * 0.0
        return {"loss_qfl": loss_qfl, "loss_dfl": zero, "loss_giou": zero.clone()}
    avg = weight.sum().clamp(min=1.0)
    giou = generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="none")
    loss_giou = w_giou * (weight * giou).sum() / avg
    target = torch.cat([centres - gt_boxes[:, :2], gt_boxes[:, 2:] - centres], dim=1)
    target = target.clamp(min=0, max=reg_max - _DFL_EPS)
    dfl = distribution_focal_loss(p_dist.reshape(-1, reg_max + 1), target.reshape(-1))
    loss_dfl = w_dfl * (weight[:, None] * dfl.view(-1, 4)).sum() / (4.0 * avg)
    return {"loss_qfl": loss_qfl, "loss_dfl": loss_dfl, "loss_giou": loss_giou}


# -- modules ------------------------------------------------------------------------------


class Scale(nn.Module):
    """A learnable scalar multiplier (mmcv ``Scale``)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class GFLBoxCoder:
    """Side distances in units of the level stride <-> XYXY boxes, from ATSS anchors.

    An anchor is a square of side ``octave_base_scale * stride`` centred on its location, so its
    stride is ``width / octave_base_scale``. :meth:`decode` is element-wise like torchvision's
    ``BoxLinearCoder.decode(rel_codes, boxes)`` (what :func:`kd2.losses.utils.decode_boxes`
    calls).
    """

    def __init__(self, octave_base_scale: float = 8.0) -> None:
        self.octave_base_scale = float(octave_base_scale)

    def _centre_stride(self, anchors: Tensor) -> Tuple[Tensor, Tensor]:
        ctr = (anchors[..., :2] + anchors[..., 2:]) / 2
        stride = (anchors[..., 2] - anchors[..., 0]) / self.octave_base_scale
        return ctr, stride[..., None]

    def decode(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """``(..., 4)`` distances ``l, t, r, b`` (stride units) on ``(..., 4)`` anchors -> boxes."""
        ctr, stride = self._centre_stride(boxes.to(rel_codes.dtype))
        d = rel_codes * stride
        return torch.cat([ctr - d[..., :2], ctr + d[..., 2:]], dim=-1)

    def encode(self, reference_boxes: Tensor, anchors: Tensor) -> Tensor:
        """Boxes -> their (unclamped) side distances from the anchors' centres, stride units."""
        ctr, stride = self._centre_stride(anchors.to(reference_boxes.dtype))
        d = torch.cat([ctr - reference_boxes[..., :2], reference_boxes[..., 2:] - ctr], dim=-1)
        return d / stride
