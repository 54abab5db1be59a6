"""The torchvision backend's :class:`~kd2.engine.predictor.Predictor`: a kd2 config's plain
detector with its trained weights, RGB ``uint8`` images in, contiguous labels out."""

from __future__ import annotations

from functools import partial
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from kd2.data.catalog import MetadataCatalog
from kd2.engine.defaults import setup_cfg
from kd2.engine.predictor import Predictor, class_names_of
from kd2.utils.errors import MissingFileError

from .build import build_plain_detector, label_offset, load_weights_strict, num_classes_of

__all__ = ["load_predictor"]


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


def load_predictor(config_file: str, opts: list) -> Predictor:
    """The plain detector of a kd2 config with its ``MODEL.WEIGHTS`` (loaded strictly)."""
    cfg = setup_cfg(config_file, opts)
    if not cfg.MODEL.WEIGHTS:
        raise MissingFileError(
            "no weights: MODEL.WEIGHTS is empty",
            "give MODEL.WEIGHTS (e.g. OUTPUT_DIR/model_final.pth of the run)",
        )
    model = build_plain_detector(cfg)
    load_weights_strict(model, cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS", config_file)
    model.eval()
    offset = label_offset(model)
    datasets = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    return Predictor(
        model=model,
        backend="torchvision",
        cfg=cfg,
        inputs_fn=model_inputs,
        detections_fn=partial(detections, offset=offset),
        class_names=class_names_of(datasets, num_classes_of(cfg), MetadataCatalog),
        label_offset=offset,
    )
