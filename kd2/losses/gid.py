"""GID: general instance distillation (Dai et al., CVPR 2021).

**Selection** (:func:`select_general_instances`, the paper's GISM): the general-instance score
of a candidate is ``max_c |p^t_c − p^s_c|`` over the sigmoid class probabilities of teacher and
student at the same dense prediction; its box is the decoded box of whichever model is more
confident there. The ``PRE_NMS_TOPK`` (3000) best candidates of an image go through a greedy NMS
at IoU 0.3 and at most ``TOP_K`` (10) survive. No GT is needed: the kept boxes are positives, hard
negatives and "semi-positives" alike. (The author's Detectron2 port compares the two max-class
scores and runs NMS per level; kd2 follows the paper.)

**Losses** (:class:`GID`, weights of the author's Detectron2 port
the repository ``Distill_GID`` of GitHub user daixinghome, ``GID/gid/loss.py``):

* feature — each instance is pooled (:func:`kd2.ops.roi_align`, 10×10, sampling 2,
  ``ROIAlignV2``) on the FPN level Detectron2's canonical rule gives it
  (``⌊4 + log2(√area / 224)⌋``, clamped to the distilled levels) from the teacher's map and from
  the student's map after a **shared** 3×3 adapter; ``Σ (t − φ(s))² / (M · 10 · 10)``, weight
  0.005;
* relation — pairwise Euclidean distances of the flattened pooled features of all instances of
  the batch, each set normalised by its mean non-zero distance, SmoothL1 (β = 1) summed over the
  off-diagonal pairs ``/ (M² − M)`` (:func:`kd2.losses.rkd.rkd_distance_loss` · ``M / (M − 1)``),
  weight 40; 0 for fewer than 3 instances, as the port. The raw student features are used: the
  port's adapter never reaches this term;
* response — the dense predictions whose anchors match an instance (IoU ≥ 0.5, plus each
  instance's best anchors: the student's RetinaNet matcher with its low-quality matches, as the
  port) carry a BCE of the student's class logits against the teacher's sigmoid and an L1 between
  the box outputs, each summed ``/`` the number of matched predictions; weights 0.1 and 0.1.

Dense sigmoid heads only (RetinaNet, FCOS, GFL); Faster R-CNN and SSD are refused when the model
is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd2.ops import roi_align
from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .rkd import rkd_distance_loss
from .utils import box_iou, compute_dtype, decode_boxes, to_compute, zero_like_loss

__all__ = [
    "GID",
    "canonical_levels",
    "general_instance_scores",
    "gid_relation_loss",
    "select_general_instances",
]


def general_instance_scores(student_scores: Tensor, teacher_scores: Tensor) -> Tensor:
    """``(M,)`` ``max_c |teacher − student|`` of ``(M, K)`` class probabilities (fp32, or fp64
    when an input is fp64)."""
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(
            f"score shapes differ: {tuple(student_scores.shape)} and {tuple(teacher_scores.shape)}"
        )
    if student_scores.shape[0] == 0:
        return student_scores.new_zeros((0,))
    dtype = compute_dtype(student_scores, teacher_scores)
    return (teacher_scores.to(dtype) - student_scores.to(dtype)).abs().max(dim=1).values


@torch.no_grad()
def select_general_instances(
    boxes: Tensor,
    student_scores: Tensor,
    teacher_scores: Tensor,
    top_k: int = 10,
    iou_threshold: float = 0.3,
) -> Tensor:
    """GID's instance selection on one image.

    Args:
        boxes: ``(M, 4)`` XYXY candidate boxes.
        student_scores / teacher_scores: ``(M, K)`` class probabilities of the same candidates.
        top_k: at most this many boxes are kept.
        iou_threshold: a box overlapping a kept one by more than this is suppressed.

    Returns:
        ``(k,)`` int64 indices into ``boxes``, ``k ≤ top_k``, highest score difference first
        (ties: the lower index first).
    """
    if boxes.shape[0] != student_scores.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {student_scores.shape[0]} score rows")
    scores = general_instance_scores(student_scores, teacher_scores)
    order = torch.sort(scores, descending=True, stable=True).indices
    kept: list[int] = []
    suppressed = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    for idx in order.tolist():
        if len(kept) >= top_k:
            break
        if suppressed[idx]:
            continue
        kept.append(idx)
        iou = box_iou(boxes[idx : idx + 1], boxes)[0]
        suppressed |= iou > iou_threshold
    return torch.tensor(kept, dtype=torch.long, device=boxes.device)


def canonical_levels(
    boxes: Tensor, strides: list[int], canonical_size: float = 224.0, canonical_level: int = 4
) -> Tensor:
    """Index into ``strides`` (consecutive powers of 2, finest first) of each ``(M, 4)`` box by
    Detectron2's ``ROIPooler`` rule ``⌊canonical_level + log2(√area / canonical_size)⌋``."""
    min_level = int(math.log2(strides[0]))
    size = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
    level = torch.floor(canonical_level + torch.log2(size / canonical_size + 1e-8))
    return (level.clamp(min_level, min_level + len(strides) - 1) - min_level).long()


def gid_relation_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """GID's relation term on ``(M, D)`` instance features: SmoothL1 between the normalised
    distance matrices, averaged over the ``M² − M`` off-diagonal pairs; ``0`` for ``M < 3``."""
    m = student.shape[0]
    if m < 3:
        return zero_like_loss(student)
    return rkd_distance_loss(student, teacher) * (m / (m - 1))


@KD_METHOD_REGISTRY.register()
class GID(KDMethod):
    """General instance distillation on a dense sigmoid head (RetinaNet, FCOS, GFL).

    Config (``cfg.KD.GID``): ``FEATURE_WEIGHT`` (0.005), ``RELATION_WEIGHT`` (40),
    ``CLS_WEIGHT`` (0.1), ``REG_WEIGHT`` (0.1), ``TOP_K`` (10), ``PRE_NMS_TOPK`` (3000),
    ``NMS_THRESH`` (0.3), ``POOL_SIZE`` (10), ``MATCH_IOU`` (0.5).

    Losses: ``loss_kd_gid_feature``, ``loss_kd_gid_relation``, ``loss_kd_gid_cls``,
    ``loss_kd_gid_reg``. Trainable: the shared 3×3 adapter.
    """

    card = MethodCard(
        title="GID",
        summary="feature, relation and response terms on the selected general instances",
        paper="Dai et al., General Instance Distillation (CVPR 2021)",
        code="daixinghome/Distill_GID_detectron2 (port)",
        project="HeadDistillation",
        terms=("loss_kd_gid_feature", "loss_kd_gid_relation", "loss_kd_gid_cls", "loss_kd_gid_reg"),
        families=("retinanet", "fcos", "gfl"),
    )

    teacher_parts = frozenset({"features", "dense"})

    def __init__(
        self,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        *,
        feature_weight: float = 0.005,
        relation_weight: float = 40.0,
        cls_weight: float = 0.1,
        reg_weight: float = 0.1,
        top_k: int = 10,
        pre_nms_topk: int = 3000,
        nms_thresh: float = 0.3,
        pool_size: int = 10,
        match_iou: float = 0.5,
    ):
        super().__init__()
        shared = sorted(set(student_channels) & set(teacher_channels))
        if not shared:
            raise ValueError("GID needs FPN levels of the same stride in student and teacher")
        widths = {(student_channels[s], teacher_channels[s]) for s in shared}
        if len(widths) != 1:
            raise ValueError(f"GID's adapter is shared across levels; got channel pairs {widths}")
        cs, ct = widths.pop()
        self.adapter = nn.Conv2d(cs, ct, kernel_size=3, padding=1)
        self.weights = (
            float(feature_weight),
            float(relation_weight),
            float(cls_weight),
            float(reg_weight),
        )
        self.top_k, self.pre_nms_topk = int(top_k), int(pre_nms_topk)
        self.nms_thresh, self.pool_size, self.match_iou = (
            float(nms_thresh),
            int(pool_size),
            float(match_iou),
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
    ) -> GID:
        return cls(
            student_channels,
            teacher_channels,
            feature_weight=node.FEATURE_WEIGHT,
            relation_weight=node.RELATION_WEIGHT,
            cls_weight=node.CLS_WEIGHT,
            reg_weight=node.REG_WEIGHT,
            top_k=node.TOP_K,
            pre_nms_topk=node.PRE_NMS_TOPK,
            nms_thresh=node.NMS_THRESH,
            pool_size=node.POOL_SIZE,
            match_iou=node.MATCH_IOU,
        )

    def unsupported_reason(self, arch: str, dense_softmax: bool) -> str | None:
        if arch == "two_stage" or dense_softmax or self.family not in ("retinanet", "fcos", "gfl"):
            return (
                "GID selects its instances from a dense sigmoid head's predictions (RetinaNet, "
                "FCOS, GFL); Faster R-CNN and SSD have none. For Faster R-CNN use e.g. FGFI, "
                "PKD or GlobalKD"
            )
        return None

    @torch.no_grad()
    def general_instances(self, student: StepRecord, teacher: StepRecord) -> list[Tensor]:
        """Per image ``(k_i, 4)`` XYXY general instances (clipped to the image, non-empty)."""
        s_dense, t_dense = student.dense, teacher.dense
        anchors = torch.cat(s_dense.anchors)
        s_cls = torch.cat(s_dense.cls_logits, dim=1)
        t_cls = torch.cat(t_dense.cls_logits, dim=1)
        s_box = torch.cat(s_dense.box_deltas, dim=1)
        t_box = torch.cat(t_dense.box_deltas, dim=1)
        cls_dtype, box_dtype = compute_dtype(s_cls, t_cls), compute_dtype(s_box, t_box)
        out = []
        for i, (h, w) in enumerate(student.image_sizes):
            valid = (s_dense.labels[i] >= 0).nonzero().flatten()
            s_p, t_p = (
                torch.sigmoid(s_cls[i, valid].to(cls_dtype)),
                torch.sigmoid(t_cls[i, valid].to(cls_dtype)),
            )
            scores = general_instance_scores(s_p, t_p)
            cand = scores.topk(min(self.pre_nms_topk, scores.numel())).indices
            idx = valid[cand]
            teacher_surer = t_p[cand].max(dim=1).values > s_p[cand].max(dim=1).values
            boxes = torch.where(
                teacher_surer[:, None],
                decode_boxes(t_dense.box_coder, t_box[i, idx].to(box_dtype), anchors[idx]),
                decode_boxes(s_dense.box_coder, s_box[i, idx].to(box_dtype), anchors[idx]),
            )
            boxes = torch.stack(
                [
                    boxes[:, 0].clamp(0, w),
                    boxes[:, 1].clamp(0, h),
                    boxes[:, 2].clamp(0, w),
                    boxes[:, 3].clamp(0, h),
                ],
                dim=1,
            )
            nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, s_p, t_p = boxes[nonempty], s_p[cand][nonempty], t_p[cand][nonempty]
            keep = select_general_instances(boxes, s_p, t_p, self.top_k, self.nms_thresh)
            out.append(boxes[keep])
        return out

    def _pooled(self, student: StepRecord, teacher: StepRecord, instances: list[Tensor]):
        strides = [
            s for s in student.dense.strides if s in student.features and s in teacher.features
        ]
        boxes = torch.cat(instances)
        index = torch.cat(
            [
                torch.full((len(b),), i, dtype=torch.long, device=boxes.device)
                for i, b in enumerate(instances)
            ]
        )
        levels = canonical_levels(boxes, strides)
        m, p = boxes.shape[0], self.pool_size
        ref_s, ref_t = student.features[strides[0]], teacher.features[strides[0]]
        raw_s = ref_s.new_zeros((m, ref_s.shape[1], p, p))
        adapted = ref_t.new_zeros((m, ref_t.shape[1], p, p))
        pooled_t = ref_t.new_zeros((m, ref_t.shape[1], p, p))
        for lvl, stride in enumerate(strides):
            sel = (levels == lvl).nonzero().flatten()
            if sel.numel() == 0:
                continue
            args = (boxes[sel], index[sel], 1.0 / stride, p)
            s_map = student.features[stride]
            raw_s = raw_s.index_copy(0, sel, roi_align(s_map, *args))
            adapted = adapted.index_copy(0, sel, roi_align(self.adapter(s_map), *args))
            t_map = teacher.features[stride].detach()
            pooled_t = pooled_t.index_copy(0, sel, roi_align(t_map, *args))
        return raw_s, adapted, pooled_t

    def _response_mask(self, student: StepRecord, instances: list[Tensor]) -> Tensor:
        anchors = to_compute(torch.cat(student.dense.anchors))
        masks = []
        for i, boxes in enumerate(instances):
            mask = torch.zeros(anchors.shape[0], dtype=torch.bool, device=anchors.device)
            if boxes.numel():
                iou = box_iou(boxes, anchors)  # (k, R)
                best = iou.max(dim=1, keepdim=True).values
                mask = (iou.max(dim=0).values >= self.match_iou) | ((iou == best) & (best > 0)).any(
                    dim=0
                )
            masks.append(mask & (student.dense.labels[i] >= 0))
        return torch.stack(masks)

    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        s_dense, t_dense = student.dense, teacher.dense
        if [t.shape[1] for t in s_dense.cls_logits] != [t.shape[1] for t in t_dense.cls_logits]:
            raise ValueError(
                "GID compares the two heads prediction by prediction: student and teacher need "
                "the same anchors per location and the same strides"
            )
        instances = self.general_instances(student, teacher)
        w_feat, w_rel, w_cls, w_reg = self.weights
        zero = zero_like_loss(*student.features.values(), *s_dense.cls_logits)
        losses = {k: zero.clone() for k in ("feature", "relation", "cls", "reg")}
        if sum(len(b) for b in instances):
            raw_s, adapted, pooled_t = self._pooled(student, teacher, instances)
            m = raw_s.shape[0]
            losses["feature"] = (adapted - pooled_t).pow(2).sum() / (m * self.pool_size**2) * w_feat
            losses["relation"] = gid_relation_loss(raw_s.flatten(1), pooled_t.flatten(1)) * w_rel
            mask = self._response_mask(student, instances)
            count = mask.sum().clamp(min=1)
            s_cls = torch.cat(s_dense.cls_logits, dim=1)[mask]
            t_cls = torch.cat(t_dense.cls_logits, dim=1)[mask]
            dtype = compute_dtype(s_cls, t_cls)
            s_cls, t_cls = s_cls.to(dtype), t_cls.to(dtype)
            bce = F.binary_cross_entropy_with_logits(s_cls, torch.sigmoid(t_cls), reduction="sum")
            losses["cls"] = bce / count * w_cls
            s_box = torch.cat(s_dense.box_deltas, dim=1)[mask]
            t_box = torch.cat(t_dense.box_deltas, dim=1)[mask]
            dtype = compute_dtype(s_box, t_box)
            s_box, t_box = s_box.to(dtype), t_box.to(dtype)
            losses["reg"] = (s_box - t_box).abs().sum() / count * w_reg
        return {f"loss_kd_gid_{k}": v for k, v in losses.items()}
