"""Broken weights: non-finite or absurdly large values, found and named."""

from __future__ import annotations

import torch
from torch import nn

from kd2.utils.errors import WeightsError

__all__ = ["ABSURD_WEIGHT", "first_non_finite", "first_absurd_parameter", "check_teacher_weights"]

#: No trained detector has a parameter this large; a diverged one does (1e22 was seen).
ABSURD_WEIGHT = 1e6


def first_non_finite(model: nn.Module) -> str | None:
    """``"name: N non-finite values"`` of the first parameter or buffer holding NaN/inf, or
    ``None`` when every floating-point tensor is finite."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point():
            n = int((~torch.isfinite(t.detach())).sum())
            if n:
                return f"{name}: {n} non-finite values"
    return None


def first_absurd_parameter(model: nn.Module, bound: float = ABSURD_WEIGHT) -> str | None:
    """``"name reaches 1.2e+22"`` for the first parameter whose magnitude exceeds ``bound``
    (buffers such as BatchNorm variances are not parameters and are not judged)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.numel():
            top = float(p.detach().abs().max())
            if top > bound:
                return f"{name} reaches {top:.2g}"
    return None


def check_teacher_weights(teacher: nn.Module, weights: str) -> None:
    """Raise ``ValueError`` when the loaded teacher has a NaN/inf or absurdly large weight: it
    would drive the distillation losses to NaN or explode them, and no learning rate could
    help."""
    bad = first_non_finite(teacher)
    what = "non-finite"
    if bad is None:
        bad, what = first_absurd_parameter(teacher), f"absurdly large (> {ABSURD_WEIGHT:g})"
    if bad:
        raise WeightsError(
            f"the teacher's weights are {what} ({bad}) in {weights!r}: the file is broken (a "
            "diverged run or a damaged copy)",
            "retrain the teacher — e.g. with a learning rate that fits its batch size — or "
            "re-export it",
        )
