"""The foundation-model teachers' entry in the backend seam (:mod:`kd2.modeling.backends`).

A :class:`~kd2.foundation.teacher.FoundationTeacher` is a teacher of every student backend: it is
always "another framework" to the distiller, which converts the student's batch into its
normalisation (:func:`kd2.modeling.cross_framework.to_teacher_input`) and asks this backend for its
record. It offers ``features`` only (no classes, heads or detections) and trains nothing, so it
has no trainer and no predictor.
"""

from __future__ import annotations

from torch import Tensor, nn

from kd2.modeling.backends import Backend, InputConvention, register_backend
from kd2.modeling.level_map import TeacherInfo
from kd2.structures import StepRecord
from kd2.utils.errors import ConfigError

from .build import build_foundation_teacher
from .teacher import FoundationTeacher

__all__ = ["FOUNDATION"]


def owns(model: nn.Module) -> bool:
    return isinstance(model, FoundationTeacher)


def model_info(model: FoundationTeacher) -> TeacherInfo:
    return TeacherInfo(
        channels=model.channels,
        num_classes=None,
        parts=frozenset({"features"}),
        family="foundation",
        anchors_per_location=None,
        name=model.name,
    )


def input_convention(model: FoundationTeacher) -> InputConvention:
    return (list(model.pixel_mean), list(model.pixel_std), "RGB", 1.0)


def size_divisibility(model: FoundationTeacher) -> int:
    return (
        1  # the teacher pads its scaled input to its patch size itself (FoundationTeacher.prepare)
    )


def teacher_record(
    teacher: FoundationTeacher, images: Tensor, student: StepRecord, parts, strides
) -> StepRecord:
    return teacher.record(images, student, strides)


def load_predictor(config_file: str, opts: list):
    raise ConfigError(
        f"{config_file!r} is a backbone-only foundation teacher: it has no detector to predict "
        "with",
        "give a detector's config",
    )


FOUNDATION = register_backend(
    Backend(
        name="foundation",
        owns=owns,
        model_info=model_info,
        input_convention=input_convention,
        size_divisibility=size_divisibility,
        build_teacher=build_foundation_teacher,
        teacher_record=teacher_record,
        load_predictor=load_predictor,
    )
)
