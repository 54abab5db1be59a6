"""Distillation meta-architectures for Detectron2.

``DistillGeneralizedRCNN`` and ``DistillRetinaNet`` subclass Detectron2's ``GeneralizedRCNN`` and
``RetinaNet`` and are registered in ``META_ARCH_REGISTRY`` (``MODEL.META_ARCHITECTURE:
"DistillGeneralizedRCNN"``). In train mode they run the student's steps explicitly — the same
calls in the same order as Detectron2's own ``forward``, so the detection losses are
bit-identical (tested) — fill the canonical :mod:`kd2.structures` record, run the needed parts of
the teacher under ``no_grad`` on the same batch (Detectron2 resizes in the data mapper, so both
networks see the same padded size), and add the ``loss_kd_*`` terms of :mod:`kd2.losses`. In eval
mode they are the plain student. The teacher is held by :class:`~kd2.modeling.distiller.
DistillerMixin`, outside the module tree.

Detectron2's conventions are already kd2's canonical ones (contiguous classes, background last,
dense labels ``-1``/``K``); only the RPN labels (1/0/-1) and the level names (``p2``... -> stride)
are translated. Anchors are ordered size-major within a location, as Detectron2 generates them.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, RetinaNet
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.structures import Boxes
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from kd2.modeling.backends import input_convention
from kd2.modeling.distiller import DistillerMixin, model_family, teachers_needed
from kd2.modeling.gfl import integral
from kd2.modeling.head_split import TowerHead, flat_layers, run_with_head_split
from kd2.modeling.level_map import TeacherInfo, detector_parts
from kd2.modeling.prototypes import own_padded_size, pool_instance_boxes
from kd2.structures import DenseOutputs, RoiOutputs, StepRecord

from .gfl import GFL
from .teacher import build_teacher
from .teacher_cache import cache_forward_keys

__all__ = ["DistillFCOS", "DistillGFL", "DistillGeneralizedRCNN", "DistillRetinaNet"]


def _strides(model: nn.Module) -> Dict[str, int]:
    return {name: spec.stride for name, spec in model.backbone.output_shape().items()}


def _channels(model: nn.Module) -> Dict[int, int]:
    return {spec.stride: spec.channels for spec in model.backbone.output_shape().values()}


def model_input_convention(model: nn.Module):
    """``(pixel_mean, pixel_std, channel order, scale)`` of a Detectron2 model's input
    (0-255 pixels in ``INPUT.FORMAT``), for a classifier teacher. ``DenseDetector`` (FCOS)
    keeps no ``input_format``: its data mapper decides, BGR by default as in Detectron2."""
    return (
        model.pixel_mean.flatten().tolist(),
        model.pixel_std.flatten().tolist(),
        getattr(model, "input_format", "BGR"),
        255.0,
    )


def _num_classes(model: nn.Module) -> int:
    """Foreground classes of a Detectron2 detector (dense heads or ROI heads)."""
    if hasattr(model, "num_classes"):
        return int(model.num_classes)
    return int(model.roi_heads.num_classes)


def _by_stride(model: nn.Module, features: Dict[str, Tensor]) -> Dict[int, Tensor]:
    strides = _strides(model)
    return {strides[name]: f for name, f in sorted(features.items(), key=lambda x: strides[x[0]])}


def _rpn_outputs(rpn, features: Dict[str, Tensor], strides: Dict[str, int]):
    """Detectron2 ``RPN.forward``'s first half: anchors, head, transposed predictions."""
    feats = [features[f] for f in rpn.in_features]
    anchors = rpn.anchor_generator(feats)
    objectness, deltas = rpn.rpn_head(feats)
    grid_sizes = [tuple(o.shape[-2:]) for o in objectness]
    a = objectness[0].shape[1]
    objectness = [o.permute(0, 2, 3, 1).flatten(1) for o in objectness]
    box_dim = rpn.anchor_generator.box_dim
    deltas = [
        x.view(x.shape[0], -1, box_dim, x.shape[-2], x.shape[-1])
        .permute(0, 3, 4, 1, 2)
        .flatten(1, -2)
        for x in deltas
    ]
    record = DenseOutputs(
        cls_logits=[o.unsqueeze(-1) for o in objectness],
        box_deltas=deltas,
        anchors=[b.tensor for b in anchors],
        strides=[strides[f] for f in rpn.in_features],
        num_anchors_per_loc=a,
        num_classes=1,
        grid_sizes=grid_sizes,
        box_coder=rpn.box2box_transform,
    )
    return record, anchors, objectness, deltas


def _dense_outputs(model, feats: List[Tensor], strides: List[int]):
    """A RetinaNet/FCOS/GFL head and anchors as :class:`DenseOutputs` (labels not filled).

    Returns the record part, the anchors and the transposed predictions (logits, deltas and,
    for FCOS, centerness; GFL: logits and distribution logits) that the detector's ``losses``
    take."""
    if isinstance(model, GFL):
        return model.dense_outputs(feats, strides)
    predictions = model.head(feats)
    dims = [model.num_classes, 4, 1][: len(predictions)]
    transposed = model._transpose_dense_predictions(predictions, dims)
    logits, deltas = transposed[0], transposed[1]
    anchors = model.anchor_generator(feats)
    record = DenseOutputs(
        cls_logits=logits,
        box_deltas=deltas,
        anchors=[b.tensor for b in anchors],
        strides=strides,
        num_anchors_per_loc=model.anchor_generator.num_anchors[0],
        num_classes=model.num_classes,
        grid_sizes=[tuple(f.shape[-2:]) for f in feats],
        centerness=transposed[2] if len(transposed) > 2 else None,
        box_coder=model.box2box_transform,
    )
    return record, anchors, transposed


def _tower_head(model) -> TowerHead:
    """The towers and predictors of a Detectron2 RetinaNet / FCOS or kd2 GFL head, by role
    (:class:`kd2.modeling.head_split.TowerHead`; FCOS's ReLU on the box sides is applied at
    decoding, so its raw outputs need no ``reg_output``)."""
    head = model.head
    extra: Dict[str, object] = {}
    if isinstance(model, GFL):
        extra = {
            "reg_output": lambda box, level: head.scales[level](box),
            "dist_to_deltas": partial(integral, reg_max=model.reg_max),
        }
    return TowerHead(
        cls_tower=flat_layers(head.cls_subnet),
        reg_tower=flat_layers(head.bbox_subnet),
        cls_predictor=head.cls_score,
        reg_predictor=head.bbox_pred,
        num_anchors=model.anchor_generator.num_anchors[0],
        **extra,
    )


def _head_outputs(model, feats: List[Tensor], strides: List[int], split: int | None):
    """:func:`_dense_outputs`, with the towers' features after block ``split`` in the record's
    ``head_split`` when a method asked for them."""
    return run_with_head_split(
        lambda: _dense_outputs(model, feats, strides), split, lambda: _tower_head(model)
    )


def _base_record(model, images, gt_instances, features) -> StepRecord:
    return StepRecord(
        images=images.tensor,
        image_sizes=[tuple(s) for s in images.image_sizes],
        gt_boxes=[x.gt_boxes.tensor for x in gt_instances],
        gt_labels=[x.gt_classes for x in gt_instances],
        features=_by_stride(model, features),
        num_classes=model.num_classes_kd,
    )


def _roi_outputs(roi_heads, features: Dict[str, Tensor], boxes: List[Boxes]):
    feats = [features[f] for f in roi_heads.box_in_features]
    pooled = roi_heads.box_pooler(feats, boxes)
    head = roi_heads.box_head(pooled)
    logits, deltas = roi_heads.box_predictor(head)
    return pooled, head, (logits, deltas)


def model_info(model: nn.Module) -> TeacherInfo:
    """A Detectron2 detector's description for the distiller."""
    family = model_family(model)
    per_loc = None if family == "faster_rcnn" else model.anchor_generator.num_anchors[0]
    return TeacherInfo(
        channels=_channels(model),
        num_classes=_num_classes(model),
        parts=detector_parts(family),
        family=family,
        anchors_per_location=per_loc,
        name=type(model).__name__,
    )


def teacher_record(
    t: nn.Module, images: Tensor, student: StepRecord, parts, split: int | None = None
) -> StepRecord:
    """A Detectron2 teacher's record of a student step: the ``parts`` of ``t`` run on ``images``
    (the batch in ``t``'s normalisation, padded to its size divisibility); the ROI head on the
    student's sampled proposals."""
    rec = student.teacher_view()
    if not parts:
        return rec
    features = t.backbone(images)
    rec.features = _by_stride(t, features)
    strides = _strides(t)
    if "dense" in parts:
        feats = [features[f] for f in t.head_in_features]
        t_strides = [strides[f] for f in t.head_in_features]
        rec.dense = _head_outputs(t, feats, t_strides, split)[0]
    if "rpn" in parts:
        rec.rpn = _rpn_outputs(t.proposal_generator, features, strides)[0]
    if "roi" in parts:
        boxes = [Boxes(p) for p in student.roi.proposals]
        pooled, head, (logits, deltas) = _roi_outputs(t.roi_heads, features, boxes)
        rec.roi = student.roi.with_outputs(
            pooled, head, logits, deltas.view(deltas.shape[0], -1, 4)
        )
    return rec


class _Distill(DistillerMixin):
    """The Detectron2 training forward shared by every meta-architecture: student steps, the
    teacher parts under ``no_grad``, the KD losses. In eval mode: the plain student."""

    kd_backend = "detectron2"

    @classmethod
    def from_config(cls, cfg):
        """The student's own ``from_config`` plus the teacher of ``cfg.KD.TEACHER`` (``None``
        when no method reads a detector teacher, e.g. ``ClassifierKD`` alone)."""
        ret = super().from_config(cfg)
        used = teachers_needed(cfg.KD)
        ret["teacher"] = build_teacher(cfg) if "" in used else None
        ret["extra_teachers"] = {name: build_teacher(cfg, name) for name in sorted(used - {""})}
        ret["kd_cfg"] = cfg.KD
        return ret

    def _kd_own_model_info(self, model: nn.Module) -> TeacherInfo:
        return model_info(model)

    def kd_publish_scalars(self, stats: Dict[str, float]) -> None:
        """Into Detectron2's event storage (its metrics.json and TensorBoard writers pick them
        up), when inside a Detectron2 training loop."""
        try:
            storage = get_event_storage()
        except AssertionError:  # no storage: not inside a Detectron2 training loop
            return
        storage.put_scalars(**stats, smoothing_hint=False)

    def teacher_step(self, batched_inputs, student: StepRecord) -> StepRecord:
        """KD.TEACHER's record of this step (only the parts its methods read)."""
        return self.teacher_records(batched_inputs, student, [""])[""]

    def teacher_records(
        self, batched_inputs, student: StepRecord, names=None
    ) -> Dict[str, StepRecord]:
        """Every teacher's record of this step, by name (``""`` = KD.TEACHER): a Detectron2
        teacher normalises the batch itself (``preprocess_image``; Detectron2 resizes in the
        data mapper, so it sees the student's geometry), a torchvision teacher reads the
        student's tensor in its own convention; the ROI head runs on the student's sampled
        proposals."""

        def own_record(t, student, parts, strides):
            images = t.preprocess_image(batched_inputs).tensor
            return teacher_record(t, images, student, parts, self.kd_head_split)

        return self.kd_teacher_records(student, own_record, names)

    def kd_input_checks(self) -> list:
        """``(ok, line)`` pairs for the pre-flight check: a Detectron2 teacher normalises the
        student's batch itself (``preprocess_image``), so its input format must be the
        student's; a torchvision teacher reads the student's tensor in its own convention."""
        t = self._teacher
        foreign = self.kd_is_foreign(t)
        classes = (
            True,
            f"classes: teacher {self.kd_teacher_infos[''].num_classes}, student "
            f"{_num_classes(self)}",
        )
        if foreign:
            return [
                classes,
                (
                    True,
                    f"the torchvision teacher reads the student's batch converted from (mean, "
                    f"std, channels, scale) {input_convention(self)} to {input_convention(t)}",
                ),
            ]
        s_fmt, t_fmt = model_input_convention(self)[2], model_input_convention(t)[2]
        return [
            classes,
            (
                s_fmt == t_fmt,
                f"input format: the data loader gives {s_fmt} images (the student's "
                f"INPUT.FORMAT), the teacher expects {t_fmt}",
            ),
            (
                True,
                f"normalisation: student mean/std {model_input_convention(self)[:2]}, teacher "
                f"{model_input_convention(t)[:2]} (each normalises the raw batch itself)",
            ),
        ]

    #: ``(shortest edge, max size)`` of the PGM's test-time resize (``INPUT.*_TEST``); the
    #: trainer sets it.
    pgm_test_size = (800, 1333)

    @torch.no_grad()
    def kd_instance_features(
        self, images: List[Tensor], boxes: List[Tensor], teacher: bool = False
    ) -> Dict[int, Tensor]:
        """PGM instance features (see :class:`kd2.modeling.prototypes.PrototypeRefresher`).

        Each ``(3, H, W)`` RGB image in ``[0, 1]`` is resized as Detectron2's test-time
        ``ResizeShortestEdge(*pgm_test_size)`` does (bilinear on the float image), turned into the
        network's input format (0-255, BGR or RGB), normalised and padded by its own
        ``preprocess_image``; each box (original pixels) is scaled along and pooled on every
        FPN level with :func:`kd2.modeling.prototypes.pool_instance_boxes` (feature size / the
        image's own padded size, as the released PGM). Returns ``{stride: (sum G_i, C)}``.
        """
        net = self._teacher if teacher else self
        if self.kd_is_foreign(net):
            raise ValueError(
                "GlobalKD's prototypes pool the teacher's features of whole images, which kd2 "
                "does for a teacher of the student's framework only; use a Detectron2 teacher"
            )
        short, max_size = self.pgm_test_size
        inputs, scaled = [], []
        for img, b in zip(images, boxes):
            h, w = img.shape[-2:]
            scale = short / min(h, w)
            if max(h, w) * scale > max_size:
                scale = max_size / max(h, w)
            nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
            x = F.interpolate(img[None] * 255.0, size=(nh, nw), mode="bilinear")[0]
            if net.input_format == "BGR":
                x = x.flip(0)
            inputs.append({"image": x})
            factor = torch.tensor([nw / w, nh / h, nw / w, nh / h], device=b.device)
            scaled.append(b.float() * factor)
        was_training = net.training
        net.eval()
        try:
            image_list = net.preprocess_image(inputs)
            feats = _by_stride(net, net.backbone(image_list.tensor))
        finally:
            net.train(was_training)
        device = image_list.tensor.device
        div = int(getattr(net.backbone, "size_divisibility", 0))
        square = int(
            (getattr(net.backbone, "padding_constraints", None) or {}).get("square_size", 0)
        )
        padded = [
            (square, square) if square > 0 else own_padded_size(hw, div)
            for hw in image_list.image_sizes
        ]
        return pool_instance_boxes(feats, [b.to(device) for b in scaled], padded)

    def forward(self, batched_inputs):
        if not self.training:
            return super().forward(batched_inputs)
        student, losses = self.student_step(batched_inputs)
        cache_forward_keys(self, batched_inputs, student)  # KD.TEACHER.CACHE's entries
        with torch.no_grad():
            teachers = self.teacher_records(batched_inputs, student)
        losses.update(self.distill_losses(student, teachers))
        return self.finalize_kd_losses(losses)


@META_ARCH_REGISTRY.register()
class DistillGeneralizedRCNN(_Distill, GeneralizedRCNN):
    """Faster R-CNN (any ``GeneralizedRCNN`` with an RPN and ``StandardROIHeads``) with a teacher.

    Record: ``features``, ``rpn`` (objectness as a 1-class dense head with the RPN's anchor
    labels) and ``roi`` on the student's sampled proposals. Teacher parts run on demand: FPN,
    RPN head, ROI head on the student's sampled proposals.
    """

    arch_kind = "two_stage"

    @configurable
    def __init__(self, *, teacher: nn.Module | None, kd_cfg, extra_teachers=None, **kwargs):
        super().__init__(**kwargs)
        if getattr(self.roi_heads, "train_on_pred_boxes", False):
            raise NotImplementedError("kd2 does not support ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES")
        self._init_distiller(
            kd_cfg,
            teacher,
            num_classes=self.roi_heads.num_classes,
            student_channels=_channels(self),
            extra_teachers=extra_teachers,
        )

    def student_step(self, batched_inputs):
        """``GeneralizedRCNN.forward`` (training) split open; returns ``(record, losses)``."""
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        rec = _base_record(self, images, gt_instances, features)

        rpn = self.proposal_generator
        rec.rpn, anchors, objectness, deltas = _rpn_outputs(rpn, features, _strides(self))
        gt_labels, gt_boxes = rpn.label_and_sample_anchors(anchors, gt_instances)
        proposal_losses = rpn.losses(anchors, objectness, gt_labels, deltas, gt_boxes)
        proposals = rpn.predict_proposals(anchors, objectness, deltas, images.image_sizes)
        lab = torch.stack(gt_labels).long()
        rec.rpn.labels = torch.where(lab == 1, 0, torch.where(lab == 0, 1, -1))
        rec.rpn.matched_gt_boxes = torch.stack(gt_boxes)

        roi = self.roi_heads
        proposals = roi.label_and_sample_proposals(proposals, gt_instances)
        pooled, head, predictions = _roi_outputs(
            roi, features, [p.proposal_boxes for p in proposals]
        )
        losses = roi.box_predictor.losses(predictions, proposals)
        losses.update(roi._forward_mask(features, proposals))
        losses.update(roi._forward_keypoint(features, proposals))
        losses.update(proposal_losses)
        logits, box_deltas = predictions
        rec.roi = RoiOutputs(
            proposals=[p.proposal_boxes.tensor for p in proposals],
            labels=[p.gt_classes for p in proposals],
            matched_gt_boxes=[p.gt_boxes.tensor for p in proposals],
            roi_features=pooled,
            box_head_features=head,
            cls_logits=logits,
            box_deltas=box_deltas.view(box_deltas.shape[0], -1, 4),
            box_coder=roi.box_predictor.box2box_transform,
        )
        return rec, losses


class _DistillDense(_Distill):
    """Shared steps of the one-stage meta-architectures (``DenseDetector`` subclasses)."""

    arch_kind = "one_stage"

    def _init_dense(self, teacher: nn.Module | None, kd_cfg, extra_teachers=None) -> None:
        self._init_distiller(
            kd_cfg,
            teacher,
            num_classes=self.num_classes,
            student_channels=_channels(self),
            extra_teachers=extra_teachers,
        )

    def student_step(self, batched_inputs):
        """``DenseDetector.forward`` + ``forward_training`` split open."""
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        rec = _base_record(self, images, gt_instances, features)
        strides = _strides(self)
        feats = [features[f] for f in self.head_in_features]
        rec.dense, anchors, preds = _head_outputs(
            self, feats, [strides[f] for f in self.head_in_features], self.kd_head_split
        )
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        losses = self.losses(anchors, preds[0], gt_labels, preds[1], gt_boxes, *preds[2:])
        rec.dense.labels = torch.stack(gt_labels)
        rec.dense.matched_gt_boxes = torch.stack(gt_boxes)
        return rec, losses


@META_ARCH_REGISTRY.register()
class DistillRetinaNet(_DistillDense, RetinaNet):
    """RetinaNet with a teacher (record: ``features``, ``dense`` with Detectron2's anchor
    labels). Never calls the teacher's ``losses`` (it would move its EMA normaliser)."""

    @configurable
    def __init__(self, *, teacher: nn.Module | None, kd_cfg, extra_teachers=None, **kwargs):
        super().__init__(**kwargs)
        self._init_dense(teacher, kd_cfg, extra_teachers)


class DistillFCOS(_DistillDense, FCOS):
    """FCOS with a teacher, for LazyConfig (Detectron2's FCOS is neither registered nor
    ``@configurable``; build it with ``model._target_ = DistillFCOS``). Record: ``features``,
    ``dense`` with ``centerness`` and FCOS's point labels (no ignore label); box outputs are the
    raw head outputs (Detectron2 applies the ReLU at decode time)."""

    def __init__(self, *, teacher: nn.Module | None, kd_cfg, extra_teachers=None, **kwargs):
        super().__init__(**kwargs)
        self._init_dense(teacher, kd_cfg, extra_teachers)


@META_ARCH_REGISTRY.register()
class DistillGFL(_DistillDense, GFL):
    """kd2's Detectron2 :class:`~kd2.d2.gfl.GFL` with a teacher (yacs ``MODEL.META_ARCHITECTURE:
    "DistillGFL"``, or LazyConfig ``model._target_ = DistillGFL``).

    Record (as the torchvision ``KDGFL``): ``features``; ``dense`` with the ``K`` joint
    class-quality logits, ``box_dist`` the distribution logits, ``box_deltas`` their expected side
    distances in stride units, the ATSS squares as ``anchors`` (one per location), a
    ``GFLBoxCoder`` as ``box_coder`` and the ATSS assignment as ``labels`` (``-1`` outside an
    image's own padded size). The teacher's ``dense`` comes from its own head: a GFL teacher's
    is laid out the same way, a RetinaNet/FCOS teacher's as for those students.
    """

    @configurable
    def __init__(self, *, teacher: nn.Module | None, kd_cfg, extra_teachers=None, **kwargs):
        super().__init__(**kwargs)
        self._init_dense(teacher, kd_cfg, extra_teachers)
