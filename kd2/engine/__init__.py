"""The training engine both backends share: config setup and launching, the divergence guard,
the pre-flight check, batch scaling, output directories, the predictor. Each backend's trainer
lives in its package (:class:`kd2.tv.Trainer`, :class:`kd2.d2.KDTrainer`)."""

from .defaults import default_argument_parser, default_setup, setup_cfg, setup_logger
from .launch import get_rank, get_world_size, is_main_process, launch

__all__ = [
    "default_argument_parser",
    "default_setup",
    "setup_cfg",
    "setup_logger",
    "launch",
    "get_rank",
    "get_world_size",
    "is_main_process",
]
