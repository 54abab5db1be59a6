"""Detectron2-style command-line entry points: argument parser, config setup, logging."""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys

import numpy as np
import torch

from kd2.config import get_cfg, validate_values
from kd2.data.catalog import register_config_datasets
from kd2.utils.checkpoint import write_text_atomic
from kd2.utils.env import check_device

from .batch_scaling import auto_scale_workers, fit_lr_to_batch
from .launch import get_rank, get_world_size
from .run_dir import lock_output_dir

__all__ = ["default_argument_parser", "setup_cfg", "default_setup", "setup_logger"]


def default_argument_parser(description: str = "kd2 training") -> argparse.ArgumentParser:
    """Detectron2's flags: ``--config-file --resume --eval-only --num-gpus --num-machines
    --machine-rank --dist-url`` and trailing ``KEY VALUE`` overrides."""
    p = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:\n  python tools/train_net.py --config-file configs/synthetic/"
        "faster_rcnn_MNv3_student.yaml SOLVER.MAX_ITER 100 OUTPUT_DIR output/run",
    )
    p.add_argument("--config-file", default="", metavar="FILE", help="path to a config file")
    p.add_argument("--resume", action="store_true", help="resume from OUTPUT_DIR/last_checkpoint")
    p.add_argument("--eval-only", action="store_true", help="only evaluate MODEL.WEIGHTS")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per machine")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT of the rank-0 machine")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides")
    return p


def setup_cfg(config_file: str, opts=()):
    cfg = get_cfg()
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    validate_values(cfg)
    check_device(cfg.MODEL.DEVICE)
    # applied here so that config.yaml records what the run uses; the Trainer warns
    cfg = fit_lr_to_batch(auto_scale_workers(cfg, get_world_size()), warn=False)
    cfg.freeze()
    register_config_datasets(cfg)
    return cfg


def setup_logger(output_dir: str | None = None, rank: int = 0) -> logging.Logger:
    logger = logging.getLogger("kd2")
    if getattr(logger, "_kd2_configured", False):
        return logger
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%m/%d %H:%M:%S")
    if rank == 0:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(fmt)
        logger.addHandler(h)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        name = "log.txt" if rank == 0 else f"log.txt.rank{rank}"
        fh = logging.FileHandler(os.path.join(output_dir, name))
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    logger._kd2_configured = True
    return logger


def default_setup(cfg, args=None) -> None:
    """Lock and create ``OUTPUT_DIR`` (rank 0), set up logging, save the full config and seed
    every RNG. A directory in use by another run stops here, before anything is written."""
    rank = get_rank()
    if rank == 0:
        lock_output_dir(cfg.OUTPUT_DIR)  # held for the life of the process
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    logger = setup_logger(cfg.OUTPUT_DIR, rank)
    logger.info("command line: %s", " ".join(sys.argv))
    if rank == 0:
        path, text = os.path.join(cfg.OUTPUT_DIR, "config.yaml"), cfg.dump()
        if not os.path.isfile(path) or open(path).read() != text:  # resumes keep it untouched
            write_text_atomic(path, text)
    seed = cfg.SEED + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
