"""The torchvision backend's entry in the backend seam (:mod:`kd2.modeling.backends`)."""

from __future__ import annotations

from typing import Dict, List

from torch import Tensor, nn

from kd2.modeling.backends import Backend, InputConvention, register_backend
from kd2.structures import StepRecord

from . import record
from .build import build_torchvision_teacher, label_offset
from .engine import Trainer
from .meta_arch import model_info
from .predictor import load_predictor

__all__ = ["TORCHVISION"]


def owns(model: nn.Module) -> bool:
    """A torchvision-style detector: it owns a ``GeneralizedRCNNTransform``."""
    return hasattr(model, "transform")


def input_convention(model: nn.Module) -> InputConvention:
    t = model.transform
    return (list(t.image_mean), list(t.image_std), "RGB", 1.0)


def detect(teacher: nn.Module, images: List[Tensor]) -> List[Dict[str, Tensor]]:
    """The teacher's inference on RGB ``[0, 1]`` images: boxes in their pixels, scores,
    contiguous labels."""
    offset = label_offset(teacher)
    return [{**o, "labels": o["labels"] - offset} for o in teacher(images)]


def size_divisibility(model: nn.Module) -> int:
    return int(model.transform.size_divisible)


def teacher_record(
    teacher: nn.Module, images: Tensor, student: StepRecord, parts, strides
) -> StepRecord:
    return record.teacher_record(teacher, images, student, parts, strides)


TORCHVISION = register_backend(
    Backend(
        name="torchvision",
        owns=owns,
        model_info=model_info,
        input_convention=input_convention,
        size_divisibility=size_divisibility,
        build_teacher=build_torchvision_teacher,
        teacher_record=teacher_record,
        load_predictor=load_predictor,
        trainer=Trainer,
        detect=detect,
    )
)
