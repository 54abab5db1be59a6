"""A learning rate that fits the batch.

* :func:`auto_scale_workers` — Detectron2's ``DefaultTrainer.auto_scale_workers``: with
  ``SOLVER.REFERENCE_WORLD_SIZE`` set, the total batch and the learning rate follow the number of
  processes, and the schedule's iteration counts follow them inversely.
* :func:`fit_lr_to_batch` — the linear scaling rule: ``SOLVER.BASE_LR`` was set for
  ``SOLVER.BASE_LR_BATCH_SIZE`` images per batch (kd2's config loader tracks where it was set);
  a run whose learning rate per image is more than 2x off gets a warning with the scaled value,
  or the scaled value itself with ``SOLVER.SCALE_LR_WITH_BATCH``. A 2-image batch at the demo's
  8-image rate diverged to a loss of 1e23 on a user's dataset; at the scaled rate it trained.

Both return a config (a modified clone when something changes) so that ``config.yaml`` records
the values the run uses.
"""

from __future__ import annotations

import logging

__all__ = ["auto_scale_workers", "fit_lr_to_batch", "lr_batch_mismatch"]

logger = logging.getLogger(__name__)

_TOLERANCE = 2.0  # a per-image learning rate within 2x of the config's is left alone


def _editable(cfg):
    cfg = cfg.clone()
    frozen = cfg.is_frozen()
    cfg.defrost()
    return cfg, frozen


def auto_scale_workers(cfg, num_workers: int):
    """Detectron2's rule for ``SOLVER.REFERENCE_WORLD_SIZE`` (0 = off) on ``num_workers``."""
    s = cfg.SOLVER
    ref = s.REFERENCE_WORLD_SIZE
    if ref == 0 or ref == num_workers:
        return cfg
    if s.IMS_PER_BATCH % ref:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH {s.IMS_PER_BATCH} is not divisible by "
            f"SOLVER.REFERENCE_WORLD_SIZE {ref}"
        )
    cfg, frozen = _editable(cfg)
    s, scale = cfg.SOLVER, num_workers / ref
    s.IMS_PER_BATCH = int(round(s.IMS_PER_BATCH * scale))
    s.BASE_LR = s.BASE_LR * scale
    s.BASE_LR_BATCH_SIZE = int(round(s.BASE_LR_BATCH_SIZE * scale))
    s.MAX_ITER = int(round(s.MAX_ITER / scale))
    s.WARMUP_ITERS = int(round(s.WARMUP_ITERS / scale))
    s.STEPS = tuple(int(round(x / scale)) for x in s.STEPS)
    s.CHECKPOINT_PERIOD = int(round(s.CHECKPOINT_PERIOD / scale))
    cfg.TEST.EVAL_PERIOD = int(round(cfg.TEST.EVAL_PERIOD / scale))
    s.REFERENCE_WORLD_SIZE = num_workers
    logger.info(
        "auto-scaling the config to %d processes (SOLVER.REFERENCE_WORLD_SIZE %d): "
        "IMS_PER_BATCH %d, BASE_LR %g, MAX_ITER %d, WARMUP_ITERS %d, STEPS %s",
        num_workers,
        ref,
        s.IMS_PER_BATCH,
        s.BASE_LR,
        s.MAX_ITER,
        s.WARMUP_ITERS,
        s.STEPS,
    )
    if frozen:
        cfg.freeze()
    return cfg


def lr_batch_mismatch(cfg) -> str | None:
    """The warning for a learning rate per image more than 2x off the config's, else ``None``."""
    s = cfg.SOLVER
    ref, batch = s.BASE_LR_BATCH_SIZE, s.IMS_PER_BATCH
    if ref <= 0 or batch <= 0 or max(ref / batch, batch / ref) <= _TOLERANCE:
        return None
    scaled = s.BASE_LR * batch / ref
    risk = (
        "a per-image learning rate this much higher than the config's often diverges"
        if batch < ref
        else "a lower per-image learning rate trains slower than the config intends"
    )
    return (
        f"SOLVER.BASE_LR {s.BASE_LR:g} was set for {ref} images per batch "
        f"(SOLVER.BASE_LR_BATCH_SIZE), but SOLVER.IMS_PER_BATCH is {batch}: {risk}. The linear "
        f"scaling rule gives SOLVER.BASE_LR {scaled:g}: set it, or SOLVER.SCALE_LR_WITH_BATCH "
        "True to apply it (SOLVER.CLIP_GRADIENTS.ENABLED True also guards against divergence)"
    )


def fit_lr_to_batch(cfg, warn: bool = True):
    """Warn about (``warn``) or, with ``SOLVER.SCALE_LR_WITH_BATCH``, apply the linearly
    scaled rate."""
    warning = lr_batch_mismatch(cfg)
    if warning is None:
        return cfg
    if not cfg.SOLVER.SCALE_LR_WITH_BATCH:
        if warn:
            logger.warning(warning)
        return cfg
    cfg, frozen = _editable(cfg)
    s = cfg.SOLVER
    old = s.BASE_LR
    s.BASE_LR = old * s.IMS_PER_BATCH / s.BASE_LR_BATCH_SIZE
    logger.warning(
        "SOLVER.SCALE_LR_WITH_BATCH: SOLVER.BASE_LR %g (set for %d images per batch) becomes %g "
        "for IMS_PER_BATCH %d",
        old,
        s.BASE_LR_BATCH_SIZE,
        s.BASE_LR,
        s.IMS_PER_BATCH,
    )
    s.BASE_LR_BATCH_SIZE = s.IMS_PER_BATCH
    if frozen:
        cfg.freeze()
    return cfg
