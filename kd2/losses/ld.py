"""LD: localization distillation (Zheng et al., CVPR 2022) on a GFL head.

Each box side of a GFL head is a discrete distribution over ``reg_max + 1`` bins; LD is the KL
between the teacher's and the student's distributions of every side at temperature ``T = 10``
(the official ``KnowledgeDistillationKLDivLoss``: ``T² ·`` KL **averaged** over the bins, mmdet's
``.mean(1)``). Terms of :class:`LD`, as the official ``LDHead`` (``HikariTJU/LD``,
``mmdet/models/dense_heads/ld_head.py``) computes them:

* **main region** — the ATSS positives of the student, each weighted by the student's own
  detached max class sigmoid (as GFL's DFL), summed over locations and sides ``/ 4``
  (``avg_factor = 4``; no division by the number of positives), weight 0.25;
* **valuable localisation region** (VLR) — anchors whose DIoU with a GT lies in
  ``[0.25 · thr_g, thr_g)``, ``thr_g`` the GT's ATSS threshold (mean + std of its candidates'
  IoUs), all anchors being candidates (``ATSSAssigner.assign_neg``; no inside-the-box test); each
  weighted by its IoU with that GT (the GT of max IoU when several qualify), summed ``/ 16``,
  weight 0.25;
* **classification KD** (optional) — softmax KL over the ``K`` class logits at ``T = 2``,
  averaged over the classes and the positives, weight 10 (the released configs').

GFL students and teachers only: LD needs a distribution head on both sides (the authors'
RetinaNet/FCOS variants re-train those detectors with GFL-style heads).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .utils import atss_candidates, box_iou, compute_dtype, softmax_kl_div, to_compute

__all__ = [
    "LD",
    "localization_distillation_loss",
    "pairwise_diou",
    "side_kl",
    "valuable_localization_region",
]


def side_kl(student_dist: Tensor, teacher_dist: Tensor, temperature: float = 10.0) -> Tensor:
    """``(M,)`` ``Σ_sides T² · mean_bins KL(softmax(z_t/T) ‖ softmax(z_s/T))`` of ``(M, 4, B)``
    distribution logits (the teacher's are constants); fp32, or fp64 when an input is fp64."""
    if student_dist.shape != teacher_dist.shape or student_dist.dim() != 3:
        raise ValueError(
            f"LD needs (M, 4, reg_max + 1) logits of one shape, got {tuple(student_dist.shape)} "
            f"and {tuple(teacher_dist.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"LD temperature must be > 0, got {temperature}")
    m, sides, bins = student_dist.shape
    if m == 0:
        return to_compute(student_dist, teacher_dist).sum(dim=(1, 2)) * 0.0
    kl = softmax_kl_div(  # T² · KL summed over the bins, per side
        student_dist.reshape(m * sides, bins), teacher_dist.reshape(m * sides, bins), temperature
    )
    return (kl.view(m, sides) / bins).sum(dim=1)


def localization_distillation_loss(
    student_dist: Tensor, teacher_dist: Tensor, temperature: float = 10.0
) -> Tensor:
    """LD on ``M`` locations.

    Args:
        student_dist: ``(M, 4, reg_max + 1)`` distribution logits of the four sides.
        teacher_dist: ``(M, 4, reg_max + 1)`` the teacher's (constants).
        temperature: ``T > 0``.

    Returns:
        fp32 scalar (fp64 when an input is fp64) ``mean_M Σ_sides T² · mean_bins
        KL(softmax(z_t/T) ‖ softmax(z_s/T))``; ``0`` with a graph for ``M = 0``.
    """
    per_location = side_kl(student_dist, teacher_dist, temperature)
    if per_location.numel() == 0:
        return to_compute(student_dist, teacher_dist).sum() * 0.0
    return per_location.mean()


def pairwise_diou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """``(P, G)`` distance-IoU ``IoU − ρ² / c²`` (``ρ`` the centre distance, ``c`` the diagonal of
    the enclosing box) of ``(P, 4)`` and ``(G, 4)`` XYXY boxes (fp32, or fp64 for fp64 boxes)."""
    dtype = compute_dtype(boxes1, boxes2)
    b1, b2 = boxes1.to(dtype), boxes2.to(dtype)
    iou = box_iou(b1, b2)
    c1 = (b1[:, None, :2] + b1[:, None, 2:]) / 2
    c2 = (b2[None, :, :2] + b2[None, :, 2:]) / 2
    rho2 = (c1 - c2).pow(2).sum(-1)
    lt = torch.minimum(b1[:, None, :2], b2[None, :, :2])
    rb = torch.maximum(b1[:, None, 2:], b2[None, :, 2:])
    diag2 = (rb - lt).pow(2).sum(-1).clamp(min=1e-12)
    return iou - rho2 / diag2


@torch.no_grad()
def valuable_localization_region(
    anchors: Tensor, num_anchors_per_level: list[int], gt_boxes: Tensor, topk: int = 9
) -> Tensor:
    """LD's VLR weights on one image.

    Args:
        anchors: ``(R, 4)`` XYXY (the valid anchors, levels concatenated).
        num_anchors_per_level: ``R_l`` per level.
        gt_boxes: ``(G, 4)`` XYXY.
        topk: ATSS candidates per level and GT (the thresholds' sample).

    Returns:
        ``(R,)`` the IoU with the GT whose DIoU window ``[0.25 thr_g, thr_g)`` the anchor falls
        in (the max IoU over such GTs), ``0`` outside every window; fp32, or fp64 for fp64
        boxes.
    """
    out = anchors.new_zeros(anchors.shape[0], dtype=compute_dtype(anchors, gt_boxes))
    if anchors.shape[0] == 0 or gt_boxes.shape[0] == 0:
        return out
    ious, _, thresholds = atss_candidates(anchors, num_anchors_per_level, gt_boxes, topk)
    diou = pairwise_diou(anchors, gt_boxes)
    window = (diou < thresholds[None]) & (diou >= 0.25 * thresholds[None])
    best = torch.where(window, ious, torch.full_like(ious, -1.0)).max(dim=1).values
    return torch.where(best >= 0, best, out)


@KD_METHOD_REGISTRY.register()
class LD(KDMethod):
    """Localization distillation of a GFL student by a GFL teacher.

    Config (``cfg.KD.LD``): ``WEIGHT`` (0.25), ``TEMPERATURE`` (10), ``VLR_WEIGHT`` (0.25),
    ``CLS_WEIGHT`` (10), ``CLS_TEMPERATURE`` (2), ``ATSS_TOPK`` (9).

    Losses: ``loss_kd_ld``, ``loss_kd_ld_vlr`` and ``loss_kd_ld_cls`` (the last two only when
    their weight is > 0). No trainable parameters.
    """

    card = MethodCard(
        title="LD",
        summary="box-side distributions (main region and VLR) and class KD",
        paper="Zheng et al., Localization Distillation (CVPR 2022)",
        code="HikariTJU/LD",
        project="HeadDistillation",
        terms=("loss_kd_ld", "loss_kd_ld_vlr", "loss_kd_ld_cls"),
        families=("gfl",),
    )

    teacher_parts = frozenset({"dense"})

    def __init__(
        self,
        *,
        weight: float = 0.25,
        temperature: float = 10.0,
        vlr_weight: float = 0.25,
        cls_weight: float = 10.0,
        cls_temperature: float = 2.0,
        atss_topk: int = 9,
    ):
        super().__init__()
        if temperature <= 0 or cls_temperature <= 0:
            raise ValueError("KD.LD temperatures must be > 0")
        self.weight, self.temperature = float(weight), float(temperature)
        self.vlr_weight, self.cls_weight = float(vlr_weight), float(cls_weight)
        self.cls_temperature, self.atss_topk = float(cls_temperature), int(atss_topk)

    @classmethod
    def from_config(
        cls,
        node,
        *,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        num_classes: int,
        arch: str,
    ) -> LD:
        return cls(
            weight=node.WEIGHT,
            temperature=node.TEMPERATURE,
            vlr_weight=node.VLR_WEIGHT,
            cls_weight=node.CLS_WEIGHT,
            cls_temperature=node.CLS_TEMPERATURE,
            atss_topk=node.ATSS_TOPK,
        )

    def unsupported_reason(self, arch: str, dense_softmax: bool) -> str | None:
        if self.family != "gfl":
            return (
                "LD distils the box-side distributions of a GFL head (MODEL.META_ARCHITECTURE "
                "'GFL'); this detector regresses boxes directly. Use a GFL student and teacher, "
                "or CrossKD / PKD on this detector"
            )
        return None

    def vlr_weights(self, student: StepRecord) -> Tensor:
        """``(N, R)`` VLR weight of every prediction (0 outside the region and on invalid
        anchors)."""
        dense = student.dense
        anchors = torch.cat(dense.anchors)
        levels = torch.cat(
            [torch.full((len(a),), i, device=anchors.device) for i, a in enumerate(dense.anchors)]
        )
        out = []
        for labels, gt in zip(dense.labels, student.gt_boxes):
            valid = labels >= 0
            counts = [int((levels[valid] == i).sum()) for i in range(len(dense.anchors))]
            dtype = compute_dtype(anchors, gt)
            w = torch.zeros(labels.shape, dtype=dtype, device=anchors.device)
            w[valid] = valuable_localization_region(
                anchors[valid], counts, gt.to(anchors.device), self.atss_topk
            )
            out.append(w)
        return torch.stack(out)

    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        s, t = student.dense, teacher.dense
        if s.box_dist is None or t.box_dist is None:
            raise ValueError("LD needs the box distributions of a GFL student and teacher")
        bins = s.box_dist[0].shape[-1] // 4
        if t.box_dist[0].shape[-1] != 4 * bins:
            raise ValueError(
                f"LD compares distributions bin by bin: the student has {bins} bins per side, "
                f"the teacher {t.box_dist[0].shape[-1] // 4} (use the same MODEL.GFL.REG_MAX)"
            )
        s_dist = torch.cat(s.box_dist, dim=1)
        t_dist = torch.cat(t.box_dist, dim=1)
        if s_dist.shape != t_dist.shape:
            raise ValueError("LD needs the same locations in student and teacher (same strides)")
        s_cls = torch.cat(s.cls_logits, dim=1)
        pos = (s.labels >= 0) & (s.labels < s.num_classes)
        score = torch.sigmoid(to_compute(s_cls.detach(), s_dist)).max(dim=-1).values
        per_pos = side_kl(
            s_dist[pos].view(-1, 4, bins), t_dist[pos].view(-1, 4, bins), self.temperature
        )
        losses = {"loss_kd_ld": (score[pos] * per_pos).sum() / 4.0 * self.weight}
        if self.vlr_weight > 0:
            vlr = self.vlr_weights(student)
            sel = vlr > 0
            per_vlr = side_kl(
                s_dist[sel].view(-1, 4, bins), t_dist[sel].view(-1, 4, bins), self.temperature
            )
            losses["loss_kd_ld_vlr"] = (vlr[sel] * per_vlr).sum() / 16.0 * self.vlr_weight
        if self.cls_weight > 0:
            t_cls = torch.cat(t.cls_logits, dim=1)
            k = s_cls.shape[-1]
            kd = softmax_kl_div(s_cls[pos], t_cls[pos], self.cls_temperature) / k
            cls_loss = kd.mean() if kd.numel() else to_compute(s_cls, t_cls).sum() * 0.0
            losses["loss_kd_ld_cls"] = cls_loss * self.cls_weight
        return losses
