"""The distillation meta-architecture on transformers DETR-family detectors.

:class:`KDHFDetector` is the student (:class:`kd2.hf.detector.HFDetector`) with
:class:`~kd2.modeling.distiller.DistillerMixin`: in eval mode it is the plain student; in train
mode it returns the model's own loss terms plus the configured ``loss_kd_*`` terms. The teacher
(a transformers detector, or one of another backend) lives outside the module tree and runs under
``torch.no_grad()`` in eval mode on the student's resized batch (converted to its input
convention), so it answers with its own matching queries only (no denoising queries).
"""

from __future__ import annotations

import torch
from torch import nn

from kd2.modeling.backends import input_convention
from kd2.modeling.cross_framework import to_teacher_input
from kd2.modeling.distiller import DistillerMixin, model_family
from kd2.modeling.level_map import TeacherInfo, detector_parts
from kd2.structures import StepRecord
from kd2.utils.errors import ConfigError

from . import record as R
from .detector import HFDetector, loss_terms
from .models import trunk_parameters
from .points import decode_points, decoder_memory, random_points

__all__ = ["KDHFDetector", "model_info"]


def model_info(model: nn.Module) -> TeacherInfo:
    """A transformers detector's description for the distiller: its encoder maps by stride,
    classes and parts."""
    strides, channels = R.encoder_levels(model.detector)
    return TeacherInfo(
        channels=dict(zip(strides, channels)),
        num_classes=model.num_classes,
        parts=detector_parts(model_family(model)),
        family="detr",
        anchors_per_location=None,
        name=f"{type(model.detector).__name__}",
    )


class KDHFDetector(DistillerMixin, HFDetector):
    """A transformers DETR-family student with frozen teachers.

    Record: ``features`` (the encoder's maps), ``queries`` (the decoder's matching queries per
    layer, D-FINE's distributions, the Hungarian assignment). Detection loss keys are the
    model's own (``loss_vfl``, ``loss_bbox``, ``loss_giou``, ...).
    """

    kd_backend = "transformers"

    def __init__(self, *, cfg, teacher: nn.Module | None, extra_teachers=None, **kwargs):
        super().__init__(**kwargs)
        strides, channels = R.encoder_levels(self.detector)
        self._init_distiller(
            cfg.KD,
            teacher,
            num_classes=self.num_classes,
            student_channels=dict(zip(strides, channels)),
            extra_teachers=extra_teachers,
        )
        self._init_points()

    def _init_points(self) -> None:
        """The distillation point groups the methods ask for (the largest count per group) and
        the one teacher that answers them."""
        groups: dict = {}
        for method in self.kd_methods.values():
            for group, count in method.point_groups.items():
                groups[group] = max(groups.get(group, 0), int(count))
        answering = [n for n, parts in self.kd_teacher_parts.items() if "points" in parts]
        if len(answering) > 1:
            raise ConfigError(
                f"the teachers {answering} would each answer distillation points",
                "let one teacher give the methods that read points (KD.<METHOD>.TEACHER)",
            )
        self.kd_point_groups = groups
        self.kd_points_teacher = answering[0] if answering else ""

    def kd_trunk_parameters(self) -> list:
        """The backbone and the hybrid encoder: the gradient diagnostics' and ``KD.BALANCE``'s
        trunk (RT-DETRv4 measures its share on the encoder)."""
        return trunk_parameters(self.detector)

    def _kd_own_model_info(self, model: nn.Module) -> TeacherInfo:
        return model_info(model)

    def forward(self, images, targets=None):
        if not self.training:
            return super().forward(images)
        return self.kd_training_forward(images, targets)

    def student_step(self, images, targets):
        """The detector's training forward, recorded: ``(record, its loss terms)``."""
        pixel_values, sizes = self.preprocess(images)
        labels = self.hf_labels(targets, sizes)
        out = self.detector(pixel_values=pixel_values, labels=labels)
        strides, _ = R.encoder_levels(self.detector)
        rec = R.base_record(
            pixel_values,
            targets,
            sizes,
            R.features_by_stride(out.encoder_last_hidden_state, strides),
            self.num_classes,
        )
        rec.queries = R.query_outputs(self.detector, out)
        rec.queries.matched = R.hungarian_matches(
            self.detector, rec.queries.logits[-1], rec.queries.boxes[-1], labels
        )
        return rec, loss_terms(out.loss_dict, pixel_values)

    def _kd_answer_points(self, student: StepRecord, teachers) -> None:
        """Both decoders' answers to this step's distillation points (KD-DETR): the teacher's
        selected queries and random boxes, decoded by the teacher (no gradients) and by the
        student (:func:`kd2.hf.points.decode_points`)."""
        if not self.kd_point_groups:
            return
        name = self.kd_points_teacher
        rec = teachers[name]
        maps, own_queries = rec.extras.pop(R.POINT_SOURCE)
        points = {}
        for group, count in self.kd_point_groups.items():
            if group == "teacher":
                points[group] = own_queries
            else:
                points[group] = random_points(len(student.images), count, own_queries)
        teacher = self.teacher_named(name).detector
        with torch.no_grad():
            memory = decoder_memory(teacher.model, maps)
            rec.queries.points = {g: decode_points(teacher, memory, p) for g, p in points.items()}
        own_maps = [student.features[s] for s in sorted(student.features)]
        memory = decoder_memory(self.detector.model, own_maps)
        student.queries.points = {
            g: decode_points(self.detector, memory, p) for g, p in points.items()
        }

    def _kd_own_teacher_record(self, t, student: StepRecord, parts, strides) -> StepRecord:
        images = to_teacher_input(student.images, input_convention(self), input_convention(t))
        return R.teacher_record(t, images, student, parts, strides)

    @property
    def kd_batch_words(self) -> str:
        return f"{self.image_size}-px square batch"
