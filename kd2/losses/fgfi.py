"""FGFI: fine-grained feature imitation near objects (Wang et al., CVPR 2019).

**Imitation mask.** For each image, the IoU between *all* anchors of the record's anchor head
(the one-stage head, or the RPN of a two-stage detector; every level together) and each GT box is
computed. GT ``g`` marks the anchors whose IoU is strictly greater than ``ψ · max_anchors IoU_g``;
a location is positive if any of its ``A`` anchors is marked, and the mask is the union over the
GTs. The per-GT maximum is taken over the anchors of **all** levels, as in the FPN port
(DeFeat's ``get_roi_mask``), so a GT mostly lights up the levels whose anchors fit it. A GT that
overlaps no anchor at all (max IoU 0) marks nothing, because the comparison is strict. IoU uses
areas ``(x2 − x1)(y2 − y1)`` (no ``+1``, Detectron2/mmdet-v2 convention).

**Loss.** ``Σ_levels Σ_{n,h,w} M · Σ_c (φ(F_s) − F_t)² / (2 · N_p)`` where ``N_p`` is the number
of positive locations over the batch and the levels used (the shared strides). When ``N_p = 0``
(no GT in the batch), the normaliser is floored at 1, so the loss is ``0`` with a graph.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from kd2.modeling.adapters import FeatureAdapter
from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod
from .utils import adapt_features, box_iou, cfg_get, masked_squared_error, shared_strides

__all__ = ["FGFI", "fgfi_imitation_mask", "fgfi_loss"]


@torch.no_grad()
def fgfi_imitation_mask(
    anchors_per_level: Sequence[Tensor],
    grid_sizes: Sequence[tuple[int, int]],
    num_anchors_per_loc: int,
    gt_boxes: Sequence[Tensor],
    psi: float = 0.5,
) -> list[Tensor]:
    """FGFI near-object imitation masks, one per level.

    Args:
        anchors_per_level: per level ``(H_l * W_l * A, 4)`` XYXY anchors, location-major (y, x)
            with the anchor index fastest.
        grid_sizes: per level ``(H_l, W_l)``.
        num_anchors_per_loc: ``A``.
        gt_boxes: per image ``(G_i, 4)`` XYXY (``G_i`` may be 0).
        psi: ``ψ``, the fraction of each GT's best anchor IoU an anchor must exceed.

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
    masks = [torch.zeros((n, h, w), dtype=torch.bool, device=device) for h, w in grid_sizes]
    all_anchors = torch.cat(list(anchors_per_level), dim=0)  # (R, 4)
    sizes = [anc.shape[0] for anc in anchors_per_level]
    for i, gt in enumerate(gt_boxes):
        if gt.numel() == 0:
            continue
        iou = box_iou(all_anchors, gt.to(device))  # (R, G)
        thresh = psi * iou.max(dim=0).values  # (G,)
        marked = (iou > thresh[None, :]).any(dim=1)  # (R,) union over GTs
        for lvl, piece in enumerate(torch.split(marked, sizes)):
            h, w = grid_sizes[lvl]
            masks[lvl][i] = piece.view(h, w, a).any(dim=-1)
    return masks


def fgfi_loss(
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    masks: Sequence[Tensor],
) -> Tensor:
    """FGFI imitation loss over several levels with one joint normaliser.

    Args:
        student_features: per level ``(N, C, H_l, W_l)`` adapted student maps.
        teacher_features: per level ``(N, C, H_l, W_l)`` teacher maps (detached).
        masks: per level ``(N, H_l, W_l)`` bool imitation masks.

    Returns:
        fp32 scalar ``Σ_l Σ M · Σ_c (s − t)² / (2 · max(1, N_p))``, ``N_p = Σ_l Σ M``.
    """
    if not (len(student_features) == len(teacher_features) == len(masks)) or not masks:
        raise ValueError("fgfi_loss needs the same non-zero number of maps and masks")
    total = None
    num_pos = None
    for s, t, m in zip(student_features, teacher_features, masks):
        term = masked_squared_error(s, t, m)
        cnt = m.float().sum()
        total = term if total is None else total + term
        num_pos = cnt if num_pos is None else num_pos + cnt
    return total / (2.0 * num_pos.clamp(min=1.0))


@KD_METHOD_REGISTRY.register()
class FGFI(KDMethod):
    """Fine-grained feature imitation on the FPN strides shared with the anchor head.

    Config (``cfg.KD.FGFI``): ``WEIGHT`` (0.01), ``PSI`` (0.5), ``ADAPTER_KERNEL`` (3).

    Loss: ``loss_kd_fgfi``. The mask comes from the student record's anchor head
    (``record.anchor_head``: dense head for one-stage, RPN for two-stage) and GT boxes.
    """

    teacher_parts = frozenset({"features"})

    def __init__(
        self,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        *,
        weight: float = 0.01,
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
            weight=cfg_get(node, "WEIGHT", 0.01),
            psi=cfg_get(node, "PSI", 0.5),
            adapter_kernel=cfg_get(node, "ADAPTER_KERNEL", 3),
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
