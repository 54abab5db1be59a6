"""DeFeat: distilling object detectors via decoupled features (Guo et al., CVPR 2021).

**Neck.** Every GT box is assigned to one FPN level by mmdet's 56-px rule on
``sqrt((w + 1)(h + 1))`` (:func:`~kd2.losses.utils.assign_fpn_levels`), where level ``0`` is
the finest stride shared by student and teacher and the index is clamped to the available
levels. On its level ``l`` (stride ``s``, grid ``H × W``) the box paints the cells
``rows [⌊y1/s⌋, ⌊y2/s⌋) × cols [⌊x1/s⌋, ⌊x2/s⌋)``. Each range is clamped to the grid and, when
it is empty (a box thinner than one cell or straddling no cell border), extended to the single
cell holding its start, so every GT marks at least one cell. (The reference code marks only the
corner cell ``(⌊y1/s⌋, ⌊x1/s⌋)`` when *either* range is empty; kd2 fixes each axis on its own,
so a thin but long box keeps its full extent along the other axis.) With ``M`` the binary mask
broadcast over the ``C`` channels and ``d = (φ(F_s) − F_t)²``:
``L_fg = Σ M·d / max(1, 2·ΣM)``, ``L_bg = Σ (1 − M)·d / max(1, 2·Σ(1 − M))`` (``ΣM`` counts
``C ×`` cells), each averaged over the levels.

**Head** (two-stage only). ``T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))`` per ROI, summed
over the positive ROIs (label ``< K``) and divided by their count, and likewise for the negative
ROIs (label ``== K``), with their own temperatures and weights. The paper samples the ROIs with
the *teacher* ("SampleTEA") and runs the student head on them; kd2 has no teacher sampling: the
teacher's ROI head runs on the **student's** sampled ROIs, so positive / negative comes from the
student's sampler (``student.roi.labels``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from kd2.losses.adapters import FeatureAdapter
from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .utils import (
    adapt_features,
    assign_fpn_levels,
    compute_dtype,
    masked_squared_error,
    shared_strides,
    softmax_kl_div,
    to_compute,
)

__all__ = ["DeFeat", "defeat_gt_masks", "defeat_head_loss", "defeat_neck_loss"]


@torch.no_grad()
def defeat_gt_masks(
    gt_boxes: Sequence[Tensor],
    strides: Sequence[int],
    grid_sizes: Sequence[tuple[int, int]],
    finest_scale: float = 56.0,
    device: torch.device | None = None,
) -> list[Tensor]:
    """Per-level binary GT masks, each GT painted only on its assigned level.

    Args:
        gt_boxes: per image ``(G_i, 4)`` XYXY in input pixels (``G_i`` may be 0).
        strides: level strides, finest first (level ``l`` has stride ``strides[l]``).
        grid_sizes: per level ``(H_l, W_l)``.
        finest_scale: the 56-px constant of the level rule.
        device: where the masks live (default: the GT boxes' device).

    Returns:
        per level a ``(N, H_l, W_l)`` bool mask.
    """
    if len(strides) != len(grid_sizes) or not strides:
        raise ValueError("strides and grid_sizes must have the same non-zero length")
    if list(strides) != sorted(strides):
        raise ValueError(f"strides must be sorted finest first, got {list(strides)}")
    n = len(gt_boxes)
    if device is None:
        device = gt_boxes[0].device if n else torch.device("cpu")
    masks = [torch.zeros((n, h, w), dtype=torch.bool, device=device) for h, w in grid_sizes]
    for i, gt in enumerate(gt_boxes):
        if gt.numel() == 0:
            continue
        gt = to_compute(gt.to(device))
        levels = assign_fpn_levels(gt, len(strides), finest_scale)
        for lvl, (s, (h, w)) in enumerate(zip(strides, grid_sizes)):
            b = gt[levels == lvl]
            if b.numel() == 0:
                continue
            x0 = torch.floor(b[:, 0] / s).clamp(0, w - 1)
            y0 = torch.floor(b[:, 1] / s).clamp(0, h - 1)
            x1 = torch.maximum(torch.floor(b[:, 2] / s), x0 + 1).clamp(max=w)
            y1 = torch.maximum(torch.floor(b[:, 3] / s), y0 + 1).clamp(max=h)
            ys = torch.arange(h, device=device, dtype=b.dtype)[None, :, None]  # (1, H, 1)
            xs = torch.arange(w, device=device, dtype=b.dtype)[None, None, :]  # (1, 1, W)
            inside = (
                (ys >= y0[:, None, None])
                & (ys < y1[:, None, None])
                & (xs >= x0[:, None, None])
                & (xs < x1[:, None, None])
            )  # (G_l, H, W)
            masks[lvl][i] |= inside.any(dim=0)
    return masks


def defeat_neck_loss(
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    masks: Sequence[Tensor],
) -> tuple[Tensor, Tensor]:
    """Decoupled foreground / background feature imitation, averaged over levels.

    Args:
        student_features: per level ``(N, C, H_l, W_l)`` adapted student maps.
        teacher_features: per level ``(N, C, H_l, W_l)`` teacher maps (detached).
        masks: per level ``(N, H_l, W_l)`` bool GT masks.

    Returns:
        ``(L_fg, L_bg)`` fp32 scalars (fp64 when a map is fp64), each
        ``mean_l Σ M·d / max(1, 2·C·Σ M)`` with ``M`` the mask (fg) or its complement (bg).
    """
    if not (len(student_features) == len(teacher_features) == len(masks)) or not masks:
        raise ValueError("defeat_neck_loss needs the same non-zero number of maps and masks")
    fg_terms, bg_terms = [], []
    for s, t, m in zip(student_features, teacher_features, masks):
        c = s.shape[1]
        fg = m.to(compute_dtype(s, t))
        bg = 1.0 - fg
        fg_terms.append(masked_squared_error(s, t, fg) / (2.0 * c * fg.sum()).clamp(min=1.0))
        bg_terms.append(masked_squared_error(s, t, bg) / (2.0 * c * bg.sum()).clamp(min=1.0))
    num = float(len(masks))
    return torch.stack(fg_terms).sum() / num, torch.stack(bg_terms).sum() / num


def defeat_head_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    num_classes: int,
    t_pos: float = 1.0,
    t_neg: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Soft-label KD on ROI logits, split into positive and negative ROIs.

    Args:
        student_logits: ``(M, K + 1)`` student ROI logits (background last).
        teacher_logits: ``(M, K + 1)`` teacher logits on the same ROIs (detached).
        labels: ``(M,)`` sampled-ROI classes, ``K`` = background.
        num_classes: ``K``.
        t_pos / t_neg: temperatures of the two parts.

    Returns:
        ``(L_pos, L_neg)`` fp32 scalars (fp64 for fp64 logits), each
        ``Σ_subset T² KL / max(1, #subset)``; ``0`` with a graph for an empty subset.
    """
    pos = (labels >= 0) & (labels < num_classes)
    neg = labels == num_classes
    out = []
    for sel, temp in ((pos, t_pos), (neg, t_neg)):
        kl = softmax_kl_div(student_logits[sel], teacher_logits[sel], temp)  # (M_sel,)
        out.append(kl.sum() / max(1, int(sel.sum())))
    return out[0], out[1]


@KD_METHOD_REGISTRY.register()
class DeFeat(KDMethod):
    """DeFeat decoupled neck imitation (+ decoupled ROI-head KD for two-stage detectors).

    Config (``cfg.KD.DEFEAT``): ``NECK_FG_WEIGHT`` (3.0), ``NECK_BG_WEIGHT`` (12.0),
    ``HEAD_POS_WEIGHT`` (2.0), ``HEAD_NEG_WEIGHT`` (2.0), ``T_POS`` (1.0), ``T_NEG`` (1.0),
    ``ADAPTER_KERNEL`` (3).

    Losses: ``loss_kd_defeat_fg``, ``loss_kd_defeat_bg`` and, for two-stage detectors,
    ``loss_kd_defeat_head_pos``, ``loss_kd_defeat_head_neg``. The head part (and the teacher's
    ROI head) is skipped for one-stage detectors and when both head weights are 0.
    """

    card = MethodCard(
        title="DeFeat",
        summary="decoupled features: FG/BG neck imitation, pos/neg ROI KL",
        paper="Guo et al., Decoupled Features (CVPR 2021)",
        code="ggjy/DeFeat.pytorch",
        project="Baselines",
        terms=(
            "loss_kd_defeat_fg",
            "loss_kd_defeat_bg",
            "loss_kd_defeat_head_pos",
            "loss_kd_defeat_head_neg",
        ),
        families=("faster_rcnn", "retinanet", "fcos", "gfl", "ssd", "detr"),
    )

    def __init__(
        self,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        *,
        neck_fg_weight: float = 3.0,
        neck_bg_weight: float = 12.0,
        head_pos_weight: float = 2.0,
        head_neg_weight: float = 2.0,
        t_pos: float = 1.0,
        t_neg: float = 1.0,
        adapter_kernel: int = 3,
        use_head: bool = True,
    ):
        super().__init__()
        if t_pos <= 0 or t_neg <= 0:
            raise ValueError(f"DeFeat temperatures must be > 0, got {t_pos}, {t_neg}")
        self.neck_fg_weight = float(neck_fg_weight)
        self.neck_bg_weight = float(neck_bg_weight)
        self.head_pos_weight = float(head_pos_weight)
        self.head_neg_weight = float(head_neg_weight)
        self.t_pos = float(t_pos)
        self.t_neg = float(t_neg)
        self.use_head = bool(use_head) and (self.head_pos_weight != 0 or self.head_neg_weight != 0)
        self.adapter = FeatureAdapter(student_channels, teacher_channels, int(adapter_kernel))
        self.teacher_parts = frozenset({"features", "roi"} if self.use_head else {"features"})

    @classmethod
    def from_config(
        cls,
        node,
        *,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        num_classes: int,
        arch: str,
    ) -> DeFeat:
        if arch not in ("two_stage", "one_stage"):
            raise ValueError(f"unknown arch {arch!r}; expected 'two_stage' or 'one_stage'")
        return cls(
            student_channels,
            teacher_channels,
            neck_fg_weight=node.NECK_FG_WEIGHT,
            neck_bg_weight=node.NECK_BG_WEIGHT,
            head_pos_weight=node.HEAD_POS_WEIGHT,
            head_neg_weight=node.HEAD_NEG_WEIGHT,
            t_pos=node.T_POS,
            t_neg=node.T_NEG,
            adapter_kernel=node.ADAPTER_KERNEL,
            use_head=arch == "two_stage",
        )

    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        strides = shared_strides(self.adapter, student.features, teacher.features)
        s, t = adapt_features(self.adapter, student.features, teacher.features, strides)
        grids = [(x.shape[-2], x.shape[-1]) for x in t]
        masks = defeat_gt_masks(student.gt_boxes, strides, grids, device=t[0].device)
        fg, bg = defeat_neck_loss(s, t, masks)
        losses = {
            "loss_kd_defeat_fg": fg * self.neck_fg_weight,
            "loss_kd_defeat_bg": bg * self.neck_bg_weight,
        }
        if self.use_head:
            if student.roi is None or teacher.roi is None:
                raise ValueError("DeFeat's head loss needs ROI outputs in both records")
            pos, neg = defeat_head_loss(
                student.roi.cls_logits,
                teacher.roi.cls_logits,
                student.roi.cat_labels,
                student.num_classes,
                self.t_pos,
                self.t_neg,
            )
            losses["loss_kd_defeat_head_pos"] = pos * self.head_pos_weight
            losses["loss_kd_defeat_head_neg"] = neg * self.head_neg_weight
        return losses
