"""Build a :class:`~kd2.foundation.teacher.FoundationTeacher` from a teacher config node.

``KD.TEACHER.BACKEND foundation`` (or a ``KD.TEACHERS.<NAME>`` entry's ``BACKEND``):

* ``CONFIG`` — a transformers model directory (its ``config.json``; a DINOv2, DINOv2-with-
  registers, DINOv3 ViT or DINOv3 ConvNeXt, as ``save_pretrained`` or the Hub write it),
  ``timm:<architecture>`` (any timm model that supports ``features_only``), or the kd2 yaml of a
  detector kd2 trained on a DINO trunk (``MODEL.BACKBONE.NAME dinov2_vit``: its trunk teaches);
* ``WEIGHTS`` — a local ``.safetensors`` file (for a directory ``""`` means its
  ``model.safetensors``), or the kd2 checkpoint of that detector (read with
  ``torch.load(weights_only=True)``, no code). Never a pickle of arbitrary objects, never
  ``trust_remote_code``, never a network call;
* ``FOUNDATION.LAYERS`` / ``STRIDES`` / ``INPUT_SCALE`` / ``PIXEL_MEAN`` / ``PIXEL_STD`` — which
  maps, on which student strides, at which input scale, in which normalisation
  (``kd2/config/defaults.py``).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import List, Tuple

from torch import nn

from kd2.utils.errors import ConfigError, MissingFileError, WeightsError

from .teacher import IMAGENET_MEAN, IMAGENET_STD, FoundationTeacher
from .trunks import CONVNEXT_TYPES, VIT_TYPES, StagesTrunk, TimmTrunk, ViTTrunk

__all__ = ["build_foundation_teacher", "TRANSFORMERS_TYPES"]

#: the transformers model types a foundation teacher may be
TRANSFORMERS_TYPES = (*VIT_TYPES, *CONVNEXT_TYPES)

_TIMM = "timm:"


def _options(node):
    """The node's ``FOUNDATION`` options with kd2's defaults for absent keys."""
    from kd2.config import get_cfg

    opts = get_cfg().KD.TEACHER.FOUNDATION.clone()
    own = node.get("FOUNDATION", None)
    if own:
        for k, v in own.items():
            opts[k] = v
    return opts


def _safetensors_file(path: str, key: str) -> str:
    if not os.path.isfile(path):
        raise MissingFileError(
            f"{key}.WEIGHTS: {path!r} does not exist",
            "give the .safetensors file of the model you downloaded",
        )
    if not path.endswith(".safetensors"):
        raise ConfigError(
            f"{key}.WEIGHTS {path!r} is not a .safetensors file; a foundation teacher loads "
            "safetensors only (no pickles)",
            "download the model's model.safetensors, or convert the file with safetensors' "
            "save_file",
        )
    return path


def _from_pretrained(directory: str, weights: str, key: str) -> nn.Module:
    """The transformers model of ``directory`` with the weights of the safetensors file
    ``weights``, loaded by transformers (its checkpoint key conversions) from local files only,
    without remote code; any missing, unexpected or mis-shaped weight is a :class:`WeightsError`.
    A weights file outside the directory is read through a temporary directory of links."""
    from transformers import AutoModel

    with tempfile.TemporaryDirectory() as tmp:
        source = directory
        if os.path.abspath(weights) != os.path.abspath(
            os.path.join(directory, "model.safetensors")
        ):
            source = tmp
            os.symlink(
                os.path.abspath(os.path.join(directory, "config.json")),
                os.path.join(tmp, "config.json"),
            )
            os.symlink(os.path.abspath(weights), os.path.join(tmp, "model.safetensors"))
        try:
            model, info = AutoModel.from_pretrained(
                source,
                local_files_only=True,
                use_safetensors=True,
                trust_remote_code=False,
                output_loading_info=True,
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise WeightsError(
                f"{key}: cannot load {weights!r} with {directory!r}/config.json "
                f"({type(e).__name__}: {str(e).splitlines()[0]})",
                "give the weights and the config.json of the same model",
            ) from None
    missing = list(info.get("missing_keys", []))
    unexpected = [
        k for k in info.get("unexpected_keys", []) if not k.startswith(("classifier.", "head."))
    ]
    mismatched = list(info.get("mismatched_keys", []))
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"{key}.WEIGHTS {weights!r} does not fit the model of {key}.CONFIG: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected "
            f"{unexpected[:3]}, {len(mismatched)} of another shape {mismatched[:3]}",
            "give the weights and the config.json of the same model",
        )
    return model.eval()


def _trunk_of(model: nn.Module, layers, key: str) -> nn.Module:
    """The trunk reading a transformers DINO model at ``layers``: its ViT or ConvNeXt kind; an
    index the model does not have is a :class:`ConfigError` naming ``key``'s option."""
    kind = ViTTrunk if model.config.model_type in VIT_TYPES else StagesTrunk
    try:
        return kind(model, layers)
    except ValueError as e:
        raise ConfigError(
            f"{key}.FOUNDATION.LAYERS {list(layers)}: {e}", "give layers the model has"
        ) from None


def _transformers_trunk(directory: str, weights: str, layers, key: str):
    """``(trunk, mean, std, name)`` of a transformers model directory."""
    config_file = os.path.join(directory, "config.json")
    if not os.path.isfile(config_file):
        raise MissingFileError(
            f"{key}.CONFIG {directory!r} has no config.json",
            "give the directory of a transformers model (save_pretrained / a Hub download)",
        )
    with open(config_file) as f:
        raw = json.load(f)
    model_type = raw.get("model_type", "")
    if model_type not in TRANSFORMERS_TYPES:
        raise ConfigError(
            f"{key}.CONFIG {directory!r} is a {model_type or 'unknown'!r} model; a foundation "
            f"teacher from transformers is one of {list(TRANSFORMERS_TYPES)}",
            "give a DINOv2 / DINOv3 directory, or timm:<architecture> for a timm model",
        )
    weights = _safetensors_file(weights or os.path.join(directory, "model.safetensors"), key)
    model = _from_pretrained(directory, weights, key)
    trunk = _trunk_of(model, layers, key)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    processor = os.path.join(directory, "preprocessor_config.json")
    if os.path.isfile(processor):
        with open(processor) as f:
            pre = json.load(f)
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    return trunk, mean, std, f"{type(model).__name__} ({os.path.basename(directory.rstrip('/'))})"


def _detector_trunk(node, layers, key: str, device: str):
    """``(trunk, mean, std, name)`` of the DINO ViT trunk of a detector kd2 trained (its kd2 yaml
    in ``node.CONFIG``, its checkpoint in ``node.WEIGHTS``, built and checked by its backend):
    e.g. a torchvision detector with ``MODEL.BACKBONE.NAME dinov2_vit``."""
    from kd2.config import get_cfg
    from kd2.modeling.backends import get_backend

    tcfg = get_cfg()
    tcfg.merge_from_file(node.CONFIG)
    backend = get_backend(str(tcfg.MODEL.BACKEND or "torchvision"), f"{key}.CONFIG's MODEL.BACKEND")
    detector = backend.build_teacher(node, key, device)
    vit = next(
        (
            m
            for m in detector.modules()
            if getattr(getattr(m, "config", None), "model_type", None) in TRANSFORMERS_TYPES
        ),
        None,
    )
    if vit is None:
        raise ConfigError(
            f"{key}.CONFIG {node.CONFIG!r} is a detector without a DINOv2 / DINOv3 trunk; a "
            "detector teaches as a backbone-only teacher when its backbone is one",
            f"train it with MODEL.BACKBONE.NAME dinov2_vit, or drop {key}.BACKEND foundation to "
            "use it as a detector teacher",
        )
    mean, std, channels, scale = backend.input_convention(detector)
    order = [0, 1, 2] if channels == "RGB" else [2, 1, 0]
    mean = [float(mean[i]) / float(scale) for i in order]
    std = [float(std[i]) / float(scale) for i in order]
    trunk = _trunk_of(vit, layers, key)
    return trunk, mean, std, f"{type(vit).__name__} of {os.path.basename(node.CONFIG)}"


def _timm_trunk(arch: str, weights: str, layers, key: str):
    """``(trunk, mean, std, name)`` of a timm architecture and its safetensors file."""
    try:
        import timm
    except ImportError as e:
        raise ConfigError(
            f"{key}.CONFIG names a timm model, but timm is not installed ({e})",
            'install kd2 with its extra: pip install -e ".[foundation]" (make install does)',
        ) from None
    if not weights:
        raise ConfigError(
            f"{key}.CONFIG {_TIMM}{arch} needs {key}.WEIGHTS",
            "give the model's .safetensors file (timm's Hub repositories have model.safetensors)",
        )
    if arch not in timm.list_models():
        raise ConfigError(
            f"{key}.CONFIG: timm has no architecture {arch!r}",
            "use a name from timm.list_models(), e.g. timm:resnet50 or "
            "timm:vit_small_patch16_dinov3",
        )
    kwargs = dict(
        pretrained=True,
        pretrained_cfg_overlay={"file": _safetensors_file(weights, key)},
        features_only=True,
    )
    if layers:
        kwargs["out_indices"] = tuple(int(i) for i in layers)
    try:
        model = timm.create_model(arch, dynamic_img_size=True, **kwargs)
    except TypeError:  # a convolutional model takes any size and has no such argument
        model = timm.create_model(arch, **kwargs)
    except RuntimeError as e:
        raise WeightsError(
            f"{key}.WEIGHTS {weights!r} does not fit timm's {arch} ({e})",
            "give the weights of that architecture",
        ) from None
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    return TimmTrunk(model.eval()), mean, std, f"timm {arch}"


def build_foundation_teacher(node, key: str, device: str) -> nn.Module:
    """The frozen :class:`FoundationTeacher` of a teacher config node (see the module doc);
    ``key`` names the node in messages."""
    source, weights = str(node.CONFIG or ""), str(node.WEIGHTS or "")
    opts = _options(node)
    layers: List[int] = [int(i) for i in opts.LAYERS]
    if not source:
        raise ConfigError(
            f"{key}.BACKEND is foundation but {key}.CONFIG is empty",
            "give a DINOv2 / DINOv3 transformers directory or timm:<architecture>",
        )
    if source.startswith(_TIMM):
        trunk, mean, std, name = _timm_trunk(source[len(_TIMM) :], weights, layers, key)
    elif source.endswith((".yaml", ".yml")) and os.path.isfile(source):
        trunk, mean, std, name = _detector_trunk(node, layers, key, device)
    elif os.path.isdir(source):
        trunk, mean, std, name = _transformers_trunk(source, weights, layers, key)
    else:
        raise MissingFileError(
            f"{key}.CONFIG {source!r} is neither a directory, a kd2 yaml nor timm:<architecture>",
            "give the directory of the downloaded model (with its config.json), or a kd2 "
            "detector yaml",
        )
    strides = [int(s) for s in opts.STRIDES]
    levels = list(trunk.levels)
    level_for_stride: Tuple[int, ...] = ()
    if len(levels) > 1 and len({r for _, r, _ in levels}) == 1:
        # several layers of one ViT have one stride: the layers go to the strides in order
        if not layers:
            levels = levels[-1:]  # timm's default indices of a ViT: its last block
        elif len(strides) != len(levels):
            raise ConfigError(
                f"{key}.FOUNDATION.LAYERS {layers} reads {len(layers)} layers of a ViT, which "
                f"all have stride {levels[0][1]}; {key}.FOUNDATION.STRIDES {strides} must give "
                "one student stride per layer",
                f"e.g. {key}.FOUNDATION.STRIDES {[8, 16, 32][: len(layers)]}, or one layer",
            )
        else:
            level_for_stride = tuple(range(len(strides)))
    mean = [float(x) for x in (opts.PIXEL_MEAN or mean)]
    std = [float(x) for x in (opts.PIXEL_STD or std)]
    for what, v in (("PIXEL_MEAN", mean), ("PIXEL_STD", std)):
        if len(v) != 3:
            raise ConfigError(f"{key}.FOUNDATION.{what} needs 3 RGB values, got {v}")
    scale = float(opts.INPUT_SCALE)
    if scale <= 0:
        raise ConfigError(f"{key}.FOUNDATION.INPUT_SCALE must be > 0, got {scale}")
    teacher = FoundationTeacher(
        trunk,
        levels,
        pixel_mean=mean,
        pixel_std=std,
        strides=strides,
        level_for_stride=level_for_stride,
        input_scale=scale,
        pad_multiple=max(r for _, r, _ in levels),
        name=name,
    )
    from kd2.modeling.weights_check import check_teacher_weights

    check_teacher_weights(teacher, weights or source)
    return teacher.to(device).eval().requires_grad_(False)
