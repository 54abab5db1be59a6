"""RKD: relational knowledge distillation (Park et al., CVPR 2019) on detection instances.

**Potentials** (mmrazor's ``RelationalKD``, the reference implementation): on ``(M, D)``
embeddings — teacher and student may have different ``D`` —

* distance: ``ψ_D(i, j) = ‖e_i − e_j‖₂ / μ`` with ``μ`` the mean of the non-zero pairwise
  distances of the same set (the diagonal is 0); loss = SmoothL1 (β = 1), **mean over the
  M × M matrix**, between the student's and the teacher's potentials;
* angle: ``ψ_A(i, j, k) = ⟨(e_i − e_j)/‖·‖, (e_k − e_j)/‖·‖⟩``; loss = SmoothL1, mean over the
  M × M × M tensor.

The teacher's potentials are constants (no gradient).

**Instances** (:class:`RKD`, as the Global-Knowledge paper's detection RKD, ``use_rkd``): every
GT box of the batch is pooled (:func:`kd2.ops.box_mean_pool`: mean over the inclusive cells it
covers) on the FPN level the 56-px rule assigns it, from the raw student and teacher maps (no
adapter is needed: the potentials compare within each space), and the embeddings are
L2-normalised (mmrazor's ``with_l2_norm``). With the GT boxes of the whole batch as the set, the
relations also tie objects of different images together, as a batch of embeddings does in the
original RKD. Weights: distance 5, angle 10 (the GK code's detection setting; mmrazor's
classification recipe uses 25 / 50). Fewer than 2 instances (3 for the angle) give 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from kd2.ops import box_mean_pool
from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .utils import assign_fpn_levels, compute_dtype, to_compute, zero_like_loss

__all__ = ["RKD", "pairwise_distances", "rkd_angle_loss", "rkd_distance_loss"]


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """``(M, M)`` Euclidean distances of ``(M, D)`` rows, 0 on the diagonal (fp32, or fp64 for
    fp64 rows). ``eps`` is a lower bound of the squared distances, which keeps the square root's
    gradient finite; it only acts on pairs closer than ``1e-6``, in fp32 and fp64 alike."""
    e = to_compute(e)
    sq = e.pow(2).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2.0 * e @ e.t()).clamp(min=eps).sqrt()
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d.masked_fill(eye, 0.0)


def _normalised_distances(e: Tensor) -> Tensor:
    d = pairwise_distances(e)
    positive = d[d > 0]
    return d / positive.mean() if positive.numel() else d


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD distance loss.

    Args:
        student: ``(M, D_s)`` embeddings.
        teacher: ``(M, D_t)`` embeddings (treated as constants).

    Returns:
        fp32 scalar (fp64 when an input is fp64) ``mean_{i,j} SmoothL1(ψ_D^s(i, j),
        ψ_D^t(i, j))``; ``0`` (with a graph) for ``M < 2``.
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"RKD needs the same M, got {student.shape[0]} and {teacher.shape[0]}")
    if student.shape[0] < 2:
        return zero_like_loss(student)
    dtype = compute_dtype(student, teacher)
    with torch.no_grad():
        t = _normalised_distances(teacher.detach().to(dtype))
    s = _normalised_distances(student.to(dtype))
    return F.smooth_l1_loss(s, t, beta=1.0)


def _angles(e: Tensor) -> Tensor:
    e = to_compute(e)
    diff = e[None, :, :] - e[:, None, :]  # (M, M, D): e_j - e_i at [i, j]
    unit = F.normalize(diff, p=2, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD angle loss.

    Args:
        student: ``(M, D_s)`` embeddings.
        teacher: ``(M, D_t)`` embeddings (treated as constants).

    Returns:
        fp32 scalar (fp64 when an input is fp64) ``mean_{i,j,k} SmoothL1(ψ_A^s, ψ_A^t)`` over
        the ``M³`` triplets; ``0`` (with a graph) for ``M < 3``.
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"RKD needs the same M, got {student.shape[0]} and {teacher.shape[0]}")
    if student.shape[0] < 3:
        return zero_like_loss(student)
    dtype = compute_dtype(student, teacher)
    with torch.no_grad():
        t = _angles(teacher.detach().to(dtype))
    return F.smooth_l1_loss(_angles(student.to(dtype)), t, beta=1.0)


@KD_METHOD_REGISTRY.register()
class RKD(KDMethod):
    """Relational distillation of the GT instances' pooled FPN features.

    Config (``cfg.KD.RKD``): ``DISTANCE_WEIGHT`` (5.0), ``ANGLE_WEIGHT`` (10.0).

    Losses: ``loss_kd_rkd_distance``, ``loss_kd_rkd_angle``. No trainable parameters.
    """

    card = MethodCard(
        title="RKD",
        summary="distance and angle relations of the GT instances' pooled FPN features",
        paper="Park et al., Relational Knowledge Distillation (CVPR 2019)",
        code="open-mmlab/mmrazor (port)",
        project="HeadDistillation",
        terms=("loss_kd_rkd_distance", "loss_kd_rkd_angle"),
        families=("faster_rcnn", "retinanet", "fcos", "gfl", "ssd", "detr"),
    )

    teacher_parts = frozenset({"features"})

    def __init__(
        self,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        *,
        distance_weight: float = 5.0,
        angle_weight: float = 10.0,
    ):
        super().__init__()
        self.strides = sorted(set(student_channels) & set(teacher_channels))
        if not self.strides:
            raise ValueError("RKD needs FPN levels of the same stride in student and teacher")
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)

    @classmethod
    def from_config(
        cls,
        node,
        *,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        num_classes: int,
        arch: str,
    ) -> RKD:
        return cls(
            student_channels,
            teacher_channels,
            distance_weight=node.DISTANCE_WEIGHT,
            angle_weight=node.ANGLE_WEIGHT,
        )

    def instance_embeddings(
        self, student: StepRecord, teacher: StepRecord
    ) -> tuple[Tensor, Tensor]:
        """``(M, C_s)`` and ``(M, C_t)`` L2-normalised embeddings of the batch's GT boxes."""
        strides = [s for s in self.strides if s in student.features and s in teacher.features]
        boxes = torch.cat([to_compute(b) for b in student.gt_boxes]) if student.gt_boxes else None
        ref = student.features[strides[0]]
        if boxes is None or boxes.numel() == 0:
            return ref.new_zeros((0, ref.shape[1])), ref.new_zeros((0, 1))
        boxes = boxes.to(ref.device)
        index = torch.cat(
            [torch.full((len(b),), i, dtype=torch.long) for i, b in enumerate(student.gt_boxes)]
        ).to(ref.device)
        levels = assign_fpn_levels(boxes, len(strides))
        s_parts, t_parts = [], []
        for lvl, st in enumerate(strides):
            sel = (levels == lvl).nonzero().flatten()
            if sel.numel() == 0:
                continue
            dtype = compute_dtype(student.features[st], teacher.features[st])
            s_map = student.features[st].to(dtype)
            s_parts.append(box_mean_pool(s_map, boxes[sel], index[sel], st))
            t_map = teacher.features[st].detach().to(dtype)
            t_parts.append(box_mean_pool(t_map, boxes[sel], index[sel], st))
        s = torch.cat(s_parts)
        t = torch.cat(t_parts)
        return F.normalize(s, p=2, dim=1), F.normalize(t, p=2, dim=1)

    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        s, t = self.instance_embeddings(student, teacher)
        if s.shape[0] == 0:
            zero = zero_like_loss(*student.features.values())
            return {"loss_kd_rkd_distance": zero, "loss_kd_rkd_angle": zero.clone()}
        return {
            "loss_kd_rkd_distance": rkd_distance_loss(s, t) * self.distance_weight,
            "loss_kd_rkd_angle": rkd_angle_loss(s, t) * self.angle_weight,
        }
