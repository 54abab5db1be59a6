"""Classifier-to-detector distillation (Guo, Alvarez, Salzmann, NeurIPS 2021): functional core.

An image classifier trained on object crops teaches the detector (``docs/algorithms.md`` §4):

* **Region crops** (:func:`crop_boxes`): a spatial transformer on the detector's own augmented,
  normalised input — ``affine_grid`` + bilinear ``grid_sample`` at ``size × size`` (112), with
  ``θ = [[(x2−x1)/W, 0, (x1+x2)/W − 1], [0, (y2−y1)/H, (y1+y2)/H − 1]]`` for a box clamped to the
  ``W × H`` image — differentiable with respect to the box coordinates.
* **KD for classification** (:func:`classifier_kd_cls_loss`): every positive anchor of an object
  takes the teacher's logits of that object's GT crop as its target; softmax heads get the
  teacher's ``K`` probabilities padded with a zero background probability, sigmoid heads the
  code's ``kl-ce`` variant (sigmoids L1-normalised across classes); ``T = 2``, ``ε = 1e-10`` on
  both distributions, mean over the positives, times ``T²``.

* **KD for localisation** (:func:`classifier_kd_loc_loss`): the crops at each positive's
  predicted box and at its GT box are compared through the eyes of the teacher — raw pixels
  average-pooled to 4×4 and the teacher's stem features (conv1-bn-relu-maxpool) pooled to 8×8,
  mean absolute difference each, summed per object and averaged over the positives. Gradients
  reach only the predicted boxes (so only the student's box regression).

:class:`ClassifierKD` reads both terms off the student's record only (no detector teacher):
softmax heads (Faster R-CNN's ROI head on its positive ROIs, SSD's dense head) and sigmoid heads
(RetinaNet, FCOS: positive anchors/points). The classifier teacher (a
:class:`kd2.modeling.classifier_teacher.ClassifierTeacher`, trained by
``tools/train_crop_classifier.py``) is attached by the meta-architecture; it maps the detector's
normalised input to its own normalisation, so crops and the pixel term stay in the detector's
units as in the official code.

Choices (``docs/algorithms.md`` §4): the official code (SSD300 only) is followed. Objects are
the GT boxes that have at least one positive (the code crops every GT, but only those with
positives reach a loss); positives of the two-stage head are the sampled foreground ROIs, their
predicted box the class-specific delta of their GT class decoded on the proposal. The code's
``kl-bce`` sigmoid variant (per-class Bernoulli KL) is not offered: algorithms.md shows its
"flip" is a no-op and the released config uses ``kl-ce``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .utils import compute_dtype, decode_boxes, object_ids, to_compute

__all__ = [
    "ClassifierKD",
    "Positives",
    "classifier_kd_cls_loss",
    "classifier_kd_loc_loss",
    "crop_boxes",
    "record_positives",
]


def crop_boxes(images: Tensor, boxes: Tensor, batch_index: Tensor, size: int = 112) -> Tensor:
    """Differentiable crops of boxes, resampled to ``size × size``.

    Args:
        images: ``(N, 3, H, W)`` (the detector's input; any normalisation).
        boxes: ``(M, 4)`` XYXY in pixels of ``images``; clamped to ``[0, W] × [0, H]``.
        batch_index: ``(M,)`` long, the image of each box.
        size: output side.

    Returns:
        ``(M, 3, size, size)``: ``grid_sample(images[b], affine_grid(θ))`` (bilinear, zeros
        padding, ``align_corners=False``) with ``θ`` as in the module docstring; gradients reach
        ``images`` and ``boxes``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (M, 4) XYXY, got shape {tuple(boxes.shape)}")
    if batch_index.shape != boxes.shape[:1]:
        raise ValueError(
            f"batch_index {tuple(batch_index.shape)} must have one entry per box ({boxes.shape[0]})"
        )
    n, c, h, w = images.shape
    m = boxes.shape[0]
    out = images.new_zeros((m, c, size, size))
    if m == 0:
        return out + boxes.sum() * 0  # keeps the graph to the boxes
    b = boxes.to(images.dtype)
    x1, x2 = b[:, 0].clamp(0, w), b[:, 2].clamp(0, w)
    y1, y2 = b[:, 1].clamp(0, h), b[:, 3].clamp(0, h)
    zero = torch.zeros_like(x1)
    theta = torch.stack(
        [
            torch.stack([(x2 - x1) / w, zero, (x1 + x2) / w - 1], dim=1),
            torch.stack([zero, (y2 - y1) / h, (y1 + y2) / h - 1], dim=1),
        ],
        dim=1,
    )  # (M, 2, 3)
    grid = F.affine_grid(theta, [m, c, size, size], align_corners=False)
    crops = []
    order = []
    for i in batch_index.unique().tolist():
        if not 0 <= i < n:
            raise IndexError(f"batch_index {i} is outside the batch of {n} images")
        sel = (batch_index == i).nonzero(as_tuple=True)[0]
        src = images[i : i + 1].expand(sel.numel(), c, h, w)
        crops.append(F.grid_sample(src, grid[sel], mode="bilinear", align_corners=False))
        order.append(sel)
    return out.index_copy(0, torch.cat(order), torch.cat(crops))


def classifier_kd_cls_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 2.0,
    head: str = "softmax",
    eps: float = 1e-10,
) -> Tensor:
    """KD-cls of the positive anchors against their objects' classifier logits.

    Args:
        student_logits: ``(P, K + 1)`` softmax-head logits (background last) or ``(P, K)``
            sigmoid-head logits.
        teacher_logits: ``(P, K)`` the classifier's logits of each anchor's object (repeated for
            the anchors of one object), detached.
        temperature: ``T``.
        head: ``"softmax"``: ``p^s = softmax(z/T)`` over ``K + 1``, ``p^t = [softmax(u/T), 0]``;
            ``"sigmoid"``: ``p = σ(·/T)`` L1-normalised across the ``K`` classes for both.
        eps: added to both distributions inside the logs.

    Returns:
        ``T² · mean_P Σ_c p^t_c (log(p^t_c + ε) − log(p^s_c + ε))`` in fp32 (fp64 when a logit
        tensor is fp64; ``ε`` is the official code's constant, kept there too); ``0`` (with a
        graph) without positives.
    """
    t = float(temperature)
    if t <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k = teacher_logits.shape[-1]
    dtype = compute_dtype(student_logits, teacher_logits)
    if head == "softmax":
        if student_logits.shape[-1] != k + 1:
            raise ValueError(
                f"a softmax head needs K + 1 = {k + 1} student logits (background last), got "
                f"{student_logits.shape[-1]}"
            )
        p_s = F.softmax(student_logits.to(dtype) / t, dim=-1)
        p_t = F.softmax(teacher_logits.detach().to(dtype) / t, dim=-1)
        p_t = torch.cat([p_t, p_t.new_zeros(p_t.shape[0], 1)], dim=-1)
    elif head == "sigmoid":
        if student_logits.shape[-1] != k:
            raise ValueError(
                f"a sigmoid head needs K = {k} student logits, got {student_logits.shape[-1]}"
            )
        s = torch.sigmoid(student_logits.to(dtype) / t)
        u = torch.sigmoid(teacher_logits.detach().to(dtype) / t)
        p_s = s / s.sum(dim=-1, keepdim=True)
        p_t = u / u.sum(dim=-1, keepdim=True)
    else:
        raise ValueError(f"head must be 'softmax' or 'sigmoid', got {head!r}")
    if student_logits.shape[0] == 0:
        return student_logits.to(dtype).sum() * 0.0
    kl = (p_t * ((p_t + eps).log() - (p_s + eps).log())).sum(dim=-1)
    return kl.mean() * (t * t)


def classifier_kd_loc_loss(
    images: Tensor,
    pred_boxes: Tensor,
    target_boxes: Tensor,
    batch_index: Tensor,
    stem: Callable[[Tensor], Tensor] | None,
    size: int = 112,
    pixel_pool: int = 4,
    feature_pool: int = 8,
    chunk: int = 256,
) -> Tensor:
    """KD-loc: predicted-box crops against GT-box crops, in pixels and in the teacher's stem.

    Args:
        images: ``(N, 3, H, W)`` the detector's input (treated as a constant).
        pred_boxes: ``(P, 4)`` decoded predicted boxes of the positives (with gradients).
        target_boxes: ``(P, 4)`` their GT boxes (constants).
        batch_index: ``(P,)`` image of each positive.
        stem: the frozen teacher's stem, ``(P, 3, size, size) -> (P, C, h, w)``; ``None`` keeps
            the pixel term only.
        size: crop side (112).
        pixel_pool / feature_pool: adaptive average-pool sides of the two terms (4 / 8).
        chunk: positives per forward of the stem (memory).

    Returns:
        fp32 scalar (fp64 when the boxes or the images are fp64) ``mean_P [mean|pool(crop_p) −
        pool(crop_t)| + mean|pool(stem(crop_p)) − pool(stem(crop_t))|]``; ``0`` (with a graph)
        without positives.
    """
    if pred_boxes.shape != target_boxes.shape:
        raise ValueError(
            f"pred_boxes {tuple(pred_boxes.shape)} and target_boxes "
            f"{tuple(target_boxes.shape)} differ in shape"
        )
    p = pred_boxes.shape[0]
    dtype = compute_dtype(pred_boxes, images)
    if p == 0:
        return pred_boxes.to(dtype).sum() * 0.0
    images = images.detach()
    total = pred_boxes.new_zeros((), dtype=dtype)
    for s in range(0, p, chunk):
        sl = slice(s, s + chunk)
        pred = crop_boxes(images, pred_boxes[sl], batch_index[sl], size)
        with torch.no_grad():
            target = crop_boxes(images, target_boxes[sl].detach(), batch_index[sl], size)
        pix = (
            (F.adaptive_avg_pool2d(pred, pixel_pool) - F.adaptive_avg_pool2d(target, pixel_pool))
            .abs()
            .flatten(1)
            .mean(dim=1)
        )
        per_object = pix.to(dtype)
        if stem is not None:
            f_pred = F.adaptive_avg_pool2d(stem(pred), feature_pool)
            with torch.no_grad():
                f_target = F.adaptive_avg_pool2d(stem(target), feature_pool)
            per_object = per_object + to_compute(
                (f_pred - f_target).abs().flatten(1).mean(dim=1), per_object
            )
        total = total + per_object.sum()
    return total / p


class Positives(NamedTuple):
    """The positives of one student step, as the two KD terms need them.

    Attributes:
        logits: ``(P, K + 1)`` softmax logits (background last) or ``(P, K)`` sigmoid logits.
        head: ``"softmax"`` or ``"sigmoid"``.
        pred_boxes: ``(P, 4)`` decoded predicted boxes (gradients to the box deltas only).
        target_boxes: ``(P, 4)`` matched GT boxes.
        image_index: ``(P,)`` image of each positive.
    """

    logits: Tensor
    head: str
    pred_boxes: Tensor
    target_boxes: Tensor
    image_index: Tensor


def record_positives(record: StepRecord) -> Positives:
    """The positives of a student record: the foreground sampled ROIs of a two-stage detector
    (class-specific deltas of the GT class, decoded on the detached proposals), else the
    foreground anchors/points of the dense head (decoded on the anchors)."""
    k = record.num_classes
    if record.roi is not None:
        roi = record.roi
        labels = roi.cat_labels
        fg = ((labels >= 0) & (labels < k)).nonzero(as_tuple=True)[0]
        counts = torch.tensor([len(p) for p in roi.proposals], device=labels.device)
        image_index = torch.repeat_interleave(
            torch.arange(len(counts), device=labels.device), counts
        )
        deltas = roi.box_deltas[fg, labels[fg]]
        proposals = torch.cat(roi.proposals)[fg].detach()
        return Positives(
            logits=roi.cls_logits[fg],
            head="softmax",
            pred_boxes=decode_boxes(roi.box_coder, deltas, proposals),
            target_boxes=torch.cat(roi.matched_gt_boxes)[fg],
            image_index=image_index[fg],
        )
    dense = record.dense
    if dense is None or dense.labels is None or dense.matched_gt_boxes is None:
        raise ValueError(
            "ClassifierKD needs the student's assignment: an ROI head, or a dense head with "
            "labels and matched GT boxes"
        )
    pos = (dense.labels >= 0) & (dense.labels < k)  # (N, ΣR)
    img, anc = pos.nonzero(as_tuple=True)
    deltas = torch.cat(dense.box_deltas, dim=1)[img, anc]
    anchors = torch.cat(dense.anchors)[anc]
    return Positives(
        logits=torch.cat(dense.cls_logits, dim=1)[img, anc],
        head="softmax" if dense.softmax else "sigmoid",
        pred_boxes=decode_boxes(dense.box_coder, deltas, anchors),
        target_boxes=dense.matched_gt_boxes[img, anc],
        image_index=img,
    )


@KD_METHOD_REGISTRY.register()
class ClassifierKD(KDMethod):
    """Classifier-to-detector distillation (KD-cls + KD-loc) from an image classifier teacher.

    Config (``cfg.KD.CLASSIFIERKD``): ``TEACHER.WEIGHTS`` (a checkpoint written by
    ``tools/train_crop_classifier.py``), ``CLS_WEIGHT`` λ_kc (0.4; the loss carries ``T²``),
    ``LOC_WEIGHT`` λ_kl (0.15), ``TEMPERATURE`` (2), ``CROP_SIZE`` (0 = the classifier's training
    crop size; 112 in the paper), ``LOC_FEATURES`` (the teacher-stem term of KD-loc, on).
    Losses: ``loss_kd_classifier_cls``, ``loss_kd_classifier_loc``.

    Needs no detector teacher (:attr:`teacher_parts` is empty), so it runs alone or next to
    detector-to-detector methods in one ``KD.METHODS`` list. The meta-architecture attaches the
    frozen classifier with :meth:`attach_classifier`; it is kept outside the module tree (never
    in ``state_dict()``, the optimizer or DDP).
    """

    card = MethodCard(
        title="classifier-to-detector",
        summary="an image-classifier teacher: KD-cls and KD-loc on object crops",
        paper="Guo et al., Distilling Image Classifiers in Object Detectors (NeurIPS 2021)",
        code="NVlabs/DICOD",
        project="ClassifierKD",
        terms=("loss_kd_classifier_cls", "loss_kd_classifier_loc"),
        families=("ssd", "faster_rcnn", "retinanet", "fcos"),
    )

    teacher_parts = frozenset()
    #: The distiller builds ``KD.CLASSIFIERKD.TEACHER`` and attaches it.
    needs_classifier_teacher = True

    def __init__(
        self,
        *,
        num_classes: int,
        teacher_weights: str = "",
        cls_weight: float = 0.4,
        loc_weight: float = 0.15,
        temperature: float = 2.0,
        crop_size: int = 0,
        loc_features: bool = True,
        chunk: int = 256,
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"ClassifierKD TEMPERATURE must be > 0, got {temperature}")
        if crop_size < 0:
            raise ValueError(
                f"ClassifierKD CROP_SIZE must be >= 0 (0 = the classifier's), got {crop_size}"
            )
        self.num_classes = int(num_classes)
        self.teacher_weights = str(teacher_weights)
        self.cls_weight = float(cls_weight)
        self.loc_weight = float(loc_weight)
        self.temperature = float(temperature)
        self.crop_size = int(crop_size)
        self.loc_features = bool(loc_features)
        self.chunk = int(chunk)
        object.__setattr__(self, "_classifier", None)

    @classmethod
    def from_config(
        cls,
        node,
        *,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        num_classes: int,
        arch: str,
    ) -> ClassifierKD:
        weights = node.TEACHER.WEIGHTS
        if not weights:
            raise ValueError(
                "ClassifierKD needs a classifier teacher: set KD.CLASSIFIERKD.TEACHER.WEIGHTS to a "
                "checkpoint written by tools/train_crop_classifier.py"
            )
        return cls(
            num_classes=num_classes,
            teacher_weights=weights,
            cls_weight=node.CLS_WEIGHT,
            loc_weight=node.LOC_WEIGHT,
            temperature=node.TEMPERATURE,
            crop_size=node.CROP_SIZE,
            loc_features=node.LOC_FEATURES,
        )

    def attach_classifier(self, classifier) -> None:
        """Attach the frozen classifier teacher: an object with ``logits(crops) -> (M, K)``,
        ``stem(crops) -> (M, C, h, w)`` (both on crops of the detector's normalised input) and
        ``num_classes`` / ``crop_size`` attributes."""
        if classifier.num_classes != self.num_classes:
            raise ValueError(
                f"the classifier teacher {self.teacher_weights!r} has {classifier.num_classes} "
                f"classes but the detector has {self.num_classes}; train it on the detector's "
                "dataset (tools/train_crop_classifier.py)"
            )
        object.__setattr__(self, "_classifier", classifier)

    @property
    def classifier(self):
        if self._classifier is None:
            raise RuntimeError(
                "ClassifierKD has no classifier teacher attached; build the detector with "
                "kd2's meta-architectures (they attach KD.CLASSIFIERKD.TEACHER)"
            )
        return self._classifier

    def resolved_crop_size(self) -> int:
        return self.crop_size or int(self.classifier.crop_size)

    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        clf = self.classifier
        size = self.resolved_crop_size()
        pos = record_positives(student)
        ids, objects = object_ids(pos.image_index, pos.target_boxes)
        images = student.images.detach()
        with torch.no_grad():
            crops = crop_boxes(images, objects[:, 1:].to(images.dtype), objects[:, 0].long(), size)
            object_logits = (
                clf.logits(crops) if len(objects) else crops.new_zeros(0, self.num_classes)
            )
        loss_cls = classifier_kd_cls_loss(
            pos.logits, object_logits[ids], self.temperature, head=pos.head
        )
        loss_loc = classifier_kd_loc_loss(
            images,
            pos.pred_boxes,
            pos.target_boxes,
            pos.image_index,
            clf.stem if self.loc_features else None,
            size=size,
            chunk=self.chunk,
        )
        return {
            "loss_kd_classifier_cls": loss_cls * self.cls_weight,
            "loss_kd_classifier_loc": loss_loc * self.loc_weight,
        }
