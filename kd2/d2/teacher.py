"""Build a frozen Detectron2 teacher from its own config (a file or a model-zoo name) and
weights (a path or a ``detectron2://`` URL)."""

from __future__ import annotations

import difflib
import os

from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from torch import nn

from .config import add_kd_config

__all__ = ["build_teacher", "resolve_config_file"]


def _zoo_names() -> list:
    root = os.path.dirname(model_zoo.get_config_file("Base-RCNN-FPN.yaml"))
    return sorted(
        os.path.relpath(os.path.join(d, f), root)
        for d, _, files in os.walk(root)
        for f in files
        if f.endswith((".yaml", ".py"))
    )


def resolve_config_file(name: str) -> str:
    """A path that exists, or a model-zoo name (``COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml``).

    A name that is neither raises ``FileNotFoundError`` listing the closest zoo names.
    """
    if os.path.isfile(name):
        return name
    try:
        return model_zoo.get_config_file(name)
    except RuntimeError:
        close = difflib.get_close_matches(name, _zoo_names(), n=5, cutoff=0.4)
        raise FileNotFoundError(
            f"KD.TEACHER.CONFIG {name!r} is neither a file nor a Detectron2 model-zoo config. "
            f"Closest model-zoo names: {close}"
        ) from None


class _RecordingCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that keeps the incompatible keys instead of only logging them."""

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def build_teacher(cfg) -> nn.Module:
    """The teacher described by ``cfg.KD.TEACHER``, loaded, in eval mode, without gradients.

    Weights: ``KD.TEACHER.WEIGHTS``, else the teacher config's own ``MODEL.WEIGHTS``. A
    checkpoint that leaves any teacher parameter missing is an error (never a silently random
    teacher).
    """
    if not cfg.KD.TEACHER.CONFIG:
        raise ValueError("KD.METHODS is set but KD.TEACHER.CONFIG is empty")
    tcfg = get_cfg()
    add_kd_config(tcfg)
    tcfg.merge_from_file(resolve_config_file(cfg.KD.TEACHER.CONFIG))
    if tcfg.KD.METHODS:
        raise ValueError(f"the teacher config {cfg.KD.TEACHER.CONFIG!r} has KD.METHODS set")
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    teacher = build_model(tcfg)
    weights = cfg.KD.TEACHER.WEIGHTS or tcfg.MODEL.WEIGHTS
    if not weights:
        raise FileNotFoundError("no teacher weights: set KD.TEACHER.WEIGHTS")
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"KD.TEACHER.WEIGHTS {weights!r} does not exist")
    checkpointer = _RecordingCheckpointer(teacher)
    checkpointer.load(weights)
    incompatible = checkpointer.incompatible
    missing = [k for k in incompatible.missing_keys if "num_batches_tracked" not in k]
    shapes = incompatible.incorrect_shapes
    if missing or shapes:
        raise ValueError(
            f"teacher checkpoint {weights!r} does not match the teacher config "
            f"{cfg.KD.TEACHER.CONFIG!r}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(shapes)} shape mismatches (e.g. {shapes[:3]}). A teacher with random "
            "parameters would teach noise; check the config and the weights"
        )
    teacher.eval().requires_grad_(False)
    teacher.kd2_cfg = tcfg
    return teacher
