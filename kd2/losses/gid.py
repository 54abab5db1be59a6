"""GID: general instance distillation (Dai et al., CVPR 2021) — the instance selection.

The general-instance score of a candidate box is ``max_c |p^t_c − p^s_c|`` (the paper's GIScore;
sigmoid class probabilities of teacher and student at the same candidate); boxes are kept by a
greedy NMS at IoU 0.3 over that score, highest first, at most ``top_k`` (10) per image. No GT is
needed: the kept boxes are positives, hard negatives and "semi-positives" alike. The registered
method (feature, relation and response terms) comes with issue 14; this is its selection.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .utils import box_iou

__all__ = ["general_instance_scores", "select_general_instances"]


def general_instance_scores(student_scores: Tensor, teacher_scores: Tensor) -> Tensor:
    """``(M,)`` ``max_c |teacher − student|`` of ``(M, K)`` class probabilities."""
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(
            f"score shapes differ: {tuple(student_scores.shape)} and {tuple(teacher_scores.shape)}"
        )
    if student_scores.shape[0] == 0:
        return student_scores.new_zeros((0,))
    return (teacher_scores.float() - student_scores.float()).abs().max(dim=1).values


@torch.no_grad()
def select_general_instances(
    boxes: Tensor,
    student_scores: Tensor,
    teacher_scores: Tensor,
    top_k: int = 10,
    iou_threshold: float = 0.3,
) -> Tensor:
    """GID's instance selection on one image.

    Args:
        boxes: ``(M, 4)`` XYXY candidate boxes.
        student_scores / teacher_scores: ``(M, K)`` class probabilities of the same candidates.
        top_k: at most this many boxes are kept.
        iou_threshold: a box overlapping a kept one by more than this is suppressed.

    Returns:
        ``(k,)`` int64 indices into ``boxes``, ``k ≤ top_k``, highest score difference first
        (ties: the lower index first).
    """
    if boxes.shape[0] != student_scores.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {student_scores.shape[0]} score rows")
    scores = general_instance_scores(student_scores, teacher_scores)
    order = torch.sort(scores, descending=True, stable=True).indices
    kept: list[int] = []
    suppressed = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    for idx in order.tolist():
        if len(kept) >= top_k:
            break
        if suppressed[idx]:
            continue
        kept.append(idx)
        iou = box_iou(boxes[idx : idx + 1], boxes)[0]
        suppressed |= iou > iou_threshold
    return torch.tensor(kept, dtype=torch.long, device=boxes.device)
