"""CrossKD: cross-head knowledge distillation for dense detectors (Wang et al., CVPR 2024) —
the tensor functions.

The student's head runs its first ``k`` convs; that feature, **before** its activation, is
standardised per channel with its own statistics and re-coloured with the teacher's at the same
point (:func:`recolor_features`), then runs through ReLU and the frozen teacher head's remaining
convs and predictor; the "cross-head" predictions mimic the teacher's
(:func:`quality_focal_kd_loss` for the classes). Follows the official code's
``KDQualityFocalLoss`` and its feature alignment (``methods-2026.md`` §2.8). The registered method
needs the split head forward of each detector, which comes with issue 14's GFL detector; these
functions are its math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["quality_focal_kd_loss", "recolor_features"]


def _channel_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased std over ``(N, H, W)``, shaped ``(1, C, 1, 1)``."""
    c = x.shape[1]
    flat = x.transpose(0, 1).reshape(c, -1)
    mean = flat.mean(dim=1)
    std = flat.std(dim=1) if flat.shape[1] > 1 else torch.zeros_like(mean)
    return mean.view(1, c, 1, 1), (std + eps).view(1, c, 1, 1)


def recolor_features(student: Tensor, teacher: Tensor, eps: float = 1e-6) -> Tensor:
    """The student's feature standardised with its own statistics and re-coloured with the
    teacher's: ``(s − μ_s) / (σ_s + ε) · (σ_t + ε) + μ_t`` per channel.

    Args:
        student: ``(N, C, H, W)`` student head feature (before the activation).
        teacher: ``(N, C, H, W)`` teacher head feature at the same point (its statistics are
            constants).
        eps: added to both standard deviations (unbiased, over ``(N, H, W)``).

    Returns:
        ``(N, C, H, W)`` with gradients to ``student`` only.
    """
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"recolor_features needs (N, C, H, W) maps with the same C, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)} (map the student's channels with "
            "a 1x1 conv first)"
        )
    s_mean, s_std = _channel_stats(student, eps)
    with torch.no_grad():
        t_mean, t_std = _channel_stats(teacher.detach(), eps)
    return (student - s_mean) / s_std * t_std + t_mean


def quality_focal_kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0
) -> Tensor:
    """``KDQualityFocalLoss``: soft BCE against ``σ(teacher)``, focused by ``|σ(s) − σ(t)|^β``.

    Args:
        student_logits: ``(..., K)`` raw sigmoid logits (the cross-head predictions).
        teacher_logits: ``(..., K)`` the teacher's logits (constants).
        beta: the focusing exponent.

    Returns:
        fp32 scalar, the **sum** over every element (the caller normalises).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logit shapes differ: {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    s = student_logits.float()
    target = torch.sigmoid(teacher_logits.detach().float())
    bce = F.binary_cross_entropy_with_logits(s, target, reduction="none")
    focal = (torch.sigmoid(s) - target).abs().pow(beta)
    return (bce * focal).sum()
