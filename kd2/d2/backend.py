"""The Detectron2 backend's entry in the backend seam (:mod:`kd2.modeling.backends`)."""

from __future__ import annotations

from torch import Tensor, nn

from kd2.modeling.backends import Backend, register_backend
from kd2.structures import StepRecord

from . import meta_arch
from .predictor import load_predictor
from .teacher import build_detectron2_teacher

__all__ = ["DETECTRON2"]


def owns(model: nn.Module) -> bool:
    """A Detectron2 meta-architecture: it normalises its own input (``pixel_mean``) and has no
    torchvision transform."""
    return hasattr(model, "pixel_mean") and not hasattr(model, "transform")


def size_divisibility(model: nn.Module) -> int:
    return int(model.backbone.size_divisibility)


def teacher_record(
    teacher: nn.Module, images: Tensor, student: StepRecord, parts, strides
) -> StepRecord:
    """``strides`` are not needed: a Detectron2 teacher names its levels by stride itself."""
    return meta_arch.teacher_record(teacher, images, student, parts)


DETECTRON2 = register_backend(
    Backend(
        name="detectron2",
        owns=owns,
        model_info=meta_arch.model_info,
        input_convention=meta_arch.model_input_convention,
        size_divisibility=size_divisibility,
        build_teacher=build_detectron2_teacher,
        teacher_record=teacher_record,
        load_predictor=load_predictor,
    )
)
