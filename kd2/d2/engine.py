"""``KDTrainer``: Detectron2's ``DefaultTrainer`` for distilled students.

What it adds to ``DefaultTrainer``:

* checkpoints hold the **student alone** under ``"model"`` — exactly the keys of a plain
  Detectron2 model of the student's config, so ``DetectionCheckpointer`` loads them into a plain
  ``GeneralizedRCNN``/``RetinaNet`` — and the KD adapters under ``"kd"``; resuming restores both;
* a hook before each step: the iteration (KD warm-up) and every method's ``before_step``
  (periodic work such as prototype refresh);
* ``build_evaluator``: ``COCOEvaluator``.

AMP (``SOLVER.AMP.ENABLED`` -> ``AMPTrainer``), DDP and hooks are Detectron2's own.
"""

from __future__ import annotations

import os
import weakref

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["KDTrainer", "StudentView", "kd_step_hook", "student_checkpointer"]


class StudentView(nn.Module):
    """The student's submodules without the KD adapters: its ``state_dict`` has exactly the keys
    of the plain detector, and loading into it loads into the shared modules of ``model``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, child in model.named_children():
            if name != "kd_methods":
                self.add_module(name, child)
        for name, buf in model.named_buffers(recurse=False):
            persistent = name not in model._non_persistent_buffers_set
            self.register_buffer(name, buf, persistent=persistent)


def student_checkpointer(model: nn.Module, save_dir: str = "", **kwargs) -> DetectionCheckpointer:
    """A ``DetectionCheckpointer`` writing the student alone (+ ``"kd"`` adapters if any)."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    if hasattr(model, "kd_methods"):
        kwargs.setdefault("kd", model.kd_methods)
        model = StudentView(model)
    return DetectionCheckpointer(model, save_dir, **kwargs)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def kd_step_hook() -> hooks.HookBase:
    """Before each step: the iteration for KD warm-up, and every method's ``before_step``."""

    def before_step(trainer):
        model = _unwrap(trainer.model)
        if hasattr(model, "kd_before_step"):
            model.kd_before_step(trainer.iter)

    return hooks.CallbackHook(before_step=before_step)


class KDTrainer(DefaultTrainer):
    """``DefaultTrainer`` + student-only checkpoints + KD warm-up + COCO evaluation."""

    def build_hooks(self):
        # DefaultTrainer.__init__ built a checkpointer over the whole model (adapters included)
        # just before calling build_hooks; swap in the student-only one before hooks capture it.
        self.checkpointer = student_checkpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )

        return [kd_step_hook()] + super().build_hooks()

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder)
