"""Atomic checkpoint files.

A checkpoint is written to a temporary file in the same directory, flushed to disk, and then
renamed over its final name (``os.replace`` is atomic on POSIX), and only then is the
``last_checkpoint`` pointer updated the same way. A kill at any moment therefore leaves the
previous good checkpoint and pointer intact.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Dict

import torch

__all__ = ["atomic_save", "write_text_atomic", "last_checkpoint", "save_checkpoint"]

LAST_CHECKPOINT = "last_checkpoint"


def write_text_atomic(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` that never leaves a truncated file at ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=os.path.basename(path))
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(output_dir: str, name: str, state: Dict[str, Any]) -> str:
    """Write ``output_dir/name`` atomically, then point ``last_checkpoint`` at it."""
    path = os.path.join(output_dir, name)
    atomic_save(state, path)
    write_text_atomic(os.path.join(output_dir, LAST_CHECKPOINT), name)
    return path


def last_checkpoint(output_dir: str) -> str | None:
    """Path of the checkpoint ``last_checkpoint`` points to, or ``None``."""
    pointer = os.path.join(output_dir, LAST_CHECKPOINT)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(output_dir, name)
    return path if os.path.isfile(path) else None
