"""PKD: Pearson-correlation knowledge distillation for detectors (Cao et al., NeurIPS 2022).

**Loss** (mmrazor's ``PKDLoss``, the official implementation): every channel of each FPN map is
standardised over ``(N, H, W)`` — mean and **unbiased** standard deviation, ``(x − μ) / (σ +
1e-6)`` — for student and teacher alike; the loss is the mean squared error of the two
standardised maps ÷ 2, which is ``1 − r`` (Pearson's r) up to scale, summed over levels and
multiplied by the weight. When the spatial sizes differ the **student** map is resized to the
teacher's, bilinearly with ``align_corners=False`` (mmrazor ``resize_stu=True``; mmrazor compares
only the heights, kd2 resizes when the height or the width differs).

**Levels and weights** as the released configs really use them (``methods-2026.md`` §2.2):
Faster R-CNN P2–P5 (4 levels) weight 6; RetinaNet P3–P6 (the 4-entry mapping the RetinaNet config
inherits: P7 is **not** distilled) weight 10; FCOS takes the one-stage mapping. mmrazor needs equal
channels (no adapter); where the student's FPN is narrower kd2 adds a 1×1 conv per level, only
there. A map whose ``N·H·W`` is 1 has no spread: its standardised values are 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .utils import (
    adapt_features,
    channel_mean_std,
    compute_dtype,
    level_adapter,
    shared_strides,
    to_compute,
)

__all__ = ["PKD", "PKD_DEFAULT_WEIGHTS", "channel_standardize", "pearson_distillation_loss"]

#: weight per level by detector family (Faster R-CNN 6; RetinaNet and other one-stage 10).
PKD_DEFAULT_WEIGHTS = {"faster_rcnn": 6.0, "one_stage": 10.0}
#: levels distilled by default (counted from the finest): P2-P5 and P3-P6.
PKD_DEFAULT_LEVELS = 4


def channel_standardize(feat: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-channel standardisation over ``(N, H, W)``.

    ``eps`` is mmrazor's absolute ``1e-6`` (part of PKD's definition, not a float32 precision
    guard), so it is kept in float64: a channel of std ``σ ≈ 1e-6`` is divided by ``σ + 1e-6``,
    smoothly, and its float64 gradients are exact.

    Args:
        feat: ``(N, C, H, W)``.

    Returns:
        ``(N, C, H, W)`` ``(x − mean_c) / (std_c + eps)``, unbiased ``std_c`` (0 when a channel
        has a single value), in fp32 (fp64 for an fp64 ``feat``).
    """
    n, c, h, w = feat.shape
    x = to_compute(feat)
    mean, std = channel_mean_std(x)
    x = (x.transpose(0, 1).reshape(c, -1) - mean) / (std + eps)
    return x.reshape(c, n, h, w).transpose(0, 1)


def pearson_distillation_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """PKD on one level.

    Args:
        student: ``(N, C, H_s, W_s)`` (resized bilinearly to ``(H_t, W_t)`` when they differ).
        teacher: ``(N, C, H_t, W_t)`` (treated as a constant: detached).

    Returns:
        fp32 scalar ``mean((std(s) − std(t))²) / 2`` (fp64 when a map is fp64).
    """
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"PKD needs (N, C, H, W) maps with the same N and C, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(
            to_compute(student), size=teacher.shape[-2:], mode="bilinear", align_corners=False
        )
    dtype = compute_dtype(student, teacher)
    s = channel_standardize(student.to(dtype))
    t = channel_standardize(teacher.detach().to(dtype))
    return F.mse_loss(s, t) / 2


@KD_METHOD_REGISTRY.register()
class PKD(KDMethod):
    """Pearson-correlation distillation of the FPN maps.

    Config (``cfg.KD.PKD``): ``WEIGHT`` (< 0: 6 for Faster R-CNN, 10 for one-stage detectors),
    ``STRIDES`` (empty: the 4 finest shared levels).

    Loss: ``loss_kd_pkd`` = weight × Σ over levels.
    """

    card = MethodCard(
        title="PKD",
        summary="Pearson correlation of the normalised FPN maps",
        paper="Cao et al., PKD: Pearson Correlation Coefficient (NeurIPS 2022)",
        code="open-mmlab/mmrazor",
        project="FeatureDistillation",
        terms=("loss_kd_pkd",),
        families=("faster_rcnn", "retinanet", "fcos", "gfl", "ssd", "detr"),
    )

    teacher_parts = frozenset({"features"})

    def __init__(
        self,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        *,
        weight: float = -1.0,
        strides: Sequence[int] = (),
        arch: str = "one_stage",
    ):
        super().__init__()
        family = "faster_rcnn" if arch == "two_stage" else "one_stage"
        self.weight = PKD_DEFAULT_WEIGHTS[family] if weight < 0 else float(weight)
        self.adapter = level_adapter(
            student_channels, teacher_channels, strides, PKD_DEFAULT_LEVELS
        )

    @classmethod
    def from_config(
        cls,
        node,
        *,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        num_classes: int,
        arch: str,
    ) -> PKD:
        return cls(
            student_channels,
            teacher_channels,
            weight=node.WEIGHT,
            strides=node.STRIDES,
            arch=arch,
        )

    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        strides = shared_strides(self.adapter, student.features, teacher.features)
        s, t = adapt_features(self.adapter, student.features, teacher.features, strides)
        loss = torch.stack([pearson_distillation_loss(a, b) for a, b in zip(s, t)]).sum()
        return {"loss_kd_pkd": loss * self.weight}
