"""DETR-family detectors of Hugging Face transformers, built from a config or loaded from a local
directory — never downloaded.

:func:`build_hf_detector` builds a randomly initialised ``<Model>ForObjectDetection`` of one of
:data:`MODEL_TYPES` at one of kd2's size presets (:data:`PRESETS`), sized for the bundled data on
a CPU (measured in transformers 5.25: the "tiny" D-FINE reaches 44 AP on the synthetic set after
1000 iterations):

* ``"pico"``: backbone stages of 32/64/128/256 channels (HGNetV2 for D-FINE / DEIMv2, a
  ResNet-basic for RT-DETR / RT-DETRv2), width 64, 4 heads, 2 decoder layers, 50 queries;
* ``"tiny"``: an HGNetV2-B0-like backbone (ResNet-18-like for RT-DETR), width 128, 8 heads,
  3 decoder layers, 100 queries.

Both use the backbone's stages 2–4 (strides 8/16/32) and train from scratch: the backbone's
BatchNorm is not frozen (``freeze_backbone_batch_norms`` would freeze a random initialisation).

:func:`load_hf_detector` loads a user's local directory (``config.json`` + ``*.safetensors``)
with ``local_files_only``, ``use_safetensors`` and without remote code; a directory with a
pickled checkpoint or with remote code is refused.
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from kd2.utils.errors import ConfigError, MissingFileError, WeightsError

__all__ = [
    "MODEL_TYPES",
    "PRESETS",
    "backbone_parameters",
    "build_hf_config",
    "build_hf_detector",
    "check_queries",
    "load_hf_detector",
    "trunk_parameters",
]

#: kd2's name -> (transformers config class, detector class, backbone kind)
MODEL_TYPES = {
    "rt_detr": ("RTDetrConfig", "RTDetrForObjectDetection", "resnet"),
    "rt_detr_v2": ("RTDetrV2Config", "RTDetrV2ForObjectDetection", "resnet"),
    "d_fine": ("DFineConfig", "DFineForObjectDetection", "hgnetv2"),
    "deimv2": ("Deimv2Config", "Deimv2ForObjectDetection", "hgnetv2"),
}

#: per preset: the backbones' stage settings and the encoder / decoder sizes
PRESETS: dict[str, dict[str, Any]] = {
    "pico": {
        "hgnetv2": {
            "stem_channels": [3, 16, 16],
            "stage_in_channels": [16, 32, 64, 128],
            "stage_mid_channels": [16, 32, 64, 128],
            "stage_out_channels": [32, 64, 128, 256],
            "stage_num_blocks": [1, 1, 1, 1],
            "stage_numb_of_layers": [2, 2, 2, 2],
        },
        "resnet": {
            "embedding_size": 32,
            "hidden_sizes": [32, 64, 128, 256],
            "depths": [1, 1, 1, 1],
        },
        "width": 64,
        "heads": 4,
        "decoder_layers": 2,
        "num_queries": 50,
        "num_denoising": 20,
    },
    "tiny": {
        "hgnetv2": {
            "stem_channels": [3, 16, 16],
            "stage_in_channels": [16, 64, 256, 512],
            "stage_mid_channels": [16, 32, 64, 128],
            "stage_out_channels": [64, 256, 512, 1024],
            "stage_num_blocks": [1, 1, 2, 1],
            "stage_numb_of_layers": [3, 3, 3, 3],
        },
        "resnet": {
            "embedding_size": 64,
            "hidden_sizes": [64, 128, 256, 512],
            "depths": [2, 2, 2, 2],
        },
        "width": 128,
        "heads": 8,
        "decoder_layers": 3,
        "num_queries": 100,
        "num_denoising": 50,
    },
}

#: the stages whose maps the encoder reads (strides 8, 16, 32)
OUT_FEATURES = ["stage2", "stage3", "stage4"]


def _transformers():
    try:
        import transformers
    except ImportError as e:  # an install without the extra
        raise ConfigError(
            "the transformers backend needs the transformers and scipy packages",
            'install kd2 with its extra: pip install -e ".[hf]" (make install does)',
        ) from e
    return transformers


def _backbone_config(transformers, kind: str, preset: dict):
    if kind == "hgnetv2":
        stages = preset["hgnetv2"]
        return transformers.HGNetV2Config(
            **stages,
            # these two must repeat the stem's and the stages' channels, or the encoder's input
            # projections are built for other channel counts
            embedding_size=stages["stem_channels"][-1],
            hidden_sizes=stages["stage_out_channels"],
            stage_downsample=[False, True, True, True],
            stage_light_block=[False, False, True, True],
            stage_kernel_size=[3, 3, 5, 5],
            out_features=OUT_FEATURES,
        )
    return transformers.RTDetrResNetConfig(
        **preset["resnet"], layer_type="basic", out_features=OUT_FEATURES
    )


def _stage_channels(backbone) -> list[int]:
    sizes = getattr(backbone, "stage_out_channels", None) or backbone.hidden_sizes
    return [sizes[int(name.removeprefix("stage")) - 1] for name in OUT_FEATURES]


def build_hf_config(model_type: str, preset: str, num_classes: int, **overrides):
    """The transformers config of ``model_type`` at kd2's ``preset`` with ``num_classes`` labels;
    ``overrides`` set any of the config's own keys on top (e.g. ``num_queries=30``)."""
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"unknown transformers detector {model_type!r}", f"use one of {sorted(MODEL_TYPES)}"
        )
    if preset not in PRESETS:
        raise ConfigError(f"unknown size preset {preset!r}", f"use one of {sorted(PRESETS)}")
    transformers = _transformers()
    config_name, _, kind = MODEL_TYPES[model_type]
    p = PRESETS[preset]
    backbone = _backbone_config(transformers, kind, p)
    width, levels = p["width"], len(OUT_FEATURES)
    settings = {
        "backbone_config": backbone,
        "num_labels": int(num_classes),
        "freeze_backbone_batch_norms": False,
        "encoder_in_channels": _stage_channels(backbone),
        "encoder_hidden_dim": width,
        "encoder_ffn_dim": 2 * width,
        "encoder_attention_heads": p["heads"],
        "d_model": width,
        "decoder_in_channels": [width] * levels,
        "decoder_ffn_dim": 2 * width,
        "decoder_attention_heads": p["heads"],
        "decoder_layers": p["decoder_layers"],
        "num_feature_levels": levels,
        "decoder_n_points": [4] * levels if kind == "hgnetv2" else 4,
        "num_queries": p["num_queries"],
        "num_denoising": p["num_denoising"],
    }
    settings.update(overrides)
    return getattr(transformers, config_name)(**settings)


def check_queries(model: nn.Module, height: int, width: int, what: str) -> None:
    """A clear error where the detector would select more queries than its encoder has
    locations on a ``height`` × ``width`` input (``what`` names the input's size)."""
    c = model.config
    locations = sum((height // int(s)) * (width // int(s)) for s in c.feat_strides)
    if int(c.num_queries) > locations:
        raise ConfigError(
            f"the model selects {c.num_queries} queries from its encoder's {locations} locations "
            f"on a {height} x {width} input ({what}), which has too few",
            "give it a larger input or fewer queries (MODEL.HF.NUM_QUERIES)",
        )


def build_hf_detector(model_type: str, preset: str, num_classes: int, **overrides) -> nn.Module:
    """A randomly initialised ``<Model>ForObjectDetection`` (:func:`build_hf_config`)."""
    config = build_hf_config(model_type, preset, num_classes, **overrides)
    detector_name = MODEL_TYPES[model_type][1]
    return getattr(_transformers(), detector_name)(config)


#: where each type keeps its backbone (DEIMv2 wraps it with its input projections)
BACKBONE_PREFIXES = ("model.backbone.model.", "model.conv_encoder.model.")
#: the backbone, the encoder's input projections and the hybrid encoder: what both the detection
#: losses and a distillation on the encoder's maps reach
TRUNK_PREFIXES = (
    "model.backbone.",
    "model.conv_encoder.",
    "model.encoder_input_proj.",
    "model.encoder.",
)


def trunk_parameters(model: nn.Module) -> list:
    """The trainable parameters of the detector's backbone and hybrid encoder."""
    return [
        p for n, p in model.named_parameters() if n.startswith(TRUNK_PREFIXES) and p.requires_grad
    ]


def backbone_parameters(model: nn.Module) -> list:
    """The trainable parameters of the detector's backbone (all types of :data:`MODEL_TYPES`)."""
    return [
        p
        for n, p in model.named_parameters()
        if n.startswith(BACKBONE_PREFIXES) and p.requires_grad
    ]


#: weight files that a safetensors-only load must not meet (pickled: they can run code)
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def load_hf_detector(directory: str) -> nn.Module:
    """A detector from a user's local directory (``config.json`` and ``*.safetensors``): no
    download, no remote code, no pickled weights."""
    if not os.path.isdir(directory):
        raise MissingFileError(
            f"model directory {directory!r} does not exist",
            "give a local directory with config.json and *.safetensors (kd2 downloads nothing)",
        )
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise MissingFileError(
            f"{config_path} does not exist", "save the model with save_pretrained"
        )
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("auto_map"):
        raise WeightsError(
            f"{config_path} asks for remote code (auto_map)",
            "kd2 never runs a model's own code: use a model type transformers implements",
        )
    names = os.listdir(directory)
    pickled = sorted(n for n in names if n.endswith(PICKLED))
    if pickled or not any(n.endswith(".safetensors") for n in names):
        found = f"pickled weights {', '.join(pickled)}" if pickled else "no *.safetensors weights"
        raise WeightsError(
            f"{directory} has {found}",
            "kd2 loads only safetensors files: convert them (save_pretrained writes safetensors)",
        )
    transformers = _transformers()
    return transformers.AutoModelForObjectDetection.from_pretrained(
        directory, local_files_only=True, use_safetensors=True, trust_remote_code=False
    )
