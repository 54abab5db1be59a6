"""The Detectron2 backend's entry in the backend seam (:mod:`kd2.modeling.backends`)."""

from __future__ import annotations

from typing import Dict, List

from torch import Tensor, nn

from kd2.modeling.backends import Backend, register_backend
from kd2.structures import StepRecord

from . import meta_arch
from .predictor import load_predictor
from .teacher import build_detectron2_teacher

__all__ = ["DETECTRON2"]


def owns(model: nn.Module) -> bool:
    """A Detectron2 meta-architecture: a subclass of one of Detectron2's classes."""
    return any(c.__module__.startswith("detectron2.") for c in type(model).__mro__)


def detect(teacher: nn.Module, images: List[Tensor]) -> List[Dict[str, Tensor]]:
    """The teacher's inference on RGB ``[0, 1]`` images (its ``INPUT.FORMAT``, 0–255, at their own
    size): boxes in their pixels, scores, contiguous labels."""
    channels = meta_arch.model_input_convention(teacher)[2]
    inputs = [
        {
            "image": (im[[2, 1, 0]] if channels == "BGR" else im) * 255.0,
            "height": int(im.shape[-2]),
            "width": int(im.shape[-1]),
        }
        for im in images
    ]
    out = []
    for o in teacher(inputs):
        inst = o["instances"]
        out.append(
            {"boxes": inst.pred_boxes.tensor, "scores": inst.scores, "labels": inst.pred_classes}
        )
    return out


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
        detect=detect,
    )
)
