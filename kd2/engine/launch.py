"""Multi-process training through PyTorch's own ``torch.distributed``.

``launch(main, num_gpus, ...)`` spawns one process per device with
``torch.multiprocessing.start_processes`` (Detectron2's ``launch`` pattern); under ``torchrun``
the processes already exist and ``launch`` only joins the process group from the environment.
Without CUDA the ``gloo`` backend runs the same code on CPU processes.

The worker processes die with their launcher (:func:`die_with_parent`): a ``kill -9`` of the
launcher never leaves orphaned training processes writing checkpoints.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
from datetime import timedelta
from typing import Callable, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = [
    "launch",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "synchronize",
    "die_with_parent",
]

logger = logging.getLogger(__name__)


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize() -> None:
    if get_world_size() > 1:
        dist.barrier()


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> None:
    """Make the kernel send SIGKILL to this process when its parent dies (Linux).

    ``parent_pid``: the launcher's pid as the launcher saw it; if the parent is already gone
    (it died before this call), exit at once.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: no orphan protection beyond the dir lock
        logger.warning("cannot tie worker processes to their launcher on this platform")
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = "auto",
    args: Tuple = (),
    timeout: timedelta = timedelta(minutes=30),
) -> None:
    """Run ``main_func(*args)`` on ``num_machines * num_gpus_per_machine`` processes.

    ``num_gpus_per_machine`` counts processes: on a CPU-only machine each one trains on CPU
    with the gloo backend.
    """
    if "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:  # started by torchrun
        if int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
            dist.init_process_group(_backend(), init_method="env://", timeout=timeout)
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        main_func(*args)
        return
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        main_func(*args)
        return
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' only works on one machine; give tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    mp.start_processes(
        _worker,
        nprocs=num_gpus_per_machine,
        args=(
            main_func,
            world_size,
            num_gpus_per_machine,
            machine_rank,
            dist_url,
            args,
            timeout,
            os.getpid(),
        ),
        daemon=False,
        start_method="spawn",
    )


def _worker(
    local_rank, main_func, world_size, gpus, machine_rank, dist_url, args, timeout, parent_pid
):
    die_with_parent(parent_pid)
    rank = machine_rank * gpus + local_rank
    dist.init_process_group(
        _backend(), init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    try:
        synchronize()
        main_func(*args)
    finally:
        dist.destroy_process_group()
