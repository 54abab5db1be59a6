"""``KDTrainer``: Detectron2's ``DefaultTrainer`` for distilled students.

What it adds to ``DefaultTrainer``:

* checkpoints hold the **student alone** under ``"model"`` — exactly the keys of a plain
  Detectron2 model of the student's config, so ``DetectionCheckpointer`` loads them into a plain
  ``GeneralizedRCNN``/``RetinaNet`` — and the KD adapters under ``"kd"``; resuming restores both;
* a hook before each step: the iteration (KD warm-up) and every method's ``before_step``;
* the Global-Knowledge prototype refresh (:func:`prototype_refresh_hook`), when configured;
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

from .teacher import _WeightsOnlyCheckpointer

__all__ = [
    "KDTrainer",
    "StudentView",
    "kd_step_hook",
    "prototype_refresh_hook",
    "student_checkpointer",
    "train_records",
]


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
    """A ``DetectionCheckpointer`` writing the student alone (+ ``"kd"`` adapters if any); it
    reads ``.pth`` files (MODEL.WEIGHTS, resumed checkpoints) with ``weights_only=True``."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    if hasattr(model, "kd_methods"):
        kwargs.setdefault("kd", model.kd_methods)
        model = StudentView(model)
    return _WeightsOnlyCheckpointer(model, save_dir, **kwargs)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def kd_step_hook() -> hooks.HookBase:
    """Before each step: the iteration for KD warm-up, and every method's ``before_step``."""

    def before_step(trainer):
        model = _unwrap(trainer.model)
        if hasattr(model, "kd_before_step"):
            model.kd_before_step(trainer.iter)

    return hooks.CallbackHook(before_step=before_step)


def train_records(dataset_names) -> list:
    """Detectron2 dataset dicts of ``dataset_names`` as kd2 records (XYXY boxes, classes)."""
    from detectron2.data import DatasetCatalog
    from detectron2.structures import BoxMode

    records = []
    for name in dataset_names:
        for d in DatasetCatalog.get(name):
            anns = [a for a in d.get("annotations", []) if not a.get("iscrowd", 0)]
            records.append(
                {
                    "file_name": d["file_name"],
                    "image_id": d["image_id"],
                    "boxes": [
                        BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns
                    ],
                    "labels": [a["category_id"] for a in anns],
                }
            )
    return records


def prototype_refresh_hook(cfg) -> hooks.HookBase:
    """Runs the Global-Knowledge PGM (one epoch period by default) before the steps that need
    it; a no-op when no configured method needs prototypes."""
    from kd2.data.loader import read_image
    from kd2.modeling.prototypes import build_prototype_refresher

    state = {}

    def before_train(trainer):
        model = _unwrap(trainer.model)
        model.pgm_test_size = (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        state["refresher"] = build_prototype_refresher(
            cfg, model, train_records(cfg.DATASETS.TRAIN), lambda r: read_image(r["file_name"])
        )

    def before_step(trainer):
        if state.get("refresher") is not None:
            state["refresher"].maybe_refresh(trainer.iter)

    return hooks.CallbackHook(before_train=before_train, before_step=before_step)


def check_dataset_classes(cfg) -> None:
    """The datasets whose metadata already lists ``thing_classes`` have the model's number of
    classes (Detectron2 only fails at the first step, or at evaluation, otherwise)."""
    from detectron2.data import MetadataCatalog

    retina = "RetinaNet" in cfg.MODEL.META_ARCHITECTURE
    key = "MODEL.RETINANET.NUM_CLASSES" if retina else "MODEL.ROI_HEADS.NUM_CLASSES"
    k = cfg.MODEL.RETINANET.NUM_CLASSES if retina else cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != k:
            raise ValueError(
                f"dataset {name!r} has {len(classes)} categories, but the model is built for {k} "
                f"({key} {k}). Set {key} {len(classes)}, or use a dataset with {k} categories"
            )


class KDTrainer(DefaultTrainer):
    """``DefaultTrainer`` + student-only checkpoints + KD warm-up + COCO evaluation."""

    @classmethod
    def build_model(cls, cfg):
        check_dataset_classes(cfg)
        return super().build_model(cfg)

    def build_hooks(self):
        # DefaultTrainer.__init__ built a checkpointer over the whole model (adapters included)
        # just before calling build_hooks; swap in the student-only one before hooks capture it.
        self.checkpointer = student_checkpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )

        return [prototype_refresh_hook(self.cfg), kd_step_hook()] + super().build_hooks()

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder)
