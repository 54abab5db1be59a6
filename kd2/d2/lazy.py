"""Helpers for LazyConfig experiments that describe a student and its teacher in Python.

Example (see ``configs/Detectron2-Quick/lazy_faster_rcnn_R18_DeFeat_quick.py``)::

    model = get_config("common/models/mask_rcnn_fpn.py").model   # the student
    model._target_ = DistillGeneralizedRCNN
    model.teacher = L(load_teacher)(model=<a LazyCall of the teacher>, weights="...")
    model.kd_cfg = L(kd_config)(METHODS=["DeFeat"], DEFEAT={"NECK_BG_WEIGHT": 0.25})
"""

from __future__ import annotations

import os
from typing import Any, Dict

from detectron2.config import CfgNode
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from kd2.config import get_cfg
from kd2.config.config import closest_name
from kd2.utils.errors import MissingFileError, UnknownNameError, WeightsError

from .teacher import _RecordingCheckpointer

__all__ = ["kd_config", "lazy_preflight_hook", "load_teacher"]


def _to_cfg_list(d: Dict[str, Any], prefix: str = "") -> list:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out += _to_cfg_list(dict(v.items()), f"{prefix}{k}.")
        else:
            out += [f"{prefix}{k}", list(v) if isinstance(v, (list, tuple)) else v]
    return out


def kd_config(**overrides) -> CfgNode:
    """kd2's ``KD`` section with ``overrides`` (nested dicts allowed); unknown keys are errors."""
    overrides = {  # LazyConfig passes omegaconf containers
        k: OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v
        for k, v in overrides.items()
    }
    kd = get_cfg()
    items = _to_cfg_list(overrides, "KD.")
    for key, value in zip(items[::2], items[1::2]):
        node = kd
        *parents, leaf = key.split(".")
        for p in parents:
            if p not in node:
                raise UnknownNameError(
                    f"unknown KD option {key!r}",
                    f"did you mean {closest_name(p, list(node.keys()))!r}?",
                )
            node = node[p]
        if leaf not in node:
            best = closest_name(leaf, list(node.keys()))
            raise UnknownNameError(
                f"unknown KD option {key!r}", f"did you mean {best!r}? valid: {sorted(node.keys())}"
            )
        node[leaf] = value
    kd.validate()
    return CfgNode(kd.KD.clone())


def load_teacher(model: nn.Module, weights: str) -> nn.Module:
    """Load ``weights`` into an instantiated teacher and freeze it (eval mode, no gradients).

    Missing parameters are an error: a randomly initialised teacher would teach noise.
    """
    if not weights:
        raise MissingFileError(
            "no teacher weights (a randomly initialised teacher would teach noise)",
            "set them on the command line, e.g. model.teacher.weights=path/to/teacher.pth",
        )
    if "://" not in weights and not os.path.isfile(weights):
        raise MissingFileError(
            f"teacher weights {weights!r} do not exist",
            "train the teacher first, or set model.teacher.weights=path/to/teacher.pth "
            "(kd2 never downloads weights)",
        )
    checkpointer = _RecordingCheckpointer(model)
    checkpointer.load(weights)
    missing = [k for k in checkpointer.incompatible.missing_keys if "num_batches" not in k]
    if missing or checkpointer.incompatible.incorrect_shapes:
        raise WeightsError(
            f"teacher weights {weights!r} do not match the LazyConfig teacher: missing "
            f"{missing[:3]}, shape mismatches {checkpointer.incompatible.incorrect_shapes[:3]}",
            "give the weights trained with this teacher model, or its model definition",
        )
    return model.eval().requires_grad_(False)


def lazy_preflight_hook(cfg: DictConfig):
    """``KD.PREFLIGHT`` for a LazyConfig experiment (``tools/lazyconfig_train_net.py``): the
    options of ``cfg.model.kd_cfg``, the teacher's AP on the first images of
    ``cfg.dataloader.test``'s dataset (when it names one), batches of a fresh
    ``cfg.dataloader.train``. ``None`` when the model has no ``kd_cfg`` (not a distillation)."""
    from detectron2.config import instantiate

    from .engine import kd_preflight_hook

    if "kd_cfg" not in cfg.model:
        return None
    node = instantiate(cfg.model.kd_cfg).PREFLIGHT

    def val_dataset():
        test = cfg.dataloader.get("test")
        names = test.get("dataset", {}).get("names") if test is not None else None
        if not names:
            return None
        name = names if isinstance(names, str) else names[0]
        return name, instantiate(test.mapper)

    return kd_preflight_hook(
        node, cfg.train.output_dir, val_dataset, lambda trainer: instantiate(cfg.dataloader.train)
    )
