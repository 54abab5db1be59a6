"""FGFI: fine-grained feature imitation near objects (Wang et al., CVPR 2019), FPN port.

The paper's code works on one backbone map; on an FPN kd2 follows the port that
``docs/algorithms.md`` §5.3 names, DeFeat's (``ggjy/DeFeat.pytorch``):

**Imitation mask** (``mmdet/models/dense_heads/anchor_head.py``, ``get_roi_mask``, l. 175-206,
and ``_map_roi_levels``, l. 168-173). Each GT is assigned to **one** level of the record's anchor
head (the one-stage head, or the RPN of a two-stage detector) by the 56-px rule
``clamp(⌊log2(sqrt((w + 1)(h + 1)) / 56 + 1e-6)⌋, 0, L − 1)`` over the head's ``L`` levels
(:func:`~kd2.losses.utils.assign_fpn_levels`). On that level only, GT ``g`` marks the anchors whose
IoU with it is strictly greater than ``ψ · max IoU_g``, the maximum taken over **that level's**
anchors; a location is positive if any of its ``A`` anchors is marked, and each level's mask is
the union over the GTs assigned to it. A GT that overlaps none of its level's anchors (max IoU 0)
marks nothing, the comparison being strict. IoU uses areas ``(x2 − x1)(y2 − y1)`` (no ``+1``,
mmdet v2's ``bbox_overlaps``); ``ψ = 0.5`` (``roi_phi``'s default, ``two_stage_kd.py`` l. 193).

**Loss** (``mmdet/apis/train.py``, ``batch_processor_kd``, l. 306-338, the ``pixel-wise`` branch)::

    L = (1 / L_d) Σ_l  Σ_{n,c,h,w} M_l · (φ_l(F^s_l) − F^t_l)²  /  max(1, 2 · C · Σ_{n,h,w} M_l)

over the ``L_d`` distilled levels (the anchor-head strides shared by both FPNs): each level is
normalised by its own masked element count (the mask broadcast over the ``C`` teacher channels),
a level without positives contributes 0 and still counts in the mean. ``loss_kd_fgfi = WEIGHT · L``
with ``WEIGHT = 3``: the port's FGFI configuration, ``configs/kd_faster_rcnn/
voc_stu_faster_rcnn_r50_FGFI.py`` (``hint_adapt.type = 'neck-adapt,mask-neck-roi,pixel-wise'``,
``hint_neck_w=3``). The single-level paper's ``λ = 0.01`` belongs to its ``1 / (2 N_p)``
normaliser (no ``C``, no level mean) and does not carry over.
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
    box_iou,
    compute_dtype,
    masked_squared_error,
    shared_strides,
)

__all__ = ["FGFI", "fgfi_imitation_mask", "fgfi_loss"]


@torch.no_grad()
def fgfi_imitation_mask(
    anchors_per_level: Sequence[Tensor],
    grid_sizes: Sequence[tuple[int, int]],
    num_anchors_per_loc: int,
    gt_boxes: Sequence[Tensor],
    psi: float = 0.5,
) -> list[Tensor]:
    """FGFI near-object imitation masks, one per level (DeFeat's ``get_roi_mask``).

    Args:
        anchors_per_level: per level ``(H_l * W_l * A, 4)`` XYXY anchors, location-major (y, x)
            with the anchor index fastest; **all** the anchor head's levels, finest first (the
            56-px rule counts levels from the first).
        grid_sizes: per level ``(H_l, W_l)``.
        num_anchors_per_loc: ``A``.
        gt_boxes: per image ``(G_i, 4)`` XYXY (``G_i`` may be 0).
        psi: ``ψ``, the fraction of each GT's best IoU (over its own level's anchors) an anchor
            of that level must exceed.

    Returns:
        per level a ``(N, H_l, W_l)`` bool mask, ``N = len(gt_boxes)``.
    """
    a = int(num_anchors_per_loc)
    if len(anchors_per_level) != len(grid_sizes):
        raise ValueError("anchors_per_level and grid_sizes must have the same length")
    for anc, (h, w) in zip(anchors_per_level, grid_sizes):
        if anc.shape[0] != h * w * a:
            raise ValueError(f"level with grid {(h, w)} and A={a} has {anc.shape[0]} anchors")
    device = anchors_per_level[0].device
    n = len(gt_boxes)
    num_levels = len(anchors_per_level)
    masks = [torch.zeros((n, h, w), dtype=torch.bool, device=device) for h, w in grid_sizes]
    for i, gt in enumerate(gt_boxes):
        if gt.numel() == 0:
            continue
        gt = gt.to(device)
        level_of = assign_fpn_levels(gt, num_levels)  # the 56-px rule, +1 in the scale
        for lvl, (anc, (h, w)) in enumerate(zip(anchors_per_level, grid_sizes)):
            g = gt[level_of == lvl]
            if g.shape[0] == 0:
                continue
            iou = box_iou(anc, g)  # (R_l, G_l)
            thresh = psi * iou.max(dim=0).values  # (G_l,) best IoU over this level only
            marked = (iou > thresh[None, :]).any(dim=1)  # (R_l,) union over the level's GTs
            masks[lvl][i] = marked.view(h, w, a).any(dim=-1)
    return masks


def fgfi_loss(
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    masks: Sequence[Tensor],
) -> Tensor:
    """FGFI imitation loss: per-level normalised, averaged over the levels.

    Args:
        student_features: per level ``(N, C, H_l, W_l)`` adapted student maps.
        teacher_features: per level ``(N, C, H_l, W_l)`` teacher maps (detached).
        masks: per level ``(N, H_l, W_l)`` bool (or 0/1) imitation masks.

    Returns:
        fp32 scalar (fp64 when a map is fp64)
        ``(1/L) Σ_l Σ M_l · Σ_c (s − t)² / max(1, 2 · C · Σ M_l)``; ``0`` with a graph when no
        mask has a positive.
    """
    if not (len(student_features) == len(teacher_features) == len(masks)) or not masks:
        raise ValueError("fgfi_loss needs the same non-zero number of maps and masks")
    terms = []
    for s, t, m in zip(student_features, teacher_features, masks):
        c = t.shape[1]
        norm = (2.0 * c * m.to(compute_dtype(s, t)).sum()).clamp(min=1.0)
        terms.append(masked_squared_error(s, t, m) / norm)
    return torch.stack(terms).mean()


@KD_METHOD_REGISTRY.register()
class FGFI(KDMethod):
    """Fine-grained feature imitation on the FPN strides shared with the anchor head, as
    DeFeat's FPN port does it (see the module docstring).

    Config (``cfg.KD.FGFI``): ``WEIGHT`` (3, the port's ``hint_neck_w``), ``PSI`` (0.5),
    ``ADAPTER_KERNEL`` (3).

    Loss: ``loss_kd_fgfi``. The mask comes from the student record's anchor head
    (``record.anchor_head``: dense head for one-stage, RPN for two-stage; every level of it takes
    part in the 56-px assignment) and GT boxes.
    """

    card = MethodCard(
        title="FGFI",
        summary="feature imitation near the objects (DeFeat's FPN port: one level per object)",
        paper="Wang et al., Fine-grained Feature Imitation (CVPR 2019)",
        code="twangnh/Distilling-Object-Detectors",
        project="Baselines",
        terms=("loss_kd_fgfi",),
        families=("faster_rcnn", "retinanet", "fcos", "gfl", "ssd"),
    )

    teacher_parts = frozenset({"features"})

    def unsupported_reason(self, arch: str, dense_softmax: bool) -> str | None:
        if self.family == "detr":
            return (
                "it imitates the locations whose anchors overlap an object, and a DETR-family "
                "detector has no anchors. Use DeFeat or FGD (ground-truth masks) on its encoder's "
                "maps"
            )
        return super().unsupported_reason(arch, dense_softmax)

    def __init__(
        self,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        *,
        weight: float = 3.0,
        psi: float = 0.5,
        adapter_kernel: int = 3,
    ):
        super().__init__()
        if not 0.0 <= psi <= 1.0:
            raise ValueError(f"FGFI psi must be in [0, 1], got {psi}")
        self.weight = float(weight)
        self.psi = float(psi)
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
    ) -> FGFI:
        return cls(
            student_channels,
            teacher_channels,
            weight=node.WEIGHT,
            psi=node.PSI,
            adapter_kernel=node.ADAPTER_KERNEL,
        )

    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        head = student.anchor_head
        if head is None:
            raise ValueError("FGFI needs an anchor head (dense head or RPN) in the student record")
        masks = fgfi_imitation_mask(
            head.anchors, head.grid_sizes, head.num_anchors_per_loc, student.gt_boxes, self.psi
        )
        mask_by_stride = dict(zip(head.strides, masks))
        strides = [
            s
            for s in shared_strides(self.adapter, student.features, teacher.features)
            if s in mask_by_stride
        ]
        if not strides:
            raise ValueError(
                f"no anchor-head stride {head.strides} is among the shared feature strides "
                f"{self.adapter.strides}"
            )
        s, t = adapt_features(self.adapter, student.features, teacher.features, strides)
        m = [mask_by_stride[st] for st in strides]
        for st, feat, mask in zip(strides, s, m):
            if feat.shape[-2:] != mask.shape[-2:]:
                raise ValueError(
                    f"stride {st}: feature map {tuple(feat.shape[-2:])} and anchor grid "
                    f"{tuple(mask.shape[-2:])} differ"
                )
        return {"loss_kd_fgfi": fgfi_loss(s, t, m) * self.weight}
