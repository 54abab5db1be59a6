"""The trained student as a transformers directory: ``AutoModelForObjectDetection.from_pretrained``
loads it with no kd2 code (strictly: the student's weights alone, no teacher or KD adapter keys).

``config.json`` and ``model.safetensors`` are written by ``save_pretrained``; kd2's input settings
(square size, per-channel mean / std on RGB in ``[0, 1]``) go beside them in
``kd2_input.json``, which :func:`kd2.hf.models.load_hf_detector` ignores.
"""

from __future__ import annotations

import json
import os

from torch import nn

__all__ = ["INPUT_FILE", "save_transformers_directory"]

#: kd2's input settings beside the transformers files
INPUT_FILE = "kd2_input.json"


def save_transformers_directory(model: nn.Module, directory: str) -> str:
    """Write the student of ``model`` (an :class:`~kd2.hf.detector.HFDetector` or its KD
    subclass) to ``directory`` as a transformers model; returns ``directory``."""
    os.makedirs(directory, exist_ok=True)
    model.detector.save_pretrained(directory, safe_serialization=True)
    settings = {
        "image_size": model.image_size,
        "pixel_mean": model.pixel_mean.tolist(),
        "pixel_std": model.pixel_std.tolist(),
        "channels": "RGB",
        "scale": "images in [0, 1]",
    }
    with open(os.path.join(directory, INPUT_FILE), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)
    return directory
