"""Localization distillation for D-FINE / DEIM students: the teacher's per-edge distributions teach
the student's (D-FINE's decoupled distillation focal loss, between two networks).

D-FINE regresses each box edge as a distribution over ``B + 1`` bins (fine-grained distribution
refinement) and, inside one model, distils its last decoder layer's distributions into the earlier
layers (GO-LSD: ``loss_ddf``, transformers ``DFineLoss.loss_local``). kd2 applies the same loss
with a **teacher** D-FINE / DEIM as the source:

1. each student query is paired with a teacher query (:func:`~kd2.losses.query_matching.
   match_queries` on the last layers' predictions: the two networks select different queries);
2. every student decoder layer's distributions of the paired queries learn the teacher's final
   ones: per edge ``T² · KL(softmax(t / T) ‖ softmax(s / T))`` (``T = 5``), weighted per query —
   by the IoU of the student's box with its ground-truth box for the queries the student's own
   Hungarian assignment matched, by the teacher query's confidence (max class sigmoid) for the
   others — exactly D-FINE's weights;
3. matched and unmatched edges are averaged separately and combined with weights
   ``√(n_pos / N)`` and ``√(n_neg / N)`` (``N`` images), as D-FINE does;
4. the layers' losses are summed (D-FINE gives each earlier layer its own ``loss_ddf_aux_<i>``
   term at the same weight) and multiplied by ``WEIGHT`` (1.5, D-FINE's and RT-DETRv4's DDF
   weight).

Two distributions compare only with the same bins and weighting function: a teacher whose
``max_num_bins``, ``reg_scale`` or ``up`` differ from the student's is refused with both
settings. The edges are read relative to each network's own reference box; a paired query's two
references differ by as much as the two networks' first-layer boxes do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from kd2.structures import QueryOutputs, StepRecord
from kd2.utils.errors import ConfigError

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .query_matching import cxcywh_to_xyxy, match_queries
from .utils import aligned_box_iou, compute_dtype, softmax_kl_div, zero_like_loss

__all__ = ["DFineLD", "decoupled_distillation_loss"]


def decoupled_distillation_loss(
    student_corners: Tensor,
    teacher_corners: Tensor,
    weights: Tensor,
    positive: Tensor,
    num_images: int,
    temperature: float = 5.0,
) -> Tensor:
    """D-FINE's decoupled distillation focal loss of paired queries.

    Args:
        student_corners / teacher_corners: ``(P, 4 * (B + 1))`` per-edge distribution logits of
            ``P`` paired queries (the teacher's treated as constants).
        weights: ``(P,)`` per-query weights (detached).
        positive: ``(P,)`` bool: the query is matched to a ground-truth box.
        num_images: ``N``, the batch size (D-FINE's ``batch_scale``).
        temperature: ``T``.

    Returns:
        a scalar: ``(mean_pos · √n_pos + mean_neg · √n_neg) / (√n_pos + √n_neg)`` over the edges,
        ``n = edges / N``; ``0`` without pairs.
    """
    if student_corners.shape[0] == 0:
        return zero_like_loss(student_corners)
    bins = student_corners.shape[-1] // 4
    s = student_corners.reshape(-1, bins)
    t = teacher_corners.reshape(-1, bins)
    per_edge = softmax_kl_div(s, t, temperature) * weights.detach().repeat_interleave(4).to(s.dtype)
    pos = positive.repeat_interleave(4)
    scale = 1.0 / max(int(num_images), 1)
    n_pos, n_neg = math.sqrt(int(pos.sum()) * scale), math.sqrt(int((~pos).sum()) * scale)
    loss_pos = per_edge[pos].mean() if bool(pos.any()) else per_edge.sum() * 0
    loss_neg = per_edge[~pos].mean() if bool((~pos).any()) else per_edge.sum() * 0
    return (loss_pos * n_pos + loss_neg * n_neg) / (n_pos + n_neg)


def _check_distributions(student: QueryOutputs, teacher: QueryOutputs) -> None:
    if student.corners is None or teacher.corners is None:
        who = "student" if student.corners is None else "teacher"
        raise ConfigError(
            f"DFineLD distils per-edge box distributions, which the {who} (no fine-grained "
            "distribution refinement head) does not predict",
            "use a D-FINE or DEIMv2 student and teacher (MODEL.HF.MODEL_TYPE d_fine / deimv2)",
        )
    if student.distribution != teacher.distribution:
        raise ConfigError(
            f"DFineLD: the teacher's distributions (max_num_bins, reg_scale, up) = "
            f"{teacher.distribution} differ from the student's {student.distribution}, so "
            "their bins mean different offsets",
            "give both models the same max_num_bins, reg_scale and up",
        )


@KD_METHOD_REGISTRY.register()
class DFineLD(KDMethod):
    """D-FINE's decoupled distillation focal loss from a teacher D-FINE / DEIM (module
    docstring). Config ``KD.DFINELD``: ``WEIGHT`` (1.5), ``TEMPERATURE`` (5),
    ``LAYERS`` (``"all"`` decoder layers, as GO-LSD, or ``"last"``)."""

    card = MethodCard(
        title="D-FINE localization KD",
        summary="the teacher's per-edge box distributions teach every student decoder layer "
        "(D-FINE's DDF loss between two networks)",
        paper="Peng et al., D-FINE: Fine-grained Distribution Refinement (ICLR 2025)",
        code="Peterande/D-FINE",
        project="DETRDistillation",
        terms=("loss_kd_dfine_ld",),
        families=("detr",),
    )

    teacher_parts = frozenset({"queries"})

    def __init__(self, *, weight: float = 1.5, temperature: float = 5.0, layers: str = "all"):
        super().__init__()
        if layers not in ("all", "last"):
            raise ValueError(f"KD.DFINELD.LAYERS must be 'all' or 'last', got {layers!r}")
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.layers = layers

    @classmethod
    def from_config(cls, node, **_geometry) -> DFineLD:
        if node is None:
            return cls()
        return cls(
            weight=float(node.WEIGHT),
            temperature=float(node.TEMPERATURE),
            layers=str(node.LAYERS),
        )

    def unsupported_reason(self, arch: str, dense_softmax: bool) -> str | None:
        if self.family not in (None, "detr"):
            return (
                "it distils a DETR decoder's per-edge box distributions, which this detector "
                "does not have. Use a D-FINE or DEIMv2 student (MODEL.BACKEND transformers)"
            )
        return None

    def forward(self, student: StepRecord, teacher: StepRecord) -> Mapping[str, Tensor]:
        s, t = student.queries, teacher.queries
        if s is None or t is None:
            raise ValueError("DFineLD needs the queries part of both records")
        _check_distributions(s, t)
        pairs = match_queries(s.logits[-1], s.boxes[-1], t.logits[-1], t.boxes[-1])
        image = torch.cat([torch.full_like(p[0], i) for i, p in enumerate(pairs)])
        s_idx = torch.cat([p[0] for p in pairs])
        t_idx = torch.cat([p[1] for p in pairs])
        t_corners = t.corners[-1][image, t_idx]
        weights = t.logits[-1][image, t_idx].sigmoid().amax(-1).to(compute_dtype(s.corners))
        positive = torch.zeros_like(s_idx, dtype=torch.bool)
        layers = range(s.corners.shape[0]) if self.layers == "all" else [s.corners.shape[0] - 1]
        total = zero_like_loss(s.corners)
        for layer in layers:
            w, pos = self._gt_weights(s, layer, image, s_idx, student, weights, positive)
            total = total + decoupled_distillation_loss(
                s.corners[layer][image, s_idx],
                t_corners,
                w,
                pos,
                num_images=len(pairs),
                temperature=self.temperature,
            )
        return {"loss_kd_dfine_ld": total * self.weight}

    @staticmethod
    def _gt_weights(s: QueryOutputs, layer, image, s_idx, student, weights, positive):
        """The per-query weights of one layer: the teacher's confidence, replaced by the IoU of
        the layer's box with its ground truth where the student's assignment matched the query."""
        if not s.matched:
            return weights, positive
        w, pos = weights.clone(), positive.clone()
        h, wid = student.images.shape[-2:]
        scale = s.boxes.new_tensor([wid, h, wid, h])
        for i, (q, g) in enumerate(s.matched):
            if q.numel() == 0:
                continue
            sel = image == i
            rows = torch.nonzero(sel).squeeze(1)
            # the paired student queries of image i that its assignment matched to a GT box
            lookup = torch.full((s.num_queries,), -1, dtype=torch.long, device=q.device)
            lookup[q] = g
            gt_of = lookup[s_idx[rows]]
            hit = gt_of >= 0
            if not bool(hit.any()):
                continue
            boxes = cxcywh_to_xyxy(s.boxes[layer][i, s_idx[rows[hit]]].detach()) * scale
            iou = aligned_box_iou(boxes, student.gt_boxes[i][gt_of[hit]].to(boxes.dtype))
            w[rows[hit]] = iou.to(w.dtype)
            pos[rows[hit]] = True
        return w, pos
