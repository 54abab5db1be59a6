"""One run per output directory.

:func:`lock_output_dir` takes an exclusive ``fcntl`` lock on ``OUTPUT_DIR/.kd2.lock`` for the
life of the process (or until :func:`release_output_dir`). The operating system releases it
when the process exits for any reason, ``kill -9`` included, so a lock never outlives its run,
and a run that is still alive — an orphaned training process too — keeps every other run out.
A second run on a busy directory stops at once with the other process's pid, host, start time
and command, before it writes anything there.

Once the lock is held no other kd2 process can be writing in the directory, so the ``.tmp_*``
files that interrupted atomic writes left behind are stale and are removed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from typing import Dict, Tuple

from kd2.utils.errors import DeviceError, KD2Error

__all__ = [
    "LOCK_FILE",
    "OutputDirBusyError",
    "lock_output_dir",
    "make_writable_dir",
    "release_output_dir",
]

logger = logging.getLogger(__name__)

LOCK_FILE = ".kd2.lock"

# realpath -> (fd, reentrancy count): the CLI locks in default_setup and Trainer.train locks
# again in the same process.
_HELD: Dict[str, Tuple[int, int]] = {}


class OutputDirBusyError(KD2Error, RuntimeError):
    """Another live process holds the output directory's lock."""


def make_writable_dir(path: str, key: str = "OUTPUT_DIR") -> None:
    """Create the directory ``path`` (named ``key`` in messages); one that cannot be created or
    written is a :class:`~kd2.utils.errors.DeviceError`."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise DeviceError(
            f"{key} {path!r} cannot be created ({e.strerror or e})",
            f"set {key} to a directory you can write, e.g. output/my_run",
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DeviceError(
            f"{key} {path!r} is not writable",
            f"set {key} to a directory you can write, or fix its permissions",
        )


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 65536).decode() or "{}")
    except (OSError, ValueError):
        return "another process (its details are unreadable)"
    return (
        f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started "
        f"{info.get('started', '?')}: {info.get('command', '?')}"
    )


def lock_output_dir(output_dir: str) -> str:
    """Lock ``output_dir`` (created if needed) for this process; returns the lock file's path.

    Re-entrant within one process. Raises :class:`OutputDirBusyError` naming the directory and
    the process that holds it.
    """
    make_writable_dir(output_dir)
    key = os.path.realpath(output_dir)
    path = os.path.join(key, LOCK_FILE)
    if key in _HELD:
        fd, count = _HELD[key]
        _HELD[key] = (fd, count + 1)
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise OutputDirBusyError(
            f"OUTPUT_DIR {output_dir!r} is in use by another run ({holder}). Two runs in one "
            "directory would mix their checkpoints and logs",
            "wait for it to finish, stop it, or set another OUTPUT_DIR",
        ) from None
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _HELD[key] = (fd, 1)
    _remove_stale_temp_files(key)
    return path


def release_output_dir(output_dir: str) -> None:
    """Undo one :func:`lock_output_dir` of this process (the last one unlocks)."""
    key = os.path.realpath(output_dir)
    if key not in _HELD:
        return
    fd, count = _HELD[key]
    if count > 1:
        _HELD[key] = (fd, count - 1)
        return
    del _HELD[key]
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _remove_stale_temp_files(directory: str) -> None:
    removed, size = 0, 0
    for sub in ("", "pgm"):
        d = os.path.join(directory, sub)
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if name.startswith(".tmp_"):
                p = os.path.join(d, name)
                try:
                    size += os.path.getsize(p)
                    os.unlink(p)
                    removed += 1
                except OSError:
                    pass
    if removed:
        logger.info(
            "removed %d unfinished temporary file(s) (%.1f MB) left in %s by an interrupted write",
            removed,
            size / 2**20,
            directory,
        )
