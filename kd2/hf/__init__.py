"""The Hugging Face transformers backend (DETR-family detectors: RT-DETR, RT-DETRv2, D-FINE,
DEIMv2). In progress: models built from kd2's size presets or loaded from a local directory
(:mod:`kd2.hf.models`) and kd2's targets in their label format (:mod:`kd2.hf.data`); the
distillation meta-architecture and ``MODEL.BACKEND transformers`` come next."""

from .data import to_hf_labels
from .models import (
    MODEL_TYPES,
    PRESETS,
    backbone_parameters,
    build_hf_config,
    build_hf_detector,
    load_hf_detector,
)

__all__ = [
    "MODEL_TYPES",
    "PRESETS",
    "backbone_parameters",
    "build_hf_config",
    "build_hf_detector",
    "load_hf_detector",
    "to_hf_labels",
]
