"""KD-DETR: the teacher and the student answer the same distillation points (Wang et al., KD-DETR:
Knowledge Distillation for Detection Transformer with Consistent Distillation Points Sampling,
CVPR 2024; Myleswork/KD-DETR, DAB-DETR).

DETR students and teachers select different queries, so their predictions do not correspond. KD-DETR
decodes one extra set of query points with **both** decoders; answer ``i`` of the student and
answer ``i`` of the teacher are about the same point, and no matching is needed. Two groups of
points, each decoded on its own (:attr:`kd2.structures.QueryOutputs.points`, filled by the
backend: :mod:`kd2.hf.points`):

* ``teacher`` ("specific" points): the teacher's own selected queries — the official code uses
  the DAB-DETR teacher's learned anchor boxes; an RT-DETR-family teacher's queries are its
  top-k encoder boxes of the image;
* ``random`` ("general" points): ``RANDOM_POINTS`` boxes drawn each step as the official code
  draws them, ``sigmoid`` of standard-normal ``cxcywh`` (300 in its training script).

On each group, every student decoder layer learns the teacher's **last** layer (the official
``KDCriterion``), each point weighted by the teacher's confidence ``w = max_k sigmoid(t_k)``:

* classes: ``Σ_i w_i · T² · mean_k KL(softmax(t_i / T) ‖ softmax(s_i / T))_k`` with ``T = 10``
  — the official code's softmax over the classes, averaged over them and **summed** over the
  points (not normalised);
* boxes: ``Σ_i w_i · mean(|s_i − t_i|) / Σ_i w_i`` (L1 on normalised ``cxcywh``) and
  ``Σ_i w_i · (1 − GIoU_i) / Σ_i w_i``;
* ``loss = WEIGHT · (CLS_WEIGHT · cls + BBOX_WEIGHT · L1 + GIOU_WEIGHT · GIoU)`` with the official
  1 / 5 / 2, one term set per group.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .query_matching import cxcywh_to_xyxy
from .utils import aligned_box_iou, compute_dtype, detr_only_reason, softmax_kl_div, zero_like_loss

__all__ = ["KDDETR", "point_losses"]

#: the point groups, in the order their terms are reported
GROUPS = ("teacher", "random")


def point_losses(
    student_logits: Tensor,
    student_boxes: Tensor,
    teacher_logits: Tensor,
    teacher_boxes: Tensor,
    temperature: float = 10.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """KD-DETR's losses of one decoder layer on one group of points.

    Args:
        student_logits / teacher_logits: ``(N, P, K)`` class logits of the same points.
        student_boxes / teacher_boxes: ``(N, P, 4)`` normalised ``cxcywh``.
        temperature: of the class distributions (the official 10).

    Returns:
        ``(cls, l1, giou)``: the confidence-weighted KL summed over the points, and the weighted
        means of the L1 and GIoU losses (teacher tensors treated as constants).
    """
    k = student_logits.shape[-1]
    s_logits, t_logits = student_logits.reshape(-1, k), teacher_logits.reshape(-1, k).detach()
    if s_logits.shape[0] == 0:
        zero = zero_like_loss(student_logits, student_boxes)
        return zero, zero, zero
    dtype = compute_dtype(student_logits, student_boxes)
    weight = t_logits.to(dtype).sigmoid().amax(-1)
    cls = (softmax_kl_div(s_logits, t_logits, temperature) / k * weight).sum()
    s_boxes = student_boxes.reshape(-1, 4).to(dtype)
    t_boxes = teacher_boxes.reshape(-1, 4).detach().to(dtype)
    norm = weight.sum().clamp(min=torch.finfo(dtype).tiny)
    l1 = ((s_boxes - t_boxes).abs().mean(-1) * weight).sum() / norm
    giou = aligned_box_iou(cxcywh_to_xyxy(s_boxes), cxcywh_to_xyxy(t_boxes), giou=True)
    return cls, l1, ((1 - giou) * weight).sum() / norm


@KD_METHOD_REGISTRY.register()
class KDDETR(KDMethod):
    """KD-DETR (module docstring). Config ``KD.KDDETR``: ``WEIGHT`` (1), ``CLS_WEIGHT`` /
    ``BBOX_WEIGHT`` / ``GIOU_WEIGHT`` (1 / 5 / 2), ``TEMPERATURE`` (10), ``TEACHER_POINTS``
    (True), ``RANDOM_POINTS`` (300)."""

    card = MethodCard(
        title="KD-DETR",
        summary="teacher and student decode the same distillation points (the teacher's queries "
        "and random boxes): KL on classes, L1 + GIoU on boxes, weighted by teacher confidence",
        paper="Wang et al., KD-DETR: Knowledge Distillation for Detection Transformer with "
        "Consistent Distillation Points Sampling (CVPR 2024)",
        code="Myleswork/KD-DETR",
        project="DETRDistillation",
        terms=tuple(f"loss_kd_kddetr_{g}_{t}" for g in GROUPS for t in ("cls", "bbox", "giou")),
        families=("detr",),
    )

    teacher_parts = frozenset({"points"})

    def __init__(
        self,
        *,
        weight: float = 1.0,
        cls_weight: float = 1.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        temperature: float = 10.0,
        teacher_points: bool = True,
        random_points: int = 300,
    ):
        super().__init__()
        if random_points < 0 or (not teacher_points and random_points == 0):
            raise ValueError(
                "KD.KDDETR needs distillation points: TEACHER_POINTS True or RANDOM_POINTS > 0, "
                f"got {teacher_points} and {random_points}"
            )
        self.weight = float(weight)
        self.weights = (float(cls_weight), float(bbox_weight), float(giou_weight))
        self.temperature = float(temperature)
        groups = {"teacher": 0} if teacher_points else {}
        if random_points:
            groups["random"] = int(random_points)
        self.point_groups = groups

    @classmethod
    def from_config(cls, node, **_geometry) -> KDDETR:
        if node is None:
            return cls()
        return cls(
            weight=float(node.WEIGHT),
            cls_weight=float(node.CLS_WEIGHT),
            bbox_weight=float(node.BBOX_WEIGHT),
            giou_weight=float(node.GIOU_WEIGHT),
            temperature=float(node.TEMPERATURE),
            teacher_points=bool(node.TEACHER_POINTS),
            random_points=int(node.RANDOM_POINTS),
        )

    def unsupported_reason(self, arch: str, dense_softmax: bool) -> str | None:
        return detr_only_reason(
            self.family, "decodes distillation points with the student's DETR decoder"
        )

    def forward(self, student: StepRecord, teacher: StepRecord) -> Mapping[str, Tensor]:
        s = student.queries.points if student.queries is not None else None
        t = teacher.queries.points if teacher.queries is not None else None
        if s is None or t is None:
            raise ValueError("KDDETR needs both records' answers to the distillation points")
        cls_w, bbox_w, giou_w = self.weights
        out = {}
        for group in GROUPS:
            if group not in self.point_groups:
                continue
            (s_logits, s_boxes), (t_logits, t_boxes) = s[group], t[group]
            totals = [zero_like_loss(s_logits, s_boxes) for _ in range(3)]
            for layer in range(s_logits.shape[0]):
                terms = point_losses(
                    s_logits[layer], s_boxes[layer], t_logits[-1], t_boxes[-1], self.temperature
                )
                totals = [a + b for a, b in zip(totals, terms)]
            cls, l1, giou = totals
            out[f"loss_kd_kddetr_{group}_cls"] = cls * (cls_w * self.weight)
            out[f"loss_kd_kddetr_{group}_bbox"] = l1 * (bbox_w * self.weight)
            out[f"loss_kd_kddetr_{group}_giou"] = giou * (giou_w * self.weight)
        return out
