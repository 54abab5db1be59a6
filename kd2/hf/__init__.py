"""kd2's Hugging Face transformers backend: DETR-family detectors (RT-DETR, RT-DETRv2, D-FINE,
DEIMv2) as students and teachers, on kd2's own trainer.

Importing :mod:`kd2.hf.backend` registers the backend (:mod:`kd2.modeling.backends`); importing
this package does so as well.
"""

from . import backend  # noqa: F401 (registers the backend)
from .build import build_detector, build_plain_detector
from .data import to_hf_labels
from .detector import HFDetector
from .engine import Trainer, evaluate
from .meta_arch import KDHFDetector
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
    "HFDetector",
    "KDHFDetector",
    "Trainer",
    "backbone_parameters",
    "build_detector",
    "build_hf_config",
    "build_hf_detector",
    "build_plain_detector",
    "evaluate",
    "load_hf_detector",
    "to_hf_labels",
]
