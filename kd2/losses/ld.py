"""LD: localization distillation (Zheng et al., CVPR 2022) — the tensor function.

Each box side of a GFL-style head is a discrete distribution over ``reg_max + 1`` bins; LD is the
KL between the teacher's and the student's distributions of every side at temperature ``T = 10``
(the official ``KnowledgeDistillationKLDivLoss``: ``T² ·`` KL averaged over the bins, as mmdet's
``.mean(1)`` convention). The registered method needs a GFL detector (issue 14); this is its math.
"""

from __future__ import annotations

from torch import Tensor

from .utils import softmax_kl_div

__all__ = ["localization_distillation_loss"]


def localization_distillation_loss(
    student_dist: Tensor, teacher_dist: Tensor, temperature: float = 10.0
) -> Tensor:
    """LD on ``M`` locations.

    Args:
        student_dist: ``(M, 4, reg_max + 1)`` distribution logits of the four sides.
        teacher_dist: ``(M, 4, reg_max + 1)`` the teacher's (constants).
        temperature: ``T > 0``.

    Returns:
        fp32 scalar ``mean_M Σ_sides T² · mean_bins KL(softmax(z_t/T) ‖ softmax(z_s/T))``; ``0``
        with a graph for ``M = 0``.
    """
    if student_dist.shape != teacher_dist.shape or student_dist.dim() != 3:
        raise ValueError(
            f"LD needs (M, 4, reg_max + 1) logits of one shape, got {tuple(student_dist.shape)} "
            f"and {tuple(teacher_dist.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"LD temperature must be > 0, got {temperature}")
    if student_dist.shape[0] == 0:
        return student_dist.float().sum() * 0.0
    m, sides, bins = student_dist.shape
    kl = softmax_kl_div(
        student_dist.reshape(m * sides, bins), teacher_dist.reshape(m * sides, bins), temperature
    )  # T² · KL summed over the bins, per side
    return (kl.view(m, sides) / bins).sum(dim=1).mean()
