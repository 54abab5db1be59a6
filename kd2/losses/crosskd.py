"""CrossKD: cross-head knowledge distillation for dense detectors (Wang et al., CVPR 2024).

The student's head runs its first ``k`` conv blocks; that feature, **before** its activation, is
standardised per channel with its own statistics and re-coloured with the teacher's at the same
point (:func:`recolor_features`), then runs through the activation and the frozen teacher head's
remaining blocks and predictors. These "cross-head" predictions mimic the teacher's own
predictions; the student's own head is trained by the detection losses only. Gradients reach the
student's first ``k`` blocks, FPN and backbone through the frozen teacher layers (the teacher's
parameters never change). Written from the paper and the official code's description
(``methods-2026.md`` §1.1, §2.8; the code is CC BY-NC, so nothing is copied).

**Per detector** (``KD.CROSSKD`` values ``< 0`` take these; ``N_pos`` = positives of the batch,
``w`` = the teacher's max class sigmoid at each location, 0 where the label is ignored):

* **RetinaNet** — ``k = 3``; classes 1.0 · Σ_valid QFL-KD / N_pos; boxes GIoU 1.0 ·
  Σ w (1 − GIoU) / N_pos on the decoded boxes of the cross head and the teacher.
* **FCOS** — ``k = 2``; classes 0.4 · Σ QFL-KD / Σ ctr; boxes IoU 0.75 · Σ w (−log IoU) / Σ ctr.
* **GFL** — ``k = 3``; classes 1.0 · Σ_valid QFL-KD / N_pos; distributions KL (T = 1, summed
  over the bins) 3.0 · Σ w Σ_sides KL / 4 / Σ w; boxes GIoU 2.0 · Σ w (1 − GIoU) / Σ w.

``Σ ctr`` is the sum of the FCOS centerness targets of the positives (the official FCOS head's
``avg_factor``). The GFL weights are those of the released configs
(``crosskd_r50_gflv1_r101-2x-ms_fpn_1x_coco.py``: ``loss_reg_kd`` KL ``class_reduction='sum'``,
``T = 1``, weight 3.0, plus ``loss_bbox_kd`` GIoU 2.0); methods-2026.md's table, from an older
commit, gives 4.0 without the GIoU term. The head is cut through
:mod:`kd2.modeling.head_split`; the backends fill ``dense.head_split``.

**Heterogeneous heads.** When the student's head is narrower than the teacher's, a trainable
1×1 conv per tower maps the student's feature to the teacher's width before the re-colouring
(the author's suggestion in CrossKD issue #8); equal widths use none, as the official code.

Faster R-CNN (no dense tower head) and SSD (no towers, softmax classes) are refused when the
model is built.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd2.structures import DenseOutputs, StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .pkd import channel_standardize
from .utils import (
    aligned_box_iou,
    channel_mean_std,
    compute_dtype,
    decode_boxes,
    softmax_kl_div,
)

__all__ = [
    "CROSSKD_DEFAULTS",
    "CrossKD",
    "flatten_levels",
    "locations_per_level",
    "quality_focal_kd_loss",
    "recolor_features",
]

#: per detector family: split ``k``, classification weight, regression weight, box (GIoU) weight
CROSSKD_DEFAULTS = {
    "retinanet": (3, 1.0, 1.0, 0.0),
    "fcos": (2, 0.4, 0.75, 0.0),
    "gfl": (3, 1.0, 3.0, 2.0),
}


def recolor_features(student: Tensor, teacher: Tensor, eps: float = 1e-6) -> Tensor:
    """The student's feature standardised with its own statistics and re-coloured with the
    teacher's: ``(s − μ_s) / (σ_s + ε) · σ_t + μ_t`` per channel (the official ``align_scale``:
    ``ε`` guards the student's std only).

    Args:
        student: ``(N, C, H, W)`` student head feature (before the activation).
        teacher: ``(N, C, H, W)`` teacher head feature at the same point (its statistics are
            constants).
        eps: added to the student's standard deviation (unbiased, over ``(N, H, W)``).

    Returns:
        ``(N, C, H, W)`` with gradients to ``student`` only, in the promotion of fp32 (fp64 for
        an fp64 ``student``) and the teacher's dtype.
    """
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"recolor_features needs (N, C, H, W) maps with the same C, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)} (map the student's channels with "
            "a 1x1 conv first)"
        )
    c = student.shape[1]
    with torch.no_grad():  # the teacher's statistics in its own dtype
        t_mean, t_std = (v.view(1, c, 1, 1) for v in channel_mean_std(teacher.detach()))
    return channel_standardize(student, eps) * t_std + t_mean


def quality_focal_kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0
) -> Tensor:
    """``KDQualityFocalLoss``: soft BCE against ``σ(teacher)``, focused by ``|σ(s) − σ(t)|^β``.

    Args:
        student_logits: ``(..., K)`` raw sigmoid logits (the cross-head predictions).
        teacher_logits: ``(..., K)`` the teacher's logits (constants).
        beta: the focusing exponent.

    Returns:
        fp32 scalar (fp64 when a logit tensor is fp64), the **sum** over every element (the
        caller normalises).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logit shapes differ: {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    dtype = compute_dtype(student_logits, teacher_logits)
    s = student_logits.to(dtype)
    target = torch.sigmoid(teacher_logits.detach().to(dtype))
    bce = F.binary_cross_entropy_with_logits(s, target, reduction="none")
    focal = (torch.sigmoid(s) - target).abs().pow(beta)
    return (bce * focal).sum()


def fcos_centerness_targets(points: Tensor, gt_boxes: Tensor) -> Tensor:
    """FCOS centerness ``sqrt(min(l, r)/max(l, r) · min(t, b)/max(t, b))`` of ``(P, 2)`` points
    inside their ``(P, 4)`` XYXY GT boxes (``(P,)``, 0 where a side is not positive)."""
    lr = torch.stack([points[:, 0] - gt_boxes[:, 0], gt_boxes[:, 2] - points[:, 0]], dim=1)
    tb = torch.stack([points[:, 1] - gt_boxes[:, 1], gt_boxes[:, 3] - points[:, 1]], dim=1)
    ratio = (lr.min(dim=1).values / lr.max(dim=1).values.clamp(min=1e-12)) * (
        tb.min(dim=1).values / tb.max(dim=1).values.clamp(min=1e-12)
    )
    return ratio.clamp(min=0).sqrt()


def locations_per_level(method: str, student: DenseOutputs, teacher: DenseOutputs) -> list[int]:
    """The predictions per level ``R_l`` both dense heads share; an error naming ``method`` when
    they differ (methods that compare the two heads location by location)."""
    counts = [t.shape[1] for t in student.cls_logits]
    if counts != [t.shape[1] for t in teacher.cls_logits]:
        raise ValueError(
            f"{method} compares predictions location by location, but the student has "
            f"{counts} and the teacher {[t.shape[1] for t in teacher.cls_logits]} per level "
            "(use the same anchors per location and the same strides)"
        )
    return counts


def flatten_levels(levels: list[Tensor]) -> Tensor:
    """Per-level ``(N, R_l, D)`` -> ``(N · R, D)`` (image-major, as ``labels.flatten()``)."""
    return torch.cat(levels, dim=1).flatten(0, 1)


@KD_METHOD_REGISTRY.register()
class CrossKD(KDMethod):
    """Cross-head distillation of a dense head (RetinaNet, FCOS, GFL).

    Config (``cfg.KD.CROSSKD``; ``< 0`` = the value for the detector, table above): ``SPLIT``
    (``k``), ``CLS_WEIGHT``, ``REG_WEIGHT``, ``BOX_WEIGHT`` (GFL only), ``BETA`` (1.0),
    ``REG_TEMPERATURE`` (GFL's KL, 1.0).

    Losses: ``loss_kd_crosskd_cls``, ``loss_kd_crosskd_reg`` and, on GFL,
    ``loss_kd_crosskd_box``.
    """

    card = MethodCard(
        title="CrossKD",
        summary="the student's head features through the frozen teacher head",
        paper="Wang et al., CrossKD: Cross-Head Knowledge Distillation (CVPR 2024)",
        code="jbwang1997/CrossKD",
        project="HeadDistillation",
        terms=("loss_kd_crosskd_cls", "loss_kd_crosskd_reg", "loss_kd_crosskd_box"),
        families=("retinanet", "fcos", "gfl"),
    )

    teacher_parts = frozenset({"dense"})

    def __init__(
        self,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        *,
        split: int = -1,
        cls_weight: float = -1.0,
        reg_weight: float = -1.0,
        box_weight: float = -1.0,
        beta: float = 1.0,
        reg_temperature: float = 1.0,
    ):
        super().__init__()
        if reg_temperature <= 0:
            raise ValueError(f"KD.CROSSKD.REG_TEMPERATURE must be > 0, got {reg_temperature}")
        self.configured = (int(split), float(cls_weight), float(reg_weight), float(box_weight))
        self.beta = float(beta)
        self.reg_temperature = float(reg_temperature)
        # The towers are as wide as the FPN in every supported head (checked at the first step).
        s_width = student_channels[min(student_channels)]
        t_width = teacher_channels[min(teacher_channels)] if teacher_channels else s_width
        self.widths = (s_width, t_width)
        if s_width != t_width:
            self.cls_mapper = nn.Conv2d(s_width, t_width, kernel_size=1)
            self.reg_mapper = nn.Conv2d(s_width, t_width, kernel_size=1)
        else:
            self.cls_mapper = self.reg_mapper = None
        self.bind_detector("retinanet")

    @classmethod
    def from_config(
        cls,
        node,
        *,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        num_classes: int,
        arch: str,
    ) -> CrossKD:
        return cls(
            student_channels,
            teacher_channels,
            split=node.SPLIT,
            cls_weight=node.CLS_WEIGHT,
            reg_weight=node.REG_WEIGHT,
            box_weight=node.BOX_WEIGHT,
            beta=node.BETA,
            reg_temperature=node.REG_TEMPERATURE,
        )

    def bind_detector(self, family: str) -> None:
        super().bind_detector(family)
        if family not in CROSSKD_DEFAULTS:
            self.head_split = None
            return
        defaults = CROSSKD_DEFAULTS[family]
        split, cls_w, reg_w, box_w = (c if c >= 0 else d for c, d in zip(self.configured, defaults))
        self.head_split = int(split)
        self.cls_weight, self.reg_weight, self.box_weight = cls_w, reg_w, box_w

    def unsupported_reason(self, arch: str, dense_softmax: bool) -> str | None:
        if arch == "two_stage" or dense_softmax or self.family not in CROSSKD_DEFAULTS:
            return (
                "CrossKD runs the student's head features through the teacher's dense head: it "
                "needs a RetinaNet, FCOS or GFL student with a head of conv towers (a two-stage "
                "detector's box head and SSD's heads have none). For Faster R-CNN use a feature "
                "method such as PKD or FGFI"
            )
        return None

    def _mapped(self, mapper: nn.Module | None, x: Tensor) -> Tensor:
        if x.shape[1] != self.widths[0]:
            raise ValueError(
                f"CrossKD assumed the student's head towers are as wide as its FPN "
                f"({self.widths[0]} channels), got {x.shape[1]}"
            )
        return mapper(x) if mapper is not None else x

    def cross_head_predictions(self, student: DenseOutputs, teacher: DenseOutputs) -> dict:
        """The teacher head's predictions from the student's re-coloured tower features."""
        s_split, t_split = student.head_split, teacher.head_split
        if s_split is None or t_split is None:
            raise ValueError("CrossKD needs both records' dense.head_split (set by the backend)")
        cls_in = [
            recolor_features(self._mapped(self.cls_mapper, s), t)
            for s, t in zip(s_split.cls_features, t_split.cls_features)
        ]
        reg_in = [
            recolor_features(self._mapped(self.reg_mapper, s), t)
            for s, t in zip(s_split.reg_features, t_split.reg_features)
        ]
        return t_split.resume(cls_in, reg_in)

    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        s_dense, t_dense = student.dense, teacher.dense
        locations_per_level("CrossKD", s_dense, t_dense)
        if (self.family == "gfl") != (t_dense.box_dist is not None):
            raise ValueError(
                "CrossKD on a GFL student needs a GFL teacher (distribution head), and a GFL "
                "teacher a GFL student"
            )
        cross = self.cross_head_predictions(s_dense, t_dense)
        labels = s_dense.labels.flatten()
        k = s_dense.num_classes
        valid = labels >= 0
        pos = valid & (labels < k)
        t_cls, c_cls = flatten_levels(t_dense.cls_logits), flatten_levels(cross["cls_logits"])
        t_del, c_del = flatten_levels(t_dense.box_deltas), flatten_levels(cross["box_deltas"])
        dtype = compute_dtype(t_cls, c_cls, t_del, c_del)
        t_cls, c_cls = t_cls.to(dtype), c_cls.to(dtype)
        w = torch.sigmoid(t_cls).max(dim=1).values * valid
        n = s_dense.labels.shape[0]
        anchors = torch.cat(s_dense.anchors).repeat(n, 1)
        if self.family == "fcos":
            points = (anchors[pos, :2] + anchors[pos, 2:]) / 2
            gt = s_dense.matched_gt_boxes.flatten(0, 1)[pos].to(dtype)
            norm = fcos_centerness_targets(points.to(dtype), gt).sum().clamp(min=1e-6)
        else:
            norm = pos.sum().clamp(min=1).to(dtype)
        cls_loss = quality_focal_kd_loss(c_cls[valid], t_cls[valid], self.beta) / norm
        losses = {"loss_kd_crosskd_cls": cls_loss * self.cls_weight}
        sel = w > 0
        c_boxes = decode_boxes(t_dense.box_coder, c_del[sel].to(dtype), anchors[sel])
        t_boxes = decode_boxes(t_dense.box_coder, t_del[sel].to(dtype), anchors[sel])
        ws = w[sel]
        if self.family == "gfl":
            bins = t_dense.box_dist[0].shape[-1] // 4
            c_dist = flatten_levels(cross["box_dist"])[sel].reshape(-1, bins)
            t_dist = flatten_levels(t_dense.box_dist)[sel].reshape(-1, bins)
            kl = softmax_kl_div(c_dist, t_dist, self.reg_temperature).view(-1, 4).sum(dim=1)
            w_sum = ws.sum().clamp(min=1e-6)
            giou = aligned_box_iou(c_boxes, t_boxes, giou=True)
            losses["loss_kd_crosskd_reg"] = (ws * kl).sum() / 4.0 / w_sum * self.reg_weight
            losses["loss_kd_crosskd_box"] = (ws * (1 - giou)).sum() / w_sum * self.box_weight
        elif self.family == "fcos":
            iou = aligned_box_iou(c_boxes, t_boxes).clamp(min=1e-6)
            losses["loss_kd_crosskd_reg"] = (ws * -iou.log()).sum() / norm * self.reg_weight
        else:
            giou = aligned_box_iou(c_boxes, t_boxes, giou=True)
            losses["loss_kd_crosskd_reg"] = (ws * (1 - giou)).sum() / norm * self.reg_weight
        return losses
