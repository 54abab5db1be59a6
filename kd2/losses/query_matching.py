"""One-to-one assignments of a DETR student's queries, by the Hungarian algorithm: to its
teacher's queries (:func:`match_queries`) or to a set of target boxes (:func:`match_to_boxes`).

Two DETR-family detectors answer different query sets (each selects its own from its encoder), so
a prediction-level distillation first decides which student query answers which teacher query.
DETRDistill does this with the detector's own Hungarian matcher, the teacher's predictions taking
the place of the ground truth; :func:`match_queries` does the same with the RT-DETR / D-FINE
matcher's costs (class 2, L1 5, GIoU 2 on normalised ``cxcywh`` boxes) and, because the teacher's
target is a class *distribution* rather than a label, the class cost is the L1 distance of the two
sigmoid probability vectors (mean over classes) by default; ``class_cost="soft_bce"`` is
DETRDistill's ``DistillCrossEntropyLossCost``, the binary cross-entropy of the student's logits
against the teacher's probabilities summed over the classes (:func:`soft_bce_class_cost`).
``scipy.optimize.linear_sum_assignment`` solves each image's assignment (``min(Q_s, Q_t)``
pairs).

:func:`match_to_boxes` is Deformable DETR's matcher (the one Teach-DETR's criterion and
transformers' ``RTDetrHungarianMatcher`` use): the focal class cost ``α (1 − p)^γ (−log p) −
(1 − α) p^γ (−log(1 − p))`` at each target's class, L1 and −GIoU, weights 2 / 5 / 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .utils import aligned_box_iou

__all__ = [
    "QUERY_MATCH_COSTS",
    "cxcywh_to_xyxy",
    "focal_class_cost",
    "match_queries",
    "match_to_boxes",
    "normalized_cxcywh",
    "pairwise_giou",
    "soft_bce_class_cost",
]

#: ``(class, L1, GIoU)`` costs: the RT-DETR / D-FINE matcher's defaults
QUERY_MATCH_COSTS = (2.0, 5.0, 2.0)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(..., 4)`` ``cx, cy, w, h`` -> ``x1, y1, x2, y2``."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def normalized_cxcywh(boxes: Tensor, height, width) -> Tensor:
    """``(..., 4)`` XYXY pixel boxes of an ``height`` × ``width`` image -> normalised
    ``cx, cy, w, h``, clipped to the image."""
    scale = torch.stack([torch.as_tensor(v, dtype=boxes.dtype) for v in (width, height) * 2])
    x1, y1, x2, y2 = (boxes / scale.to(boxes.device)).clamp(0.0, 1.0).unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


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


def _solve(cost: Tensor, device) -> tuple[Tensor, Tensor]:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return (
        torch.as_tensor(rows, dtype=torch.int64, device=device),
        torch.as_tensor(cols, dtype=torch.int64, device=device),
    )


def _box_cost(boxes: Tensor, targets: Tensor, w_l1: float, w_giou: float) -> Tensor:
    """``(Q, G)`` ``w_l1 · L1 − w_giou · GIoU`` of normalised ``cxcywh`` boxes."""
    giou = pairwise_giou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(targets))
    return w_l1 * torch.cdist(boxes, targets, p=1) - w_giou * giou


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """``(Q, G)`` Deformable DETR's focal class cost of ``logits`` ``(Q, K)`` for targets of
    classes ``labels`` ``(G,)``."""
    p = logits.sigmoid()
    neg = (1 - alpha) * p**gamma * (-(1 - p + 1e-8).log())
    pos = alpha * (1 - p) ** gamma * (-(p + 1e-8).log())
    return (pos - neg)[:, labels]


def soft_bce_class_cost(logits: Tensor, probabilities: Tensor) -> Tensor:
    """``(Q, M)`` binary cross-entropy of each query's ``logits`` ``(Q, K)`` against each target's
    class ``probabilities`` ``(M, K)``, summed over the classes."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return pos @ probabilities.T + neg @ (1 - probabilities).T


@torch.no_grad()
def match_to_boxes(
    logits: Tensor,
    boxes: Tensor,
    target_labels: list[Tensor],
    target_boxes: list[Tensor],
    costs: tuple[float, float, float] = QUERY_MATCH_COSTS,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> list[tuple[Tensor, Tensor]]:
    """Per image ``(query, target)`` index pairs of Deformable DETR's Hungarian matching.

    Args:
        logits: ``(N, Q, K)`` sigmoid logits; boxes: ``(N, Q, 4)`` normalised ``cxcywh``.
        target_labels / target_boxes: per image ``(G_i,)`` classes and ``(G_i, 4)`` normalised
            ``cxcywh`` boxes (``G_i`` may be 0).
        costs: ``(class, L1, GIoU)`` weights; alpha / gamma: of the focal class cost.
    """
    w_cls, w_l1, w_giou = costs
    out = []
    for lg, bx, labels, targets in zip(logits, boxes, target_labels, target_boxes):
        if len(labels) == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=logits.device)
            out.append((empty, empty))
            continue
        lg, bx, targets = lg.detach().double(), bx.detach().double(), targets.double()
        cost = w_cls * focal_class_cost(lg, labels, alpha, gamma)
        out.append(_solve(cost + _box_cost(bx, targets, w_l1, w_giou), logits.device))
    return out


@torch.no_grad()
def match_queries(
    student_logits: Tensor,
    student_boxes: Tensor,
    teacher_logits: Tensor,
    teacher_boxes: Tensor,
    costs: tuple[float, float, float] = QUERY_MATCH_COSTS,
    class_cost: str = "l1",
) -> list[tuple[Tensor, Tensor]]:
    """Per image ``(student_query, teacher_query)`` int64 index pairs of the minimal-cost
    one-to-one assignment.

    Args:
        student_logits / teacher_logits: ``(N, Q_s, K)`` / ``(N, Q_t, K)`` sigmoid logits.
        student_boxes / teacher_boxes: ``(N, Q_s, 4)`` / ``(N, Q_t, 4)`` normalised ``cxcywh``.
        costs: ``(class, L1, GIoU)`` weights.
        class_cost: ``"l1"`` (mean L1 of the probabilities) or ``"soft_bce"``
            (:func:`soft_bce_class_cost`).

    Returns:
        per image two ``(min(Q_s, Q_t),)`` tensors on the logits' device, sorted by student query.
    """
    w_cls, w_l1, w_giou = costs
    out = []
    for sl, sb, tl, tb in zip(student_logits, student_boxes, teacher_logits, teacher_boxes):
        sl, sb, tl, tb = (x.detach().double() for x in (sl, sb, tl, tb))
        if class_cost == "soft_bce":
            cls = soft_bce_class_cost(sl, tl.sigmoid())
        else:
            cls = torch.cdist(sl.sigmoid(), tl.sigmoid(), p=1) / sl.shape[-1]
        out.append(_solve(w_cls * cls + _box_cost(sb, tb, w_l1, w_giou), student_logits.device))
    return out
