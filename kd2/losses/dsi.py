"""DSI: the Deep Semantic Injector of RT-DETRv4 (Liao et al., 2025), for any student and any
feature teacher — first of all a vision foundation model (:mod:`kd2.foundation`).

**Loss** (RT-DETRv4's ``RTv4Criterion.loss_distillation``, the official code): a projector — a
per-pixel linear map, kd2's 1×1 conv — takes the student's map into the teacher's feature space;
both maps are L2-normalised per location over the channels and the loss is ``mean(1 − cos)`` over
all locations of the batch. When the two maps' sizes differ the **teacher's** map is resized to
the student's, bilinearly with ``align_corners=False`` (the code's fallback; a foundation
teacher's maps are already on the student's grid). The projector exists only in training: it
lives in the method, which the exported student does not contain.

**Where**: RT-DETRv4 taps its hybrid encoder's AIFI output (stride 32) before the FPN/PAN, with
DINOv3 ViT-B/16 at half resolution (stride 32) as the teacher and weight 5 for the S model. kd2
distils the record's ``features`` — the student's FPN maps (a DETR student's encoder outputs
after FPN/PAN) — at ``STRIDES`` (default: every stride both have). That is a departure for a
DETR student, written in ``projects/FoundationDistillation/README.md``.

**Weight control**: RT-DETRv4 steers the loss weight once per epoch to keep the AIFI layer's
gradient share near a target (its GAM); kd2's ``KD.BALANCE grad_share`` (``TARGET nearest`` is
GAM's rule) does the same on the trunk's gradient and is the recommended setting.

**Variant** (not in the official code): ``SMOOTH_L1_WEIGHT`` > 0 adds a smooth-L1 term between
the projected map and the teacher's, ``loss_kd_dsi_smooth_l1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .utils import compute_dtype, level_adapter

__all__ = ["DSI", "semantic_alignment_loss"]


def semantic_alignment_loss(projected: Tensor, teacher: Tensor) -> Tensor:
    """RT-DETRv4's DSI loss on one level.

    Args:
        projected: ``(N, C, H_s, W_s)`` the student's map after the projector.
        teacher: ``(N, C, H_t, W_t)`` (detached; resized bilinearly to ``(H_s, W_s)`` when the
            sizes differ).

    Returns:
        fp32 scalar ``mean over N·H_s·W_s of 1 − cos(p̂, t̂)``, ``x̂ = x / max(‖x‖₂, 1e-12)`` per
        location (fp64 when a map is fp64).
    """
    if projected.dim() != 4 or teacher.dim() != 4 or projected.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"DSI needs (N, C, H, W) maps with the same N and C, got {tuple(projected.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    dtype = compute_dtype(projected, teacher)
    s, t = projected.to(dtype), teacher.detach().to(dtype)
    if s.shape[-2:] != t.shape[-2:]:
        t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
    s = F.normalize(s.flatten(2), p=2, dim=1)
    t = F.normalize(t.flatten(2), p=2, dim=1)
    return (1 - F.cosine_similarity(s, t, dim=1)).mean()


@KD_METHOD_REGISTRY.register()
class DSI(KDMethod):
    """RT-DETRv4's semantic injector: projector + cosine alignment to the teacher's features.

    Config (``cfg.KD.DSI``): ``WEIGHT`` (5, RT-DETRv4-S), ``STRIDES`` (empty: every stride the
    student and the teacher both have), ``SMOOTH_L1_WEIGHT`` (0: the official loss only),
    ``SMOOTH_L1_BETA``.

    Losses: ``loss_kd_dsi`` = weight × Σ over levels of :func:`semantic_alignment_loss`;
    ``loss_kd_dsi_smooth_l1`` = weight × smooth-L1 weight × Σ over levels of the mean smooth-L1
    (when its weight is > 0).
    """

    card = MethodCard(
        title="DSI (RT-DETRv4)",
        summary="projector + cosine alignment to a foundation model's (or any teacher's) maps",
        paper="Liao et al., RT-DETRv4: Painlessly Furthering Real-Time Object Detection with "
        "Vision Foundation Models (2025)",
        code="RT-DETRs/RT-DETRv4",
        project="FoundationDistillation",
        terms=("loss_kd_dsi", "loss_kd_dsi_smooth_l1"),
        families=("faster_rcnn", "retinanet", "fcos", "gfl", "ssd", "detr"),
    )

    teacher_parts = frozenset({"features"})

    def __init__(
        self,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        *,
        weight: float = 5.0,
        strides: Sequence[int] = (),
        smooth_l1_weight: float = 0.0,
        smooth_l1_beta: float = 1.0,
    ):
        super().__init__()
        self.weight = float(weight)
        self.smooth_l1_weight = float(smooth_l1_weight)
        self.smooth_l1_beta = float(smooth_l1_beta)
        #: the projectors, one per distilled stride (every shared one by default; always a layer,
        #: as RT-DETRv4's Linear)
        self.projector = level_adapter(
            student_channels,
            teacher_channels,
            strides,
            len(student_channels),
            identity_when_equal=False,
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
    ) -> DSI:
        return cls(
            student_channels,
            teacher_channels,
            weight=node.WEIGHT,
            strides=node.STRIDES,
            smooth_l1_weight=node.SMOOTH_L1_WEIGHT,
            smooth_l1_beta=node.SMOOTH_L1_BETA,
        )

    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        strides = [s for s in self.projector.strides if s in student.features]
        missing = [s for s in strides if s not in teacher.features]
        if not strides or missing:
            raise ValueError(
                f"DSI distils strides {self.projector.strides}; the student has "
                f"{sorted(student.features)}, the teacher {sorted(teacher.features)}"
            )
        cos, l1 = [], []
        for s in strides:
            p = self.projector.convs[str(s)](student.features[s])
            t = teacher.features[s]
            cos.append(semantic_alignment_loss(p, t))
            if self.smooth_l1_weight > 0:
                t = t.detach().to(compute_dtype(p, t))
                if t.shape[-2:] != p.shape[-2:]:
                    t = F.interpolate(t, size=p.shape[-2:], mode="bilinear", align_corners=False)
                l1.append(F.smooth_l1_loss(p.to(t.dtype), t, beta=self.smooth_l1_beta))
        out = {"loss_kd_dsi": torch.stack(cos).sum() * self.weight}
        if l1:
            out["loss_kd_dsi_smooth_l1"] = (
                torch.stack(l1).sum() * self.weight * self.smooth_l1_weight
            )
        return out
