"""The iteration-based trainer of teachers, students and distilled students.

Detectron2's ``DefaultTrainer`` shape on a plain PyTorch loop: build model / optimizer /
scheduler / loader from the config, ``resume_or_load``, ``train``, ``test``. What it guarantees:

* **exact resume** — a checkpoint holds the model, the KD adapters, the optimizer, the
  scheduler, the iteration and every RNG state of every process; the data stream is a pure
  function of (seed, iteration), so resuming after a kill reproduces the uninterrupted run's
  weights on CPU, with one process or several (the same number as before);
* resuming a **finished** run trains nothing and writes nothing; a missing or unreadable
  ``last_checkpoint`` target falls back to the newest readable checkpoint (with a warning);
  a ``SOLVER`` learning rate, momentum or weight decay changed on resume is applied (and logged);
* **one run per** ``OUTPUT_DIR`` (:mod:`kd2.engine.run_dir`), **atomic checkpoints** with the
  user's umask (:mod:`kd2.utils.checkpoint`);
* a non-finite loss stops training with a clear error, before the optimizer touches the
  weights and without writing a checkpoint, so the last good checkpoint stays intact; the
  message says whether the teacher, the student or the distillation terms are at fault;
* with several processes, rank 0's buffers (BatchNorm statistics) are broadcast before every
  evaluation and checkpoint, so the evaluated model is the saved model on every rank;
* ``metrics.json`` lines and TensorBoard events in ``OUTPUT_DIR``, tqdm progress with ETA;
* optional AMP (KD losses are computed in fp32 by the methods) and gradient clipping;
* DDP through ``torch.distributed`` when launched on several processes.

Student checkpoints: ``checkpoint["model"]`` holds the student alone (it loads into the plain
detector of its backend); the KD adapters are in ``checkpoint["kd"]``.

The loop is shared by the backends that train on kd2's own loop — torchvision
(:class:`kd2.tv.Trainer`) and transformers (:class:`kd2.hf.Trainer`) — which subclass
:class:`Trainer` with the few things that differ: how a model is built (:meth:`Trainer.build_model`,
:meth:`Trainer.build_plain_model`) and which label the detector trains on
(:meth:`Trainer.label_offset`). Detectron2 trains on its own ``DefaultTrainer``
(:class:`kd2.d2.KDTrainer`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections import OrderedDict
from typing import Callable, Dict, List

import numpy as np
import torch
from torch import nn

from kd2.config import NUM_CLASSES_KEYS, num_classes_of, validate_values
from kd2.data import (
    DatasetCatalog,
    DetectionDataset,
    MetadataCatalog,
    build_test_loader,
    build_train_loader,
)
from kd2.data.catalog import check_class_count, records_of, register_config_datasets
from kd2.data.loader import model_targets, read_image
from kd2.data.report import write_dataset_report
from kd2.engine.batch_scaling import auto_scale_workers, fit_lr_to_batch, lr_batch_mismatch
from kd2.engine.divergence import DivergenceGuard, Stop, judge_step, stop_message
from kd2.engine.launch import broadcast_buffers, get_rank, get_world_size, is_main_process
from kd2.engine.preflight import preserved_random_state, run_preflight
from kd2.engine.run_dir import lock_output_dir, release_output_dir
from kd2.engine.teacher_cache import attach_teacher_cache, log_cache_use
from kd2.evaluation import COCOEvaluator, inference_on_dataset
from kd2.modeling.prototypes import build_prototype_refresher
from kd2.utils.checkpoint import find_resume_checkpoint, load_checkpoint_state, save_checkpoint
from kd2.utils.errors import ConfigError

__all__ = [
    "Trainer",
    "build_lr_lambda",
    "build_optimizer",
    "ContiguousLabels",
    "evaluate",
    "unwrap",
]

logger = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def build_lr_lambda(cfg) -> Callable[[int], float]:
    """Linear warm-up from ``WARMUP_FACTOR`` over ``WARMUP_ITERS``, then ``GAMMA`` at each
    of ``STEPS`` (Detectron2's ``WarmupMultiStepLR``)."""
    s = cfg.SOLVER
    steps = sorted(s.STEPS)
    if any(x > s.MAX_ITER for x in steps):
        logger.warning("SOLVER.STEPS %s has steps beyond MAX_ITER=%d", steps, s.MAX_ITER)

    def factor(it: int) -> float:
        warm = 1.0
        if it < s.WARMUP_ITERS:
            alpha = it / s.WARMUP_ITERS
            warm = s.WARMUP_FACTOR * (1 - alpha) + alpha
        return warm * s.GAMMA ** sum(1 for x in steps if x <= it)

    return factor


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER`` over the model's trainable parameters: ``SGD`` (with
    ``SOLVER.MOMENTUM``) or ``AdamW`` (the DETR family's), both with ``SOLVER.WEIGHT_DECAY``;
    with ``SOLVER.BACKBONE_LR_FACTOR`` ≠ 1 the parameters the model names as its backbone's
    (``backbone_parameters()``) train at that multiple of the rate (RT-DETR's and D-FINE's
    recipes)."""
    s = cfg.SOLVER
    params = [p for p in model.parameters() if p.requires_grad]
    factor = float(s.get("BACKBONE_LR_FACTOR", 1.0))
    groups: List[Dict] = [{"params": params}]
    if factor != 1.0 and hasattr(model, "backbone_parameters"):
        backbone = {id(p) for p in model.backbone_parameters()}
        groups = [
            {"params": [p for p in params if id(p) not in backbone]},
            {
                "params": [p for p in params if id(p) in backbone],
                "lr": s.BASE_LR * factor,
                "lr_factor": factor,
            },
        ]
    name = str(s.get("OPTIMIZER", "SGD"))
    if name == "SGD":
        return torch.optim.SGD(
            groups, lr=s.BASE_LR, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY
        )
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=s.BASE_LR, weight_decay=s.WEIGHT_DECAY)
    raise ConfigError(
        f"SOLVER.OPTIMIZER must be SGD or AdamW, got {name!r}",
        "set SOLVER.OPTIMIZER to one of them",
    )


class ContiguousLabels(nn.Module):
    """Eval-mode wrapper: a detector's labels ``c + offset`` -> contiguous ``c`` (torchvision's
    Faster R-CNN and SSD count the background as class 0: ``offset`` 1)."""

    def __init__(self, model: nn.Module, offset: int = 0):
        super().__init__()
        self.model = model
        self.offset = int(offset)

    def forward(self, images):
        outputs = self.model(images)
        if self.offset:
            outputs = [{**o, "labels": o["labels"] - self.offset} for o in outputs]
        return outputs


def evaluate(
    cfg,
    model: nn.Module,
    dataset_names=None,
    output_dir: str | None = None,
    max_images: int | None = None,
    label_offset: int = 0,
) -> Dict:
    """COCO-evaluate ``model`` on each of ``DATASETS.TEST`` (or ``dataset_names``); on the first
    ``max_images`` images of each when given (the metrics then cover those images only).
    ``label_offset``: the detector's label of class ``c`` is ``c + label_offset``."""
    results = OrderedDict()
    rank, world = get_rank(), get_world_size()
    for name in dataset_names if dataset_names is not None else cfg.DATASETS.TEST:
        records = DatasetCatalog.get(name)[:max_images][rank::world]
        loader = build_test_loader(
            DetectionDataset(records, train=False, corrupt_images=cfg.DATALOADER.CORRUPT_IMAGES),
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )
        backend = cfg.TEST.get("COCO_EVAL_BACKEND", "auto")
        evaluator = COCOEvaluator(name, output_dir=output_dir, backend=backend)
        res = inference_on_dataset(
            ContiguousLabels(model, label_offset), _to_device(loader, cfg), evaluator
        )
        results[name] = res
        if is_main_process() and res:
            logger.info("evaluation on %s: %s", name, _fmt(res))
    return results


def _to_device(loader, cfg):
    device = torch.device(cfg.MODEL.DEVICE)
    for images, targets in loader:
        yield [im.to(device) for im in images], targets


def _fmt(res: Dict) -> str:
    bbox = res.get("bbox", {})
    return " ".join(f"{k}={v:.2f}" for k, v in bbox.items())


def _rng_state() -> Dict:
    """Every RNG's state in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _all_rank_rng_states() -> List[Dict]:
    """Every rank's :func:`_rng_state`, in rank order (collective: call on every rank)."""
    state = _rng_state()
    if get_world_size() == 1:
        return [state]
    import torch.distributed as dist

    gathered: List = [None] * get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


def check_dataset_classes(cfg) -> None:
    """Each dataset of ``DATASETS.TRAIN`` / ``TEST`` has the model's number of classes."""
    check_class_count(
        list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST),
        num_classes_of(cfg),
        NUM_CLASSES_KEYS[cfg.MODEL.META_ARCHITECTURE],
        lambda name: MetadataCatalog.get(name).get("thing_classes"),
    )


def _set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Train the detector described by ``cfg`` (a teacher, a student, or a distilled student).

    Usage (what ``tools/train_net.py`` does)::

        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()

    ``after_step`` callbacks ``fn(trainer)`` run after every completed iteration.

    A backend subclasses it with :meth:`build_model`, :meth:`build_plain_model` and, where its
    detectors count the background as a class, :meth:`label_offset`.
    """

    # -- what a backend provides ----------------------------------------------------------
    @classmethod
    def build_model(cls, cfg) -> nn.Module:
        """The detector ``cfg`` trains: plain, or its KD subclass holding the teachers."""
        raise NotImplementedError

    @classmethod
    def build_plain_model(cls, cfg) -> nn.Module:
        """The plain detector of ``cfg`` (no KD): what a student checkpoint loads into."""
        raise NotImplementedError

    @classmethod
    def label_offset(cls, model: nn.Module) -> int:
        """The detector's training label of class ``c`` is ``c + label_offset``."""
        return 0

    @classmethod
    def evaluate(cls, cfg, model: nn.Module, dataset_names=None, **kwargs) -> Dict:
        """:func:`evaluate` with this backend's label convention."""
        return evaluate(
            cfg, model, dataset_names, label_offset=cls.label_offset(unwrap(model)), **kwargs
        )

    def __init__(self, cfg):
        validate_values(cfg)
        register_config_datasets(cfg)
        cfg = fit_lr_to_batch(auto_scale_workers(cfg, get_world_size()))
        check_dataset_classes(cfg)
        self.cfg = cfg
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.rank, self.world_size = get_rank(), get_world_size()
        if cfg.SOLVER.IMS_PER_BATCH % self.world_size:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} is not divisible by the "
                f"number of processes ({self.world_size})"
            )
        logger.info(
            "world size %d, rank %d, pid %d, device %s",
            self.world_size,
            self.rank,
            os.getpid(),
            self.device,
        )
        torch.manual_seed(cfg.SEED)
        self.model = self.build_model(cfg)
        self.target_offset = self.label_offset(self.model)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, build_lr_lambda(cfg))
        self.amp = bool(cfg.SOLVER.AMP.ENABLED)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp and self.device.type == "cuda"
        )
        self.ddp_model: nn.Module = self.model
        if self.world_size > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        self.start_iter = 0
        self._resume_rng: Dict | None = None  # this rank's RNG state in the checkpoint
        self.resumed_from: str | None = None
        self.prototype_refresher = None  # set by train() when a method needs prototypes
        self.iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.after_step: List[Callable[[Trainer], None]] = []
        self.last_results: Dict = {}
        self.teacher_results: Dict = {}
        self.divergence_guard = DivergenceGuard.from_config(cfg.SOLVER.DIVERGENCE)

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self, rng_per_rank: List[Dict] | None = None) -> Dict:
        """The checkpoint. ``rng_per_rank``: every rank's RNG state (:func:`_all_rank_rng_states`,
        gathered by :meth:`save`); this process's alone when not given."""
        rngs = rng_per_rank if rng_per_rank is not None else [_rng_state()]
        model = self.model
        balance_state = {}
        if hasattr(model, "student_state_dict"):
            model_state = model.student_state_dict()
            kd_state = model.kd_methods.state_dict()
            if getattr(model, "kd_balance", None) is not None:
                balance_state = model.kd_balance.state_dict()
        else:
            model_state, kd_state = model.state_dict(), {}
        return {
            "model": model_state,
            "kd": kd_state,
            "kd_balance": balance_state,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "iteration": self.iter,
            "rng": rngs[0],
            "rng_per_rank": rngs,
            "config": self.cfg.dump(),
        }

    def save(self, name: str) -> None:
        """Write a checkpoint (collective with several processes: call on every rank)."""
        broadcast_buffers(self.model)
        rngs = _all_rank_rng_states()
        if is_main_process():
            path = save_checkpoint(self.cfg.OUTPUT_DIR, name, self.state_dict(rngs))
            logger.info("saved checkpoint %s", path)

    def resume_or_load(self, resume: bool = True) -> None:
        """With ``resume`` and a checkpoint in ``OUTPUT_DIR``, restore everything and continue
        from its iteration; otherwise load ``MODEL.WEIGHTS`` (model only) if given."""
        found = find_resume_checkpoint(self.cfg.OUTPUT_DIR) if resume else None
        if found is None:
            if self.cfg.MODEL.WEIGHTS:
                state = load_checkpoint_state(self.cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")
                result = self.model.load_state_dict(state, strict=False)
                missing = [
                    k
                    for k in result.missing_keys
                    if not k.startswith(("kd_methods.", "kd_balance."))
                ]
                if missing or result.unexpected_keys:
                    raise ValueError(
                        f"MODEL.WEIGHTS {self.cfg.MODEL.WEIGHTS!r} does not match the model: "
                        f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
                    )
            return
        path, ckpt = found
        self.model.load_state_dict(ckpt["model"], strict=not hasattr(self.model, "kd_methods"))
        if hasattr(self.model, "kd_methods"):
            self.model.kd_methods.load_state_dict(ckpt["kd"])
        if getattr(self.model, "kd_balance", None) is not None and ckpt.get("kd_balance"):
            self.model.kd_balance.load_state_dict(ckpt["kd_balance"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["grad_scaler"])
        self.start_iter = ckpt["iteration"]
        self.resumed_from = path
        self._apply_solver_on_resume(ckpt)
        # restored in train(), once the data iterator exists
        self._resume_rng = self._rank_rng_state(ckpt)
        logger.info("resumed from %s at iteration %d", path, self.start_iter)

    def _rank_rng_state(self, ckpt: Dict) -> Dict:
        states = ckpt.get("rng_per_rank") or [ckpt["rng"]]
        if len(states) != self.world_size:
            logger.warning(
                "the checkpoint was written by %d process(es), this run has %d: training "
                "continues, but not bit-identically to an uninterrupted run",
                len(states),
                self.world_size,
            )
        return states[self.rank] if self.rank < len(states) else states[0]

    def _apply_solver_on_resume(self, ckpt: Dict) -> None:
        """The config's learning rate, momentum and weight decay apply from the resumed
        iteration on (the optimizer's state would otherwise keep the checkpoint's), and every
        change is logged; the schedule's shape (steps, warm-up) always comes from the config."""
        s = self.cfg.SOLVER
        wanted = {"momentum": s.MOMENTUM, "weight_decay": s.WEIGHT_DECAY}
        old_base = list(self.scheduler.base_lrs)
        if old_base[0] != s.BASE_LR:
            logger.warning(
                "SOLVER.BASE_LR is %g in this config but %g in the checkpoint: the new rate "
                "applies from iteration %d on",
                s.BASE_LR,
                old_base[0],
                self.start_iter,
            )
        bases = [float(s.BASE_LR) * g.get("lr_factor", 1.0) for g in self.optimizer.param_groups]
        self.scheduler.base_lrs = bases
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group, base in zip(self.optimizer.param_groups, bases):
            group["initial_lr"] = base
            group["lr"] = base * factor
            for key, value in wanted.items():
                if key in group and group[key] != value:
                    logger.warning(
                        "SOLVER.%s is %g in this config but %g in the checkpoint: the new value "
                        "applies from iteration %d on",
                        key.upper(),
                        value,
                        group[key],
                        self.start_iter,
                    )
                    group[key] = value

    # -- training -------------------------------------------------------------------------
    def train_records(self) -> List[Dict]:
        records = records_of(self.cfg.DATASETS.TRAIN)
        if not records:
            raise ValueError(f"DATASETS.TRAIN={self.cfg.DATASETS.TRAIN} contains no images")
        return records

    def build_train_loader(self, records: List[Dict] | None = None):
        cfg = self.cfg
        records = self.train_records() if records is None else records
        flip = 0.5 if cfg.INPUT.RANDOM_FLIP == "horizontal" else 0.0
        return build_train_loader(
            DetectionDataset(
                records, train=True, flip_prob=flip, corrupt_images=cfg.DATALOADER.CORRUPT_IMAGES
            ),
            batch_size_per_rank=cfg.SOLVER.IMS_PER_BATCH // self.world_size,
            seed=cfg.SEED,
            start_iter=self.start_iter,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    def train(self) -> Dict:
        """Train from ``start_iter`` to ``SOLVER.MAX_ITER``, holding ``OUTPUT_DIR``'s lock."""
        cfg = self.cfg
        if self.start_iter >= self.max_iter:
            logger.warning(
                "the run in %s is finished: %s is at iteration %d and SOLVER.MAX_ITER is %d. "
                "Nothing was trained and no file was written. Evaluate it with --eval-only "
                "--resume, or raise SOLVER.MAX_ITER to train longer",
                cfg.OUTPUT_DIR,
                self.resumed_from,
                self.start_iter,
                self.max_iter,
            )
            return self.last_results
        locked = is_main_process()
        if locked:
            lock_output_dir(cfg.OUTPUT_DIR)
        try:
            return self._train()
        finally:
            if locked:
                release_output_dir(cfg.OUTPUT_DIR)

    def _train(self) -> Dict:
        loader = self._before_train()
        writer = _tensorboard(self.cfg.OUTPUT_DIR) if is_main_process() else None
        self._train_steps(loader, writer)
        self._after_train(writer)
        return self.last_results

    def _before_train(self):
        """Evaluate the teacher, write the dataset report, build the loader (the resumed RNG
        state restored after it), the PGM refresher, and run the pre-flight check."""
        cfg = self.cfg
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        teacher = getattr(self.model, "teacher", None)
        detector_teacher = teacher is not None and (
            "detections" in self.model.kd_teacher_infos[""].parts
        )  # a backbone-only (foundation) teacher has nothing to evaluate
        if detector_teacher and cfg.KD.EVAL_TEACHER and self.start_iter == 0:
            self.teacher_results = self.evaluate(cfg, teacher)
            self._write_metrics({"teacher_eval": self.teacher_results}, self.start_iter)
        records = self.train_records()
        if hasattr(self.model, "kd_attach_cache"):
            attach_teacher_cache(cfg, self.model, records)
        if self.start_iter == 0 and is_main_process():
            names = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_classes")
            write_dataset_report(records, cfg, cfg.OUTPUT_DIR, class_names=names)
        loader = iter(self.build_train_loader(records))
        if self._resume_rng is not None:
            # Creating the loader's iterator draws a base seed from the global RNG; the
            # uninterrupted run drew it before the checkpoint's state was taken, so the state is
            # restored only now, to continue the exact same stream (Faster R-CNN samples ROIs
            # from it).
            _set_rng_state(self._resume_rng)
        self.prototype_refresher = build_prototype_refresher(
            cfg, self.model, records, _read_record_image
        )
        if self.start_iter == 0 and cfg.KD.PREFLIGHT.ENABLED and hasattr(self.model, "teacher"):
            if self.model.teacher is not None:
                self._preflight(records)
        return loader

    def _train_steps(self, loader, writer) -> None:
        """The iterations from ``start_iter``, with the progress bar."""
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(
            total=self.max_iter,
            initial=self.start_iter,
            desc=os.path.basename(os.path.normpath(cfg.OUTPUT_DIR)) or "train",
            disable=not is_main_process() or os.environ.get("KD2_NO_PROGRESS") == "1",
            dynamic_ncols=True,
        )
        self.ddp_model.train()
        started = (time.perf_counter(), self.start_iter)
        try:
            for it in range(self.start_iter, self.max_iter):
                self.iter = it
                t0 = time.perf_counter()
                images, targets = next(loader)
                data_time = time.perf_counter() - t0
                losses = self.run_step(images, targets)
                diag = getattr(self.model, "kd_diag_last", None)
                if diag and diag.get("iteration") == it:
                    self._write_metrics(
                        {k: v for k, v in diag.items() if k != "iteration"}, it, writer
                    )
                bar.update(1)
                bar.set_postfix(loss=f"{losses['total_loss']:.3f}", refresh=False)
                self._after_step(losses, t0, data_time, writer, bar.disable, started)
        finally:
            bar.close()

    def _after_step(self, losses, t0: float, data_time: float, writer, quiet_bar, started):
        """Log, evaluate (``TEST.EVAL_PERIOD``) and checkpoint after an iteration."""
        cfg = self.cfg
        done = self.iter + 1
        period = cfg.SOLVER.LOG_PERIOD
        if done % period == 0 or done == self.max_iter:
            losses.update(
                lr=self.optimizer.param_groups[0]["lr"],
                data_time=data_time,
                time=time.perf_counter() - t0,
            )
            self._write_metrics(losses, done, writer)
        if quiet_bar and (done <= 5 or done % period == 0 or done == self.max_iter):
            self._log_progress(losses, done, started)
        self.iter = done
        # Evaluate before saving: the evaluation's data loader draws from the global
        # RNG, and the checkpoint must hold the state the next step starts from.
        if cfg.TEST.EVAL_PERIOD and done % cfg.TEST.EVAL_PERIOD == 0 and done < self.max_iter:
            broadcast_buffers(self.model)
            self._evaluate_and_log(done, writer)
        if cfg.SOLVER.CHECKPOINT_PERIOD and done % cfg.SOLVER.CHECKPOINT_PERIOD == 0:
            self.save(f"model_{done:07d}.pth")
        for fn in self.after_step:
            fn(self)

    def _after_train(self, writer) -> None:
        """The final checkpoint, the replicas' checksums, the final evaluation."""
        log_cache_use(self.model)
        self.save("model_final.pth")  # broadcasts rank 0's buffers first
        # Between checkpoints BatchNorm running statistics are per rank (DDP with
        # broadcast_buffers=False, as in Detectron2); save() made them rank 0's everywhere.
        checksum = sum(float(p.detach().double().sum()) for p in self.model.parameters())
        buffers = sum(float(b.detach().double().sum()) for b in self.model.buffers())
        logger.info(
            "rank %d final parameter checksum %.10e buffer checksum %.10e",
            self.rank,
            checksum,
            buffers,
        )
        if self.cfg.DATASETS.TEST:
            self._evaluate_and_log(self.max_iter, writer)
        if writer is not None:
            writer.close()

    def _preflight(self, records: List[Dict]) -> None:
        """``KD.PREFLIGHT`` (:mod:`kd2.engine.preflight`) before the first step; it leaves the
        run unchanged (forked RNG, restored buffers, no step)."""
        cfg, model, node = self.cfg, self.model, self.cfg.KD.PREFLIGHT
        if self.prototype_refresher is not None:  # GlobalKD's terms need their prototypes
            self.prototype_refresher.maybe_refresh(self.start_iter)
        with preserved_random_state():
            teacher_ap, n_val = None, 0
            # a teacher of another framework (KD.TEACHER.BACKEND) is not evaluated by this loop
            same_framework = not model.kd_is_foreign(model.teacher)
            if cfg.DATASETS.TEST and node.VAL_IMAGES > 0 and same_framework:
                name = cfg.DATASETS.TEST[0]
                n_val = min(int(node.VAL_IMAGES), len(DatasetCatalog.get(name)))
                res = self.evaluate(cfg, model.teacher, [name], max_images=n_val)
                teacher_ap = float(res[name]["bbox"]["AP"]) if res.get(name) else None
            loader = iter(self.build_train_loader(records))
            batches = [next(loader) for _ in range(max(1, int(node.BATCHES)))]

        def forward(batch):
            images, targets = batch
            images = [im.to(self.device) for im in images]
            with torch.autocast(self.device.type, enabled=self.amp):
                return model(images, model_targets(targets, self.target_offset, self.device))

        run_preflight(
            model,
            batches,
            forward,
            output_dir=cfg.OUTPUT_DIR,
            teacher_ap=teacher_ap,
            val_images=n_val,
            min_teacher_ap=float(node.MIN_TEACHER_AP),
            input_checks=model.kd_input_checks(),
            start_iteration=self.start_iter,
            write=is_main_process(),
        )

    def run_step(self, images, targets) -> Dict[str, float]:
        model = unwrap(self.ddp_model)
        if self.prototype_refresher is not None:
            self.prototype_refresher.maybe_refresh(self.iter)
        if hasattr(model, "kd_before_step"):
            model.kd_before_step(self.iter)
        images = [im.to(self.device, non_blocking=True) for im in images]
        # KD.TEACHER.CACHE: each image's entry key goes with its targets
        keys = getattr(model, "kd_cache", None) is not None
        targets = model_targets(targets, self.target_offset, self.device, cache_keys=keys)
        with torch.autocast(self.device.type, enabled=self.amp):
            loss_dict = self.ddp_model(images, targets)
        total = sum(loss_dict.values())
        values = {k: float(v.detach()) for k, v in loss_dict.items()}
        total_value = float(total.detach())
        # the loss the optimizer receives: KD terms with their warm-up factor and KD.BALANCE
        # multiplier (calibrated on this batch at iteration 0 of a fresh run)
        stop = judge_step(self.divergence_guard, values, total_value, self.iter)
        if stop is not None:
            raise FloatingPointError(self._stop_message(stop))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        clip = self.cfg.SOLVER.CLIP_GRADIENTS
        if clip.ENABLED:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if clip.CLIP_TYPE == "norm":
                torch.nn.utils.clip_grad_norm_(params, clip.CLIP_VALUE, clip.NORM_TYPE)
            elif clip.CLIP_TYPE == "value":
                torch.nn.utils.clip_grad_value_(params, clip.CLIP_VALUE)
            else:
                raise ValueError(
                    f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be norm|value, got {clip.CLIP_TYPE!r}"
                )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        values["total_loss"] = total_value
        return values

    def _stop_message(self, stop: Stop) -> str:
        """:func:`kd2.engine.divergence.stop_message` for this run (shared with Detectron2's
        ``KDTrainer``)."""
        return stop_message(
            stop,
            self.model,
            output_dir=self.cfg.OUTPUT_DIR,
            base_lr=self.cfg.SOLVER.BASE_LR,
            teacher_weights=self.cfg.KD.TEACHER.WEIGHTS,
            kd_cfg=self.cfg.KD,
            lr_batch=lr_batch_mismatch(self.cfg),
        )

    def _log_progress(self, losses: Dict[str, float], done: int, started) -> None:
        """One log line (for runs without the progress bar: clusters, ``KD2_NO_PROGRESS``)."""
        if not is_main_process():
            return
        t0, first = started
        per_iter = (time.perf_counter() - t0) / max(1, done - first)
        eta = per_iter * (self.max_iter - done)
        terms = " ".join(
            f"{k}={v:.4g}" for k, v in losses.items() if k not in ("data_time", "time", "lr")
        )
        logger.info(
            "iter %d/%d %s lr=%.4g (%.2fs/it, ETA %s)",
            done,
            self.max_iter,
            terms,
            self.optimizer.param_groups[0]["lr"],
            per_iter,
            time.strftime("%H:%M:%S", time.gmtime(eta)),
        )

    def _evaluate_and_log(self, it: int, writer) -> None:
        self.last_results = self.evaluate(self.cfg, self.model, output_dir=self.cfg.OUTPUT_DIR)
        self.ddp_model.train()
        self._write_metrics({"eval": self.last_results}, it, writer)

    def _write_metrics(self, values: Dict, it: int, writer=None) -> None:
        if not is_main_process():
            return
        line = {"iteration": it, **values}
        with open(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"), "a") as f:
            f.write(json.dumps(line) + "\n")
        if writer is not None:
            for k, v in _flatten(values).items():
                writer.add_scalar(k, v, it)


def _read_record_image(record: Dict) -> torch.Tensor:
    return read_image(record["file_name"], json_file=record.get("json_file"))


def _flatten(d: Dict, prefix: str = "") -> Dict[str, float]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and math.isfinite(v):
            out[key] = v
    return out


def _tensorboard(output_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency; stay usable without it
        logger.warning("tensorboard is not installed; no TensorBoard events are written")
        return None
    return SummaryWriter(output_dir)
