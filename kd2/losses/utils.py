"""Small tensor helpers shared by several distillation losses.

Everything here is a pure function of its tensor arguments (no hidden state); shapes are given in
each docstring. Boxes are XYXY in input pixels, feature maps are ``(N, C, H, W)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd2.losses.adapters import FeatureAdapter

__all__ = [
    "adapt_features",
    "aligned_box_iou",
    "atss_candidates",
    "channel_mean_std",
    "assign_fpn_levels",
    "compute_dtype",
    "box_iou",
    "decode_boxes",
    "detector_family",
    "distill_strides",
    "level_adapter",
    "masked_squared_error",
    "object_ids",
    "require_sigmoid_dense",
    "shared_strides",
    "softmax_dense_reason",
    "softmax_kl_div",
    "to_compute",
    "zero_like_loss",
]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the losses compute in: float64 when any of ``tensors`` is float64, else float32
    (for float32, float16 and bfloat16 inputs, and for non-floating ones such as masks).

    Half types are upcast so that sums, exponentials and logs keep their small terms; float64
    stays float64 so that values and gradients are exact (``torch.autograd.gradcheck`` holds,
    e.g. on a channel of standard deviation 1e-6). Results are returned in this dtype.
    """
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def to_compute(t: Tensor, *others: Tensor) -> Tensor:
    """``t`` in the :func:`compute_dtype` of ``t`` and ``others`` (``t`` itself when it already
    is: no copy, the autograd graph kept)."""
    return t.to(compute_dtype(t, *others))


def zero_like_loss(*tensors: Tensor) -> Tensor:
    """A scalar ``0`` attached to the autograd graph of ``tensors`` (when they have one), in
    their :func:`compute_dtype` (fp32, or fp64 when one of them is).

    Used where a loss has nothing to average over (no GT, no positive ROI), so that the caller
    still gets a finite value that back-propagates zeros instead of ``nan`` or a detached
    constant. ``tensors`` must be non-empty; each may have any shape (including empty).
    """
    dtype = compute_dtype(*tensors)
    out = tensors[0].to(dtype).sum() * 0.0
    for t in tensors[1:]:
        out = out + t.to(dtype).sum() * 0.0
    return out


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of two sets of XYXY boxes (areas ``(x2 - x1) * (y2 - y1)``, no ``+1``).

    Args:
        boxes1: ``(P, 4)``.
        boxes2: ``(G, 4)``.

    Returns:
        ``(P, G)`` IoU in fp32 (fp64 for fp64 boxes); ``0`` where the union is empty
        (degenerate boxes).
    """
    dtype = compute_dtype(boxes1, boxes2)
    b1 = boxes1.to(dtype)
    b2 = boxes2.to(dtype)
    area1 = (b1[:, 2] - b1[:, 0]).clamp(min=0) * (b1[:, 3] - b1[:, 1]).clamp(min=0)
    area2 = (b2[:, 2] - b2[:, 0]).clamp(min=0) * (b2[:, 3] - b2[:, 1]).clamp(min=0)
    lt = torch.maximum(b1[:, None, :2], b2[None, :, :2])  # (P, G, 2)
    rb = torch.minimum(b1[:, None, 2:], b2[None, :, 2:])  # (P, G, 2)
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def channel_mean_std(feat: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased std of ``(N, C, H, W)`` over ``(N, H, W)``.

    Returns:
        ``(C, 1)`` mean and std in ``feat``'s dtype; the std is 0 when a channel has a single
        value.
    """
    c = feat.shape[1]
    x = feat.transpose(0, 1).reshape(c, -1)
    mean = x.mean(dim=1, keepdim=True)
    std = x.std(dim=1, keepdim=True) if x.shape[1] > 1 else torch.zeros_like(mean)
    return mean, std


def aligned_box_iou(a: Tensor, b: Tensor, eps: float = 1e-6, giou: bool = False) -> Tensor:
    """IoU (or GIoU) of paired XYXY boxes (mmdet ``bbox_overlaps(is_aligned=True)``).

    Args:
        a / b: ``(P, 4)`` boxes, row ``i`` of one paired with row ``i`` of the other.
        eps: lower bound of the union (and of the enclosing area for GIoU).
        giou: return the generalized IoU ``IoU − (enclose − union) / enclose`` instead.

    Returns:
        ``(P,)`` differentiable in both inputs.
    """
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = (area_a + area_b - inter).clamp(min=eps)
    iou = inter / union
    if not giou:
        return iou
    enclose_wh = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp(
        min=0
    )
    enclose = (enclose_wh[:, 0] * enclose_wh[:, 1]).clamp(min=eps)
    return iou - (enclose - union) / enclose


def atss_candidates(
    anchors: Tensor, num_anchors_per_level: Sequence[int], gt_boxes: Tensor, topk: int = 9
) -> tuple[Tensor, Tensor, Tensor]:
    """ATSS's candidates and IoU thresholds on one image (mmdet ``ATSSAssigner``).

    Args:
        anchors: ``(R, 4)`` XYXY, levels concatenated.
        num_anchors_per_level: ``R_l`` of every level.
        gt_boxes: ``(G, 4)`` XYXY, ``G ≥ 1``.
        topk: candidates per level and GT, the nearest anchor centres (L2).

    Returns:
        ``ious`` ``(R, G)``, ``candidates`` ``(C, G)`` anchor indices and ``thresholds`` ``(G,)``
        = mean + std (unbiased) of each GT's candidate IoUs; fp32, or fp64 for fp64 boxes.
    """
    dtype = compute_dtype(anchors, gt_boxes)
    anchors, gt_boxes = anchors.to(dtype), gt_boxes.to(dtype)
    ious = box_iou(anchors, gt_boxes)
    a_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    g_ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    dist = (a_ctr[:, None, :] - g_ctr[None]).pow(2).sum(-1).sqrt()  # (R, G)
    candidates, start = [], 0
    for n in num_anchors_per_level:
        if n > 0:
            _, idx = dist[start : start + n].topk(min(topk, n), dim=0, largest=False)
            candidates.append(idx + start)
        start += n
    cand = torch.cat(candidates, dim=0)
    cand_iou = ious.gather(0, cand)
    return ious, cand, cand_iou.mean(0) + cand_iou.std(0)


def assign_fpn_levels(
    boxes: Tensor, num_levels: int, finest_scale: float = 56.0, plus_one: bool = True
) -> Tensor:
    """mmdet's box -> FPN level rule, as used by DeFeat and Global-Knowledge KD.

    ``level = clamp(floor(log2(scale / finest_scale + 1e-6)), 0, num_levels - 1)`` with
    ``scale = sqrt((w + 1) * (h + 1))`` (``plus_one=True``, the DeFeat/GK variant) or
    ``sqrt(w * h)`` (``plus_one=False``, mmdet's ``SingleRoIExtractor``). Level ``0`` is the
    finest level the caller has (e.g. P2 for Faster R-CNN, P3 for RetinaNet). With the default
    56 px: ``scale < 112`` -> 0, ``[112, 224)`` -> 1, ``[224, 448)`` -> 2, ``[448, 896)`` -> 3,
    ``>= 896`` -> 4.

    Args:
        boxes: ``(G, 4)`` XYXY.
        num_levels: number of available levels (``>= 1``).

    Returns:
        ``(G,)`` int64 level indices in ``[0, num_levels - 1]``.
    """
    b = boxes.double()  # fp64 so that exact boundaries (scale == 112, ...) are not perturbed
    extra = 1.0 if plus_one else 0.0
    w = (b[:, 2] - b[:, 0] + extra).clamp(min=0)
    h = (b[:, 3] - b[:, 1] + extra).clamp(min=0)
    scale = torch.sqrt(w * h)
    lvl = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return lvl.clamp(min=0, max=num_levels - 1).long()


def softmax_kl_div(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Per-row ``T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))``, summed over classes, in fp32
    (fp64 when a logit tensor is fp64: :func:`compute_dtype`).

    Args:
        student_logits: ``(M, C)``.
        teacher_logits: ``(M, C)`` (treated as a constant: detached).

    Returns:
        ``(M,)`` non-negative KL per row.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    t = float(temperature)
    dtype = compute_dtype(student_logits, teacher_logits)
    log_p_s = F.log_softmax(student_logits.to(dtype) / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().to(dtype) / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return kl * (t * t)


def masked_squared_error(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``Σ_{n,c,h,w} mask[n,h,w] · (pred − target)²`` in fp32, fp64 when ``pred`` or ``target``
    is (mask broadcast over channels).

    Args:
        pred: ``(N, C, H, W)`` (e.g. adapted student features).
        target: ``(N, C, H, W)`` (teacher features; detached).
        mask: ``(N, H, W)`` bool or float weights.

    Returns:
        Scalar sum. The caller chooses the normaliser.
    """
    dtype = compute_dtype(pred, target)
    diff = (pred.to(dtype) - target.detach().to(dtype)).pow(2)
    return (diff * mask.to(diff.dtype)[:, None]).sum()


def adapt_features(
    adapter: FeatureAdapter,
    student_features: dict[int, Tensor],
    teacher_features: dict[int, Tensor],
    strides: Sequence[int],
) -> tuple[list[Tensor], list[Tensor]]:
    """Run the per-stride adapter on the student maps and pair them with the teacher maps.

    Args:
        adapter: maps ``(N, C_s, H, W)`` to ``(N, C_t, H, W)`` per stride.
        student_features / teacher_features: ``{stride: (N, C, H, W)}``.
        strides: the strides to use (must be adapter strides present in both dicts).

    Returns:
        ``(adapted_student, teacher)`` lists, each ``(N, C_t, H_l, W_l)`` per stride, in fp32
        (fp64 when either map is fp64); the teacher maps are detached.
    """
    adapted, targets = [], []
    for s in strides:
        if s not in student_features or s not in teacher_features:
            raise KeyError(
                f"stride {s} missing from the student {sorted(student_features)} or teacher "
                f"{sorted(teacher_features)} features"
            )
        a = adapter.convs[str(s)](student_features[s])
        t = teacher_features[s].detach()
        dtype = compute_dtype(a, t)
        a, t = a.to(dtype), t.to(dtype)
        if a.shape != t.shape:
            raise ValueError(
                f"stride {s}: adapted student map {tuple(a.shape)} does not match the teacher map "
                f"{tuple(t.shape)}"
            )
        adapted.append(a)
        targets.append(t)
    return adapted, targets


def shared_strides(
    adapter: FeatureAdapter,
    student_features: dict[int, Tensor],
    teacher_features: dict[int, Tensor],
) -> list[int]:
    """Adapter strides present in both feature dicts, finest first; raises if there are none."""
    strides = [s for s in adapter.strides if s in student_features and s in teacher_features]
    if not strides:
        raise ValueError(
            f"no stride of the adapter {adapter.strides} is present in both the student "
            f"{sorted(student_features)} and teacher {sorted(teacher_features)} features"
        )
    return strides


def detector_family(arch: str, record) -> str:
    """``"faster_rcnn"`` (two-stage), ``"gfl"`` (a dense head with box distributions),
    ``"fcos"`` (a dense head with centerness), ``"ssd"`` (a softmax dense head) or
    ``"retinanet"`` (any other sigmoid dense head): the key of the per-detector defaults the
    papers' configs give.

    Args:
        arch: ``"two_stage"`` or ``"one_stage"``.
        record: the student's :class:`~kd2.structures.StepRecord` of the step.
    """
    if arch == "two_stage":
        return "faster_rcnn"
    dense = getattr(record, "dense", None)
    if dense is not None and getattr(dense, "softmax", False):
        return "ssd"
    if dense is not None and getattr(dense, "box_dist", None) is not None:
        return "gfl"
    if dense is not None and dense.centerness is not None:
        return "fcos"
    return "retinanet"


def distill_strides(
    available: Sequence[int], configured: Sequence[int], default_count: int
) -> list[int]:
    """The FPN strides a feature method distils, finest first.

    Args:
        available: strides present in both detectors (and the method's adapters).
        configured: the method's ``STRIDES`` option; empty = the ``default_count`` finest
            available strides (the released configs count levels from the finest: Faster R-CNN
            P2–P5 is 4, RetinaNet / FCOS P3–P7 is 5).
        default_count: levels used when ``configured`` is empty.

    Raises:
        ValueError: a configured stride is not available.
    """
    strides = sorted(available)
    if not configured:
        return strides[:default_count]
    missing = sorted(set(int(s) for s in configured) - set(strides))
    if missing:
        raise ValueError(
            f"STRIDES {list(configured)} include {missing}, which student and teacher do not "
            f"both have; available strides: {strides}"
        )
    return sorted(int(s) for s in configured)


def level_adapter(
    student_channels: dict[int, int],
    teacher_channels: dict[int, int],
    configured: Sequence[int],
    default_count: int,
    identity_when_equal: bool = True,
) -> FeatureAdapter:
    """The 1×1 align convs of the levels a feature method distils (:func:`distill_strides` of
    the shared strides), identity where the channels are equal — the "align conv only if the
    channels differ" rule of the CWD, PKD, MGD and FGD recipes (``identity_when_equal=False``:
    a conv on every level, DSI's projector). ``adapter.strides`` are the distilled strides."""
    shared = sorted(set(student_channels) & set(teacher_channels))
    used = distill_strides(shared, configured, default_count) if shared else []
    return FeatureAdapter(
        {s: student_channels[s] for s in used} if used else student_channels,
        {s: teacher_channels[s] for s in used} if used else teacher_channels,
        kernel_size=1,
        identity_when_equal=identity_when_equal,
    )


def require_one_stage(method: str, arch: str) -> None:
    """Raise unless ``arch`` is ``"one_stage"`` (methods defined on dense-head outputs only)."""
    if arch != "one_stage":
        raise ValueError(
            f"{method} works on one-stage detectors only (arch 'one_stage'), got arch {arch!r}"
        )


def softmax_dense_reason(method: str) -> str:
    """Why ``method`` (sigmoid dense heads only) cannot distill a softmax dense head (SSD), and
    what to use instead: the one message of the build-time check and the step-time checks."""
    return (
        f"{method} is defined on sigmoid dense heads (RetinaNet, FCOS); this detector's dense "
        "head is a softmax classifier with a background class (SSD). Use a method that supports "
        "softmax dense heads (ClassifierKD, DeFeat, FGFI, FitNet, or GlobalKD with "
        "KD.GLOBALKD.SOFT_WEIGHT 0) or a sigmoid-head detector (RetinaNet, FCOS)"
    )


def detr_only_reason(family: str | None, reads: str) -> str | None:
    """Why a method that ``reads`` a DETR decoder's outputs cannot apply to a detector of
    ``family`` (``None`` when it is a DETR, or not yet bound)."""
    if family in (None, "detr"):
        return None
    return (
        f"it {reads}, which this detector does not have. Use a DETR-family student "
        "(MODEL.BACKEND transformers)"
    )


def require_sigmoid_dense(method: str, dense) -> None:
    """Raise when a method written for sigmoid dense heads meets a softmax one (SSD).

    The last line of defence: the distiller refuses such a method when the model is built
    (:meth:`kd2.losses.KDMethod.unsupported_reason`)."""
    if dense is not None and getattr(dense, "softmax", False):
        raise ValueError(softmax_dense_reason(method))


def object_ids(image_index: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Group positives into objects by their matched GT box.

    Within one image, positives with identical matched boxes belong to one object
    (``torch.unique`` over the ``(image, x1, y1, x2, y2)`` rows; two GTs with exactly the same
    box in one image are merged).

    Args:
        image_index: ``(P,)`` image of each positive.
        boxes: ``(P, 4)`` matched GT boxes.

    Returns:
        ``(ids (P,) long in [0, O), objects (O, 5))``: each positive's object, and each object's
        ``(image, x1, y1, x2, y2)`` row (float64).
    """
    rows = torch.cat([image_index[:, None].double(), boxes.detach().double()], dim=1)
    if rows.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device), rows
    objects, ids = torch.unique(rows, dim=0, return_inverse=True)
    return ids, objects


def decode_boxes(box_coder, deltas: Tensor, anchors: Tensor) -> Tensor:
    """Apply a framework's box transform: ``(P, 4)`` deltas on ``(P, 4)`` XYXY anchors/proposals.

    Duck-typed, so that no framework is imported here: torchvision's ``BoxCoder`` exposes
    ``decode_single(deltas, boxes)`` and ``BoxLinearCoder`` (FCOS) an element-wise
    ``decode(deltas, boxes)``; Detectron2's ``Box2BoxTransform`` / ``Box2BoxTransformLinear``
    ``apply_deltas(deltas, boxes)``. Differentiable in ``deltas``.
    """
    if box_coder is None:
        raise ValueError("the record has no box_coder; the backend must set one to decode boxes")
    if hasattr(box_coder, "decode_single"):
        return box_coder.decode_single(deltas, anchors)
    if hasattr(box_coder, "apply_deltas"):
        return box_coder.apply_deltas(deltas, anchors)
    if hasattr(box_coder, "decode"):  # torchvision's BoxLinearCoder
        return box_coder.decode(deltas, anchors)
    raise TypeError(
        f"{type(box_coder).__name__} has neither decode_single nor apply_deltas; cannot decode"
    )
