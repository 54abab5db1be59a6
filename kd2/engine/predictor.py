"""A trained detector of either backend, ready for images: ``tools/predict.py``,
``tools/export_model.py`` and ``benchmarks/inference.py`` build it the same way.

:func:`load_predictor` reads a config (any ``MODEL.BACKEND``) and ``MODEL.WEIGHTS``, builds the
**plain** detector — a distillation config gives its student alone, never the teacher or the KD
adapters (kd2 checkpoints hold the student's weights under ``"model"``) — and wraps it as a
:class:`Predictor`: one RGB ``uint8`` image in, ``{"boxes", "scores", "labels"}`` out, boxes in
the image's pixels, labels contiguous ``0..K-1`` whatever the framework's convention.
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from kd2.config import config_backend, num_classes_of
from kd2.data.catalog import MetadataCatalog
from kd2.modeling.backends import get_backend
from kd2.utils.checkpoint import load_weights_strict
from kd2.utils.errors import ConfigError, MissingFileError

from .defaults import setup_cfg

__all__ = [
    "IMAGE_SUFFIXES",
    "Predictor",
    "class_names_of",
    "image_files",
    "load_own_loop_predictor",
    "load_predictor",
    "read_rgb",
]

#: the file suffixes :func:`image_files` takes for images (lower case)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def image_files(spec: str, option: str = "--input") -> List[str]:
    """The image files ``spec`` names (a file, a folder or a glob), sorted; an error naming
    ``option`` when none."""
    if os.path.isdir(spec):
        files = [os.path.join(spec, f) for f in sorted(os.listdir(spec))]
        files = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    elif os.path.isfile(spec):
        files = [spec]
    else:
        files = sorted(f for f in glob.glob(spec) if os.path.isfile(f))
    if not files:
        raise MissingFileError(
            f"{option} {spec!r} names no image", "give an image file, a folder or a glob"
        )
    return files


def read_rgb(path: str) -> np.ndarray | None:
    """RGB ``uint8`` ``(H, W, 3)``; ``None`` (with a message) for an unreadable file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        print(f"warning: skipping {path}: not a readable image ({e})", file=sys.stderr)
        return None


@dataclass
class Predictor:
    """``predictor(image)`` -> detections of one image (see the module docstring).

    Attributes:
        model: the plain detector (eval mode).
        backend: its backend's name (``"torchvision"``, ``"detectron2"``).
        cfg: its config.
        class_names: per contiguous label (``"class <i>"`` when the dataset has no names).
        label_offset: what the model's labels are shifted by (torchvision Faster R-CNN/SSD: 1);
            the detections are already shifted back.
        inputs_fn: RGB ``uint8`` ``(H, W, 3)`` images -> the framework's model input.
        detections_fn: ``(model, inputs)`` -> per image ``{"boxes", "scores", "labels"}`` (CPU
            tensors, contiguous labels).
    """

    model: nn.Module
    backend: str
    cfg: object
    inputs_fn: Callable[[Sequence[np.ndarray]], list]
    detections_fn: Callable[[nn.Module, list], List[Dict[str, Tensor]]]
    class_names: List[str] = field(default_factory=list)
    label_offset: int = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def model_inputs(self, images: Sequence[np.ndarray]) -> list:
        """The framework's input for RGB ``uint8`` ``(H, W, 3)`` images."""
        return self.inputs_fn(images)

    @torch.no_grad()
    def predict(self, images: Sequence[np.ndarray]) -> List[Dict[str, Tensor]]:
        """Detections of a batch of RGB ``uint8`` images (CPU tensors)."""
        return self.detections_fn(self.model, self.model_inputs(images))

    def __call__(self, image: np.ndarray) -> Dict[str, Tensor]:
        return self.predict([image])[0]


def class_names_of(dataset_names: Sequence[str], count: int, catalog) -> List[str]:
    """The ``thing_classes`` of the first of ``dataset_names`` that has ``count`` of them in
    ``catalog`` (a ``MetadataCatalog``), else ``"class <i>"``."""
    for name in dataset_names:
        try:
            names = catalog.get(name).get("thing_classes")
        except (KeyError, AttributeError):
            names = None
        if names and len(names) == count:
            return list(names)
    return [f"class {i}" for i in range(count)]


def load_predictor(config_file: str, opts: Sequence[str] = (), weights: str = "") -> Predictor:
    """The plain detector of ``config_file`` with ``MODEL.WEIGHTS`` (or ``weights``) loaded, by
    the backend its ``MODEL.BACKEND`` names (:mod:`kd2.modeling.backends`).

    Raises:
        MissingFileError: no ``MODEL.WEIGHTS``, or a weights file that does not exist.
        ConfigError: a Detectron2 config without Detectron2 installed.
        kd2.utils.errors.KD2Error: weights that do not fit the model (the backends' loaders).
    """
    opts = list(opts) + (["MODEL.WEIGHTS", weights] if weights else [])
    backend = config_backend(config_file, opts)
    try:
        loader = get_backend(backend).load_predictor
    except ConfigError as e:
        raise ConfigError(
            f"{config_file} is a Detectron2 config (it sets no MODEL.BACKEND torchvision), but "
            "detectron2 is not installed"
            if backend == "detectron2"
            else e.what,
            e.fix,
        ) from None
    return loader(config_file, opts)


def model_inputs(images: Sequence[np.ndarray]) -> List[Tensor]:
    """RGB ``uint8`` ``(H, W, 3)`` images -> ``(3, H, W)`` floats in ``[0, 1]``."""
    return [
        torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float().div(255.0)
        for im in images
    ]


def detections(model: nn.Module, inputs: List[Tensor], offset: int) -> List[Dict[str, Tensor]]:
    """Run ``model`` on ``inputs``; its labels shifted back by ``offset`` (the background)."""
    device = next(model.parameters()).device
    outputs = model([x.to(device) for x in inputs])
    return [
        {
            "boxes": o["boxes"].cpu(),
            "scores": o["scores"].cpu(),
            "labels": o["labels"].cpu() - offset,
        }
        for o in outputs
    ]


def load_own_loop_predictor(
    config_file: str,
    opts: list,
    backend: str,
    build_plain: Callable[[object], nn.Module],
    label_offset: Callable[[nn.Module], int] = lambda model: 0,
) -> Predictor:
    """The plain detector of a kd2 config of a backend that trains on kd2's own loop
    (torchvision, transformers) with its ``MODEL.WEIGHTS``, loaded strictly: ``build_plain``
    builds it, ``label_offset`` says which label its class ``c`` has."""
    cfg = setup_cfg(config_file, opts)
    if not cfg.MODEL.WEIGHTS:
        raise MissingFileError(
            "no weights: MODEL.WEIGHTS is empty",
            "give MODEL.WEIGHTS (e.g. OUTPUT_DIR/model_final.pth of the run)",
        )
    model = build_plain(cfg)
    load_weights_strict(model, cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS", config_file)
    model.eval()
    offset = label_offset(model)
    datasets = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    return Predictor(
        model=model,
        backend=backend,
        cfg=cfg,
        inputs_fn=model_inputs,
        detections_fn=partial(detections, offset=offset),
        class_names=class_names_of(datasets, num_classes_of(cfg), MetadataCatalog),
        label_offset=offset,
    )
