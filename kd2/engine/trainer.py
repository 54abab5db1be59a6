"""The iteration-based trainer of teachers, students and distilled students.

Detectron2's ``DefaultTrainer`` shape on a plain PyTorch loop: build model / optimizer /
scheduler / loader from the config, ``resume_or_load``, ``train``, ``test``. What it guarantees:

* **exact resume** — a checkpoint holds the model, the KD adapters, the optimizer, the
  scheduler, the iteration and every RNG state; the data stream is a pure function of
  (seed, iteration), so resuming after a kill reproduces the uninterrupted run's weights on CPU;
* **atomic checkpoints** (:mod:`kd2.engine.checkpoint`);
* a non-finite loss stops training with a clear error, before the optimizer touches the
  weights and without writing a checkpoint, so the last good checkpoint stays intact;
* ``metrics.json`` lines and TensorBoard events in ``OUTPUT_DIR``, tqdm progress with ETA;
* optional AMP (KD losses are computed in fp32 by the methods) and gradient clipping;
* DDP through ``torch.distributed`` when launched on several processes.

Student checkpoints: ``checkpoint["model"]`` holds the student alone (it loads into a plain
torchvision model); the KD adapters are in ``checkpoint["kd"]``.
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

from kd2.data import DatasetCatalog, DetectionDataset, build_test_loader, build_train_loader
from kd2.data.loader import read_image
from kd2.evaluation import COCOEvaluator, inference_on_dataset
from kd2.modeling.prototypes import build_prototype_refresher
from kd2.tv.build import build_detector, label_offset, load_checkpoint_state

from .checkpoint import last_checkpoint, save_checkpoint
from .launch import get_rank, get_world_size, is_main_process

__all__ = ["Trainer", "build_lr_lambda", "ContiguousLabels", "evaluate", "unwrap"]

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


class ContiguousLabels(nn.Module):
    """Eval-mode wrapper: torchvision Faster R-CNN labels ``c + 1`` -> contiguous ``c``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.offset = label_offset(unwrap(model))

    def forward(self, images):
        outputs = self.model(images)
        if self.offset:
            outputs = [{**o, "labels": o["labels"] - self.offset} for o in outputs]
        return outputs


def _model_targets(targets: List[Dict], offset: int, device) -> List[Dict[str, torch.Tensor]]:
    return [
        {"boxes": t["boxes"].to(device), "labels": (t["labels"] + offset).to(device)}
        for t in targets
    ]


def evaluate(cfg, model: nn.Module, dataset_names=None, output_dir: str | None = None) -> Dict:
    """COCO-evaluate ``model`` on each of ``DATASETS.TEST`` (or ``dataset_names``)."""
    results = OrderedDict()
    rank, world = get_rank(), get_world_size()
    for name in dataset_names if dataset_names is not None else cfg.DATASETS.TEST:
        records = DatasetCatalog.get(name)[rank::world]
        loader = build_test_loader(
            DetectionDataset(records, train=False), num_workers=cfg.DATALOADER.NUM_WORKERS
        )
        evaluator = COCOEvaluator(name, output_dir=output_dir)
        res = inference_on_dataset(ContiguousLabels(model), _to_device(loader, cfg), evaluator)
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
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.rank, self.world_size = get_rank(), get_world_size()
        if cfg.SOLVER.IMS_PER_BATCH % self.world_size:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} is not divisible by the "
                f"number of processes ({self.world_size})"
            )
        logger.info("world size %d, rank %d, device %s", self.world_size, self.rank, self.device)
        torch.manual_seed(cfg.SEED)
        self.model = build_detector(cfg)
        self.label_offset = label_offset(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            params,
            lr=cfg.SOLVER.BASE_LR,
            momentum=cfg.SOLVER.MOMENTUM,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
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
        self._resume_rng: Dict | None = None  # RNG state of the checkpoint resumed from
        self.prototype_refresher = None  # set by train() when a method needs prototypes
        self.iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.after_step: List[Callable[[Trainer], None]] = []
        self.last_results: Dict = {}
        self.teacher_results: Dict = {}

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> Dict:
        model = self.model
        if hasattr(model, "student_state_dict"):
            model_state = model.student_state_dict()
            kd_state = model.kd_methods.state_dict()
        else:
            model_state, kd_state = model.state_dict(), {}
        return {
            "model": model_state,
            "kd": kd_state,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "iteration": self.iter,
            "rng": _rng_state(),
            "config": self.cfg.dump(),
        }

    def save(self, name: str) -> None:
        if is_main_process():
            path = save_checkpoint(self.cfg.OUTPUT_DIR, name, self.state_dict())
            logger.info("saved checkpoint %s", path)

    def resume_or_load(self, resume: bool = True) -> None:
        """With ``resume`` and a checkpoint in ``OUTPUT_DIR``, restore everything and continue
        from its iteration; otherwise load ``MODEL.WEIGHTS`` (model only) if given."""
        path = last_checkpoint(self.cfg.OUTPUT_DIR) if resume else None
        if path is None:
            if self.cfg.MODEL.WEIGHTS:
                state = load_checkpoint_state(self.cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")
                result = self.model.load_state_dict(state, strict=False)
                missing = [k for k in result.missing_keys if not k.startswith("kd_methods.")]
                if missing or result.unexpected_keys:
                    raise ValueError(
                        f"MODEL.WEIGHTS {self.cfg.MODEL.WEIGHTS!r} does not match the model: "
                        f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
                    )
            return
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(ckpt["model"], strict=not hasattr(self.model, "kd_methods"))
        if hasattr(self.model, "kd_methods"):
            self.model.kd_methods.load_state_dict(ckpt["kd"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["grad_scaler"])
        self._resume_rng = ckpt["rng"]  # restored in train(), once the data iterator exists
        self.start_iter = ckpt["iteration"]
        logger.info("resumed from %s at iteration %d", path, self.start_iter)

    # -- training -------------------------------------------------------------------------
    def train_records(self) -> List[Dict]:
        records = []
        for name in self.cfg.DATASETS.TRAIN:
            records.extend(DatasetCatalog.get(name))
        if not records:
            raise ValueError(f"DATASETS.TRAIN={self.cfg.DATASETS.TRAIN} contains no images")
        return records

    def build_train_loader(self, records: List[Dict] | None = None):
        cfg = self.cfg
        records = self.train_records() if records is None else records
        flip = 0.5 if cfg.INPUT.RANDOM_FLIP == "horizontal" else 0.0
        return build_train_loader(
            DetectionDataset(records, train=True, flip_prob=flip),
            batch_size_per_rank=cfg.SOLVER.IMS_PER_BATCH // self.world_size,
            seed=cfg.SEED,
            start_iter=self.start_iter,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    def train(self) -> Dict:
        cfg = self.cfg
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        teacher = getattr(self.model, "teacher", None)
        if teacher is not None and cfg.KD.EVAL_TEACHER and self.start_iter == 0:
            self.teacher_results = evaluate(cfg, teacher)
            self._write_metrics({"teacher_eval": self.teacher_results}, self.start_iter)
        records = self.train_records()
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
        writer = _tensorboard(cfg.OUTPUT_DIR) if is_main_process() else None
        from tqdm import tqdm

        bar = tqdm(
            total=self.max_iter,
            initial=self.start_iter,
            desc=os.path.basename(os.path.normpath(cfg.OUTPUT_DIR)) or "train",
            disable=not is_main_process() or os.environ.get("KD2_NO_PROGRESS") == "1",
            dynamic_ncols=True,
        )
        self.ddp_model.train()
        try:
            for it in range(self.start_iter, self.max_iter):
                self.iter = it
                t0 = time.perf_counter()
                images, targets = next(loader)
                data_time = time.perf_counter() - t0
                losses = self.run_step(images, targets)
                done = self.iter + 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses['total_loss']:.3f}", refresh=False)
                if done % 20 == 0 or done == self.max_iter:
                    losses.update(
                        lr=self.optimizer.param_groups[0]["lr"],
                        data_time=data_time,
                        time=time.perf_counter() - t0,
                    )
                    self._write_metrics(losses, done, writer)
                self.iter = done
                # Evaluate before saving: the evaluation's data loader draws from the global
                # RNG, and the checkpoint must hold the state the next step starts from.
                if (
                    cfg.TEST.EVAL_PERIOD
                    and done % cfg.TEST.EVAL_PERIOD == 0
                    and done < self.max_iter
                ):
                    self._evaluate_and_log(done, writer)
                if cfg.SOLVER.CHECKPOINT_PERIOD and done % cfg.SOLVER.CHECKPOINT_PERIOD == 0:
                    self.save(f"model_{done:07d}.pth")
                for fn in self.after_step:
                    fn(self)
        finally:
            bar.close()
        self.save("model_final.pth")
        # Parameters only: BatchNorm running statistics stay per-rank (broadcast_buffers=False,
        # as in Detectron2), so only the parameters are guaranteed identical across replicas.
        checksum = sum(float(p.detach().double().sum()) for p in self.model.parameters())
        logger.info("rank %d final parameter checksum %.10e", self.rank, checksum)
        if cfg.DATASETS.TEST:
            self._evaluate_and_log(self.max_iter, writer)
        if writer is not None:
            writer.close()
        return self.last_results

    def run_step(self, images, targets) -> Dict[str, float]:
        model = unwrap(self.ddp_model)
        if self.prototype_refresher is not None:
            self.prototype_refresher.maybe_refresh(self.iter)
        if hasattr(model, "kd_before_step"):
            model.kd_before_step(self.iter)
        images = [im.to(self.device, non_blocking=True) for im in images]
        targets = _model_targets(targets, self.label_offset, self.device)
        with torch.autocast(self.device.type, enabled=self.amp):
            loss_dict = self.ddp_model(images, targets)
        total = sum(loss_dict.values())
        values = {k: float(v.detach()) for k, v in loss_dict.items()}
        if not math.isfinite(float(total.detach())):
            last = last_checkpoint(self.cfg.OUTPUT_DIR)
            raise FloatingPointError(
                f"loss became non-finite at iteration {self.iter}: {values}. Training stopped "
                f"before updating the weights; the last good checkpoint is "
                f"{last or '(none written yet)'}. Try a lower SOLVER.BASE_LR, a longer "
                "SOLVER.WARMUP_ITERS, SOLVER.CLIP_GRADIENTS.ENABLED True, or smaller KD weights."
            )
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
        values["total_loss"] = float(total.detach())
        return values

    def _evaluate_and_log(self, it: int, writer) -> None:
        self.last_results = evaluate(self.cfg, self.model, output_dir=self.cfg.OUTPUT_DIR)
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
