"""Atomic checkpoint files, and finding the checkpoint to resume from.

A checkpoint is written to a temporary file in the same directory, flushed to disk, and then
renamed over its final name (``os.replace`` is atomic on POSIX), and only then is the
``last_checkpoint`` pointer updated the same way. A kill at any moment therefore leaves the
previous good checkpoint and pointer intact; a full disk does too, and says so. Files get the
user's umask (``mkstemp`` alone would make them 0600).

:func:`find_resume_checkpoint` reads the checkpoint ``last_checkpoint`` names and, when that file
is missing or unreadable, falls back to the newest readable ``model_*.pth`` with a warning that
names both: ``--resume`` never trains from scratch while a checkpoint exists.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import tempfile
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from .errors import MissingFileError, WeightsError

__all__ = [
    "file_sha256",
    "atomic_save",
    "write_text_atomic",
    "last_checkpoint",
    "save_checkpoint",
    "find_resume_checkpoint",
    "CheckpointWriteError",
    "load_checkpoint_state",
    "load_weights_strict",
]


def file_sha256(path: str) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"
_CHECKPOINT_NAME = re.compile(r"^model_(\d+|final)\.pth$")


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (the disk is full, typically); earlier files are intact."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch's C++ writer: "[enforce fail at inline_container.cc:...] ... file write failed"
    return isinstance(err, RuntimeError) and "file write failed" in str(err)


def _atomic_write(path: str, write: Callable[[Any], None], mode: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=os.path.basename(path))
    os.close(fd)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if _is_disk_full(e):
            raise CheckpointWriteError(
                errno.ENOSPC,
                f"no space left on device while writing {path}; earlier checkpoints are intact "
                f"(last: {last_checkpoint(d) or 'none'}). Free space, then resume with --resume",
            ) from e
        raise


def write_text_atomic(path: str, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text), "w")


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` that never leaves a truncated file at ``path``."""
    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def save_checkpoint(output_dir: str, name: str, state: Dict[str, Any]) -> str:
    """Write ``output_dir/name`` atomically, then point ``last_checkpoint`` at it."""
    path = os.path.join(output_dir, name)
    atomic_save(state, path)
    write_text_atomic(os.path.join(output_dir, LAST_CHECKPOINT), name)
    return path


def _pointer_target(output_dir: str) -> str | None:
    pointer = os.path.join(output_dir, LAST_CHECKPOINT)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(output_dir, f.read().strip())


def last_checkpoint(output_dir: str) -> str | None:
    """Path of the checkpoint ``last_checkpoint`` points to, or ``None``."""
    path = _pointer_target(output_dir)
    return path if path and os.path.isfile(path) else None


def _checkpoints_newest_first(output_dir: str) -> List[str]:
    """``model_*.pth`` files, ``model_final`` first, then by iteration (then mtime) descending."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        m = _CHECKPOINT_NAME.match(name)
        if m:
            path = os.path.join(output_dir, name)
            it = float("inf") if m.group(1) == "final" else int(m.group(1))
            found.append((it, os.path.getmtime(path), path))
    return [p for _, _, p in sorted(found, reverse=True)]


def _load(path: str) -> Dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "iteration" not in ckpt or "model" not in ckpt:
        raise ValueError("not a kd2 training checkpoint (no 'model' / 'iteration')")
    return ckpt


def find_resume_checkpoint(output_dir: str) -> Tuple[str, Dict[str, Any]] | None:
    """The checkpoint to resume from and its contents, or ``None`` when there is none.

    ``last_checkpoint``'s file first; if it is missing or unreadable (truncated, not a
    checkpoint), the newest readable ``model_*.pth`` with a warning naming both files. Raises
    ``RuntimeError`` when checkpoints exist but none can be read (rather than train from
    scratch over them).
    """
    named = _pointer_target(output_dir)
    candidates = _checkpoints_newest_first(output_dir)
    if named is not None:
        candidates = [named] + [c for c in candidates if c != named]
    failures = []
    for path in candidates:
        if not os.path.isfile(path):
            failures.append((path, "missing"))
            continue
        try:
            ckpt = _load(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped with its reason
            failures.append((path, f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        if failures:
            logger.warning(
                "cannot resume from %s; resuming from the newest readable checkpoint %s "
                "(iteration %d) instead. Skipped: %s",
                failures[0][0],
                path,
                ckpt["iteration"],
                "; ".join(f"{p} ({why})" for p, why in failures),
            )
        return path, ckpt
    if failures:
        skipped = "; ".join(f"{p} ({why})" for p, why in failures)
        raise RuntimeError(
            f"--resume: no checkpoint in {output_dir} can be read, so nothing was trained or "
            f"overwritten: {skipped}. Remove the broken files to start from scratch, or restore "
            "a checkpoint"
        )
    return None


def load_checkpoint_state(path: str, what: str) -> Dict[str, torch.Tensor]:
    """Read a model state dict from a kd2 checkpoint (``{"model": ...}``) or a bare state dict."""
    if not path:
        raise MissingFileError(f"{what}: no weights file given", f"set {what} to a checkpoint")
    if not os.path.isfile(path):
        raise MissingFileError(
            f"{what}: weights file {path!r} does not exist",
            "kd2 never downloads weights; pass the path of a local checkpoint (e.g. "
            "OUTPUT_DIR/model_final.pth of the run that trained it)",
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"{what}: cannot read weights file {path!r} ({type(e).__name__}: {e})",
            "give a checkpoint written by torch.save (kd2's model_final.pth, or a state dict)",
        ) from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(
            f"{what}: {path!r} is not a model checkpoint (no tensor state dict)",
            "give a file holding {'model': state_dict} or a state dict",
        )
    return state


def load_weights_strict(model: nn.Module, path: str, what: str, config_file: str = "") -> None:
    """Load ``path`` into ``model``; any missing/unexpected/mis-shaped key is a clear error."""
    state = load_checkpoint_state(path, what)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches, e.g. {mismatched[:3]}")
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
        src = f" built from {config_file!r}" if config_file else ""
        raise WeightsError(
            f"{what}: checkpoint {path!r} does not match the model{src}: " + "; ".join(parts),
            "check that the config describes the network the checkpoint was trained with "
            "(backbone, FPN channels, number of classes, anchors)",
        )
    model.load_state_dict(state)
