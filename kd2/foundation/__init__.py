"""Backbone-only foundation-model teachers (DINOv2, DINOv3, timm) for every student backend.

``KD.TEACHER.BACKEND foundation`` builds a :class:`FoundationTeacher` (:mod:`kd2.foundation.build`)
whose ``features`` record — the model's patch or stage maps resampled onto the student's FPN
strides — any feature method reads (``DSI``, ``PKD``, ``CWD``, ``MGD``, ``FitNet``, ...).
Importing :mod:`kd2.foundation.backend` registers the backend; importing this package does so as
well.
"""

from . import backend  # noqa: F401 (registers the backend)
from .build import TRANSFORMERS_TYPES, build_foundation_teacher
from .teacher import FoundationTeacher, default_strides, resample_to_grid, scale_input

__all__ = [
    "TRANSFORMERS_TYPES",
    "FoundationTeacher",
    "build_foundation_teacher",
    "default_strides",
    "resample_to_grid",
    "scale_input",
]
