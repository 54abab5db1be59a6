"""Non-finite weights: find them, and refuse a teacher that has them."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["first_non_finite", "check_teacher_finite"]


def first_non_finite(model: nn.Module) -> str | None:
    """``"name: N non-finite values"`` of the first parameter or buffer holding NaN/inf, or
    ``None`` when every floating-point tensor is finite."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point():
            n = int((~torch.isfinite(t.detach())).sum())
            if n:
                return f"{name}: {n} non-finite values"
    return None


def check_teacher_finite(teacher: nn.Module, weights: str) -> None:
    """Raise ``ValueError`` when the loaded teacher has a NaN/inf weight: it would drive every
    distillation loss to NaN, and no learning rate could help."""
    bad = first_non_finite(teacher)
    if bad:
        raise ValueError(
            f"the teacher's weights are non-finite ({bad}) in {weights!r}: the file is broken "
            "(a diverged run or a damaged copy). Retrain or re-export the teacher"
        )
