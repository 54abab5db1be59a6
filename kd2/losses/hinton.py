"""Hinton soft-label distillation (Hinton et al., 2015) on the ROI head or on a dense head.

* **ROI head** (softmax over ``K + 1`` classes, background last): per sampled ROI
  ``T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))``, averaged over the ROIs. The teacher's ROI
  head is evaluated on the **student's** sampled proposals, so the two ``(M, K + 1)`` logit
  matrices are row-aligned.
* **Dense head** (sigmoid, no background channel): each (anchor, class) logit is an independent
  Bernoulli, so the soft-label loss is the binary KL
  ``T² · [p_t log(p_t / p_s) + (1 − p_t) log((1 − p_t) / (1 − p_s))]`` with
  ``p = σ(z / T)``. It is summed over the non-ignored anchors (``labels != -1``, background
  included) and all classes, and divided by ``max(1, #foreground anchors)`` of the batch — the
  normaliser of the focal loss, so the KD term has the same scale as the detection loss it sits
  next to. (Detectron2 smooths that count with an EMA; here the batch's own count is used, which
  keeps the loss a pure function of the two records.)

``class_mean=True`` reproduces mmdet's ``KnowledgeDistillationKLDivLoss`` convention (a
``.mean(1)`` over the class dimension before ``× T²``): the ROI loss is divided by ``K + 1`` and
the dense loss by ``K``. Weights reported for mmdet-based methods (LD, GK) assume this scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .utils import compute_dtype, require_sigmoid_dense, softmax_kl_div, zero_like_loss

__all__ = [
    "Hinton",
    "binary_kl_div_with_logits",
    "hinton_dense_loss",
    "hinton_roi_loss",
]


def hinton_roi_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 2.0,
    class_mean: bool = False,
) -> Tensor:
    """Soft-label KD on softmax ROI logits.

    Args:
        student_logits: ``(M, K + 1)`` student ROI-head logits (background last).
        teacher_logits: ``(M, K + 1)`` teacher logits on the same ROIs (detached).
        temperature: ``T``.
        class_mean: divide by ``K + 1`` (mmdet's ``.mean(1)`` over classes).

    Returns:
        fp32 scalar (fp64 for fp64 logits) ``mean_ROIs T² · KL(p_t ‖ p_s)``; ``0`` (with graph)
        when ``M == 0``.
    """
    if student_logits.shape[0] == 0:
        return zero_like_loss(student_logits)
    kl = softmax_kl_div(student_logits, teacher_logits, temperature)  # (M,)
    loss = kl.mean()
    if class_mean:
        loss = loss / student_logits.shape[1]
    return loss


def binary_kl_div_with_logits(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """Element-wise ``T² · KL(Bernoulli(σ(z_t / T)) ‖ Bernoulli(σ(z_s / T)))`` in fp32 (fp64
    when a logit tensor is fp64).

    Computed from log-sigmoids, so it is finite for any finite logits.

    Args:
        student_logits: any shape ``(*)``.
        teacher_logits: same shape ``(*)`` (detached).

    Returns:
        ``(*)`` non-negative KL values.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    t = float(temperature)
    dtype = compute_dtype(student_logits, teacher_logits)
    zs = student_logits.to(dtype) / t
    zt = teacher_logits.detach().to(dtype) / t
    p_t = torch.sigmoid(zt)
    kl = p_t * (F.logsigmoid(zt) - F.logsigmoid(zs)) + (1.0 - p_t) * (
        F.logsigmoid(-zt) - F.logsigmoid(-zs)
    )
    return kl * (t * t)


def hinton_dense_loss(
    student_logits: Sequence[Tensor],
    teacher_logits: Sequence[Tensor],
    labels: Tensor,
    num_classes: int,
    temperature: float = 2.0,
    class_mean: bool = False,
) -> Tensor:
    """Soft-label KD on sigmoid dense-head logits, normalised like the focal loss.

    Args:
        student_logits: per level ``(N, R_l, K)``.
        teacher_logits: per level ``(N, R_l, K)`` on the same anchors (detached).
        labels: ``(N, sum_l R_l)`` student assignment: ``-1`` ignore, ``0..K-1`` foreground,
            ``K`` background.
        num_classes: ``K``.
        temperature: ``T``.
        class_mean: divide by ``K`` (mmdet's ``.mean(1)`` over classes).

    Returns:
        fp32 scalar (fp64 for fp64 logits) ``Σ_{valid anchors, classes} binary-KL / max(1, #fg)``;
        ``0`` (with graph) when every anchor is ignored.
    """
    s = torch.cat(list(student_logits), dim=1)  # (N, R, K)
    t = torch.cat(list(teacher_logits), dim=1)
    if labels.shape != s.shape[:2]:
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match the dense predictions {tuple(s.shape[:2])}"
        )
    valid = labels >= 0
    kl = binary_kl_div_with_logits(s, t, temperature).sum(dim=-1)  # (N, R)
    num_fg = (valid & (labels < num_classes)).sum().clamp(min=1).to(kl.dtype)
    loss = (kl * valid.to(kl.dtype)).sum() / num_fg
    if class_mean:
        loss = loss / s.shape[-1]
    return loss


@KD_METHOD_REGISTRY.register()
class Hinton(KDMethod):
    """Hinton soft-label KD on the ROI head (two-stage) or the dense head (one-stage).

    Config (``cfg.KD.HINTON``): ``WEIGHT`` (1.0), ``TEMPERATURE`` (2.0), ``HEAD``
    (``"auto"`` | ``"roi"`` | ``"dense"``; ``auto`` = ``roi`` for ``two_stage`` and ``dense``
    for ``one_stage``), ``CLASS_MEAN`` (False).

    Losses: ``loss_kd_hinton_roi`` or ``loss_kd_hinton_dense``.
    """

    card = MethodCard(
        title="Hinton soft-label KD",
        summary="soft class scores of the ROI head or the dense head",
        paper="Hinton et al., Distilling the Knowledge in a Neural Network (2015)",
        code="open-mmlab/mmrazor (port)",
        project="Baselines",
        terms=("loss_kd_hinton_roi", "loss_kd_hinton_dense"),
        families=("faster_rcnn", "retinanet", "fcos", "gfl"),
    )

    dense_across_families = True  # reads the teacher's class logits only

    def __init__(
        self,
        *,
        head: str,
        weight: float = 1.0,
        temperature: float = 2.0,
        class_mean: bool = False,
    ):
        super().__init__()
        if head not in ("roi", "dense"):
            raise ValueError(f"Hinton head must be 'roi' or 'dense', got {head!r}")
        if temperature <= 0:
            raise ValueError(f"Hinton temperature must be > 0, got {temperature}")
        self.head = head
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.class_mean = bool(class_mean)
        self.teacher_parts = frozenset({head})

    @classmethod
    def from_config(
        cls,
        node,
        *,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        num_classes: int,
        arch: str,
    ) -> Hinton:
        head = str(node.HEAD).lower()
        if head == "auto":
            if arch not in ("two_stage", "one_stage"):
                raise ValueError(f"unknown arch {arch!r}; expected 'two_stage' or 'one_stage'")
            head = "roi" if arch == "two_stage" else "dense"
        return cls(
            head=head,
            weight=node.WEIGHT,
            temperature=node.TEMPERATURE,
            class_mean=node.CLASS_MEAN,
        )

    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        if self.head == "roi":
            if student.roi is None or teacher.roi is None:
                raise ValueError("Hinton(head='roi') needs ROI outputs in both records")
            loss = hinton_roi_loss(
                student.roi.cls_logits,
                teacher.roi.cls_logits,
                self.temperature,
                self.class_mean,
            )
            return {"loss_kd_hinton_roi": loss * self.weight}
        if student.dense is None or teacher.dense is None:
            raise ValueError("Hinton(head='dense') needs dense-head outputs in both records")
        if student.dense.labels is None:
            raise ValueError("Hinton(head='dense') needs the student's dense labels")
        require_sigmoid_dense("Hinton(head='dense')", student.dense)
        loss = hinton_dense_loss(
            student.dense.cls_logits,
            teacher.dense.cls_logits,
            student.dense.labels,
            student.dense.num_classes,
            self.temperature,
            self.class_mean,
        )
        return {"loss_kd_hinton_dense": loss * self.weight}
