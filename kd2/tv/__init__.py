"""kd2's torchvision backend: detectors, KD meta-architectures and their record."""

from .build import build_detector, build_plain_detector, build_teacher, label_offset
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
]
