"""``KDTrainer``: Detectron2's ``DefaultTrainer`` for distilled students.

What it adds to ``DefaultTrainer``:

* checkpoints hold the **student alone** under ``"model"`` — exactly the keys of a plain
  Detectron2 model of the student's config, so ``DetectionCheckpointer`` loads them into a plain
  ``GeneralizedRCNN``/``RetinaNet`` — and the KD adapters under ``"kd"``; resuming restores both;
* a hook before each step: the iteration (KD warm-up) and every method's ``before_step``;
* the Global-Knowledge prototype refresh (:func:`prototype_refresh_hook`), when configured;
* ``build_evaluator``: ``COCOEvaluator``;
* ``KD.TEACHER.CACHE`` (:mod:`kd2.d2.teacher_cache`): the teacher's features read from a cache
  built by ``tools/cache_teacher.py``, for every batch it holds exactly;
* COCO files by name (:func:`kd2.d2.data.register_config_datasets`, at construction);
* the torchvision trainer's safety checks: the divergence guard (:func:`divergence_hook`: a
  non-finite loss, and with ``SOLVER.DIVERGENCE.ENABLED`` a diverging or out-of-scale one, stops
  the run before the optimizer step, with the same message) and the learning rate's batch
  (:func:`kd2.engine.batch_scaling.fit_lr_to_batch`, when ``SOLVER.BASE_LR_BATCH_SIZE`` is
  declared); both opt-in on Detectron2 (:func:`kd2.d2.config.add_kd_config` says why);
* identical replicas on several processes (:func:`replica_sync_hook`): rank 0's buffers before
  every checkpoint and evaluation, per-rank checksums at the end; and DDP of a CPU model
  (:func:`create_ddp_model`: ``--num-gpus 2`` without a GPU runs on gloo).

AMP (``SOLVER.AMP.ENABLED`` -> ``AMPTrainer``), DDP and hooks are Detectron2's own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Callable, Mapping

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer, hooks
from detectron2.engine.defaults import create_ddp_model as _d2_create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kd2.data.catalog import check_class_count
from kd2.data.loader import read_image
from kd2.engine.batch_scaling import auto_scale_workers, fit_lr_to_batch, lr_batch_mismatch
from kd2.engine.divergence import DivergenceGuard, judge_step, stop_message
from kd2.engine.launch import broadcast_buffers
from kd2.engine.preflight import preserved_random_state, run_preflight
from kd2.engine.teacher_cache import attach_teacher_cache, log_cache_use
from kd2.modeling.prototypes import build_prototype_refresher

from .data import register_config_datasets
from .teacher import _WeightsOnlyCheckpointer
from .teacher_cache import FlipRecordingMapper, cache_records

__all__ = [
    "create_ddp_model",
    "divergence_hook",
    "replica_sync_hook",
    "KDTrainer",
    "StudentView",
    "kd_preflight_hook",
    "kd_step_hook",
    "prototype_refresh_hook",
    "student_checkpointer",
    "teacher_cache_hook",
    "train_records",
]


class StudentView(nn.Module):
    """The student's submodules without the KD adapters: its ``state_dict`` has exactly the keys
    of the plain detector, and loading into it loads into the shared modules of ``model``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, child in model.named_children():
            if name not in ("kd_methods", "kd_balance"):
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
        if getattr(model, "kd_balance", None) is not None:
            kwargs.setdefault("kd_balance", model.kd_balance)  # the controller's multipliers
        model = StudentView(model)
    return _WeightsOnlyCheckpointer(model, save_dir, **kwargs)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def teacher_cache_hook(cfg) -> hooks.HookBase:
    """Attach ``KD.TEACHER.CACHE`` before training (:mod:`kd2.d2.teacher_cache`); log how many
    batches it served."""

    def before_train(trainer):
        model = _unwrap(trainer.model)
        if hasattr(model, "kd_attach_cache"):
            attach_teacher_cache(cfg, model, cache_records(cfg.DATASETS.TRAIN))

    return hooks.CallbackHook(
        before_train=before_train, after_train=lambda trainer: log_cache_use(_unwrap(trainer.model))
    )


def kd_step_hook() -> hooks.HookBase:
    """Before each step: the iteration for KD warm-up, and every method's ``before_step``."""

    def before_step(trainer):
        model = _unwrap(trainer.model)
        if hasattr(model, "kd_before_step"):
            model.kd_before_step(trainer.iter)

    return hooks.CallbackHook(before_step=before_step)


class _DivergenceHook(hooks.HookBase):
    """See :func:`divergence_hook`."""

    def __init__(self, guard: DivergenceGuard | None, message: Callable):
        self.guard, self.message = guard, message
        self._armed, self._handle = False, None

    def before_train(self):
        self._handle = self.trainer.model.register_forward_hook(self._judge)

    def before_step(self):
        self._armed = True  # the step's training forward, not the pre-flight's or an eval's

    def after_step(self):
        self._armed = False

    def after_train(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _judge(self, module, inputs, output):
        if not self._armed or not module.training or not isinstance(output, Mapping):
            return
        self._armed = False
        values = {k: float(v.detach()) for k, v in output.items()}
        stop = judge_step(self.guard, values, sum(values.values()), self.trainer.iter)
        if stop is not None:
            raise FloatingPointError(self.message(stop, _unwrap(self.trainer.model)))


def divergence_hook(cfg) -> hooks.HookBase:
    """kd2's divergence guard (``SOLVER.DIVERGENCE``, :mod:`kd2.engine.divergence`) on a
    Detectron2 trainer: the loss dict of every step's training forward — the loss the optimizer
    receives, ``KD.BALANCE`` multipliers included — is judged right after the forward, so a
    non-finite, diverging or out-of-scale loss stops the run before ``backward`` and the
    optimizer step, with the torchvision trainer's message (FloatingPointError). Detectron2's own
    NaN check comes only after ``backward``, and it has no guard for finite explosions.

    A forward hook on ``trainer.model``, armed in ``before_step``: Detectron2's ``run_step``
    (``SimpleTrainer`` and ``AMPTrainer`` alike) stays Detectron2's own."""
    guard = DivergenceGuard.from_config(cfg.SOLVER.DIVERGENCE)

    def message(stop, model):
        return stop_message(
            stop,
            model,
            output_dir=cfg.OUTPUT_DIR,
            base_lr=cfg.SOLVER.BASE_LR,
            teacher_weights=cfg.KD.TEACHER.WEIGHTS,
            kd_cfg=cfg.KD,
            lr_batch=lr_batch_mismatch(cfg),
        )

    return _DivergenceHook(guard, message)


def replica_sync_hook(cfg) -> hooks.HookBase:
    """Keeps the replicas of a multi-process run identical where it matters.

    Detectron2 wraps the model in DDP with ``broadcast_buffers=False``, so BatchNorm running
    statistics drift apart between ranks (each sees its own images). Right before every step
    after which ``PeriodicCheckpointer`` saves (``SOLVER.CHECKPOINT_PERIOD``, the last step) or
    ``EvalHook`` / ``PreciseBN`` run (``TEST.EVAL_PERIOD``, the last step), every rank gets rank
    0's buffers (:func:`kd2.engine.launch.broadcast_buffers`, as kd2's torchvision trainer does),
    so every rank evaluates, and rank 0 saves, the same model. Its ``after_step`` must therefore
    run after ``PreciseBN`` and before ``PeriodicCheckpointer`` and ``EvalHook``
    (:meth:`KDTrainer.build_hooks` puts it there); it runs on every rank, at the same steps. After
    a completed training each rank logs ``rank R final parameter checksum P buffer checksum B``
    (in ``log.txt`` / ``log.txt.rankR``): identical on all ranks. One process: no-op but the log.
    """
    log = logging.getLogger("detectron2")  # the logger default_setup writes to OUTPUT_DIR
    periods = [p for p in (cfg.SOLVER.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD) if p > 0]

    def after_step(trainer):
        next_iter = trainer.iter + 1
        if next_iter >= trainer.max_iter or any(next_iter % p == 0 for p in periods):
            broadcast_buffers(trainer.model)

    def after_train(trainer):
        # no collective here: after_train also runs when a rank fails (trainer.iter < max_iter)
        if trainer.iter < trainer.max_iter:
            return

        params = sum(float(p.detach().double().sum()) for p in trainer.model.parameters())
        buffers = sum(float(b.detach().double().sum()) for b in trainer.model.buffers())
        log.info(
            "rank %d final parameter checksum %.10e buffer checksum %.10e",
            comm.get_rank(),
            params,
            buffers,
        )

    return hooks.CallbackHook(after_step=after_step, after_train=after_train)


def create_ddp_model(model: nn.Module, **kwargs) -> nn.Module:
    """Detectron2's ``create_ddp_model``, which also wraps a CPU model: Detectron2 passes
    ``device_ids=[local rank]``, which DDP rejects for a CPU model, so ``--num-gpus 2`` without
    a GPU (gloo) failed; a CPU model gets no ``device_ids``."""
    if all(p.device.type == "cpu" for p in model.parameters()):
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


@contextlib.contextmanager
def _cpu_ddp():
    """``DefaultTrainer.__init__`` calls :func:`create_ddp_model` while this is active."""
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        defaults.create_ddp_model = original


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
    state = {}

    def before_train(trainer):
        model = _unwrap(trainer.model)
        model.pgm_test_size = (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        state["refresher"] = build_prototype_refresher(
            cfg, model, train_records(cfg.DATASETS.TRAIN), lambda r: read_image(r["file_name"])
        )
        trainer.kd_prototype_refresher = state["refresher"]  # the pre-flight check uses it

    def before_step(trainer):
        if state.get("refresher") is not None:
            state["refresher"].maybe_refresh(trainer.iter)

    return hooks.CallbackHook(before_train=before_train, before_step=before_step)


def preflight_hook(cfg) -> hooks.HookBase:
    """``KD.PREFLIGHT`` (:mod:`kd2.engine.preflight`) before the first step of a fresh
    ``KDTrainer`` run: the teacher on ``DATASETS.TEST[0]``, batches of the trainer's loader."""

    def val_dataset():
        from detectron2.data import DatasetMapper

        if not cfg.DATASETS.TEST:
            return None
        return cfg.DATASETS.TEST[0], DatasetMapper(cfg, False)

    return kd_preflight_hook(
        cfg.KD.PREFLIGHT,
        cfg.OUTPUT_DIR,
        val_dataset,
        lambda trainer: trainer.build_train_loader(cfg),
    )


def kd_preflight_hook(
    node, output_dir: str, val_dataset: Callable, train_loader: Callable
) -> hooks.HookBase:
    """The pre-flight check as a Detectron2 hook, for any trainer (``KDTrainer``, LazyConfig).

    Args:
        node: the ``KD.PREFLIGHT`` options.
        output_dir: where ``preflight.json`` goes.
        val_dataset: ``() -> (dataset name, test mapper)``: the teacher's AP is measured on the
            dataset's first ``node.VAL_IMAGES`` images; ``None`` (no test set): no AP.
        train_loader: ``trainer -> a fresh training data loader`` (a few batches are read).
    """

    def before_train(trainer):
        model = _unwrap(trainer.model)
        if trainer.iter != 0 or not node.ENABLED or getattr(model, "teacher", None) is None:
            return
        from detectron2.data import DatasetCatalog, build_detection_test_loader
        from detectron2.evaluation import inference_on_dataset

        refresher = getattr(trainer, "kd_prototype_refresher", None)
        if refresher is not None:  # GlobalKD's terms need their prototypes
            refresher.maybe_refresh(trainer.iter)
        with preserved_random_state():
            teacher_ap, n_val = None, 0
            # a teacher of another framework (KD.TEACHER.BACKEND) is not evaluated by this loop
            foreign = model.kd_is_foreign(model.teacher)
            val = val_dataset() if node.VAL_IMAGES > 0 and not foreign else None
            if val is not None:
                name, mapper = val
                dicts = DatasetCatalog.get(name)[: int(node.VAL_IMAGES)]
                n_val = len(dicts)
                loader = build_detection_test_loader(dicts, mapper=mapper)
                evaluator = COCOEvaluator(name, output_dir=None)
                res = inference_on_dataset(model.teacher, loader, evaluator)
                teacher_ap = float(res["bbox"]["AP"]) if res and "bbox" in res else None
            data = iter(train_loader(trainer))
            batches = [next(data) for _ in range(max(1, int(node.BATCHES)))]
        run_preflight(
            model,
            batches,
            model,
            output_dir=output_dir,
            teacher_ap=teacher_ap,
            val_images=n_val,
            min_teacher_ap=float(node.MIN_TEACHER_AP),
            input_checks=model.kd_input_checks(),
            start_iteration=trainer.iter,
            write=comm.is_main_process(),
        )

    return hooks.CallbackHook(before_train=before_train)


def check_dataset_classes(cfg) -> None:
    """The datasets whose metadata already lists ``thing_classes`` have the model's number of
    classes (Detectron2 only fails at the first step, or at evaluation, otherwise)."""
    from detectron2.data import MetadataCatalog

    arch = cfg.MODEL.META_ARCHITECTURE
    section = "RETINANET" if "RetinaNet" in arch else "GFL" if "GFL" in arch else "ROI_HEADS"
    check_class_count(
        list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST),
        cfg.MODEL[section].NUM_CLASSES,
        f"MODEL.{section}.NUM_CLASSES",
        lambda name: MetadataCatalog.get(name).get("thing_classes"),
    )


class KDTrainer(DefaultTrainer):
    """``DefaultTrainer`` + student-only checkpoints + KD warm-up + COCO evaluation."""

    def __init__(self, cfg):
        register_config_datasets(cfg)  # "instances.json:image_dir" names, DATASETS.REGISTER
        if "BASE_LR_BATCH_SIZE" in cfg.SOLVER:
            # kd2's REFERENCE_WORLD_SIZE rule also scales BASE_LR_BATCH_SIZE (Detectron2's own
            # then finds nothing to do), then the learning rate is checked against the batch
            cfg = fit_lr_to_batch(auto_scale_workers(cfg, comm.get_world_size()))
        with _cpu_ddp():  # --num-gpus N without a GPU: DDP of a CPU model takes no device_ids
            super().__init__(cfg)

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

        ret = super().build_hooks()
        # rank 0's buffers before PeriodicCheckpointer / EvalHook (after PreciseBN) see the model
        at = next(
            (
                i
                for i, h in enumerate(ret)
                if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))
            ),
            len(ret),
        )
        ret.insert(at, replica_sync_hook(self.cfg))
        first = [prototype_refresh_hook(self.cfg), preflight_hook(self.cfg), kd_step_hook()]
        if self.cfg.KD.TEACHER.get("CACHE", ""):
            first.append(teacher_cache_hook(self.cfg))
        if "DIVERGENCE" in self.cfg.SOLVER:
            first.append(divergence_hook(self.cfg))
        return first + ret

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's loader; with ``KD.TEACHER.CACHE``, its mapper records each image's flip
        (the key of its cache entry, :class:`~kd2.d2.teacher_cache.FlipRecordingMapper`)."""
        if not cfg.KD.TEACHER.get("CACHE", ""):
            return super().build_train_loader(cfg)
        from detectron2.data import build_detection_train_loader

        return build_detection_train_loader(cfg, mapper=FlipRecordingMapper(cfg, is_train=True))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder)
