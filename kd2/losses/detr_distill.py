"""DETRDistill (Chang et al., DETRDistill: A Universal Knowledge Distillation Framework for
DETR-families, ICCV 2023; BIVLab-USTC/DETRDistill, Deformable DETR on mmdet 2.x).

Three parts, each as the official distiller and head compute it:

1. **Hungarian-matched logits distillation** (``loss_kd_detrdistill_{cls,bbox,giou}``): the
   teacher's predictions — every query, its sigmoid class probabilities and its box — take the
   place of the ground truth. Each student decoder layer is matched one to one to a teacher layer
   (``DistillHungarianAssigner``: the soft binary cross-entropy class cost summed over the
   classes at weight 1, :func:`~kd2.losses.query_matching.soft_bce_class_cost`; L1 5; −GIoU 2) and
   learns it: binary cross-entropy of the logits against the matched teacher probabilities over
   all queries and classes (an unmatched query, which only exists when the student has more
   queries, learns background — the official code would fill it with the class count), L1 and
   ``1 − GIoU`` of the matched boxes; all three divided by the number of matched pairs, weights
   1 / 5 / 2. ``LAYER_BY_LAYER`` pairs student layer ``l`` with the teacher layer as far from the
   last (the official ``is_layer_by_layer_distill``); a teacher recorded in eval mode may only
   have its last layer (D-FINE, DEIMv2), which every student layer then learns, as the official
   code's other setting does.
2. **Target-aware feature distillation** (``loss_kd_detrdistill_feature``): the teacher's top
   ``TOPK`` (query, class) pairs by score, each scored by its class probability times its box's
   best IoU with the ground truth, weight a spatial mask built from the cosine similarity of the
   teacher's L2-normalised query embeddings with its L2-normalised feature maps:
   ``m = clamp(Σ_j score_j · cos(q_j, f_t), min=0.01) / max``; the loss is the mean squared error
   of ``m · f_t`` and ``m · adapter(f_s)`` summed over the levels (``FEATURE_WEIGHT`` 1, the
   official ``MSELoss(reduction="mean")``). The official code sums over the teacher's decoder
   stages; kd2 records the teacher's last layer's query embeddings, so one stage. The queries
   and the maps must have the same width (they do in the RT-DETR family's configs).
3. **Query-prior assignment distillation** (``loss_kd_detrdistill_group_{cls,bbox,giou}``,
   ``GROUP``): the teacher's queries are decoded by the student's decoder as an extra group (the
   ``teacher`` distillation points, :attr:`kd2.structures.QueryOutputs.points`) and supervised by
   the ground truth under the **teacher's** Hungarian assignment of those queries (Deformable
   DETR's criterion: focal α 0.25 γ 2, L1, GIoU at 2 / 5 / 2, over the number of GT boxes), so the
   student learns from the teacher which query should answer which object.

The official distiller also carries a contrastive query head (CE 0.2) and a commented-out FGD
block; kd2 leaves them out (FGD is its own method, ``KD.METHODS: ["FGD"]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd2.structures import StepRecord

from .adapters import FeatureAdapter
from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .query_matching import cxcywh_to_xyxy, match_queries, match_to_boxes, normalized_cxcywh
from .teach_detr import teach_detr_losses
from .utils import (
    adapt_features,
    aligned_box_iou,
    box_iou,
    compute_dtype,
    detr_only_reason,
    shared_strides,
    zero_like_loss,
)

__all__ = [
    "DETRDistill",
    "matched_logit_losses",
    "target_aware_feature_loss",
    "target_aware_mask",
    "target_aware_scores",
]

#: the logits part's assignment costs (class, L1, GIoU): the official DistillHungarianAssigner
DISTILL_MATCH_COSTS = (1.0, 5.0, 2.0)


def matched_logit_losses(
    student_logits: Tensor,
    student_boxes: Tensor,
    teacher_logits: Tensor,
    teacher_boxes: Tensor,
    pairs: Sequence[tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor, Tensor]:
    """DETRDistill's logits distillation of one student layer against its teacher layer.

    Args:
        student_logits / teacher_logits: ``(N, Q_s, K)`` / ``(N, Q_t, K)`` sigmoid logits.
        student_boxes / teacher_boxes: normalised ``cxcywh``, ``(N, Q_s, 4)`` / ``(N, Q_t, 4)``.
        pairs: per image ``(student_query, teacher_query)`` (:func:`match_queries`).

    Returns:
        ``(cls, l1, giou)``, each divided by ``max(1, number of pairs)``.
    """
    dtype = compute_dtype(student_logits, student_boxes)
    image = torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(pairs)])
    s_idx = torch.cat([s for s, _ in pairs])
    t_idx = torch.cat([t for _, t in pairs])
    num = max(1, int(s_idx.numel()))
    logits = student_logits.to(dtype)
    target = torch.zeros_like(logits)
    target[image, s_idx] = teacher_logits.detach().to(dtype)[image, t_idx].sigmoid()
    cls = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / num
    if s_idx.numel() == 0:
        zero = zero_like_loss(student_logits, student_boxes)
        return cls, zero, zero
    s_boxes = student_boxes.to(dtype)[image, s_idx]
    t_boxes = teacher_boxes.detach().to(dtype)[image, t_idx]
    l1 = (s_boxes - t_boxes).abs().sum() / num
    giou = aligned_box_iou(cxcywh_to_xyxy(s_boxes), cxcywh_to_xyxy(t_boxes), giou=True)
    return cls, l1, (1 - giou).sum() / num


def target_aware_scores(
    logits: Tensor, boxes: Tensor, gt_boxes: Sequence[Tensor], topk: int
) -> tuple[Tensor, Tensor]:
    """The teacher's top ``topk`` (query, class) pairs of each image and their scores.

    Args:
        logits: ``(N, Q, K)``; boxes: ``(N, Q, 4)`` normalised ``cxcywh``.
        gt_boxes: per image ``(G_i, 4)`` normalised ``cxcywh``.

    Returns:
        ``(query (N, k), score (N, k))``, ``k = min(topk, Q·K)``: the pair's class probability
        times the best IoU of its query's box with the ground truth (the probability alone for an
        image without boxes).
    """
    n, q, k = logits.shape
    probs, index = logits.sigmoid().reshape(n, q * k).topk(min(int(topk), q * k), dim=1)
    query = index // k
    scores = []
    for i, gt in enumerate(gt_boxes):
        if len(gt) == 0:
            scores.append(probs[i])
            continue
        iou = box_iou(cxcywh_to_xyxy(boxes[i, query[i]]), cxcywh_to_xyxy(gt.to(boxes.dtype)))
        scores.append(probs[i] * iou.amax(1))
    return query, torch.stack(scores)


def target_aware_mask(
    queries: Tensor, scores: Tensor, features: Tensor, floor: float = 1e-2
) -> Tensor:
    """``(N, 1, H, W)`` DETRDistill's mask: ``clamp(Σ_j score_j · cos(q_j, f), min=floor)``
    divided by its maximum over the map.

    Args:
        queries: ``(N, J, C)`` query embeddings; scores: ``(N, J)``.
        features: ``(N, C, H, W)``.
    """
    q = F.normalize(queries, dim=-1)
    f = F.normalize(features, dim=1)
    mask = torch.einsum("nj,njhw->nhw", scores, torch.einsum("njc,nchw->njhw", q, f))
    mask = mask.clamp(min=floor)
    return (mask / mask.flatten(1).amax(1)[:, None, None])[:, None]


def target_aware_feature_loss(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """``mean((mask · teacher − mask · student)²)`` over ``(N, C, H, W)``."""
    dtype = compute_dtype(student, teacher)
    m = mask.detach().to(dtype)
    return F.mse_loss(m * student.to(dtype), m * teacher.detach().to(dtype))


@KD_METHOD_REGISTRY.register()
class DETRDistill(KDMethod):
    """DETRDistill (module docstring). Config ``KD.DETRDISTILL``: ``WEIGHT`` (1), ``CLS_WEIGHT`` /
    ``BBOX_WEIGHT`` / ``GIOU_WEIGHT`` (1 / 5 / 2), ``LAYER_BY_LAYER`` (True), ``FEATURE_WEIGHT``
    (1), ``TOPK`` (100), ``GROUP`` (True), ``GROUP_CLS_WEIGHT`` / ``GROUP_BBOX_WEIGHT`` /
    ``GROUP_GIOU_WEIGHT`` (2 / 5 / 2)."""

    card = MethodCard(
        title="DETRDistill",
        summary="Hungarian-matched logits KD per decoder layer, target-aware feature masks from "
        "the teacher's queries, and the teacher's queries decoded by the student under the "
        "teacher's assignment",
        paper="Chang et al., DETRDistill: A Universal Knowledge Distillation Framework for "
        "DETR-families (ICCV 2023)",
        code="BIVLab-USTC/DETRDistill",
        project="DETRDistillation",
        terms=(
            "loss_kd_detrdistill_cls",
            "loss_kd_detrdistill_bbox",
            "loss_kd_detrdistill_giou",
            "loss_kd_detrdistill_feature",
            "loss_kd_detrdistill_group_cls",
            "loss_kd_detrdistill_group_bbox",
            "loss_kd_detrdistill_group_giou",
        ),
        families=("detr",),
    )

    #: with the default parts on (an instance reads only those its settings use)
    teacher_parts = frozenset({"queries", "features", "points"})

    def __init__(
        self,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        *,
        weight: float = 1.0,
        cls_weight: float = 1.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        layer_by_layer: bool = True,
        feature_weight: float = 1.0,
        topk: int = 100,
        group: bool = True,
        group_weights: tuple[float, float, float] = (2.0, 5.0, 2.0),
    ):
        super().__init__()
        self.weight = float(weight)
        self.weights = (float(cls_weight), float(bbox_weight), float(giou_weight))
        self.layer_by_layer = bool(layer_by_layer)
        self.feature_weight = float(feature_weight)
        self.topk = int(topk)
        self.group = bool(group)
        self.group_weights = tuple(float(w) for w in group_weights)
        self.adapter = (
            FeatureAdapter(student_channels, teacher_channels, 1, identity_when_equal=True)
            if self.feature_weight
            else None
        )
        parts = {"queries"} | ({"features"} if self.feature_weight else set())
        self.teacher_parts = frozenset(parts | ({"points"} if self.group else set()))
        self.point_groups = {"teacher": 0} if self.group else {}

    @classmethod
    def from_config(
        cls,
        node,
        *,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        num_classes: int,
        arch: str,
    ) -> DETRDistill:
        return cls(
            student_channels,
            teacher_channels,
            weight=float(node.WEIGHT),
            cls_weight=float(node.CLS_WEIGHT),
            bbox_weight=float(node.BBOX_WEIGHT),
            giou_weight=float(node.GIOU_WEIGHT),
            layer_by_layer=bool(node.LAYER_BY_LAYER),
            feature_weight=float(node.FEATURE_WEIGHT),
            topk=int(node.TOPK),
            group=bool(node.GROUP),
            group_weights=(
                float(node.GROUP_CLS_WEIGHT),
                float(node.GROUP_BBOX_WEIGHT),
                float(node.GROUP_GIOU_WEIGHT),
            ),
        )

    def unsupported_reason(self, arch: str, dense_softmax: bool) -> str | None:
        return detr_only_reason(
            self.family, "distils a DETR decoder's matched predictions and queries"
        )

    def teacher_layer(self, layer: int, student_layers: int, teacher_layers: int) -> int:
        """The teacher layer student layer ``layer`` learns: as far from the last
        (``LAYER_BY_LAYER``), else the last."""
        if not self.layer_by_layer:
            return teacher_layers - 1
        return max(0, teacher_layers - student_layers + layer)

    def forward(self, student: StepRecord, teacher: StepRecord) -> Mapping[str, Tensor]:
        s, t = student.queries, teacher.queries
        if s is None or t is None:
            raise ValueError("DETRDistill needs the queries part of both records")
        out = self._logits(s, t)
        h, w = student.images.shape[-2:]
        gt = [normalized_cxcywh(b.to(t.boxes.dtype), h, w) for b in student.gt_boxes]
        if self.feature_weight:
            out["loss_kd_detrdistill_feature"] = self._feature(student, teacher, gt)
        if self.group:
            out.update(self._group(student, t, gt))
        return out

    def _logits(self, s, t) -> dict[str, Tensor]:
        cls_w, bbox_w, giou_w = self.weights
        totals = [zero_like_loss(s.logits, s.boxes) for _ in range(3)]
        layers_s, layers_t = s.logits.shape[0], t.logits.shape[0]
        for layer in range(layers_s):
            tl = self.teacher_layer(layer, layers_s, layers_t)
            logits, boxes = s.logits[layer], s.boxes[layer]
            pairs = match_queries(
                logits, boxes, t.logits[tl], t.boxes[tl], DISTILL_MATCH_COSTS, "soft_bce"
            )
            terms = matched_logit_losses(logits, boxes, t.logits[tl], t.boxes[tl], pairs)
            totals = [a + b for a, b in zip(totals, terms)]
        cls, l1, giou = totals
        return {
            "loss_kd_detrdistill_cls": cls * (cls_w * self.weight),
            "loss_kd_detrdistill_bbox": l1 * (bbox_w * self.weight),
            "loss_kd_detrdistill_giou": giou * (giou_w * self.weight),
        }

    def _feature(self, student: StepRecord, teacher: StepRecord, gt) -> Tensor:
        t = teacher.queries
        query, scores = target_aware_scores(t.logits[-1], t.boxes[-1], gt, self.topk)
        embeddings = t.hidden.gather(1, query[..., None].expand(-1, -1, t.hidden.shape[-1]))
        strides = shared_strides(self.adapter, student.features, teacher.features)
        s_maps, t_maps = adapt_features(self.adapter, student.features, teacher.features, strides)
        if embeddings.shape[-1] != t_maps[0].shape[1]:
            raise ValueError(
                f"DETRDistill's feature masks compare the teacher's {embeddings.shape[-1]}-wide "
                f"queries with its {t_maps[0].shape[1]}-channel maps; they must be as wide "
                "(KD.DETRDISTILL.FEATURE_WEIGHT 0 turns the feature part off)"
            )
        total = zero_like_loss(*s_maps)
        for s_map, t_map in zip(s_maps, t_maps):
            mask = target_aware_mask(embeddings.to(t_map.dtype), scores.to(t_map.dtype), t_map)
            total = total + target_aware_feature_loss(s_map, t_map, mask)
        return total * (self.feature_weight * self.weight)

    def _group(self, student: StepRecord, t, gt) -> dict[str, Tensor]:
        if student.queries.points is None or "teacher" not in student.queries.points:
            raise ValueError(
                "DETRDistill's GROUP needs the student's answers to the teacher's queries"
            )
        logits, boxes = student.queries.points["teacher"]
        labels = list(student.gt_labels)
        matches = match_to_boxes(t.logits[-1], t.boxes[-1], labels, gt)
        ones = [torch.ones(len(b), dtype=compute_dtype(logits), device=logits.device) for b in gt]
        cls_w, bbox_w, giou_w = self.group_weights
        totals = [zero_like_loss(logits, boxes) for _ in range(3)]
        for layer in range(logits.shape[0]):
            terms = teach_detr_losses(
                logits[layer], boxes[layer], labels, gt, ones, matches, unmatched_weight=1.0
            )
            totals = [a + b for a, b in zip(totals, terms)]
        cls, l1, giou = totals
        return {
            "loss_kd_detrdistill_group_cls": cls * (cls_w * self.weight),
            "loss_kd_detrdistill_group_bbox": l1 * (bbox_w * self.weight),
            "loss_kd_detrdistill_group_giou": giou * (giou_w * self.weight),
        }
