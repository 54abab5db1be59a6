"""Rank Mimicking (RM) of Li et al., "Knowledge Distillation for Object Detection via Rank
Mimicking and Prediction-guided Feature Imitation" (AAAI 2022).

The teacher's *ranking distribution* over the candidate anchors of each object is distilled
into the student. For object ``g`` with positive anchors ``A_g``::

    p^t_g = softmax(s^t_g / T),  p^s_g = softmax(s^s_g / T)      (over the |A_g| anchors)
    L_RM  = mean_{images with objects} mean_{g in image} KL(p^t_g ‖ p^s_g)

where ``s_{g,j}`` is the **raw logit** of anchor ``j`` for g's GT class. No official code is
known; the choices below follow ``docs/algorithms.md`` §3.1 (the "recommended faithful
reading"):

* **Logits, not probabilities.** The softmax runs over the raw classification logits. The final
  third-party mmrazor version applied it to sigmoid probabilities, which squashes the
  distribution towards uniform and weakens the ranking signal.
* **No sorting.** Teacher and student scores are compared anchor by anchor (anchor ``j`` of the
  teacher against anchor ``j`` of the student). Sorting the two vectors independently, as the
  final mmrazor version does, would match score profiles rather than rankings.
* **One positive set.** The teacher's dense head runs on the student's anchors and the label
  assignment in ``student.dense.labels`` is shared, so the student's positive set is the
  teacher's (for RetinaNet/ATSS/FCOS the assignment depends only on anchors and GT anyway).
* **T = 1** by default and the KL is **not** multiplied by ``T²``; gradients reach only the
  student scores (the teacher's are detached).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .utils import (
    compute_dtype,
    object_ids,
    require_one_stage,
    require_sigmoid_dense,
    zero_like_loss,
)

__all__ = ["RM", "dense_positive_scores", "rank_mimicking_loss"]


def _segment_log_softmax(x: Tensor, seg: Tensor, num_segments: int) -> Tensor:
    """Log-softmax of ``x`` within each segment.

    Args:
        x: ``(P,)`` fp32 or fp64 values.
        seg: ``(P,)`` int64 segment index in ``[0, num_segments)``.
        num_segments: ``G``.

    Returns:
        ``(P,)`` ``x_j − logsumexp_{i in seg(j)} x_i``.
    """
    seg_max = torch.full((num_segments,), float("-inf"), dtype=x.dtype, device=x.device)
    seg_max = seg_max.scatter_reduce(0, seg, x.detach(), reduce="amax", include_self=True)
    shifted = x - seg_max[seg]
    sum_exp = torch.zeros(num_segments, dtype=x.dtype, device=x.device).index_add(
        0, seg, shifted.exp()
    )
    return shifted - sum_exp.log()[seg]


def rank_mimicking_loss(
    student_scores: Tensor,
    teacher_scores: Tensor,
    object_ids: Tensor,
    image_ids: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """Rank-mimicking KL over the positive anchors of a batch (vectorised, no loop over objects).

    Args:
        student_scores: ``(P,)`` student logit of each positive anchor for its GT's class.
        teacher_scores: ``(P,)`` teacher logit, same anchors in the same order (detached here).
        object_ids: ``(P,)`` integer id of the object each anchor is assigned to, unique within
            the batch (any integers; they need not be contiguous).
        image_ids: ``(P,)`` integer id of the image of each anchor (all anchors of one object
            must share it).
        temperature: ``T``; both score vectors are divided by it before the softmax.

    Returns:
        fp32 scalar (fp64 when a score vector is fp64): per object
        ``KL(softmax(t/T) ‖ softmax(s/T))`` over its anchors, averaged
        over the objects of each image, then over the images that have objects. ``0`` (with a
        graph to ``student_scores``) when ``P == 0``.
    """
    if not (student_scores.shape == teacher_scores.shape == object_ids.shape == image_ids.shape):
        raise ValueError(
            "rank_mimicking_loss needs 1-D inputs of one shape, got "
            f"{tuple(student_scores.shape)}, {tuple(teacher_scores.shape)}, "
            f"{tuple(object_ids.shape)}, {tuple(image_ids.shape)}"
        )
    if student_scores.dim() != 1:
        raise ValueError(f"rank_mimicking_loss needs 1-D inputs, got {student_scores.dim()}-D")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_scores.numel() == 0:
        return zero_like_loss(student_scores)

    t = float(temperature)
    obj_uniq, obj = torch.unique(object_ids, return_inverse=True)  # obj: (P,) in [0, G)
    img_uniq, img = torch.unique(image_ids, return_inverse=True)  # img: (P,) in [0, I)
    num_obj, num_img = obj_uniq.numel(), img_uniq.numel()

    dtype = compute_dtype(student_scores, teacher_scores)
    log_p_s = _segment_log_softmax(student_scores.to(dtype) / t, obj, num_obj)
    log_p_t = _segment_log_softmax(teacher_scores.detach().to(dtype) / t, obj, num_obj)
    kl_terms = log_p_t.exp() * (log_p_t - log_p_s)  # (P,)
    kl_obj = torch.zeros(num_obj, dtype=kl_terms.dtype, device=kl_terms.device).index_add(
        0, obj, kl_terms
    )  # (G,)

    # image of each object (every anchor of an object carries the same image id)
    obj_img = torch.zeros(num_obj, dtype=torch.long, device=img.device).scatter(0, obj, img)
    ones = torch.ones(num_obj, dtype=kl_obj.dtype, device=kl_obj.device)
    objs_per_img = torch.zeros(num_img, dtype=kl_obj.dtype, device=kl_obj.device).index_add(
        0, obj_img, ones
    )  # (I,) >= 1: every listed image has at least one object
    kl_img = torch.zeros(num_img, dtype=kl_obj.dtype, device=kl_obj.device).index_add(
        0, obj_img, kl_obj
    )
    return (kl_img / objs_per_img).mean()


def dense_positive_scores(
    student: StepRecord, teacher: StepRecord
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gather the RM inputs from a pair of one-stage records.

    Positives are the anchors whose ``student.dense.labels`` lie in ``[0, K)``. **Object ids**
    are derived from ``student.dense.matched_gt_boxes``: within one image, positive anchors with
    identical matched boxes belong to the same object (``torch.unique`` over the
    ``(image, x1, y1, x2, y2)`` rows). Two GTs with exactly the same box in one image are thus
    merged into one object.

    Returns:
        ``(student_scores, teacher_scores, object_ids, image_ids)``, each ``(P,)``; the scores
        are the logits of each anchor's assigned class.
    """
    sd, td = student.dense, teacher.dense
    if sd is None or td is None:
        raise ValueError("RM needs the dense (one-stage) head in both the student and teacher")
    if sd.labels is None or sd.matched_gt_boxes is None:
        raise ValueError("RM needs student.dense.labels and student.dense.matched_gt_boxes")
    require_sigmoid_dense("RM (rank mimicking)", sd)
    s_logits = torch.cat(sd.cls_logits, dim=1)  # (N, ΣR, K)
    t_logits = torch.cat(td.cls_logits, dim=1)
    if s_logits.shape != t_logits.shape:
        raise ValueError(
            f"student dense logits {tuple(s_logits.shape)} and teacher dense logits "
            f"{tuple(t_logits.shape)} differ; RM needs the teacher head on the same anchors"
        )
    k = sd.num_classes
    labels = sd.labels
    pos = (labels >= 0) & (labels < k)  # (N, ΣR)
    img, anc = pos.nonzero(as_tuple=True)  # (P,), (P,)
    cls = labels[img, anc]
    s_scores = s_logits[img, anc, cls]
    t_scores = t_logits[img, anc, cls]
    obj, _ = object_ids(img, sd.matched_gt_boxes[img, anc])
    return s_scores, t_scores, obj, img


@KD_METHOD_REGISTRY.register()
class RM(KDMethod):
    """Rank Mimicking on the dense head of a one-stage detector.

    Config (``cfg.KD.RM``): ``WEIGHT`` (4.0), ``TEMPERATURE`` (1.0). Loss: ``loss_kd_rm``.
    Reads the teacher's dense head run on the student's anchors; the assignment (positives and
    matched GT boxes) comes from the student record. See the module docstring for the choices.
    """

    card = MethodCard(
        title="Rank Mimicking",
        summary="the teacher's ranking of each object's candidate boxes",
        paper="Li et al., Rank Mimicking and Prediction-guided Feature Imitation (AAAI 2022)",
        code="open-mmlab/mmrazor (unmerged commits, port)",
        project="RankMimicking",
        terms=("loss_kd_rm",),
        families=("retinanet", "fcos", "gfl"),
    )

    dense_across_families = True  # reads the teacher's class logits only

    teacher_parts = frozenset({"dense"})

    def __init__(self, *, weight: float = 4.0, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"RM temperature must be positive, got {temperature}")
        self.weight = float(weight)
        self.temperature = float(temperature)

    @classmethod
    def from_config(
        cls,
        node,
        *,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        num_classes: int,
        arch: str,
    ) -> RM:
        require_one_stage("RM (rank mimicking)", arch)
        return cls(
            weight=node.WEIGHT,
            temperature=node.TEMPERATURE,
        )

    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        s, t, obj, img = dense_positive_scores(student, teacher)
        if s.numel() == 0:
            loss = zero_like_loss(*student.dense.cls_logits)
        else:
            loss = rank_mimicking_loss(s, t, obj, img, self.temperature)
        return {"loss_kd_rm": loss * self.weight}
