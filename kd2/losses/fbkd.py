"""FBKD ("FKD"): attention-guided and non-local distillation (Zhang & Ma, ICLR 2021).

The authors' repository is a README stub; the code (OpenReview supplementary) is ported by
mmrazor, which kd2 follows: ``mmrazor/models/losses/fbkd_loss.py`` (``FBKDLoss.forward``,
``mask_l2_loss``), ``mmrazor/models/architectures/connectors/fbkd_connector.py``
(``FBKDStudentConnector``, ``FBKDTeacherConnector``, ``NonLocal2dMaxpoolNstride``) on top of
mmcv's ``NonLocal2d`` (``mmcv/cnn/bricks/non_local.py``), and
``configs/distill/mmdet/fbkd/fbkd_fpn_faster-rcnn_r101_faster-rcnn_r50_1x_coco.py``. Per FPN
level, with ``F_s`` the raw student map ``(N, C_s, H, W)`` and ``F_t`` the teacher map
``(N, C_t, H, W)`` (detached):

* **Masked feature loss** (:func:`fbkd_spatial_mask`, :func:`fbkd_masked_feature_loss`):
  ``M^S = (A^S(F_t) + A^S(F_s)) / 2`` (detached; ``A^S`` is FGD's
  :func:`~kd2.losses.fgd.spatial_attention` at ``T = 0.5``) and
  ``L_mask = ( Σ_{n,c,h,w} M^S · (F_t − f_1×1(F_s))² )^{1/2}`` — the square root of the sum over
  the whole batch, not a mean. The paper also multiplies by a channel mask ``M^C``; the official
  code computes it but does not use it, and neither does kd2.
* **Attention transfer** (:func:`fbkd_attention_transfer_loss`), the official code's form (not the
  paper's L1 between attention maps): ``L_channel = ‖mean_{hw} F_t − Linear(mean_{hw} F_s)‖₂``
  over the ``(N, C_t)`` matrix and ``L_spatial = ‖mean_c F_t − Conv3×3(mean_c F_s)‖₂`` over the
  ``(N, 1, H, W)`` maps (``torch.dist``: one 2-norm over the whole batch).
* **Non-local distillation** (:class:`NonLocalBlock`, :func:`fbkd_nonlocal_loss`): each side has
  its own dot-product non-local block; ``L_nonlocal = ‖NL_t(F_t) − Conv1×1(NL_s(F_s))‖₂``. Both
  the student-side and the **teacher-side** blocks are trainable: the teacher's features are
  detached, but its non-local block gets this loss's gradient (as in mmrazor, where both
  connectors are optimised).

Level total: ``7e-5 · L_mask + 4e-3 · L_channel + 4e-3 · L_spatial + 7e-5 · L_nonlocal``, summed
over the levels. Published protocol: Faster R-CNN P2–P5. Non-local settings per level (mmrazor
config): P2 reduction 4, ``maxpool_stride`` 8; P3 reduction 4, ``maxpool_stride`` 4; P4/P5
reduction 2, ``maxpool_stride`` 2. kd2 keys them by **stride** (:func:`fbkd_nonlocal_setting`:
stride 4 → (4, 8), stride 8 → (4, 4), any coarser → (2, 2)), which gives exactly these on
Faster R-CNN and, on one-stage detectors (P3–P7), P3 → (4, 4) and P4–P7 → (2, 2).

Where kd2 departs from mmrazor:

* **channels**: mmrazor needs ``C_s == C_t``. kd2 lets the student-side learned layers map
  ``C_s → C_t`` (the 1×1 feature adaptation, the channel ``Linear`` and the 1×1 conv after the
  student non-local block; the student block itself runs on ``C_s``). With equal channels these
  are exactly mmrazor's layers; no extra align conv is stacked before them (the official 1×1
  adaptation conv *is* the alignment).
* every square root (``L_mask`` and the three 2-norms) has gradient ``0`` where its argument is
  ``0`` (the official ``sum ** 0.5`` gives ``nan`` there);
* the non-local pooling kernel is clamped to the map size, so maps smaller than the kernel pool to
  one cell instead of an empty tensor (identical to mmcv's on maps at least ``2·maxpool_stride``
  cells high and wide);
* the non-local output BatchNorm uses its running statistics for a step whose batch has a single
  value per channel (one image, one cell), where training-mode BatchNorm is undefined.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd2.losses.adapters import FeatureAdapter
from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .fgd import spatial_attention
from .utils import (
    adapt_features,
    compute_dtype,
    distill_strides,
    shared_strides,
    to_compute,
)

__all__ = [
    "FBKD",
    "NonLocalBlock",
    "fbkd_attention_transfer_loss",
    "fbkd_masked_feature_loss",
    "fbkd_nonlocal_loss",
    "fbkd_nonlocal_setting",
    "fbkd_spatial_mask",
]


def _safe_sqrt(x: Tensor) -> Tensor:
    """``√x`` for ``x ≥ 0`` with gradient ``0`` (not ``inf · 0 = nan``) at ``x == 0``."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), 0.0 * x)


def _l2_distance(a: Tensor, b: Tensor) -> Tensor:
    """``‖a − b‖₂`` over all elements (``torch.dist``), fp32 (fp64 when ``a`` or ``b`` is),
    gradient 0 at ``a == b``."""
    if a.shape != b.shape:
        raise ValueError(f"shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    dtype = compute_dtype(a, b)
    return _safe_sqrt((a.to(dtype) - b.to(dtype)).pow(2).sum())


def fbkd_nonlocal_setting(stride: int) -> tuple[int, int]:
    """``(reduction, maxpool_stride)`` of FBKD's non-local blocks at an FPN stride.

    mmrazor's Faster R-CNN config: P2 (stride 4) ``(4, 8)``, P3 (stride 8) ``(4, 4)``, P4 and
    P5 ``(2, 2)``; kd2 gives every stride coarser than 8 ``(2, 2)`` (one-stage P4–P7).
    """
    if stride <= 4:
        return 4, 8
    if stride == 8:
        return 4, 4
    return 2, 2


@torch.no_grad()
def fbkd_spatial_mask(student: Tensor, teacher: Tensor, temperature: float = 0.5) -> Tensor:
    """``M^S = (A^S(F_t) + A^S(F_s)) / 2``, detached (``FBKDLoss.forward``).

    ``A^S = H·W · softmax_{hw}(mean_c |F| / T)`` of each side (the connectors' spatial masks),
    on the **raw** student map (before any adaptation).

    Args:
        student: ``(N, C_s, H, W)``.
        teacher: ``(N, C_t, H, W)``.
        temperature: ``T`` (0.5 in the official code).

    Returns:
        ``(N, 1, H, W)`` fp32 (fp64 when a map is fp64), no gradient.
    """
    if student.shape[0] != teacher.shape[0] or student.shape[-2:] != teacher.shape[-2:]:
        raise ValueError(
            f"student map {tuple(student.shape)} and teacher map {tuple(teacher.shape)} differ "
            "in batch or spatial size"
        )
    dtype = compute_dtype(student, teacher)
    t_att = spatial_attention(teacher.to(dtype), temperature)
    return (t_att + spatial_attention(student.to(dtype), temperature)) / 2


def fbkd_masked_feature_loss(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """``L_mask = ( Σ_{n,c,h,w} M^S[n,h,w] · (F_t − F_s)² )^{1/2}`` (mmrazor ``mask_l2_loss``).

    Args:
        student: ``(N, C, H, W)`` **adapted** student map (``f_1×1(F_s)``; gets the gradient).
        teacher: ``(N, C, H, W)`` teacher map (detached here).
        mask: ``(N, 1, H, W)`` spatial mask of :func:`fbkd_spatial_mask` (used as a constant).

    Returns:
        0-dim fp32 tensor (fp64 when a map is fp64): the square root of the sum over the whole
        batch (not a mean).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student map {tuple(student.shape)} and teacher map {tuple(teacher.shape)} differ"
        )
    dtype = compute_dtype(student, teacher)
    diff = (teacher.detach().to(dtype) - student.to(dtype)).pow(2)
    return _safe_sqrt((diff * mask.detach().to(dtype)).sum())


def fbkd_attention_transfer_loss(
    student: Tensor,
    teacher: Tensor,
    channel_adapt: Callable[[Tensor], Tensor],
    spatial_adapt: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    """The official code's two attention-transfer terms (``FBKDLoss.forward``, connectors).

    ``L_channel = ‖mean_{hw} F_t − channel_adapt(mean_{hw} F_s)‖₂`` (2-norm over ``N × C_t``)
    and ``L_spatial = ‖mean_c F_t − spatial_adapt(mean_c F_s)‖₂`` (2-norm over ``N × 1 × H × W``).

    Args:
        student: ``(N, C_s, H, W)`` raw student map.
        teacher: ``(N, C_t, H, W)`` teacher map (detached here).
        channel_adapt: ``(N, C_s) -> (N, C_t)`` (FBKD: ``nn.Linear``).
        spatial_adapt: ``(N, 1, H, W) -> (N, 1, H, W)`` (FBKD: ``Conv2d(1, 1, 3, padding=1)``).

    Returns:
        ``(L_channel, L_spatial)`` 0-dim fp32 tensors (fp64 when a map is fp64).
    """
    dtype = compute_dtype(student, teacher)
    t = teacher.detach().to(dtype)
    s = student.to(dtype)
    channel = _l2_distance(t.mean(dim=(2, 3)), channel_adapt(s.mean(dim=(2, 3))))
    spatial = _l2_distance(t.mean(dim=1, keepdim=True), spatial_adapt(s.mean(dim=1, keepdim=True)))
    return channel, spatial


def fbkd_nonlocal_loss(student_relation: Tensor, teacher_relation: Tensor) -> Tensor:
    """``L_nonlocal = ‖r_t − r_s‖₂`` over all elements (``torch.dist``).

    Args:
        student_relation: ``(N, C_t, H, W)`` ``Conv1×1(NL_s(F_s))``.
        teacher_relation: ``(N, C_t, H, W)`` ``NL_t(F_t)``. **Not** detached: the teacher-side
            non-local block is trainable and learns through this loss.

    Returns:
        0-dim fp32 tensor (fp64 when a relation is fp64).
    """
    return _l2_distance(teacher_relation, student_relation)


def _pool(x: Tensor, kernel: int) -> Tensor:
    """Max-pool with kernel = stride = ``kernel`` per axis, clamped to the map size."""
    kh, kw = min(kernel, x.shape[-2]), min(kernel, x.shape[-1])
    if kh <= 1 and kw <= 1:
        return x
    return F.max_pool2d(x, kernel_size=(kh, kw), stride=(kh, kw))


class NonLocalBlock(nn.Module):
    """FBKD's dot-product non-local block (mmcv ``NonLocal2d``, ``mode='dot_product'``,
    ``sub_sample=True``, as wrapped by mmrazor's ``NonLocal2dMaxpoolNstride``).

    ``θ, φ, g``: 1×1 convs ``C → C' = max(1, C // reduction)`` (weights ``N(0, 0.01)``, zero
    bias); ``φ(x)`` and ``g(x)`` are max-pooled by 2 and then by ``maxpool_stride`` (mmcv pools by 2
    and mmrazor's wrapper pools again, so the effective sub-sampling is ``2·maxpool_stride``: 16
    at P2, 8 at P3, 4 at P4/P5). With ``P`` the pooled positions:
    ``y = (θ(x)ᵀ φ(x) / P) g(x)ᵀ`` (``(HW × C')``, reshaped to ``(C', H, W)``) and
    ``out = x + BN(W_out y)``, ``W_out`` a bias-free 1×1 conv ``C' → C`` (Kaiming-normal fan-out)
    and BN's weight and bias zero-initialised, so the block starts as the identity.

    Args:
        channels: ``C``.
        reduction: channel reduction of ``θ, φ, g``.
        maxpool_stride: the second max-pool's kernel and stride.
    """

    def __init__(self, channels: int, reduction: int = 2, maxpool_stride: int = 2):
        super().__init__()
        if channels < 1 or reduction < 1 or maxpool_stride < 1:
            raise ValueError(
                f"NonLocalBlock needs channels, reduction and maxpool_stride >= 1, got "
                f"{channels}, {reduction}, {maxpool_stride}"
            )
        inter = max(1, channels // reduction)
        self.inter_channels = inter
        self.maxpool_stride = int(maxpool_stride)
        self.theta = nn.Conv2d(channels, inter, kernel_size=1)
        self.phi = nn.Conv2d(channels, inter, kernel_size=1)
        self.g = nn.Conv2d(channels, inter, kernel_size=1)
        self.conv_out = nn.Conv2d(inter, channels, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(channels)
        for conv in (self.theta, self.phi, self.g):
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)
        nn.init.kaiming_normal_(self.conv_out.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def subsample(self, x: Tensor) -> Tensor:
        """Max-pool by 2, then by ``maxpool_stride`` (kernels clamped to the map)."""
        return _pool(_pool(x, 2), self.maxpool_stride)

    def _normalize(self, z: Tensor) -> Tensor:
        bn = self.norm
        if self.training and z.shape[0] * z.shape[2] * z.shape[3] <= 1:
            return F.batch_norm(
                z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
            )
        return bn(z)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` -> ``(N, C, H, W)`` fp32 (fp64 for an fp64 ``x`` and block)."""
        n, _, h, w = x.shape
        dtype = compute_dtype(x)
        x = x.to(dtype)
        theta = self.theta(x).to(dtype).reshape(n, self.inter_channels, h * w).transpose(1, 2)
        phi = self.subsample(self.phi(x)).to(dtype).reshape(n, self.inter_channels, -1)
        g = self.subsample(self.g(x)).to(dtype).reshape(n, self.inter_channels, -1)
        g = g.transpose(1, 2)
        with torch.autocast(device_type=x.device.type, enabled=False):
            pairwise = torch.bmm(theta, phi) / float(phi.shape[-1])  # (N, HW, P)
            y = torch.bmm(pairwise, g)  # (N, HW, C')
        y = y.transpose(1, 2).reshape(n, self.inter_channels, h, w)
        return x + self._normalize(self.conv_out(y).to(dtype)).to(dtype)


@KD_METHOD_REGISTRY.register()
class FBKD(KDMethod):
    """FBKD attention-guided and non-local distillation on the shared FPN levels.

    Config (``cfg.KD.FBKD``): ``MASK_WEIGHT`` (7e-5), ``CHANNEL_WEIGHT`` (4e-3),
    ``SPATIAL_WEIGHT`` (4e-3), ``NONLOCAL_WEIGHT`` (7e-5), ``TEMPERATURE`` (0.5, of both spatial
    masks), ``STRIDES`` (empty = the 4 finest shared levels for two-stage detectors — Faster
    R-CNN P2–P5, the published protocol — and 5 for one-stage detectors, P3–P7).

    Trainable parts, per distilled stride (built in ``__init__``, so every parameter takes part in
    each step): the student-side 1×1 feature adaptation (``C_s → C_t``), the channel ``Linear``
    (``C_s → C_t``), the spatial ``Conv3×3`` (1 → 1), the student :class:`NonLocalBlock` (on
    ``C_s``) followed by a 1×1 conv (``C_s → C_t``), and the **teacher-side**
    :class:`NonLocalBlock` (on ``C_t``), which trains through the non-local loss although the
    teacher's features are detached.

    Losses (each summed over the levels, times its weight): ``loss_kd_fbkd_mask``,
    ``loss_kd_fbkd_channel``, ``loss_kd_fbkd_spatial``, ``loss_kd_fbkd_nonlocal``.
    """

    card = MethodCard(
        title='FBKD ("FKD")',
        summary="attention-guided and non-local distillation",
        paper="Zhang & Ma, Improve Object Detection with Feature-based KD (ICLR 2021)",
        code="open-mmlab/mmrazor (port)",
        project="FeatureDistillation",
        terms=(
            "loss_kd_fbkd_mask",
            "loss_kd_fbkd_channel",
            "loss_kd_fbkd_spatial",
            "loss_kd_fbkd_nonlocal",
        ),
        families=("faster_rcnn", "retinanet", "fcos", "gfl", "ssd", "detr"),
    )

    teacher_parts = frozenset({"features"})

    def __init__(
        self,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        *,
        arch: str,
        mask_weight: float = 7e-5,
        channel_weight: float = 4e-3,
        spatial_weight: float = 4e-3,
        nonlocal_weight: float = 7e-5,
        temperature: float = 0.5,
        strides: Sequence[int] = (),
    ):
        super().__init__()
        if arch not in ("one_stage", "two_stage"):
            raise ValueError(f"FBKD arch must be 'one_stage' or 'two_stage', got {arch!r}")
        if not temperature > 0:
            raise ValueError(f"KD.FBKD.TEMPERATURE must be > 0, got {temperature}")
        self.mask_weight = float(mask_weight)
        self.channel_weight = float(channel_weight)
        self.spatial_weight = float(spatial_weight)
        self.nonlocal_weight = float(nonlocal_weight)
        self.temperature = float(temperature)
        available = sorted(set(student_channels) & set(teacher_channels))
        if not available:
            raise ValueError(
                f"student strides {sorted(student_channels)} and teacher strides "
                f"{sorted(teacher_channels)} have none in common"
            )
        self.strides = distill_strides(available, list(strides), 4 if arch == "two_stage" else 5)
        c_s = {s: student_channels[s] for s in self.strides}
        c_t = {s: teacher_channels[s] for s in self.strides}
        # the official 1x1 adaptation conv, always present (it is also the channel alignment)
        self.adapter = FeatureAdapter(c_s, c_t, kernel_size=1)
        self.channel_adapt = nn.ModuleDict({str(s): nn.Linear(c_s[s], c_t[s]) for s in c_s})
        self.spatial_adapt = nn.ModuleDict(
            {str(s): nn.Conv2d(1, 1, kernel_size=3, padding=1) for s in c_s}
        )
        self.student_nonlocal = nn.ModuleDict(
            {str(s): NonLocalBlock(c_s[s], *fbkd_nonlocal_setting(s)) for s in c_s}
        )
        self.nonlocal_adapt = nn.ModuleDict(
            {str(s): nn.Conv2d(c_s[s], c_t[s], kernel_size=1) for s in c_s}
        )
        self.teacher_nonlocal = nn.ModuleDict(
            {str(s): NonLocalBlock(c_t[s], *fbkd_nonlocal_setting(s)) for s in c_t}
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
    ) -> FBKD:
        return cls(
            student_channels,
            teacher_channels,
            arch=arch,
            mask_weight=node.MASK_WEIGHT,
            channel_weight=node.CHANNEL_WEIGHT,
            spatial_weight=node.SPATIAL_WEIGHT,
            nonlocal_weight=node.NONLOCAL_WEIGHT,
            temperature=node.TEMPERATURE,
            strides=list(node.STRIDES or []),
        )

    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        strides = shared_strides(self.adapter, student.features, teacher.features)
        adapted, t_feats = adapt_features(self.adapter, student.features, teacher.features, strides)
        sums: dict[str, Tensor] = {}
        for stride, s_adapt, t in zip(strides, adapted, t_feats):
            key = str(stride)
            s_raw = to_compute(student.features[stride], t)
            mask = fbkd_spatial_mask(s_raw, t, self.temperature)
            terms = {"mask": fbkd_masked_feature_loss(s_adapt, t, mask)}
            terms["channel"], terms["spatial"] = fbkd_attention_transfer_loss(
                s_raw, t, self.channel_adapt[key], self.spatial_adapt[key]
            )
            s_rel = self.nonlocal_adapt[key](self.student_nonlocal[key](s_raw)).to(s_raw.dtype)
            t_rel = self.teacher_nonlocal[key](t)
            terms["nonlocal"] = fbkd_nonlocal_loss(s_rel, t_rel)
            for name, value in terms.items():
                sums[name] = value if name not in sums else sums[name] + value
        weights = {
            "mask": self.mask_weight,
            "channel": self.channel_weight,
            "spatial": self.spatial_weight,
            "nonlocal": self.nonlocal_weight,
        }
        return {f"loss_kd_fbkd_{name}": sums[name] * weights[name] for name in weights}
