"""Run the pieces of a torchvision detector and translate them into :mod:`kd2.structures`.

Each function runs one stage of a torchvision model on explicit inputs, so the same code serves
the student (with gradients, train mode) and the teacher (``no_grad``, eval mode). Re-running
``transform -> backbone -> rpn -> select_training_samples -> box_roi_pool -> box_head ->
box_predictor -> fastrcnn_loss`` reproduces torchvision's own training losses exactly
(tested), which is what lets kd2 read the intermediate tensors torchvision does not return.

Translations (torchvision -> canonical):
* FPN names (``'0'``, ``'pool'``, ``'p6'``...) -> stride keys;
* Faster R-CNN classes: background column 0 -> last column; labels ``c + 1`` -> ``c``;
* box deltas ``(M, (K+1)*4)`` with a background slot -> ``(M, K, 4)``;
* RPN labels ``1/0/-1`` -> ``0`` (object) / ``1`` (background) / ``-1`` (ignore);
* dense ``matched_idxs`` ``-1`` (bg) / ``-2`` (ignore) / GT index -> ``K`` / ``-1`` / class.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import box_iou

from kd2.modeling.head_split import TowerHead, flat_layers, run_with_head_split
from kd2.structures import DenseOutputs

__all__ = [
    "infer_strides",
    "features_by_stride",
    "run_rpn",
    "run_dense_head",
    "run_gfl_head",
    "run_roi_head",
    "sample_rois",
    "dense_labels_from_matches",
    "match_retinanet",
    "match_fcos",
    "anchors_per_location",
    "run_any_dense_head",
    "teacher_record",
    "tower_head",
]


def infer_strides(feature_shapes: List[Tuple[int, int]], padded_hw: Tuple[int, int]) -> List[int]:
    """Strides of FPN levels given their ``(H_l, W_l)`` and the padded input size.

    The finest level's stride is exact (inputs are padded to a multiple of 32); each following
    level halves the resolution (its size is ``ceil`` of the previous one's half), so its stride
    doubles. Levels of equal size share a stride, which kd2 rejects.
    """
    h0, w0 = feature_shapes[0]
    strides = [max(round(padded_hw[0] / h0), round(padded_hw[1] / w0))]
    for prev, cur in zip(feature_shapes, feature_shapes[1:]):
        strides.append(strides[-1] if tuple(cur) == tuple(prev) else strides[-1] * 2)
    if len(set(strides)) != len(strides):
        raise ValueError(
            f"two FPN levels have the same stride ({strides}); kd2 keys levels by stride, so "
            "pick returned backbone layers of distinct strides"
        )
    return strides


def features_by_stride(features: OrderedDict[str, Tensor], strides: List[int]) -> Dict[int, Tensor]:
    """torchvision's named FPN dict -> ``{stride: (N, C, H, W)}`` (``strides`` from
    :func:`model_strides`)."""
    return dict(zip(strides, features.values()))


def model_strides(model: nn.Module, size: int = 256) -> Tuple[List[int], List[int]]:
    """Strides and channels of a detector's FPN levels, from one dummy forward of the backbone.

    Computed once per model: on small inputs the coarsest levels all collapse to 1x1, so
    strides cannot be read off the feature sizes of an arbitrary batch.
    """
    fixed = getattr(model.transform, "fixed_size", None)  # SSD: levels at its one input size
    hw = tuple(fixed) if fixed is not None else (size, size)
    was_training = model.training
    model.eval()
    try:
        p = next(model.backbone.parameters())
        with torch.no_grad():
            feats = model.backbone(torch.zeros(1, 3, *hw, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
    shapes = [tuple(f.shape[-2:]) for f in feats.values()]
    channels = [f.shape[1] for f in feats.values()]
    if fixed is None:
        return infer_strides(shapes, hw), channels
    strides = [round(hw[0] / h) for h, _ in shapes]  # SSD300: 8, 16, 30, 60, 100, 300
    if len(set(strides)) != len(strides):
        raise ValueError(
            f"SSD feature maps {shapes} at input {hw} have repeated strides {strides}; kd2 keys "
            "levels by stride: use a larger MODEL.SSD.SIZE"
        )
    return strides, channels


def _split_levels(flat: Tensor, counts: List[int]) -> List[Tensor]:
    return list(torch.split(flat, counts, dim=1))


def run_rpn(
    rpn: nn.Module,
    images: ImageList,
    features: OrderedDict[str, Tensor],
    strides: List[int],
    targets: List[Dict[str, Tensor]] | None = None,
    need_proposals: bool = True,
) -> Tuple[DenseOutputs, List[Tensor], Dict[str, Tensor]]:
    """torchvision ``RegionProposalNetwork.forward`` split open.

    Returns the RPN as :class:`DenseOutputs` (``K = 1``; labels filled when ``targets`` is
    given), the proposals per image ``(P_i, 4)`` (empty list if not ``need_proposals``), and the
    RPN losses ``loss_objectness`` / ``loss_rpn_box_reg`` when ``targets`` is given.
    """
    maps = list(features.values())
    objectness, deltas = rpn.head(maps)
    anchors = rpn.anchor_generator(images, maps)
    n = len(anchors)
    grid_sizes = [tuple(o.shape[-2:]) for o in objectness]
    a = objectness[0].shape[1]
    counts = [h * w * a for h, w in grid_sizes]
    obj_flat, deltas_flat = concat_box_prediction_layers(objectness, deltas)

    proposals: List[Tensor] = []
    if need_proposals:
        decoded = rpn.box_coder.decode(deltas_flat.detach(), anchors).view(n, -1, 4)
        proposals, _ = rpn.filter_proposals(decoded, obj_flat, images.image_sizes, counts)

    losses: Dict[str, Tensor] = {}
    labels = matched = None
    if targets is not None:
        tv_labels, matched_gt = rpn.assign_targets_to_anchors(anchors, targets)
        regression_targets = rpn.box_coder.encode(matched_gt, anchors)
        loss_obj, loss_reg = rpn.compute_loss(obj_flat, deltas_flat, tv_labels, regression_targets)
        losses = {"loss_objectness": loss_obj, "loss_rpn_box_reg": loss_reg}
        lab = torch.stack(tv_labels).long()
        labels = torch.where(lab == 1, 0, torch.where(lab == 0, 1, -1))
        matched = torch.stack(matched_gt)

    out = DenseOutputs(
        cls_logits=_split_levels(obj_flat.view(n, -1, 1), counts),
        box_deltas=_split_levels(deltas_flat.view(n, -1, 4), counts),
        anchors=list(torch.split(anchors[0], counts)),
        strides=strides,
        num_anchors_per_loc=a,
        num_classes=1,
        grid_sizes=grid_sizes,
        labels=labels,
        matched_gt_boxes=matched,
        box_coder=rpn.box_coder,
    )
    return out, proposals, losses


def anchors_per_location(model: nn.Module) -> int | List[int]:
    """``A`` of a torchvision dense head's anchor generator; one per level when they differ
    (SSD)."""
    per_level = list(model.anchor_generator.num_anchors_per_location())
    return per_level[0] if len(set(per_level)) == 1 else per_level


def run_dense_head(
    model: nn.Module,
    images: ImageList,
    maps: List[Tensor],
    strides: List[int],
    softmax: bool = False,
) -> Tuple[DenseOutputs, Dict[str, Tensor], List[Tensor]]:
    """Run a RetinaNet/FCOS/SSD head and its anchor (default-box) generator; returns the record
    part (no labels), torchvision's raw ``head_outputs`` dict and the per-image anchors (for its
    losses).

    ``softmax``: an SSD head, whose ``(N, R, K + 1)`` logits carry the background in column 0;
    the record moves it last. SSD places a different number of default boxes on each level.
    """
    head_outputs = model.head(maps)
    anchors = model.anchor_generator(images, maps)
    grid_sizes = [tuple(m.shape[-2:]) for m in maps]
    per_level = list(model.anchor_generator.num_anchors_per_location())
    counts = [h * w * a for (h, w), a in zip(grid_sizes, per_level)]
    logits = head_outputs["cls_logits"]
    if softmax:
        logits = canonical_roi_logits(logits)
    ctr = head_outputs.get("bbox_ctrness")
    out = DenseOutputs(
        cls_logits=_split_levels(logits, counts),
        box_deltas=_split_levels(head_outputs["bbox_regression"], counts),
        anchors=list(torch.split(anchors[0], counts)),
        strides=strides,
        num_anchors_per_loc=anchors_per_location(model),
        num_classes=logits.shape[-1] - int(softmax),
        grid_sizes=grid_sizes,
        centerness=_split_levels(ctr, counts) if ctr is not None else None,
        box_coder=model.box_coder,
        softmax=softmax,
    )
    return out, head_outputs, anchors


def run_gfl_head(
    model: nn.Module, images: ImageList, maps: List[Tensor], strides: List[int]
) -> Tuple[DenseOutputs, Dict[str, Tensor], List[Tensor]]:
    """Run a :class:`kd2.tv.gfl.GFL` head; returns the record part (no labels), the raw
    ``head_outputs`` and the per-level anchors (for the assignment and the losses).

    Record: ``cls_logits`` the ``K`` joint class-quality (QFL) logits; ``box_dist`` the
    ``4 (reg_max + 1)`` distribution logits; ``box_deltas`` their expected side distances in
    units of the stride (:func:`kd2.modeling.gfl.integral`, differentiable); ``anchors`` the ATSS
    squares (side ``octave_base_scale`` x stride, one per location), which ``box_coder``
    (:class:`kd2.tv.gfl.GFLBoxCoder`) decodes ``box_deltas`` against.
    """
    from .gfl import integral

    head_outputs = model.head(maps)
    anchors = model.grid_anchors(images, maps)
    counts = [a.shape[0] for a in anchors]
    logits = head_outputs["cls_logits"]
    dist = _split_levels(head_outputs["bbox_regression"], counts)
    out = DenseOutputs(
        cls_logits=_split_levels(logits, counts),
        box_deltas=[integral(d, model.reg_max) for d in dist],
        anchors=anchors,
        strides=strides,
        num_anchors_per_loc=1,
        num_classes=logits.shape[-1],
        grid_sizes=[tuple(m.shape[-2:]) for m in maps],
        box_coder=model.box_coder,
        box_dist=dist,
    )
    return out, head_outputs, anchors


def run_any_dense_head(
    model: nn.Module,
    images: ImageList,
    maps: List[Tensor],
    strides: List[int],
    split: int | None = None,
    softmax: bool = False,
):
    """:func:`run_gfl_head` or :func:`run_dense_head`, with the towers' features after block
    ``split`` in the record's ``head_split`` (:mod:`kd2.modeling.head_split`) when given."""
    from .gfl import GFL

    def run():
        if isinstance(model, GFL):
            return run_gfl_head(model, images, maps, strides)
        return run_dense_head(model, images, maps, strides, softmax=softmax)

    return run_with_head_split(run, split, lambda: tower_head(model))


def teacher_record(
    t: nn.Module,
    images: Tensor,
    student,
    parts,
    strides: List[int],
    split: int | None = None,
):
    """A torchvision teacher's record of a student step: the ``parts`` of ``t`` run on
    ``images`` (the student's batch in ``t``'s normalisation); the ROI head on the student's
    sampled proposals. ``strides``: ``t``'s FPN strides."""
    rec = student.teacher_view()
    if not parts:
        return rec
    feats = t.backbone(images)
    rec.features = features_by_stride(feats, strides)
    image_list = ImageList(images, [tuple(s) for s in student.image_sizes])
    if "dense" in parts:
        maps = list(feats.values())
        rec.dense = run_any_dense_head(t, image_list, maps, strides, split)[0]
    if "rpn" in parts:
        rec.rpn = run_rpn(t.rpn, image_list, feats, strides, None, False)[0]
    if "roi" in parts:
        pooled, head, logits, deltas = run_roi_head(
            t.roi_heads, feats, student.roi.proposals, student.image_sizes
        )
        rec.roi = student.roi.with_outputs(
            pooled, head, canonical_roi_logits(logits), canonical_roi_deltas(deltas)
        )
    return rec


def _relu_output(box: Tensor, level: int) -> Tensor:
    return F.relu(box)


def tower_head(model: nn.Module) -> TowerHead:
    """The towers and predictors of a torchvision RetinaNet / FCOS or kd2 GFL head, by role
    (:class:`kd2.modeling.head_split.TowerHead`), for cutting it open (CrossKD).

    torchvision's FCOS applies a ReLU to its box outputs and GFL a learnable scale per level;
    both are the head's ``reg_output``. SSD has no towers.
    """
    from torchvision.models.detection import FCOS, RetinaNet

    from .gfl import GFL, integral

    head = getattr(model, "head", None)
    if isinstance(model, (RetinaNet, FCOS, GFL)):
        cls, reg = head.classification_head, head.regression_head
        extra: Dict[str, object] = {}
        if isinstance(model, GFL):
            extra = {
                "reg_output": lambda box, level: reg.scales[level](box),
                "dist_to_deltas": partial(integral, reg_max=model.reg_max),
            }
        elif isinstance(model, FCOS):
            extra = {"reg_output": _relu_output}
        return TowerHead(
            cls_tower=flat_layers(cls.conv),
            reg_tower=flat_layers(reg.conv),
            cls_predictor=cls.cls_logits,
            reg_predictor=reg.bbox_reg,
            num_anchors=getattr(cls, "num_anchors", 1),
            **extra,
        )
    raise ValueError(
        f"{type(model).__name__} has no conv-tower dense head to cut open (RetinaNet, FCOS and "
        "GFL have one)"
    )


def dense_labels_from_matches(
    matched_idxs: List[Tensor], targets: List[Dict[str, Tensor]], num_classes: int
) -> Tuple[Tensor, Tensor]:
    """torchvision dense matches -> canonical ``(N, R)`` labels and ``(N, R, 4)`` matched boxes.

    ``matched_idxs`` use ``-1`` = background, ``-2`` = ignore, ``>= 0`` = GT index; target
    labels are already contiguous ``0..K-1``.
    """
    labels, boxes = [], []
    for m, t in zip(matched_idxs, targets):
        if t["boxes"].numel() == 0:
            lab = torch.full_like(m, num_classes)
            box = t["boxes"].new_zeros((m.numel(), 4))
        else:
            idx = m.clamp(min=0)
            lab = torch.where(m >= 0, t["labels"][idx], torch.full_like(m, num_classes))
            box = t["boxes"][idx]
        labels.append(torch.where(m == -2, -1, lab))
        boxes.append(box)
    return torch.stack(labels), torch.stack(boxes)


def match_retinanet(model: nn.Module, targets, anchors: List[Tensor]) -> List[Tensor]:
    """RetinaNet's anchor matching (``-1`` bg, ``-2`` ignore, else GT index), as in
    ``torchvision.models.detection.RetinaNet.compute_loss``; SSD's ``forward`` matches with the
    same code (its ``SSDMatcher`` never returns ``-2``)."""
    out = []
    for a, t in zip(anchors, targets):
        if t["boxes"].numel() == 0:
            out.append(torch.full((a.size(0),), -1, dtype=torch.int64, device=a.device))
        else:
            out.append(model.proposal_matcher(box_iou(t["boxes"], a)))
    return out


def match_fcos(model: nn.Module, targets, anchors: List[Tensor], counts: List[int]) -> List[Tensor]:
    """FCOS's point assignment, the rule of ``torchvision.models.detection.FCOS.compute_loss``.

    A point matches a GT when it lies inside the box, within ``center_sampling_radius * stride``
    of its centre (Chebyshev distance), and the box's largest side distance from the point is
    in the level's range ``(4s, 8s)`` (open-ended at the first and last level). Among several
    GTs the smallest one wins. Returns ``-1`` for background, else the GT index.
    """
    out = []
    for a, t in zip(anchors, targets):
        boxes = t["boxes"]
        if boxes.numel() == 0:
            out.append(torch.full((a.size(0),), -1, dtype=torch.int64, device=a.device))
            continue
        centers = (a[:, :2] + a[:, 2:]) / 2  # (R, 2)
        side = a[:, 2] - a[:, 0]  # the stride at each point
        gt_centers = (boxes[:, :2] + boxes[:, 2:]) / 2
        near = (centers[:, None] - gt_centers[None]).abs().amax(dim=2)
        ok = near < model.center_sampling_radius * side[:, None]
        ltrb = torch.cat(
            [centers[:, None] - boxes[None, :, :2], boxes[None, :, 2:] - centers[:, None]], 2
        )
        ok &= ltrb.amin(dim=2) > 0
        low, high = side * 4, side * 8
        low[: counts[0]] = 0
        high[-counts[-1] :] = float("inf")
        reach = ltrb.amax(dim=2)
        ok &= (reach > low[:, None]) & (reach < high[:, None])
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        score = ok.to(torch.float32) * (1e8 - areas[None])
        best, idx = score.max(dim=1)
        idx[best < 1e-5] = -1
        out.append(idx)
    return out


def sample_rois(
    roi_heads: nn.Module, proposals: List[Tensor], targets
) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
    """torchvision's ROI sampling; returns sampled proposals, tv labels (0 = bg), matched GT
    boxes and regression targets."""
    props, matched_idxs, labels, reg_targets = roi_heads.select_training_samples(proposals, targets)
    matched_boxes = []
    for m, t in zip(matched_idxs, targets):
        gt = t["boxes"] if t["boxes"].numel() else t["boxes"].new_zeros((1, 4))
        matched_boxes.append(gt[m.clamp(min=0)])
    return props, labels, matched_boxes, reg_targets


def run_roi_head(
    roi_heads: nn.Module,
    features: OrderedDict[str, Tensor],
    proposals: List[Tensor],
    image_sizes: List[Tuple[int, int]],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pool, box head and predictor on given proposals.

    Returns ``roi_features (M, C, 7, 7)``, ``box_head_features (M, D)`` and torchvision's raw
    ``class_logits (M, K+1)`` (background at 0) and ``box_regression (M, (K+1)*4)``.
    """
    pooled = roi_heads.box_roi_pool(features, proposals, image_sizes)
    head = roi_heads.box_head(pooled)
    logits, deltas = roi_heads.box_predictor(head)
    return pooled, head, logits, deltas


def canonical_roi_logits(logits: Tensor) -> Tensor:
    """``(..., K+1)`` background-first -> background-last (ROI ``(M, K+1)``, SSD
    ``(N, R, K+1)``)."""
    return torch.cat([logits[..., 1:], logits[..., :1]], dim=-1)


def canonical_roi_deltas(deltas: Tensor) -> Tensor:
    """``(M, (K+1)*4)`` with a background slot -> ``(M, K, 4)``."""
    return deltas.view(deltas.shape[0], -1, 4)[:, 1:]


def canonical_roi_labels(labels: List[Tensor], num_classes: int) -> List[Tensor]:
    """torchvision ROI labels (0 = bg, ``c + 1``) -> canonical (``K`` = bg, ``c``)."""
    return [torch.where(lab == 0, num_classes, lab - 1) for lab in labels]


def frcnn_losses(logits, deltas, labels, reg_targets) -> Dict[str, Tensor]:
    loss_cls, loss_box = fastrcnn_loss(logits, deltas, labels, reg_targets)
    return {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
