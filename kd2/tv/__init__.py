"""kd2's torchvision backend: detectors, KD meta-architectures, their record and the trainer.

Importing it registers the backend (:mod:`kd2.modeling.backends`)."""

from . import backend  # noqa: F401 (registers the backend)
from .build import build_detector, build_plain_detector, build_teacher, label_offset
from .engine import Trainer, evaluate
from .gfl import GFL
from .meta_arch import KD_ARCHITECTURES, KDFCOS, KDGFL, KDFasterRCNN, KDRetinaNet

__all__ = [
    "build_detector",
    "build_plain_detector",
    "build_teacher",
    "label_offset",
    "GFL",
    "KD_ARCHITECTURES",
    "KDFasterRCNN",
    "KDRetinaNet",
    "KDFCOS",
    "KDGFL",
    "Trainer",
    "evaluate",
]
