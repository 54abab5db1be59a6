"""FRS: distilling object detectors with feature richness (Du et al., NeurIPS 2021).

**Feature-richness mask.** Per FPN level ``l``, from the *teacher's* classification logits of the
anchor head (no GT is used)::

    S_l(n, h, w) = max_j σ(z^t_l(n, j, h, w))          (detached)

where ``j`` runs over **all** channels of the head at that location: ``A·K`` anchor × class
channels for RetinaNet, the ``K`` class channels for FCOS (centerness excluded), the ``A`` RPN
objectness channels for Faster R-CNN (the ROI head is not used).

**Losses** (``φ_l``: one Conv3×3 adapter per level, no activation)::

    L_FPN  = Σ_l  Σ_{n,c,h,w} S_l · (F^t_l − φ_l(F^s_l))²        / Σ_{n,h,w} S_l
    L_head = Σ_l  Σ_{n,j,h,w} S_l · BCE(σ(z^s_l), σ(z^t_l))      / Σ_{n,h,w} S_l
    L      = L_det + min(1, iter / WARMUP_ITERS) · (α · L_FPN + β · L_head)

Notes following the released code rather than a literal reading of the paper
(``docs/algorithms.md`` §2 and §8 items 12-15):

* the per-level terms are **summed** over levels, not averaged;
* the squared error is **summed over channels** per location; the normaliser counts locations
  only (``Σ_{n,h,w} S``), so the mask weighs every channel of a location alike;
* the head BCE uses soft targets ``p_t = σ(z_t)`` over all channels and is, by default, the
  released code's own value: ``F.binary_cross_entropy(σ(z_s), σ(z_t))`` on fp32 probabilities
  (duzhixing/FRS ``detectors/distill_frs_single.py`` l. 61-70, ``distill_frs_two.py`` l. 91-100;
  kd2 runs it with autocast off). That is **not** the logit form ``BCE_with_logits(z_s, p_t)``
  wherever the student's logit saturates: fp32 ``σ(z)`` rounds to exactly 1 for ``z ≳ 16.64``,
  torch clamps the resulting ``log(1 − p) = −∞`` at −100, so such a logit costs
  ``100 · (1 − p_t)`` instead of ``≈ z · (1 − p_t)`` (``z = 20``, ``p_t = 0.5``: 50 instead of
  10) and gets **no gradient** (``σ'(z) = 0`` in fp32), where the logit form pulls it with
  ``1 − p_t``; below ``z ≈ −27.6`` torch's ``ε = 1e-12`` in the BCE backward makes the gradient
  fade to 0 as well (logit form: ``−p_t``), and below ``z ≈ −88`` (``σ`` underflows to 0) the
  value is clamped to ``100 · p_t``. Between ``z ≈ 12.2`` and 16.64 the rounding of
  ``1 − σ(z)`` already moves the value by 0.1 % to 4.1 %. Over 10⁶ logits ``z_s ~ N(−4, 3²)``
  with targets ``σ(N(−4, 3²))``, the mean BCE of the two forms agrees to fp32 precision when no
  logit saturates, and the released one is +9 % higher when 0.1 % of the logits lie in
  ``[17, 25]``, +50 % at 0.6 %, +215 % at 5 %, ×4.8 when all do. ``KD.FRS.BCE_FROM_LOGITS``
  switches to the stable logit form (the value of the released code only where ``z_s ≲ 12``);
* the warm-up ``min(1, iter / 500)`` is FRS's own (the ``Increase_Hook``); it multiplies both
  terms and stacks with the global ``KD.WARMUP_ITERS`` (0 by default).

Default weights (``-1`` in the config): Faster R-CNN α = 0.002, β = 0.1 (on RPN objectness);
RetinaNet α = 0.005, β = 0.02; FCOS α = 0.01, β = 0.05. A one-stage record whose dense head has
centerness is treated as FCOS, otherwise as RetinaNet.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from kd2.losses.adapters import FeatureAdapter
from kd2.structures import DenseOutputs, StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .utils import (
    adapt_features,
    compute_dtype,
    detector_family,
    require_sigmoid_dense,
    shared_strides,
    to_compute,
)

__all__ = ["FRS", "FRS_DEFAULT_WEIGHTS", "feature_richness", "frs_feature_loss", "frs_head_loss"]

#: The paper's ``(α, β)`` per detector family (``docs/algorithms.md`` §2.2).
FRS_DEFAULT_WEIGHTS: dict[str, tuple[float, float]] = {
    "faster_rcnn": (0.002, 0.1),
    "retinanet": (0.005, 0.02),
    "fcos": (0.01, 0.05),
    "gfl": (0.1, 0.05),
}


def feature_richness(teacher_cls_logits: Tensor) -> Tensor:
    """The feature-richness score of one level: the max over channels of the sigmoid.

    Args:
        teacher_cls_logits: ``(N, C, H, W)`` raw classification logits of the teacher's head at one
            level (``C = A·K``, ``K`` or ``A``).

    Returns:
        ``(N, 1, H, W)`` fp32 (fp64 for fp64 logits) scores in ``[0, 1]``, detached.
    """
    if teacher_cls_logits.dim() != 4:
        raise ValueError(
            f"feature_richness expects (N, C, H, W) logits, got {tuple(teacher_cls_logits.shape)}"
        )
    return torch.sigmoid(to_compute(teacher_cls_logits.detach())).amax(dim=1, keepdim=True)


def _check_mask(x: Tensor, mask: Tensor, what: str, dtype: torch.dtype) -> Tensor:
    """Validate a ``(N, 1, H, W)`` mask against a ``(N, C, H, W)`` map; returns it detached, in
    ``dtype``."""
    if x.dim() != 4 or mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(
            f"{what}: expected (N, C, H, W) maps and an (N, 1, H, W) mask, got "
            f"{tuple(x.shape)} and {tuple(mask.shape)}"
        )
    if mask.shape[0] != x.shape[0] or mask.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"{what}: mask {tuple(mask.shape)} does not fit maps {tuple(x.shape)}")
    return mask.detach().to(dtype)


def _normalise(weighted_sum: Tensor, mask: Tensor) -> Tensor:
    """``weighted_sum / Σ mask``, ``0`` (with the graph kept) when the mask sums to 0."""
    den = mask.sum()
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, weighted_sum / safe, weighted_sum * 0.0)


def frs_feature_loss(student_feat: Tensor, teacher_feat: Tensor, mask: Tensor) -> Tensor:
    """Richness-weighted feature imitation on one level.

    Args:
        student_feat: ``(N, C, H, W)`` student map, already adapted to the teacher's channels.
        teacher_feat: ``(N, C, H, W)`` teacher map (treated as a constant).
        mask: ``(N, 1, H, W)`` non-negative weights (treated as a constant).

    Returns:
        0-dim fp32 (fp64 when an input is fp64) ``Σ_{n,c,h,w} mask · (t − s)² / Σ_{n,h,w} mask``
        (``0`` when the mask sums to 0); gradients reach ``student_feat`` only.
    """
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"frs_feature_loss: student {tuple(student_feat.shape)} and teacher "
            f"{tuple(teacher_feat.shape)} maps differ in shape"
        )
    dtype = compute_dtype(student_feat, teacher_feat, mask)
    m = _check_mask(student_feat, mask, "frs_feature_loss", dtype)
    diff = (teacher_feat.detach().to(dtype) - student_feat.to(dtype)).pow(2)
    return _normalise((diff * m).sum(), m)


def frs_head_loss(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, from_logits: bool = False
) -> Tensor:
    """Richness-weighted soft-target BCE between the sigmoid heads of one level.

    Args:
        student_logits: ``(N, C, H, W)`` raw student logits.
        teacher_logits: ``(N, C, H, W)`` raw teacher logits (treated as a constant).
        mask: ``(N, 1, H, W)`` non-negative weights (treated as a constant).
        from_logits: ``False`` (default): the released code's
            ``F.binary_cross_entropy(σ(z_s), σ(z_t))`` on fp32 probabilities, logs clamped at
            −100 by torch (``duzhixing/FRS`` ``detectors/distill_frs_single.py`` l. 67); ``True``:
            the stable ``binary_cross_entropy_with_logits(z_s, σ(z_t))``. The two differ where
            ``z_s`` saturates (see the module docstring).

    Returns:
        0-dim fp32 ``Σ_{n,j,h,w} mask · BCE(σ(z_s), σ(z_t)) / Σ_{n,h,w} mask`` with
        ``BCE(p, q) = −[q max(log p, −100) + (1 − q) max(log(1 − p), −100)]``; ``0`` when the
        mask sums to 0; gradients reach ``student_logits`` only (finite everywhere: ``|∂/∂z_s|
        ≤ |σ(z_s) − q|``, 0 where ``σ(z_s)`` saturates in fp32). Computed in fp32, or in fp64
        when an input is fp64: then ``σ(z)`` rounds to 1 only for ``z ≳ 36.7``, and the gradient
        is exact except where torch's fixed ``ε = 1e-12`` in the BCE backward
        (``max(p (1 − p), ε)``) bites, ``|z_s| ≳ 27.6``, as in fp32.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"frs_head_loss: student {tuple(student_logits.shape)} and teacher "
            f"{tuple(teacher_logits.shape)} logits differ in shape"
        )
    dtype = compute_dtype(student_logits, teacher_logits, mask)
    m = _check_mask(student_logits, mask, "frs_head_loss", dtype)
    target = torch.sigmoid(teacher_logits.detach().to(dtype))
    z = student_logits.to(dtype)
    if from_logits:
        bce = F.binary_cross_entropy_with_logits(z, target, reduction="none")
    else:
        # the released value; autocast refuses binary_cross_entropy (and would not keep fp32)
        with torch.autocast(device_type=z.device.type, enabled=False):
            bce = F.binary_cross_entropy(torch.sigmoid(z), target, reduction="none")
    return _normalise((bce * m).sum(), m)


def _level_maps(head: DenseOutputs) -> dict[int, Tensor]:
    """``{stride: (N, A·K, H_l, W_l)}`` classification logits of a dense head / RPN."""
    return dict(zip(head.strides, head.level_maps(head.cls_logits)))


@KD_METHOD_REGISTRY.register()
class FRS(KDMethod):
    """Feature-richness score distillation of the FPN and the anchor head's classifier.

    Config (``cfg.KD.FRS``): ``WEIGHT_FEAT`` (α), ``WEIGHT_CLS`` (β), both ``-1`` = the paper's
    value for the detector (see :data:`FRS_DEFAULT_WEIGHTS`), ``WARMUP_ITERS`` (500, ``0`` = no
    warm-up), ``ADAPTER_KERNEL`` (3), ``BCE_FROM_LOGITS`` (False: the released probability BCE;
    True: the logit form, see :func:`frs_head_loss`).

    Losses: ``loss_kd_frs_feat`` (α · L_FPN) and ``loss_kd_frs_cls`` (β · L_head), both times
    ``min(1, iter / WARMUP_ITERS)`` with ``iter`` from :meth:`before_step`. The mask and the head
    term use the one-stage head (``dense``) for ``arch == "one_stage"`` and the RPN objectness
    (``rpn``) for ``arch == "two_stage"``.
    """

    card = MethodCard(
        title="FRS",
        summary="feature richness: FPN and head imitation under the teacher-score mask",
        paper="Du et al., Feature Richness (NeurIPS 2021)",
        code="duzhixing/FRS",
        project="FRS",
        terms=("loss_kd_frs_feat", "loss_kd_frs_cls"),
        families=("faster_rcnn", "retinanet", "fcos", "gfl"),
    )

    dense_across_families = True  # reads the teacher's class logits only

    def __init__(
        self,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        *,
        arch: str,
        weight_feat: float = -1.0,
        weight_cls: float = -1.0,
        warmup_iters: int = 500,
        adapter_kernel: int = 3,
        bce_from_logits: bool = False,
    ):
        super().__init__()
        if arch not in ("one_stage", "two_stage"):
            raise ValueError(f"FRS arch must be 'one_stage' or 'two_stage', got {arch!r}")
        self.bce_from_logits = bool(bce_from_logits)
        if warmup_iters < 0:
            raise ValueError(f"FRS WARMUP_ITERS must be >= 0, got {warmup_iters}")
        self.arch = arch
        self.head_part = "rpn" if arch == "two_stage" else "dense"
        self.teacher_parts = frozenset({"features", self.head_part})
        self.weight_feat = float(weight_feat)
        self.weight_cls = float(weight_cls)
        self.warmup_iters = int(warmup_iters)
        self.iteration = 0
        self.adapter = FeatureAdapter(student_channels, teacher_channels, int(adapter_kernel))

    @classmethod
    def from_config(
        cls,
        node,
        *,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        num_classes: int,
        arch: str,
    ) -> FRS:
        return cls(
            student_channels,
            teacher_channels,
            arch=arch,
            weight_feat=node.WEIGHT_FEAT,
            weight_cls=node.WEIGHT_CLS,
            warmup_iters=node.WARMUP_ITERS,
            adapter_kernel=node.ADAPTER_KERNEL,
            bce_from_logits=node.BCE_FROM_LOGITS,
        )

    def before_step(self, iteration: int) -> None:
        """Store the iteration for the warm-up factor."""
        self.iteration = int(iteration)

    def warmup_factor(self) -> float:
        """``min(1, iteration / WARMUP_ITERS)`` (1 when the warm-up is off)."""
        if self.warmup_iters <= 0:
            return 1.0
        return min(1.0, max(0.0, self.iteration / self.warmup_iters))

    def detector_family(self, student: StepRecord) -> str:
        """``"faster_rcnn"``, ``"gfl"``, ``"fcos"`` (dense head with centerness) or
        ``"retinanet"``."""
        if self.arch == "one_stage":
            require_sigmoid_dense("FRS", student.dense)
        return detector_family(self.arch, student)

    def resolved_weights(self, student: StepRecord) -> tuple[float, float]:
        """``(α, β)``: the configured values, negative ones replaced by the paper's."""
        alpha, beta = FRS_DEFAULT_WEIGHTS[self.detector_family(student)]
        return (
            alpha if self.weight_feat < 0 else self.weight_feat,
            beta if self.weight_cls < 0 else self.weight_cls,
        )

    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        s_head: DenseOutputs | None = getattr(student, self.head_part)
        t_head: DenseOutputs | None = getattr(teacher, self.head_part)
        if s_head is None or t_head is None:
            raise ValueError(
                f"FRS ({self.arch}) needs the '{self.head_part}' head in both the student and the "
                "teacher records"
            )
        t_logits = _level_maps(t_head)
        s_logits = _level_maps(s_head)
        masks = {st: feature_richness(z) for st, z in t_logits.items()}

        # L_FPN on the strides shared by the adapter, both feature dicts and the mask levels.
        strides = [
            s
            for s in shared_strides(self.adapter, student.features, teacher.features)
            if s in masks
        ]
        if not strides:
            raise ValueError(
                f"no head stride {sorted(masks)} is among the shared feature strides "
                f"{self.adapter.strides}"
            )
        s_feats, t_feats = adapt_features(self.adapter, student.features, teacher.features, strides)
        loss_feat = None
        for st, sf, tf in zip(strides, s_feats, t_feats):
            term = frs_feature_loss(sf, tf, masks[st])
            loss_feat = term if loss_feat is None else loss_feat + term

        # L_head on every head level present in both records.
        head_strides = [st for st in t_head.strides if st in s_logits]
        if not head_strides:
            raise ValueError(
                f"student head strides {s_head.strides} and teacher head strides "
                f"{t_head.strides} have none in common"
            )
        loss_cls = None
        for st in head_strides:
            term = frs_head_loss(s_logits[st], t_logits[st], masks[st], self.bce_from_logits)
            loss_cls = term if loss_cls is None else loss_cls + term

        alpha, beta = self.resolved_weights(student)
        factor = self.warmup_factor()
        return {
            "loss_kd_frs_feat": loss_feat * (alpha * factor),
            "loss_kd_frs_cls": loss_cls * (beta * factor),
        }
