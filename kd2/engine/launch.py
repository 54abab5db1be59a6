"""Multi-process training through PyTorch's own ``torch.distributed``.

``launch(main, num_gpus, ...)`` spawns one process per device with
``torch.multiprocessing.start_processes`` (Detectron2's ``launch`` pattern); under ``torchrun``
the processes already exist and ``launch`` only joins the process group from the environment.
Without CUDA the ``gloo`` backend runs the same code on CPU processes.

The worker processes die with their launcher (:func:`die_with_parent`): a ``kill -9`` of the
launcher never leaves orphaned training processes writing checkpoints.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
from datetime import timedelta
from typing import Callable, Iterator, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kd2.utils.errors import USER_ERROR_EXIT, KD2Error, debug_enabled, format_error

__all__ = [
    "launch",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "synchronize",
    "die_with_parent",
    "broadcast_buffers",
    "worker_user_errors",
    "call_reporting_user_errors",
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


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics, prototypes)."""
    if get_world_size() == 1:
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, 0)


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
    with worker_user_errors():
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


@contextlib.contextmanager
def worker_user_errors() -> Iterator[None]:
    """Around a launch of worker processes (kd2's or Detectron2's ``launch``): a user error in
    a worker (:func:`call_reporting_user_errors`) ends the launcher with its one message and
    exit 2, whichever rank stopped first, instead of the workers' tracebacks."""
    try:
        yield
    except mp.ProcessRaisedException as e:
        message = _user_error_of(str(e))
        if message is None:
            raise
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT) from None


def call_reporting_user_errors(main_func: Callable, *args) -> object:
    """``main_func(*args)`` in a worker process; a user error (``KD2Error``) is passed to the
    launcher as its message (torch sends a worker's exception to the launcher as the text of
    its traceback), unless ``KD2_DEBUG`` asks for the traceback."""
    try:
        return main_func(*args)
    except KD2Error as e:
        if debug_enabled([]) or multiprocessing.parent_process() is None:  # not a worker
            raise
        raise RuntimeError(f"{_USER_ERROR_MARK}{format_error(e)}{_USER_ERROR_MARK}") from None


#: brackets a worker's user-error message in the text its exception reaches the launcher as
_USER_ERROR_MARK = "\x1ekd2-user-error\x1e"


def _user_error_of(worker_traceback: str) -> str | None:
    """The ``kd2: error: ...`` message a worker stopped on, or ``None`` for any other failure."""
    parts = worker_traceback.split(_USER_ERROR_MARK)
    return parts[1] if len(parts) >= 3 else None


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
        call_reporting_user_errors(main_func, *args)
    finally:
        dist.destroy_process_group()
