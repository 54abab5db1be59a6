"""Training, evaluation and launching."""

from .defaults import default_argument_parser, default_setup, setup_cfg, setup_logger
from .launch import get_rank, get_world_size, is_main_process, launch
from .trainer import Trainer, evaluate

__all__ = [
    "Trainer",
    "evaluate",
    "default_argument_parser",
    "default_setup",
    "setup_cfg",
    "setup_logger",
    "launch",
    "get_rank",
    "get_world_size",
    "is_main_process",
]
