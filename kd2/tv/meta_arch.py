"""Distillation meta-architectures on torchvision detectors.

``KDFasterRCNN``, ``KDRetinaNet``, ``KDFCOS`` and ``KDSSD`` subclass torchvision's classes, and
``KDGFL`` kd2's torchvision-style :class:`kd2.tv.gfl.GFL`: in eval mode they are the plain
student; in train mode they return the detector's own losses plus the configured ``loss_kd_*``
terms.

The teacher lives **outside** the module tree: it is not in ``state_dict()``, ``parameters()``,
the optimizer or DDP, ``.train()`` never switches it out of eval mode, and ``.to()`` moves it
along. It runs under ``torch.no_grad()`` on the student's transformed input tensors (the student
transforms once; torchvision's random train-time resize would otherwise give the two networks
different inputs), and only the parts the configured methods read (features, dense head, RPN
head, ROI head on the student's sampled proposals) are run — never its losses or its sampling.
Without a detector teacher (``ClassifierKD`` alone) no teacher runs at all.
"""

from __future__ import annotations

import logging
from typing import Dict, List

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.ssd import SSD

from kd2.modeling.backends import input_convention
from kd2.modeling.cross_framework import to_teacher_input
from kd2.modeling.distiller import DistillerMixin, model_family
from kd2.modeling.level_map import TeacherInfo, detector_parts
from kd2.modeling.prototypes import own_padded_size, pool_instance_boxes
from kd2.structures import RoiOutputs, StepRecord, check_target_boxes

from . import record as R
from .gfl import GFL

__all__ = ["KDFasterRCNN", "KDRetinaNet", "KDFCOS", "KDSSD", "KDGFL", "KD_ARCHITECTURES"]

logger = logging.getLogger(__name__)


class _KDMixin(DistillerMixin):
    """torchvision side of the KD meta-architectures: record filling and the training forward."""

    kd_backend = "torchvision"

    def _init_kd(
        self, cfg, teacher: nn.Module | None, extra_teachers: Dict[str, nn.Module] | None = None
    ) -> None:
        self.kd_strides, s_channels = R.model_strides(self)
        self._init_distiller(
            cfg.KD,
            teacher,
            num_classes=_num_classes(self),
            student_channels=dict(zip(self.kd_strides, s_channels)),
            extra_teachers=extra_teachers,
        )
        default = self.kd_teacher_infos.get("")
        self.kd_teacher_strides = sorted(default.channels) if default is not None else []

    def _kd_own_model_info(self, model: nn.Module) -> TeacherInfo:
        return model_info(model, self.kd_strides if model is self else None)

    def forward(self, images, targets=None):
        if not self.training:
            return super().forward(images)
        return self.kd_training_forward(images, targets)

    # -- helpers used by the subclasses ---------------------------------------------------
    def _transform(self, images, targets):
        check_target_boxes(targets)
        return self.transform(images, targets)

    def _kd_own_teacher_record(self, t, student: StepRecord, parts, strides) -> StepRecord:
        """A torchvision teacher's record: the parts its methods read, run on the student's
        resized, padded batch in the teacher's input convention (the student's proposals for
        the ROI head)."""
        images = to_teacher_input(student.images, input_convention(self), input_convention(t))
        return R.teacher_record(t, images, student, parts, strides, self.kd_head_split)

    def _base_record(self, images, targets, features, label_shift: int) -> StepRecord:
        return StepRecord(
            images=images.tensors,
            image_sizes=[tuple(s) for s in images.image_sizes],
            gt_boxes=[t["boxes"] for t in targets],
            gt_labels=[t["labels"] - label_shift for t in targets],
            features=R.features_by_stride(features, self.kd_strides),
            num_classes=self.num_classes_kd,
        )

    @torch.no_grad()
    def kd_instance_features(
        self, images: List[Tensor], boxes: List[Tensor], teacher: bool = False
    ) -> dict:
        """PGM instance features: each image through the (student's or teacher's) **test-time**
        transform and FPN, each box pooled on every level with
        :func:`kd2.modeling.prototypes.pool_instance_boxes` (feature size / the image's own
        padded size, as the released PGM).

        Args:
            images: ``(3, H_i, W_i)`` float images in ``[0, 1]``.
            boxes: per image ``(G_i, 4)`` XYXY in original pixels.
            teacher: pool the teacher's FPN instead of the student's.

        Returns:
            ``{stride: (sum G_i, C)}`` in image-then-box order.
        """
        net = self._teacher if teacher else self
        if self.kd_is_foreign(net):
            raise ValueError(
                "GlobalKD's prototypes pool the teacher's features of whole images, which kd2 "
                "does for a teacher of the student's framework only; use a torchvision teacher"
            )
        strides = self.kd_teacher_strides if teacher else self.kd_strides
        was_training = net.training
        net.eval()
        try:
            targets = [
                {"boxes": b.float(), "labels": torch.zeros(len(b), dtype=torch.long)} for b in boxes
            ]
            image_list, targets = net.transform(images, targets)
            feats = R.features_by_stride(net.backbone(image_list.tensors), strides)
        finally:
            net.train(was_training)
        div = int(getattr(net.transform, "size_divisible", 32))
        padded = [own_padded_size(hw, div) for hw in image_list.image_sizes]
        return pool_instance_boxes(feats, [t["boxes"] for t in targets], padded)


class KDFasterRCNN(_KDMixin, FasterRCNN):
    """torchvision ``FasterRCNN`` student with a frozen teacher.

    Record: ``features``, ``rpn`` (objectness as a 1-class dense head, with the RPN's anchor
    labels), and ``roi`` on the 512-per-image sampled proposals. Detection loss keys are
    torchvision's (``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``,
    ``loss_box_reg``).
    """

    arch_kind = "two_stage"

    def __init__(
        self, *, cfg, teacher: nn.Module | None, backbone: nn.Module, extra_teachers=None, **kwargs
    ):
        super().__init__(backbone, **kwargs)
        self._init_kd(cfg, teacher, extra_teachers)

    def student_step(self, images, targets):
        images, targets = self._transform(images, targets)
        feats = self.backbone(images.tensors)
        rec = self._base_record(images, targets, feats, label_shift=1)
        rec.rpn, proposals, losses = R.run_rpn(self.rpn, images, feats, rec.strides, targets)
        props, tv_labels, matched, reg_targets = R.sample_rois(self.roi_heads, proposals, targets)
        pooled, head, logits, deltas = R.run_roi_head(
            self.roi_heads, feats, props, images.image_sizes
        )
        losses.update(R.frcnn_losses(logits, deltas, tv_labels, reg_targets))
        rec.roi = RoiOutputs(
            proposals=props,
            labels=R.canonical_roi_labels(tv_labels, self.num_classes_kd),
            matched_gt_boxes=matched,
            roi_features=pooled,
            box_head_features=head,
            cls_logits=R.canonical_roi_logits(logits),
            box_deltas=R.canonical_roi_deltas(deltas),
            box_coder=self.roi_heads.box_coder,
        )
        return rec, losses


class _KDDense(_KDMixin):
    """Shared student/teacher steps of the one-stage architectures."""

    #: torchvision's training label of class ``c`` is ``c + label_shift`` (SSD: background 0).
    label_shift = 0

    def _match(self, targets, anchors, counts) -> List[Tensor]:
        raise NotImplementedError

    #: the dense head is a softmax classifier with a background column (SSD)
    dense_softmax = False

    def _run_head(self, model, images, maps, strides):
        """The head's record part, raw outputs and anchors; with the towers' features at the
        cut when a method asked for one (``kd_head_split``)."""
        return R.run_any_dense_head(
            model, images, maps, strides, self.kd_head_split, self.dense_softmax
        )

    def _detection_losses(self, targets, head_outputs, anchors, matched):
        return self.head.compute_loss(targets, head_outputs, anchors, matched)

    def student_step(self, images, targets):
        """The architecture's ``forward`` (training) split open."""
        images, targets = self._transform(images, targets)
        feats = self.backbone(images.tensors)
        rec = self._base_record(images, targets, feats, label_shift=self.label_shift)
        maps = list(feats.values())
        rec.dense, head_outputs, anchors = self._run_head(self, images, maps, rec.strides)
        counts = [t.shape[1] for t in rec.dense.cls_logits]
        matched = self._match(targets, anchors, counts)
        losses = self._detection_losses(targets, head_outputs, anchors, matched)
        canonical = [
            {"boxes": t["boxes"], "labels": t["labels"] - self.label_shift} for t in targets
        ]
        rec.dense.labels, rec.dense.matched_gt_boxes = R.dense_labels_from_matches(
            matched, canonical, self.num_classes_kd
        )
        return rec, losses


class KDRetinaNet(_KDDense, RetinaNet):
    """torchvision ``RetinaNet`` student with a frozen teacher (record: ``features``,
    ``dense`` with anchors and the IoU-matcher assignment)."""

    def __init__(
        self, *, cfg, teacher: nn.Module | None, backbone: nn.Module, extra_teachers=None, **kwargs
    ):
        super().__init__(backbone, **kwargs)
        self._init_kd(cfg, teacher, extra_teachers)

    def _match(self, targets, anchors, counts):
        return R.match_retinanet(self, targets, anchors)


class KDFCOS(_KDDense, FCOS):
    """torchvision ``FCOS`` student with a frozen teacher (record: ``features``, ``dense`` with
    ``centerness`` and the centre-sampling assignment). Box outputs are post-ReLU distances."""

    def __init__(
        self, *, cfg, teacher: nn.Module | None, backbone: nn.Module, extra_teachers=None, **kwargs
    ):
        super().__init__(backbone, **kwargs)
        self._init_kd(cfg, teacher, extra_teachers)

    def _match(self, targets, anchors, counts):
        return R.match_fcos(self, targets, anchors, counts)


class KDSSD(_KDDense, SSD):
    """torchvision ``SSD`` (SSD300-VGG16, SSDLite) student (record: ``features`` keyed by
    ``round(size / H_l)``, ``dense`` with **softmax** logits, background last, and SSD's IoU
    matching). ``dense_softmax`` tells the distiller so: methods whose dense-head terms assume
    sigmoid classifiers (Hinton's dense head, FRS, RM, PFI, GlobalKD's soft labels) are refused
    when the model is built; ClassifierKD and the feature methods (FitNet, FGFI, DeFeat) apply."""

    label_shift = 1
    dense_softmax = True

    def __init__(
        self, *, cfg, teacher: nn.Module | None, backbone: nn.Module, extra_teachers=None, **kwargs
    ):
        super().__init__(backbone, **kwargs)
        self._init_kd(cfg, teacher, extra_teachers)

    def _match(self, targets, anchors, counts):
        return R.match_retinanet(self, targets, anchors)

    def _detection_losses(self, targets, head_outputs, anchors, matched):
        return self.compute_loss(targets, head_outputs, anchors, matched)


class KDGFL(_KDDense, GFL):
    """kd2's ``GFL`` student with a frozen teacher (record: ``features``, ``dense`` with the
    ``K`` joint class-quality logits, ``box_dist`` the distribution logits, ``box_deltas`` their
    expected side distances in stride units, the ATSS squares as ``anchors`` and the ATSS
    assignment as ``labels``; anchors in the batch padding outside an image's own padded size
    are ignored, ``-1``). Detection loss keys: ``loss_qfl``, ``loss_dfl``, ``loss_giou``."""

    def __init__(
        self, *, cfg, teacher: nn.Module | None, backbone: nn.Module, extra_teachers=None, **kwargs
    ):
        super().__init__(backbone, **kwargs)
        self._init_kd(cfg, teacher, extra_teachers)
        if list(self.kd_strides) != list(self.anchor_strides):
            raise ValueError(
                f"the GFL student's FPN strides {self.kd_strides} are not its anchor strides "
                f"{self.anchor_strides}"
            )

    # The assignment needs each image's size (valid anchors), so the "anchors" handed from
    # ``_run_head`` to ``_match`` / ``_detection_losses`` are ``(per-level anchors, sizes)``.
    def _run_head(self, model, images, maps, strides):
        dense, head_outputs, anchors = super()._run_head(model, images, maps, strides)
        return dense, head_outputs, (anchors, images.image_sizes)

    def _match(self, targets, anchors, counts):
        per_level, image_sizes = anchors
        return self.assign_targets(targets, per_level, image_sizes)

    def _detection_losses(self, targets, head_outputs, anchors, matched):
        return self.head.compute_loss(
            targets, head_outputs, anchors[0], matched, self.anchor_strides
        )


KD_ARCHITECTURES = {
    "FasterRCNN": KDFasterRCNN,
    "RetinaNet": KDRetinaNet,
    "FCOS": KDFCOS,
    "SSD": KDSSD,
    "GFL": KDGFL,
}


# -- module-level helpers -----------------------------------------------------------------


def _num_classes(model: nn.Module) -> int:
    if isinstance(model, FasterRCNN):
        return model.roi_heads.box_predictor.cls_score.out_features - 1
    if isinstance(model, SSD):
        return model.head.classification_head.num_columns - 1
    return model.head.classification_head.num_classes


def model_info(model: nn.Module, strides: List[int] | None = None) -> TeacherInfo:
    """A torchvision detector's description for the distiller (``strides``: known ones)."""
    found, channels = R.model_strides(model)
    family = model_family(model)
    per_loc = None
    if family != "faster_rcnn":
        per_loc = 1 if isinstance(model, GFL) else R.anchors_per_location(model)
    return TeacherInfo(
        channels=dict(zip(strides or found, channels)),
        num_classes=_num_classes(model),
        parts=detector_parts(family),
        family=family,
        anchors_per_location=per_loc,
        name=type(model).__name__,
    )


def _image_list(record: StepRecord):
    from torchvision.models.detection.image_list import ImageList

    return ImageList(record.images, [tuple(s) for s in record.image_sizes])
