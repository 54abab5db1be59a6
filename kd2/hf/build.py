"""Build transformers DETR-family detectors (and their KD subclass) from a kd2 config.

``MODEL.BACKEND transformers`` with ``MODEL.META_ARCHITECTURE DETR``: ``MODEL.HF`` names the model
(``MODEL_TYPE`` at a kd2 size ``PRESET``, or a user's local ``PRETRAINED_DIR``), its classes and
its square input. Nothing is downloaded; a student checkpoint's ``model`` entry loads strictly into
the plain :class:`~kd2.hf.detector.HFDetector` of the same config.
"""

from __future__ import annotations

from typing import Any, Dict

from torch import nn

from kd2.modeling.cross_framework import build_teacher_of_config, build_teacher_of_node
from kd2.modeling.distiller import teachers_needed
from kd2.utils.errors import ConfigError

from .detector import HFDetector
from .models import build_hf_detector, check_queries, load_hf_detector

__all__ = ["build_detector", "build_hf_teacher", "build_plain_detector", "detector_kwargs"]


def _transformers_model(cfg) -> nn.Module:
    hf = cfg.MODEL.HF
    if hf.PRETRAINED_DIR:
        model = load_hf_detector(hf.PRETRAINED_DIR)
        if int(model.config.num_labels) != int(hf.NUM_CLASSES):
            raise ConfigError(
                f"MODEL.HF.PRETRAINED_DIR {hf.PRETRAINED_DIR!r} has {model.config.num_labels} "
                f"classes, MODEL.HF.NUM_CLASSES is {hf.NUM_CLASSES}",
                "set MODEL.HF.NUM_CLASSES to the directory's number of labels",
            )
        return model
    overrides: Dict[str, Any] = {}
    if hf.NUM_QUERIES > 0:
        overrides["num_queries"] = int(hf.NUM_QUERIES)
    if hf.NUM_DENOISING >= 0:
        overrides["num_denoising"] = int(hf.NUM_DENOISING)
    return build_hf_detector(hf.MODEL_TYPE, hf.PRESET, hf.NUM_CLASSES, **overrides)


def detector_kwargs(cfg) -> Dict[str, Any]:
    """The :class:`~kd2.hf.detector.HFDetector` arguments of ``cfg`` (a fresh transformers
    model included)."""
    if cfg.MODEL.META_ARCHITECTURE != "DETR":
        raise ConfigError(
            f"MODEL.BACKEND transformers builds DETR-family detectors, but "
            f"MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}",
            "set MODEL.META_ARCHITECTURE DETR and name the model in MODEL.HF.MODEL_TYPE",
        )
    hf = cfg.MODEL.HF
    if hf.IMAGE_SIZE <= 0 or hf.IMAGE_SIZE % 32:
        raise ConfigError(
            f"MODEL.HF.IMAGE_SIZE must be a positive multiple of 32, got {hf.IMAGE_SIZE}",
            "use e.g. 128 for the bundled synthetic data, 640 for COCO",
        )
    detector = _transformers_model(cfg)
    check_queries(detector, int(hf.IMAGE_SIZE), int(hf.IMAGE_SIZE), "MODEL.HF.IMAGE_SIZE")
    return {
        "detector": detector,
        "image_size": int(hf.IMAGE_SIZE),
        "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
        "pixel_std": list(cfg.MODEL.PIXEL_STD),
        "score_thresh": float(hf.SCORE_THRESH_TEST),
        "detections_per_image": int(hf.DETECTIONS_PER_IMAGE),
    }


def build_plain_detector(cfg) -> nn.Module:
    """The plain detector of ``cfg`` (no KD), on ``MODEL.DEVICE``."""
    return HFDetector(**detector_kwargs(cfg)).to(cfg.MODEL.DEVICE)


def build_hf_teacher(node, key: str, device: str) -> nn.Module:
    """A frozen transformers teacher from ``node.CONFIG`` (a kd2 yaml of this backend) and
    ``node.WEIGHTS`` (its local checkpoint, loaded strictly)."""
    return build_teacher_of_node(node, key, device, build_plain_detector)


def build_detector(cfg) -> nn.Module:
    """The plain detector when ``KD.METHODS`` is empty, else :class:`KDHFDetector` holding its
    teachers (a detector teacher only when a method reads one)."""
    if not cfg.KD.METHODS:
        return build_plain_detector(cfg)
    from .meta_arch import KDHFDetector

    kwargs = detector_kwargs(cfg)
    used = teachers_needed(cfg.KD)
    teacher = build_teacher_of_config(cfg, "", "transformers") if "" in used else None
    extra = {
        name: build_teacher_of_config(cfg, name, "transformers") for name in sorted(used - {""})
    }
    model = KDHFDetector(cfg=cfg, teacher=teacher, extra_teachers=extra, **kwargs)
    return model.to(cfg.MODEL.DEVICE)
