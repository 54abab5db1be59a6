"""Build a frozen Detectron2 teacher from its own config (a file or a model-zoo name) and
weights (a path or a ``detectron2://`` URL)."""

from __future__ import annotations

import difflib
import os
import pickle
import re

import torch
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from torch import nn

from kd2.modeling.cross_framework import build_teacher_of_config
from kd2.modeling.weights_check import check_teacher_weights
from kd2.utils.errors import ConfigError, MissingFileError, WeightsError

from .config import load_config

__all__ = ["build_detectron2_teacher", "build_teacher", "resolve_config_file"]


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
        raise MissingFileError(
            f"KD.TEACHER.CONFIG {name!r} is neither a file nor a Detectron2 model-zoo config",
            f"check the path; closest model-zoo names: {close}",
        ) from None


class _WeightsOnlyCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that reads torch-format files (``.pth``, ``.pt``, any name but
    ``.pkl``/``.pyth``) with ``torch.load(weights_only=True)``, whatever torch's default: such a
    file holds tensors and plain containers and cannot run code when loaded. ``.pkl`` files
    (Detectron2 model zoo, Caffe2-converted weights, ``detectron2://`` URLs) still go through
    Detectron2's own ``pickle.load``: they are trusted code."""

    def _torch_load(self, f):
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            reason = re.search(r"(Unsupported global|WeightsUnpickler error)[^\n]*", str(e))
            raise WeightsError(
                f"checkpoint {f!r} holds objects other than tensors and plain containers"
                f"{' (' + reason.group(0) + ')' if reason else ''}. kd2 loads .pth/.pt weights "
                "(teacher weights, MODEL.WEIGHTS, resumed checkpoints) with "
                "torch.load(weights_only=True) and refuses to unpickle arbitrary objects, which "
                "can run code",
                "if you trust the file, convert it once in a trusted session: "
                "load it with torch.load(path, weights_only=False) and re-save the weights alone, "
                "torch.save({'model': state_dict}, new_path)",
            ) from e


class _RecordingCheckpointer(_WeightsOnlyCheckpointer):
    """``DetectionCheckpointer`` that keeps the incompatible keys instead of only logging them."""

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def build_teacher(cfg, name: str = "") -> nn.Module:
    """The teacher described by ``cfg.KD.TEACHER`` (``name`` empty) or ``cfg.KD.TEACHERS.<name>``,
    loaded, in eval mode, without gradients. ``BACKEND: torchvision`` builds a kd2 torchvision
    detector from its kd2 yaml (a teacher from the other framework).

    Weights: ``WEIGHTS``, else the teacher config's own ``MODEL.WEIGHTS``. A
    checkpoint that leaves any teacher parameter missing is an error (never a silently random
    teacher). A ``.pth``/``.pt`` file is read with ``torch.load(weights_only=True)``; a ``.pkl``
    file (``detectron2://`` model zoo) is unpickled by Detectron2: trust its source.
    """
    return build_teacher_of_config(cfg, name, "detectron2")


def build_detectron2_teacher(node, key: str, device: str) -> nn.Module:
    """A frozen Detectron2 teacher from ``node.CONFIG`` (a file or a model-zoo name) and
    ``node.WEIGHTS`` (``key`` names the node in messages)."""
    if not node.CONFIG:
        raise ConfigError(
            f"KD.METHODS is set but {key}.CONFIG is empty", "give the teacher's own config file"
        )
    tcfg = load_config(resolve_config_file(node.CONFIG), freeze=False)
    if tcfg.KD.METHODS:
        raise ConfigError(
            f"the teacher config {node.CONFIG!r} has KD.METHODS set",
            "a teacher has no KD: give the config the teacher was trained with",
        )
    tcfg.MODEL.DEVICE = device
    teacher = build_model(tcfg)
    weights = node.WEIGHTS or tcfg.MODEL.WEIGHTS
    if not weights:
        raise MissingFileError(f"no teacher weights for {key}", f"set {key}.WEIGHTS")
    if "://" not in weights and not os.path.isfile(weights):
        raise MissingFileError(
            f"{key}.WEIGHTS {weights!r} does not exist",
            "kd2 never downloads weights: give a local checkpoint of the teacher",
        )
    checkpointer = _RecordingCheckpointer(teacher)
    checkpointer.load(weights)
    incompatible = checkpointer.incompatible
    missing = [k for k in incompatible.missing_keys if "num_batches_tracked" not in k]
    shapes = incompatible.incorrect_shapes
    if missing or shapes:
        raise WeightsError(
            f"teacher checkpoint {weights!r} does not match the teacher config "
            f"{node.CONFIG!r}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(shapes)} shape mismatches (e.g. {shapes[:3]}); a teacher with random "
            "parameters would teach noise",
            "give the weights trained with this config, or the config they were trained with",
        )
    check_teacher_weights(teacher, weights)
    teacher.eval().requires_grad_(False)
    teacher.kd2_cfg = tcfg
    return teacher
