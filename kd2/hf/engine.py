"""kd2's trainer (:class:`kd2.engine.trainer.Trainer`) on transformers DETR-family detectors."""

from __future__ import annotations

from torch import nn

from kd2.engine.trainer import Trainer as _Trainer

from .build import build_detector, build_plain_detector

__all__ = ["Trainer", "evaluate"]


class Trainer(_Trainer):
    """Train a transformers detector (a teacher, a student or a distilled student) on kd2's
    loop, with every guarantee of :mod:`kd2.engine.trainer` (exact resume, atomic checkpoints,
    divergence guard, diagnostics, ``KD.BALANCE``, pre-flight, COCO evaluation, progress).
    The DETR family's recipe is the config's: ``SOLVER.OPTIMIZER AdamW``, gradient clipping,
    ``SOLVER.BACKBONE_LR_FACTOR``."""

    build_model = staticmethod(build_detector)
    build_plain_model = staticmethod(build_plain_detector)


def evaluate(cfg, model: nn.Module, dataset_names=None, **kwargs):
    """COCO-evaluate a transformers detector (:func:`kd2.engine.trainer.evaluate`)."""
    return Trainer.evaluate(cfg, model, dataset_names, **kwargs)
