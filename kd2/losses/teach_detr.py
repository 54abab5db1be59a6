"""Teach-DETR: any detector's boxes as extra one-to-one targets of a DETR student (Huang et al.,
Teach-DETR: Better Training DETR with Teachers, TPAMI 2023; LeonHLJ/Teach-DETR).

The teacher — a Faster R-CNN, an FCOS, a DETR, of any backend — detects on the student's input
(the record's ``detections``); its boxes scoring at least ``SCORE_THRESH`` become a second set of
targets, which the student's decoder answers through the same Hungarian criterion as the ground
truth, each matched term weighted by the teacher's score (the official ``SetCriterion`` with
``is_ensemble``):

* each decoder layer is matched to the teacher's boxes on its own (Deformable DETR's matcher:
  focal class cost, L1, GIoU at 2 / 5 / 2; :func:`~kd2.losses.query_matching.match_to_boxes`);
* classification: the sigmoid focal loss (α 0.25, γ 2) of every query against the one-hot
  teacher classes, each query's row weighted by its matched box's score — and by 0.5 where the
  query matched no box (the official ``target_scores`` fill) — summed and divided by the number
  of teacher boxes;
* boxes: L1 × score and the GIoU term, divided by the number of teacher boxes. The official code
  computes ``1 − GIoU · score`` (``GIOU_WEIGHTING code``, the default); ``paper`` weights the
  loss itself, ``(1 − GIoU) · score``;
* ``loss = WEIGHT · (CLS_WEIGHT · cls + BBOX_WEIGHT · L1 + GIOU_WEIGHT · GIoU)`` per layer, summed
  over the layers (the official ``lambda_ensemble`` 1 and H-Deformable-DETR's coefficients 2 / 5 /
  2).

The official pipeline computes the teachers' boxes offline, once per image; kd2 runs the frozen
teacher on each training batch (the same boxes for the same augmented image, no file to keep in
sync). No parameter is added and inference is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .query_matching import cxcywh_to_xyxy, match_to_boxes, normalized_cxcywh
from .utils import aligned_box_iou, compute_dtype, detr_only_reason, zero_like_loss

__all__ = ["TeachDETR", "sigmoid_focal_loss", "teach_detr_losses", "teacher_targets"]

#: the query weight of the official criterion where a query matched no teacher box
UNMATCHED_WEIGHT = 0.5


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    """Element-wise sigmoid focal loss (RetinaNet's), same shape as ``logits``."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * ce * (1 - p_t) ** gamma


def teacher_targets(
    detections: Sequence[Mapping[str, Tensor]],
    image_size: tuple[int, int],
    score_thresh: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Per image the teacher's classes, normalised ``cxcywh`` boxes and scores (in ``dtype``) of
    the detections scoring at least ``score_thresh`` (``image_size``: the ``(h, w)`` the boxes
    are in)."""
    h, w = image_size
    labels, boxes, scores = [], [], []
    for d in detections:
        keep = d["scores"] >= score_thresh
        boxes.append(normalized_cxcywh(d["boxes"][keep].to(dtype), h, w))
        labels.append(d["labels"][keep].long())
        scores.append(d["scores"][keep].to(dtype))
    return labels, boxes, scores


def teach_detr_losses(
    logits: Tensor,
    boxes: Tensor,
    labels: Sequence[Tensor],
    targets: Sequence[Tensor],
    scores: Sequence[Tensor],
    matches: Sequence[tuple[Tensor, Tensor]],
    alpha: float = 0.25,
    gamma: float = 2.0,
    giou_weighting: str = "code",
    unmatched_weight: float = UNMATCHED_WEIGHT,
) -> tuple[Tensor, Tensor, Tensor]:
    """The official score-weighted criterion of one decoder layer (with all scores 1 and
    ``unmatched_weight`` 1: Deformable DETR's own criterion, focal / L1 / GIoU).

    Args:
        logits: ``(N, Q, K)``; boxes: ``(N, Q, 4)`` normalised ``cxcywh``.
        labels / targets / scores: per image the teacher's ``(G_i,)`` classes, ``(G_i, 4)``
            normalised ``cxcywh`` boxes and scores (:func:`teacher_targets`).
        matches: per image ``(query, target)`` index pairs (:func:`match_to_boxes`).
        giou_weighting: ``"code"`` ``1 − GIoU · s`` or ``"paper"`` ``(1 − GIoU) · s``.
        unmatched_weight: the class-loss weight of a query that matched no target.

    Returns:
        ``(cls, l1, giou)`` scalars, each divided by ``max(1, Σ G_i)``.
    """
    n, q, k = logits.shape
    num_boxes = max(1, sum(len(t) for t in labels))
    onehot = torch.zeros_like(logits)
    weight = logits.new_full((n, q), float(unmatched_weight))
    image = torch.cat([torch.full_like(qi, i) for i, (qi, _) in enumerate(matches)])
    query = torch.cat([qi for qi, _ in matches])
    cat_labels = torch.cat([lb[ti] for lb, (_, ti) in zip(labels, matches)])
    cat_scores = torch.cat([sc[ti] for sc, (_, ti) in zip(scores, matches)]).to(logits.dtype)
    onehot[image, query, cat_labels] = 1.0
    weight[image, query] = cat_scores
    focal = sigmoid_focal_loss(logits, onehot, alpha, gamma)
    cls = (focal * weight[..., None]).sum() / num_boxes
    if query.numel() == 0:
        zero = zero_like_loss(boxes)
        return cls, zero, zero
    src = boxes[image, query]
    tgt = torch.cat([t[ti] for t, (_, ti) in zip(targets, matches)]).to(src.dtype)
    l1 = ((src - tgt).abs() * cat_scores[:, None]).sum() / num_boxes
    giou = aligned_box_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt), giou=True)
    if giou_weighting == "code":
        giou_loss = (1 - giou * cat_scores).sum() / num_boxes
    else:
        giou_loss = ((1 - giou) * cat_scores).sum() / num_boxes
    return cls, l1, giou_loss


@KD_METHOD_REGISTRY.register()
class TeachDETR(KDMethod):
    """Teach-DETR (module docstring). Config ``KD.TEACHDETR``: ``WEIGHT`` (1), ``CLS_WEIGHT`` /
    ``BBOX_WEIGHT`` / ``GIOU_WEIGHT`` (2 / 5 / 2), ``SCORE_THRESH`` (0.3), ``ALPHA`` / ``GAMMA``
    (0.25 / 2), ``GIOU_WEIGHTING`` (``code`` | ``paper``)."""

    card = MethodCard(
        title="Teach-DETR",
        summary="any detector's boxes (scored) as extra one-to-one matching targets of a DETR",
        paper="Huang et al., Teach-DETR: Better Training DETR with Teachers (TPAMI 2023)",
        code="LeonHLJ/Teach-DETR",
        project="DETRDistillation",
        terms=("loss_kd_teachdetr_cls", "loss_kd_teachdetr_bbox", "loss_kd_teachdetr_giou"),
        families=("detr",),
    )

    teacher_parts = frozenset({"detections"})

    def __init__(
        self,
        *,
        weight: float = 1.0,
        cls_weight: float = 2.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        score_thresh: float = 0.3,
        alpha: float = 0.25,
        gamma: float = 2.0,
        giou_weighting: str = "code",
    ):
        super().__init__()
        if giou_weighting not in ("code", "paper"):
            raise ValueError(
                f"KD.TEACHDETR.GIOU_WEIGHTING must be 'code' or 'paper', got {giou_weighting!r}"
            )
        self.weight = float(weight)
        self.weights = (float(cls_weight), float(bbox_weight), float(giou_weight))
        self.score_thresh = float(score_thresh)
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.giou_weighting = giou_weighting

    @classmethod
    def from_config(cls, node, **_geometry) -> TeachDETR:
        if node is None:
            return cls()
        return cls(
            weight=float(node.WEIGHT),
            cls_weight=float(node.CLS_WEIGHT),
            bbox_weight=float(node.BBOX_WEIGHT),
            giou_weight=float(node.GIOU_WEIGHT),
            score_thresh=float(node.SCORE_THRESH),
            alpha=float(node.ALPHA),
            gamma=float(node.GAMMA),
            giou_weighting=str(node.GIOU_WEIGHTING),
        )

    def unsupported_reason(self, arch: str, dense_softmax: bool) -> str | None:
        return detr_only_reason(self.family, "adds one-to-one matching targets to a DETR decoder")

    def forward(self, student: StepRecord, teacher: StepRecord) -> Mapping[str, Tensor]:
        s = student.queries
        if s is None or teacher.detections is None:
            raise ValueError("TeachDETR needs the student's queries and the teacher's detections")
        size = tuple(student.images.shape[-2:])
        labels, targets, scores = teacher_targets(
            teacher.detections, size, self.score_thresh, compute_dtype(s.logits)
        )
        cls_w, bbox_w, giou_w = self.weights
        totals = [zero_like_loss(s.logits) for _ in range(3)]
        for layer in range(s.logits.shape[0]):
            logits, boxes = s.logits[layer], s.boxes[layer]
            matches = match_to_boxes(
                logits, boxes, labels, targets, alpha=self.alpha, gamma=self.gamma
            )
            terms = teach_detr_losses(
                logits, boxes, labels, targets, scores, matches, self.alpha, self.gamma,
                self.giou_weighting,
            )  # fmt: skip
            totals = [t + v for t, v in zip(totals, terms)]
        cls, l1, giou = totals
        return {
            "loss_kd_teachdetr_cls": cls * (cls_w * self.weight),
            "loss_kd_teachdetr_bbox": l1 * (bbox_w * self.weight),
            "loss_kd_teachdetr_giou": giou * (giou_w * self.weight),
        }
