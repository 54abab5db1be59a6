"""BCKD: binary classification and IoU-based localization distillation for dense detectors
(Yang et al., "Bridging Cross-task Protocol Inconsistency for Distillation in Dense Object
Detection", ICCV 2023).

A dense detector's classifier is a set of **binary** (sigmoid) classifiers, so BCKD distils each
class score as a binary problem, and its box regressor is trained with an IoU loss, so BCKD
distils the decoded boxes with one. As the official code (``TinyTigerPan/BCKD``,
``mmdet/models/losses/kd_loss.py`` ``novel_kd_loss`` and ``dense_heads/ld_head.py``, config
``configs/bckd/bckd_r50_gflv1_r101_fpn_coco_1x.py``) computes them, with ``σ`` the sigmoid, ``s``
/ ``t`` the student's and teacher's logits and ``N_pos`` the batch's positives (at least 1):

* **classification** (``loss_kd_bckd_cls``, weight 1.0): at every valid location (not ignored),
  ``Σ_k BCE(s_k, σ(t_k)) · |σ(t_k) − σ(s_k)|^β`` (``β = 1``), summed and divided by ``N_pos``;
* **localization** (``loss_kd_bckd_loc``, weight 4.0): at every valid location, the GIoU loss
  ``1 − GIoU`` between the student's decoded box and the teacher's (a constant), weighted by
  ``max_k |σ(t_k) − σ(s_k)|`` (both detached), summed and divided by ``N_pos``. As the official
  per-level loop, a level without a positive in the batch adds no localization term.

The official code is GFL's (boxes decoded from the distributions' expected sides); kd2 applies
the same two formulas to RetinaNet and FCOS heads too (their sigmoid logits and box-coder
decoded boxes; FCOS's centerness is not distilled), as the paper reports those detectors as well.
The classification term is CrossKD's ``KDQualityFocalLoss`` form (:func:`quality_focal_kd_loss`),
one function for both.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .crosskd import flatten_levels, locations_per_level, quality_focal_kd_loss
from .utils import aligned_box_iou, compute_dtype, decode_boxes

__all__ = ["BCKD", "bckd_losses"]


def bckd_losses(
    s_cls: Tensor,
    t_cls: Tensor,
    s_boxes: Tensor,
    t_boxes: Tensor,
    labels: Tensor,
    levels: Tensor,
    num_classes: int,
    beta: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """BCKD's two terms on ``M`` flattened locations (unweighted).

    Args:
        s_cls / t_cls: ``(M, K)`` sigmoid logits (the teacher's are constants).
        s_boxes / t_boxes: ``(M, 4)`` decoded XYXY boxes (the teacher's are constants).
        labels: ``(M,)`` canonical assignment (``-1`` ignore, ``K`` background).
        levels: ``(M,)`` each location's FPN level index.
        num_classes: ``K``.
        beta: the focusing exponent of the classification term.

    Returns:
        ``(classification, localization)`` scalars (fp32, fp64 for fp64 inputs).
    """
    dtype = compute_dtype(s_cls, t_cls, s_boxes, t_boxes)
    s_cls, t_cls = s_cls.to(dtype), t_cls.detach().to(dtype)
    valid = labels >= 0
    pos = valid & (labels < num_classes)
    norm = pos.sum().clamp(min=1).to(dtype)
    cls = quality_focal_kd_loss(s_cls[valid], t_cls[valid], beta) / norm
    gap = (torch.sigmoid(t_cls) - torch.sigmoid(s_cls.detach())).abs().max(dim=1).values
    levels_with_pos = torch.isin(levels, levels[pos].unique())
    sel = valid & levels_with_pos & (gap > 0)
    giou = aligned_box_iou(s_boxes[sel].to(dtype), t_boxes[sel].detach().to(dtype), giou=True)
    loc = (gap[sel] * (1 - giou)).sum() / norm
    return cls, loc


@KD_METHOD_REGISTRY.register()
class BCKD(KDMethod):
    """Binary classification and IoU-based localization distillation of a dense head.

    Config (``cfg.KD.BCKD``): ``CLS_WEIGHT`` (1.0), ``LOC_WEIGHT`` (4.0), ``BETA`` (1.0).

    Losses: ``loss_kd_bckd_cls`` and ``loss_kd_bckd_loc``. No trainable parameters.
    """

    card = MethodCard(
        title="BCKD",
        summary="binary (sigmoid) class KD and GIoU box KD on the dense head",
        paper="Yang et al., Bridging Cross-task Protocol Inconsistency for Distillation in "
        "Dense Object Detection (ICCV 2023)",
        code="TinyTigerPan/BCKD",
        project="HeadDistillation",
        terms=("loss_kd_bckd_cls", "loss_kd_bckd_loc"),
        families=("retinanet", "fcos", "gfl"),
    )

    teacher_parts = frozenset({"dense"})

    def __init__(self, *, cls_weight: float = 1.0, loc_weight: float = 4.0, beta: float = 1.0):
        super().__init__()
        self.cls_weight, self.loc_weight, self.beta = float(cls_weight), float(loc_weight), beta

    @classmethod
    def from_config(
        cls,
        node,
        *,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        num_classes: int,
        arch: str,
    ) -> BCKD:
        return cls(cls_weight=node.CLS_WEIGHT, loc_weight=node.LOC_WEIGHT, beta=float(node.BETA))

    def unsupported_reason(self, arch: str, dense_softmax: bool) -> str | None:
        if arch == "two_stage" or dense_softmax or self.family not in ("retinanet", "fcos", "gfl"):
            return (
                "BCKD distils a dense sigmoid head's class scores and decoded boxes (RetinaNet, "
                "FCOS, GFL); Faster R-CNN and SSD have none. For Faster R-CNN use e.g. FGFI, "
                "PKD or GlobalKD"
            )
        return None

    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        s, t = student.dense, teacher.dense
        counts = locations_per_level("BCKD", s, t)
        n = s.labels.shape[0]
        s_anchors = torch.cat(s.anchors).repeat(n, 1)
        t_anchors = torch.cat(t.anchors).repeat(n, 1)
        s_del, t_del = flatten_levels(s.box_deltas), flatten_levels(t.box_deltas)
        dtype = compute_dtype(s_del, t_del)
        s_boxes = decode_boxes(s.box_coder, s_del.to(dtype), s_anchors.to(dtype))
        t_boxes = decode_boxes(t.box_coder, t_del.to(dtype), t_anchors.to(dtype))
        levels = torch.cat(
            [torch.full((c,), i, device=s_del.device) for i, c in enumerate(counts)]
        ).repeat(n)
        cls, loc = bckd_losses(
            flatten_levels(s.cls_logits),
            flatten_levels(t.cls_logits),
            s_boxes,
            t_boxes,
            s.labels.flatten(),
            levels,
            s.num_classes,
            self.beta,
        )
        return {
            "loss_kd_bckd_cls": cls * self.cls_weight,
            "loss_kd_bckd_loc": loc * self.loc_weight,
        }
