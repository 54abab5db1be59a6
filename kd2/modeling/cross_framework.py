"""A teacher from the other framework: its input convention and its construction.

A detector's input is ``x = (raw · scale − mean) / std`` per channel, in its channel order, with
``raw`` the RGB image in ``[0, 1]`` — torchvision: ``scale`` 1, RGB, its transform's
``image_mean``/``image_std``; Detectron2: ``scale`` 255, ``INPUT.FORMAT`` (BGR by default),
``MODEL.PIXEL_MEAN``/``PIXEL_STD``. Converting the student's normalised, padded batch into the
teacher's is one fixed per-channel affine map after a channel permutation
(:func:`normalization_map`), so the teacher sees exactly the student's image and geometry: its
record is in the student's coordinates. The batch padding is extended to the teacher's size
divisibility when it needs more (:func:`to_teacher_input`).

``KD.TEACHER.BACKEND`` (or ``KD.TEACHERS.<NAME>.BACKEND``) picks the teacher's framework; its
backend (:mod:`kd2.modeling.backends`) builds it. A teacher of the
other framework fills ``features`` (and, for a two-stage teacher, ``roi`` on the student's
proposals); per-anchor parts (``dense``, ``rpn``) are not offered across frameworks — the two
frameworks lay their anchors out differently.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd2.config import get_cfg
from kd2.utils.checkpoint import load_weights_strict
from kd2.utils.errors import ConfigError, MissingFileError

from .backends import InputConvention, get_backend
from .teacher_runtime import configure_teacher
from .weights_check import check_teacher_weights

__all__ = [
    "InputConvention",
    "build_teacher_of_config",
    "teacher_config_node",
    "normalization_map",
    "to_teacher_input",
]


def _rgb(conv: InputConvention) -> Tuple[List[int], Tensor, Tensor]:
    """Channel permutation to RGB, and mean/std in RGB order divided by the scale."""
    mean, std, channels, scale = conv
    if channels not in ("RGB", "BGR"):
        raise ValueError(f"channels must be 'RGB' or 'BGR', got {channels!r}")
    perm = [0, 1, 2] if channels == "RGB" else [2, 1, 0]
    m = torch.tensor([float(mean[i]) for i in perm]) / float(scale)
    s = torch.tensor([float(std[i]) for i in perm]) / float(scale)
    return perm, m, s


def normalization_map(
    src: InputConvention, dst: InputConvention
) -> Tuple[List[int], Tensor, Tensor]:
    """``(perm, a, b)`` with ``y = x[:, perm] · a + b`` mapping a ``src``-normalised batch to the
    ``dst`` normalisation of the same image (``a``, ``b``: ``(1, 3, 1, 1)``)."""
    s_perm, s_mean, s_std = _rgb(src)
    d_perm, d_mean, d_std = _rgb(dst)
    # raw_rgb = x_src[s_perm] · s_std + s_mean ;  y_rgb = (raw_rgb − d_mean) / d_std
    a_rgb, b_rgb = s_std / d_std, (s_mean - d_mean) / d_std
    # back to the destination's order: y[d_perm[c]] = y_rgb[c]  (perm is its own inverse)
    perm = [s_perm[d_perm[c]] for c in range(3)]
    a = torch.stack([a_rgb[d_perm[c]] for c in range(3)]).view(1, 3, 1, 1)
    b = torch.stack([b_rgb[d_perm[c]] for c in range(3)]).view(1, 3, 1, 1)
    return perm, a, b


def to_teacher_input(
    images: Tensor, src: InputConvention, dst: InputConvention, size_divisibility: int = 0
) -> Tensor:
    """The student's ``(N, 3, H, W)`` batch in the teacher's normalisation (the same tensor when
    the conventions agree), zero-padded at the bottom/right to a multiple of
    ``size_divisibility`` (the boxes keep their coordinates)."""
    perm, a, b = normalization_map(src, dst)
    if perm != [0, 1, 2] or not (torch.all(a == 1) and torch.all(b == 0)):
        images = images[:, perm] * a.to(images) + b.to(images)
    if size_divisibility > 1:
        h, w = images.shape[-2:]
        ph = (size_divisibility - h % size_divisibility) % size_divisibility
        pw = (size_divisibility - w % size_divisibility) % size_divisibility
        if ph or pw:
            images = F.pad(images, (0, pw, 0, ph))
    return images


def teacher_config_node(cfg, name: str = ""):
    """``(node, "KD.TEACHER" / "KD.TEACHERS.<name>")`` of a teacher; an unknown name lists the
    defined ones, an entry without ``CONFIG`` / ``WEIGHTS`` says which key is missing."""
    if not name:
        return cfg.KD.TEACHER, "KD.TEACHER"
    if name not in cfg.KD.TEACHERS:
        raise ConfigError(
            f"a method names teacher {name!r}, but KD.TEACHERS defines {sorted(cfg.KD.TEACHERS)}"
        )
    node = cfg.KD.TEACHERS[name]
    for key in ("CONFIG", "WEIGHTS"):
        if key not in node:
            raise ConfigError(f"KD.TEACHERS.{name} needs {key} (and optionally BACKEND)")
    return node, f"KD.TEACHERS.{name}"


def build_teacher_of_config(cfg, name: str, own_backend: str) -> nn.Module:
    """The frozen teacher ``name`` (``""`` = ``KD.TEACHER``) of a student of ``own_backend``
    (``"torchvision"`` or ``"detectron2"``), built by the backend its ``BACKEND`` names."""
    node, key = teacher_config_node(cfg, name)
    backend = str(node.get("BACKEND", "") or own_backend).lower()
    build = get_backend(backend, f"{key}.BACKEND").build_teacher
    return configure_teacher(build(node, key, cfg.MODEL.DEVICE), node, key, cfg.MODEL.DEVICE)


def build_teacher_of_node(
    node, key: str, device: str, build_plain: Callable[[Any], nn.Module]
) -> nn.Module:
    """A frozen teacher of a backend that trains on kd2's own loop (torchvision, transformers):
    ``node.CONFIG`` is the kd2 yaml it was trained with (no ``KD.METHODS``), ``build_plain`` its
    backend's plain-detector builder, ``node.WEIGHTS`` the local checkpoint, loaded strictly and
    checked for absurd values; ``key`` names the config node in messages."""
    tpath = node.CONFIG
    if not tpath:
        raise ConfigError(
            f"KD.METHODS is set but {key}.CONFIG is empty", "give the teacher's own config file"
        )
    if not os.path.isfile(tpath):
        raise MissingFileError(
            f"{key}.CONFIG: teacher config {tpath!r} does not exist",
            "give the config file the teacher was trained with",
        )
    tcfg = get_cfg()
    tcfg.merge_from_file(tpath)
    if tcfg.KD.METHODS:
        raise ConfigError(
            f"the teacher config {tpath!r} has KD.METHODS set",
            "a teacher has no KD: give the config the teacher was trained with",
        )
    tcfg.MODEL.DEVICE = device
    teacher = build_plain(tcfg)
    load_weights_strict(teacher, node.WEIGHTS, f"{key}.WEIGHTS", tpath)
    check_teacher_weights(teacher, node.WEIGHTS)
    teacher.eval().requires_grad_(False)
    teacher.kd2_cfg = tcfg
    return teacher
