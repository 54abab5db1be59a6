"""The transformers backend's entry in the backend seam (:mod:`kd2.modeling.backends`)."""

from __future__ import annotations

from typing import Dict, List

from torch import Tensor, nn

from kd2.modeling.backends import Backend, InputConvention, register_backend
from kd2.structures import StepRecord

from . import record
from .build import build_hf_teacher
from .detector import HFDetector
from .engine import Trainer
from .meta_arch import model_info
from .predictor import load_predictor

__all__ = ["TRANSFORMERS"]


def owns(model: nn.Module) -> bool:
    """A kd2 wrapper of a transformers detector (:class:`~kd2.hf.detector.HFDetector`)."""
    return isinstance(model, HFDetector)


def input_convention(model: nn.Module) -> InputConvention:
    return (model.pixel_mean.tolist(), model.pixel_std.tolist(), "RGB", 1.0)


def detect(teacher: nn.Module, images: List[Tensor]) -> List[Dict[str, Tensor]]:
    """The teacher's inference on RGB ``[0, 1]`` images: boxes in their pixels, scores, labels."""
    return teacher(images)


def size_divisibility(model: nn.Module) -> int:
    return 32


def teacher_record(
    teacher: nn.Module, images: Tensor, student: StepRecord, parts, strides
) -> StepRecord:
    return record.teacher_record(teacher, images, student, parts, strides)


TRANSFORMERS = register_backend(
    Backend(
        name="transformers",
        owns=owns,
        model_info=model_info,
        input_convention=input_convention,
        size_divisibility=size_divisibility,
        build_teacher=build_hf_teacher,
        teacher_record=teacher_record,
        load_predictor=load_predictor,
        trainer=Trainer,
        detect=detect,
    )
)
