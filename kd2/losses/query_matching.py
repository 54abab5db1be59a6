"""Pairing a DETR student's queries with its teacher's: one-to-one, by the Hungarian algorithm.

Two DETR-family detectors answer different query sets (each selects its own from its encoder), so
a prediction-level distillation first decides which student query answers which teacher query.
DETRDistill does this with the detector's own Hungarian matcher, the teacher's predictions taking
the place of the ground truth; :func:`match_queries` does the same with the RT-DETR / D-FINE
matcher's costs (class 2, L1 5, GIoU 2 on normalised ``cxcywh`` boxes) and, because the teacher's
target is a class *distribution* rather than a label, the class cost is the L1 distance of the two
sigmoid probability vectors (mean over classes). ``scipy.optimize.linear_sum_assignment`` solves
each image's assignment (``min(Q_s, Q_t)`` pairs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .utils import aligned_box_iou

__all__ = ["QUERY_MATCH_COSTS", "cxcywh_to_xyxy", "match_queries", "pairwise_giou"]

#: ``(class, L1, GIoU)`` costs: the RT-DETR / D-FINE matcher's defaults
QUERY_MATCH_COSTS = (2.0, 5.0, 2.0)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(..., 4)`` ``cx, cy, w, h`` -> ``x1, y1, x2, y2``."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def pairwise_giou(a: Tensor, b: Tensor) -> Tensor:
    """``(P, G)`` generalized IoU of every XYXY box of ``a`` ``(P, 4)`` with every one of ``b``
    ``(G, 4)``."""
    p, g = a.shape[0], b.shape[0]
    flat = aligned_box_iou(
        a[:, None].expand(p, g, 4).reshape(-1, 4),
        b[None].expand(p, g, 4).reshape(-1, 4),
        giou=True,
    )
    return flat.reshape(p, g)


@torch.no_grad()
def match_queries(
    student_logits: Tensor,
    student_boxes: Tensor,
    teacher_logits: Tensor,
    teacher_boxes: Tensor,
    costs: tuple[float, float, float] = QUERY_MATCH_COSTS,
) -> list[tuple[Tensor, Tensor]]:
    """Per image ``(student_query, teacher_query)`` int64 index pairs of the minimal-cost
    one-to-one assignment.

    Args:
        student_logits / teacher_logits: ``(N, Q_s, K)`` / ``(N, Q_t, K)`` sigmoid logits.
        student_boxes / teacher_boxes: ``(N, Q_s, 4)`` / ``(N, Q_t, 4)`` normalised ``cxcywh``.
        costs: ``(class, L1, GIoU)`` weights.

    Returns:
        per image two ``(min(Q_s, Q_t),)`` tensors on the logits' device, sorted by student query.
    """
    from scipy.optimize import linear_sum_assignment

    w_cls, w_l1, w_giou = costs
    out = []
    for sl, sb, tl, tb in zip(student_logits, student_boxes, teacher_logits, teacher_boxes):
        sl, sb, tl, tb = (x.detach().double() for x in (sl, sb, tl, tb))
        cls = torch.cdist(sl.sigmoid(), tl.sigmoid(), p=1) / sl.shape[-1]
        l1 = torch.cdist(sb, tb, p=1)
        giou = pairwise_giou(cxcywh_to_xyxy(sb), cxcywh_to_xyxy(tb))
        cost = w_cls * cls + w_l1 * l1 - w_giou * giou
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        device = student_logits.device
        out.append(
            (
                torch.as_tensor(rows, dtype=torch.int64, device=device),
                torch.as_tensor(cols, dtype=torch.int64, device=device),
            )
        )
    return out
