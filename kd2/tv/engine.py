"""kd2's trainer (:class:`kd2.engine.trainer.Trainer`) on torchvision detectors."""

from __future__ import annotations

from torch import nn

from kd2.engine.trainer import Trainer as _Trainer

from .build import build_detector, build_plain_detector, label_offset

__all__ = ["Trainer", "evaluate"]


class Trainer(_Trainer):
    """Train a torchvision detector (a teacher, a student or a distilled student) on kd2's loop.

    Usage (what ``tools/train_net.py`` does)::

        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
    """

    build_model = staticmethod(build_detector)
    build_plain_model = staticmethod(build_plain_detector)

    @classmethod
    def label_offset(cls, model: nn.Module) -> int:
        return label_offset(model)


def evaluate(cfg, model: nn.Module, dataset_names=None, **kwargs):
    """COCO-evaluate a torchvision detector (:func:`kd2.engine.trainer.evaluate`)."""
    return Trainer.evaluate(cfg, model, dataset_names, **kwargs)
