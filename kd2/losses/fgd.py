"""FGD: Focal and Global Distillation for detectors (Yang et al., CVPR 2022).

Follows the official ``yzd-v/FGD`` code, ``mmdet/distillation/losses/fgd.py`` (``FeatureLoss``:
``forward``, ``get_attention``, ``get_fea_loss``, ``get_mask_loss``, ``spatial_pool``,
``get_rela_loss``, ``reset_parameters``) at its last commit, and its released configs
``configs/distillers/fgd/*.py``; the mmrazor port ``mmrazor/models/losses/fgd_loss.py`` computes
the same. Per FPN level, with ``F_s`` the (aligned) student map and ``F_t`` the teacher map, both
``(N, C, H, W)``:

* **Attention** (:func:`spatial_attention`, :func:`channel_attention`):
  ``A^S = H·W · softmax_{hw}(mean_c |F| / T)`` and ``A^C = C · softmax_c(mean_{hw} |F| / T)``.
* **Masks** (:func:`fgd_masks`): GT boxes scaled by the un-padded image size to the map, a
  scale mask ``1 / (box cells)`` on the boxes (the smallest box wins where they overlap) and
  ``1 / N_bg`` on the background cells.
* **Focal feature loss** (:func:`fgd_feature_loss`), weighted by the **teacher's** attention:
  ``L_fg = Σ M_fg · A^S_t · A^C_t · (F_s − F_t)² / N`` and ``L_bg`` likewise with ``M_bg``.
  The official code multiplies both features by ``√(M·A^S_t·A^C_t)`` before a summed MSE, which
  is the same value and gradient.
* **Attention loss** (:func:`fgd_attention_loss`):
  ``L_at = (Σ |A^C_s − A^C_t| + Σ |A^S_s − A^S_t|) / N``; the student's attention gets the
  gradient.
* **Global loss** (:func:`fgd_global_loss`): ``L_global = Σ (R_s(F_s) − R_t(F_t))² / N`` with one
  :class:`GlobalContextBlock` per side.

The level total is ``α L_fg + β L_bg + γ L_at + λ L_global``, summed over levels
(:class:`FGD` reports the four terms separately). Per-detector defaults of the released configs
(:data:`FGD_DEFAULTS`): RetinaNet (and GFL) α 1e-3, β 5e-4, γ 5e-4, λ 5e-6, T 0.5; Faster R-CNN
(P2–P5) α 5e-5, β 2.5e-5, γ 5e-5, λ 5e-7, T 0.5; FCOS α 1.6e-3, β 8e-4, γ 8e-4, λ 8e-6, T 0.8.

Where kd2 departs from the official code:

* the box corners are scaled in fp64 as ``x · W / w`` (the official fp32 ``x / w · W`` can land a
  hair above an integer and then ``ceil`` one cell further);
* corners outside the map are clipped when painting (the official slicing would wrap a negative
  start); the ``1 / cells`` weight still uses the unclipped corners, as the official code does;
* every term is normalised by ``max(N, 1)`` so that an empty batch gives ``0``, not ``nan``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .utils import (
    adapt_features,
    compute_dtype,
    detector_family,
    level_adapter,
    shared_strides,
    to_compute,
)

__all__ = [
    "FGD",
    "FGD_DEFAULTS",
    "GlobalContextBlock",
    "channel_attention",
    "fgd_attention_loss",
    "fgd_feature_loss",
    "fgd_global_loss",
    "fgd_masks",
    "spatial_attention",
]

#: ``(α, β, γ, λ, T)`` of the released FGD configs per detector family (see
#: :func:`kd2.losses.utils.detector_family`). GFL uses the RetinaNet values; SSD and the DETR
#: family (on the hybrid encoder's maps), which FGD never published, get the one-stage
#: (RetinaNet) values.
FGD_DEFAULTS: dict[str, tuple[float, float, float, float, float]] = {
    "retinanet": (1e-3, 5e-4, 5e-4, 5e-6, 0.5),
    "gfl": (1e-3, 5e-4, 5e-4, 5e-6, 0.5),
    "detr": (1e-3, 5e-4, 5e-4, 5e-6, 0.5),
    "faster_rcnn": (5e-5, 2.5e-5, 5e-5, 5e-7, 0.5),
    "fcos": (1.6e-3, 8e-4, 8e-4, 8e-6, 0.8),
    "ssd": (1e-3, 5e-4, 5e-4, 5e-6, 0.5),
}


def spatial_attention(feat: Tensor, temperature: float) -> Tensor:
    """``A^S = H·W · softmax_{hw}(mean_c |F| / T)`` (official ``get_attention``).

    Args:
        feat: ``(N, C, H, W)``.
        temperature: ``T > 0``.

    Returns:
        ``(N, 1, H, W)`` fp32 (fp64 for an fp64 ``feat``); each image's map sums to ``H·W``.
        Differentiable in ``feat``.
    """
    n, _, h, w = feat.shape
    energy = to_compute(feat).abs().mean(dim=1).reshape(n, h * w) / float(temperature)
    return (h * w * F.softmax(energy, dim=1)).reshape(n, 1, h, w)


def channel_attention(feat: Tensor, temperature: float) -> Tensor:
    """``A^C = C · softmax_c(mean_{hw} |F| / T)`` (official ``get_attention``).

    Args:
        feat: ``(N, C, H, W)``.
        temperature: ``T > 0``.

    Returns:
        ``(N, C, 1, 1)`` fp32 (fp64 for an fp64 ``feat``); each image's vector sums to ``C``.
        Differentiable in ``feat``.
    """
    n, c = feat.shape[:2]
    energy = to_compute(feat).abs().mean(dim=(2, 3)) / float(temperature)
    return (c * F.softmax(energy, dim=1)).reshape(n, c, 1, 1)


@torch.no_grad()
def fgd_masks(
    gt_boxes: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    feature_size: tuple[int, int],
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """FGD's foreground scale mask and background mask of one level (official ``forward``).

    Each box (XYXY, input pixels) is scaled by its image's **un-padded** size ``(h, w)`` to the
    ``H × W`` map: ``x · W / w`` and ``y · H / h``. Its cells are rows ``⌊y1'⌋ … ⌈y2'⌉`` and columns
    ``⌊x1'⌋ … ⌈x2'⌉``, both ends **inclusive** (clipped to the map), and it writes
    ``1 / ((⌈y2'⌉ − ⌊y1'⌋ + 1)(⌈x2'⌉ − ⌊x1'⌋ + 1))`` — computed from the unclipped corners — into
    them; a cell covered by several boxes keeps the largest value (the smallest box). The
    background is every cell whose foreground value is ``0``; each holds ``1 / N_bg`` of its image
    (so an image's background sums to 1), or ``0`` when the boxes cover the whole map.

    Args:
        gt_boxes: per image ``(G_i, 4)`` XYXY boxes (``G_i`` may be 0).
        image_sizes: per image ``(h, w)`` of the valid (un-padded) region.
        feature_size: ``(H, W)`` of the level.
        device: where the masks live (default: the boxes' device).
        dtype: the masks' dtype (the weights are computed in fp64 and rounded to it).

    Returns:
        ``(fg_weight, bg_weight)``, each ``(N, H, W)`` of ``dtype``. An image without boxes has
        ``fg = 0`` and ``bg = 1 / (H·W)``.
    """
    if len(gt_boxes) != len(image_sizes):
        raise ValueError(f"{len(gt_boxes)} box sets but {len(image_sizes)} image sizes")
    n = len(gt_boxes)
    h_map, w_map = int(feature_size[0]), int(feature_size[1])
    if device is None:
        device = gt_boxes[0].device if n else torch.device("cpu")
    fg = torch.zeros((n, h_map, w_map), dtype=dtype, device=device)
    ys = torch.arange(h_map, device=device, dtype=torch.float64)[None, :, None]  # (1, H, 1)
    xs = torch.arange(w_map, device=device, dtype=torch.float64)[None, None, :]  # (1, 1, W)
    for i, (boxes, (img_h, img_w)) in enumerate(zip(gt_boxes, image_sizes)):
        if boxes.numel() == 0:
            continue
        b = boxes.detach().to(device=device, dtype=torch.float64).reshape(-1, 4)
        x0 = torch.floor(b[:, 0] * w_map / float(img_w))
        x1 = torch.ceil(b[:, 2] * w_map / float(img_w))
        y0 = torch.floor(b[:, 1] * h_map / float(img_h))
        y1 = torch.ceil(b[:, 3] * h_map / float(img_h))
        weight = (1.0 / ((y1 - y0 + 1.0) * (x1 - x0 + 1.0))).to(dtype)  # (G,) unclipped corners
        inside = (
            (ys >= y0[:, None, None])
            & (ys <= y1[:, None, None])
            & (xs >= x0[:, None, None])
            & (xs <= x1[:, None, None])
        )  # (G, H, W)
        zero = torch.zeros((), dtype=weight.dtype, device=device)
        fg[i] = torch.where(inside, weight[:, None, None], zero).amax(dim=0)
    bg = (fg <= 0).to(dtype)
    count = bg.sum(dim=(1, 2), keepdim=True)
    bg = torch.where(count > 0, bg / count.clamp(min=1.0), bg)
    return fg, bg


def fgd_feature_loss(
    student: Tensor,
    teacher: Tensor,
    fg_weight: Tensor,
    bg_weight: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """FGD's focal feature loss of one level (official ``get_fea_loss``).

    ``L_fg = Σ_{n,c,h,w} M_fg[n,h,w] · A^S_t[n,h,w] · A^C_t[n,c] · (F_s − F_t)² / N`` and ``L_bg``
    with ``M_bg``; ``A^S_t``, ``A^C_t`` are the **teacher's** attentions at ``temperature``
    (constants). ``N`` is the batch size.

    Args:
        student: ``(N, C, H, W)`` aligned student map (gets the gradient).
        teacher: ``(N, C, H, W)`` teacher map (detached here).
        fg_weight / bg_weight: ``(N, H, W)`` masks of :func:`fgd_masks`.
        temperature: the attention temperature ``T``.

    Returns:
        ``(L_fg, L_bg)`` 0-dim fp32 tensors (fp64 when a map is fp64).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student map {tuple(student.shape)} and teacher map {tuple(teacher.shape)} differ"
        )
    dtype = compute_dtype(student, teacher)
    t = teacher.detach().to(dtype)
    s = student.to(dtype)
    n = t.shape[0]
    att = (spatial_attention(t, temperature) * channel_attention(t, temperature)).detach()
    diff = (s - t).pow(2) * att  # (N, C, H, W)
    denom = float(max(n, 1))
    fg = (diff * fg_weight.to(diff)[:, None]).sum() / denom
    bg = (diff * bg_weight.to(diff)[:, None]).sum() / denom
    return fg, bg


def fgd_attention_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """FGD's attention imitation of one level (official ``get_mask_loss``).

    ``L_at = (Σ_{n,c} |A^C_s − A^C_t| + Σ_{n,h,w} |A^S_s − A^S_t|) / N``.

    Args:
        student: ``(N, C, H, W)`` aligned student map (its attentions get the gradient).
        teacher: ``(N, C, H, W)`` teacher map (detached here).
        temperature: ``T``.

    Returns:
        0-dim fp32 tensor (fp64 when a map is fp64).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student map {tuple(student.shape)} and teacher map {tuple(teacher.shape)} differ"
        )
    t = teacher.detach()
    n = t.shape[0]
    channel = (channel_attention(student, temperature) - channel_attention(t, temperature)).abs()
    spatial = (spatial_attention(student, temperature) - spatial_attention(t, temperature)).abs()
    return (channel.sum() + spatial.sum()) / float(max(n, 1))


class GlobalContextBlock(nn.Module):
    """FGD's GcBlock relation module of one side (official ``spatial_pool`` +
    ``channel_add_conv_*``).

    ``R(F) = F + W_2 · ReLU(LN(W_1 · Σ_{hw} softmax_{hw}(W_k F) · F))``: a 1×1 context conv
    ``W_k`` (``C → 1``, Kaiming-normal fan-in init, zero bias) pools the map into one ``C``-vector
    by a spatial softmax; the bottleneck ``W_1`` (``C → C/2``, 1×1) → ``LayerNorm([C/2, 1, 1])``
    → ReLU → ``W_2`` (``C/2 → C``, 1×1, weight and bias zero-initialised, so ``R`` starts as the
    identity) gives a per-channel term added back to every location.

    Args:
        channels: ``C`` (the teacher's channels; ``>= 2``).
    """

    def __init__(self, channels: int):
        super().__init__()
        if channels < 2:
            raise ValueError(f"GlobalContextBlock needs >= 2 channels, got {channels}")
        self.context = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=1),
            nn.LayerNorm([channels // 2, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // 2, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.context.weight, a=0, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` -> ``(N, C, H, W)`` fp32 (fp64 for an fp64 ``x`` and block)."""
        n, c, h, w = x.shape
        dtype = compute_dtype(x)
        x = x.to(dtype)
        weights = F.softmax(self.context(x).reshape(n, 1, h * w).to(dtype), dim=2)  # (N, 1, HW)
        pooled = torch.matmul(x.reshape(n, c, h * w), weights.transpose(1, 2))  # (N, C, 1)
        add = self.transform(pooled.reshape(n, c, 1, 1).to(dtype))
        return x + add.to(dtype)


def fgd_global_loss(
    student: Tensor,
    teacher: Tensor,
    student_block: nn.Module,
    teacher_block: nn.Module,
) -> Tensor:
    """FGD's global relation loss of one level (official ``get_rela_loss``).

    ``L_global = Σ_{n,c,h,w} (R_s(F_s) − R_t(F_t))² / N`` with one :class:`GlobalContextBlock`
    per side. The teacher's map is detached, but ``teacher_block`` is **trainable** and gets the
    gradient of this loss (as in the official code, where both blocks are optimised only through
    this term); ``student_block`` and the student map get it too.

    Args:
        student: ``(N, C, H, W)`` aligned student map.
        teacher: ``(N, C, H, W)`` teacher map.
        student_block / teacher_block: ``(N, C, H, W) -> (N, C, H, W)`` modules.

    Returns:
        0-dim fp32 tensor (fp64 when a map is fp64).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student map {tuple(student.shape)} and teacher map {tuple(teacher.shape)} differ"
        )
    dtype = compute_dtype(student, teacher)
    out_s = student_block(student.to(dtype)).to(dtype)
    out_t = teacher_block(teacher.detach().to(dtype)).to(dtype)
    return (out_s - out_t).pow(2).sum() / float(max(student.shape[0], 1))


@KD_METHOD_REGISTRY.register()
class FGD(KDMethod):
    """Focal and Global Distillation on the FPN levels shared by student and teacher.

    Config (``cfg.KD.FGD``): ``ALPHA``, ``BETA``, ``GAMMA``, ``LAMBDA``, ``TEMPERATURE`` — a
    negative value is the released config's value for the detector (:data:`FGD_DEFAULTS`),
    resolved from :meth:`bind_detector` or, without it, at the first forward from the student's
    record (:func:`~kd2.losses.utils.detector_family`: FCOS is a dense head with centerness) —
    and ``STRIDES`` (empty = the 4 finest shared levels for two-stage detectors, P2–P5 as the
    released Faster R-CNN configs, and 5 for one-stage detectors, P3–P7).

    Trainable parts, built in ``__init__`` for the distilled strides only (so every parameter
    takes part in each step): a 1×1 align conv on the student where the channels differ
    (identity otherwise), and per level a student-side and a teacher-side
    :class:`GlobalContextBlock` on the teacher's channels. The **teacher-side GC blocks train**:
    the teacher's features are detached, but its GC blocks get the global loss's gradient.

    Losses (each summed over the levels and multiplied by its weight): ``loss_kd_fgd_fg``
    (α · L_fg), ``loss_kd_fgd_bg`` (β · L_bg), ``loss_kd_fgd_attention`` (γ · L_at),
    ``loss_kd_fgd_global`` (λ · L_global).
    """

    card = MethodCard(
        title="FGD",
        summary="focal (FG/BG, attention) and global (GcBlock) distillation",
        paper="Yang et al., Focal and Global Knowledge Distillation (CVPR 2022)",
        code="yzd-v/FGD",
        project="FeatureDistillation",
        terms=("loss_kd_fgd_fg", "loss_kd_fgd_bg", "loss_kd_fgd_attention", "loss_kd_fgd_global"),
        families=("faster_rcnn", "retinanet", "fcos", "gfl", "ssd", "detr"),
    )

    teacher_parts = frozenset({"features"})

    def __init__(
        self,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        *,
        arch: str,
        alpha: float = -1.0,
        beta: float = -1.0,
        gamma: float = -1.0,
        lambda_: float = -1.0,
        temperature: float = -1.0,
        strides: Sequence[int] = (),
    ):
        super().__init__()
        if arch not in ("one_stage", "two_stage"):
            raise ValueError(f"FGD arch must be 'one_stage' or 'two_stage', got {arch!r}")
        values = {"ALPHA": alpha, "BETA": beta, "GAMMA": gamma, "LAMBDA": lambda_}
        for key, value in {**values, "TEMPERATURE": temperature}.items():
            if not math.isfinite(float(value)):
                raise ValueError(f"KD.FGD.{key} must be finite, got {value}")
        if temperature == 0:
            raise ValueError("KD.FGD.TEMPERATURE must be > 0 (or < 0 for the detector's default)")
        self.arch = arch
        self.configured = (float(alpha), float(beta), float(gamma), float(lambda_))
        self.configured_temperature = float(temperature)
        self.family: str | None = None
        # the 1x1 align convs of the distilled levels, identity where the channels are equal
        self.adapter = level_adapter(
            dict(student_channels),
            dict(teacher_channels),
            list(strides),
            4 if arch == "two_stage" else 5,
        )
        self.strides = list(self.adapter.strides)
        self.student_gc = nn.ModuleDict(
            {str(s): GlobalContextBlock(teacher_channels[s]) for s in self.strides}
        )
        self.teacher_gc = nn.ModuleDict(
            {str(s): GlobalContextBlock(teacher_channels[s]) for s in self.strides}
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
    ) -> FGD:
        return cls(
            student_channels,
            teacher_channels,
            arch=arch,
            alpha=node.ALPHA,
            beta=node.BETA,
            gamma=node.GAMMA,
            lambda_=node.LAMBDA,
            temperature=node.TEMPERATURE,
            strides=list(node.STRIDES or []),
        )

    def bind_detector(self, family: str) -> None:
        """Record the student's detector family (the key of :data:`FGD_DEFAULTS`)."""
        if family not in FGD_DEFAULTS:
            raise ValueError(f"unknown detector family {family!r}; known: {sorted(FGD_DEFAULTS)}")
        self.family = family

    def resolved(self, student: StepRecord | None = None) -> tuple[float, ...]:
        """``(α, β, γ, λ, T)``: the configured values, negative ones replaced by the released
        config's value for the detector (bound, or inferred from ``student`` and cached)."""
        if self.family is None:
            if student is None:
                raise ValueError("FGD: the detector family is not bound yet; pass the record")
            self.family = detector_family(self.arch, student)
        defaults = FGD_DEFAULTS[self.family]
        configured = (*self.configured, self.configured_temperature)
        return tuple(d if c < 0 else c for c, d in zip(configured, defaults))

    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        alpha, beta, gamma, lambda_, temperature = self.resolved(student)
        strides = shared_strides(self.adapter, student.features, teacher.features)
        s_feats, t_feats = adapt_features(self.adapter, student.features, teacher.features, strides)
        fg_sum = bg_sum = at_sum = gl_sum = None
        for stride, s, t in zip(strides, s_feats, t_feats):
            fg_w, bg_w = fgd_masks(
                student.gt_boxes,
                student.image_sizes,
                tuple(t.shape[-2:]),
                device=t.device,
                dtype=compute_dtype(s, t),
            )
            fg, bg = fgd_feature_loss(s, t, fg_w, bg_w, temperature)
            at = fgd_attention_loss(s, t, temperature)
            gl = fgd_global_loss(s, t, self.student_gc[str(stride)], self.teacher_gc[str(stride)])
            fg_sum = fg if fg_sum is None else fg_sum + fg
            bg_sum = bg if bg_sum is None else bg_sum + bg
            at_sum = at if at_sum is None else at_sum + at
            gl_sum = gl if gl_sum is None else gl_sum + gl
        return {
            "loss_kd_fgd_fg": fg_sum * alpha,
            "loss_kd_fgd_bg": bg_sum * beta,
            "loss_kd_fgd_attention": at_sum * gamma,
            "loss_kd_fgd_global": gl_sum * lambda_,
        }
