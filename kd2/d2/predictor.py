"""The Detectron2 backend's :class:`~kd2.engine.predictor.Predictor`: a Detectron2 config's
student alone (no teacher is built or loaded) with its trained weights, RGB ``uint8`` images in
(resized as ``INPUT.*_TEST`` says, in ``INPUT.FORMAT``), contiguous labels out."""

from __future__ import annotations

import os
from functools import partial
from typing import Dict, List, Sequence

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from torch import Tensor, nn

from kd2.engine.predictor import Predictor, class_names_of
from kd2.utils.errors import MissingFileError

from .config import load_config
from .data import register_config_datasets
from .engine import student_checkpointer
from .student import student_config

__all__ = ["load_predictor"]


def model_inputs(images: Sequence[np.ndarray], input_format: str, resize) -> List[dict]:
    """RGB ``uint8`` ``(H, W, 3)`` images -> Detectron2's input dicts (resized, in the model's
    channel order, with the original ``height`` / ``width``)."""
    out = []
    for im in images:
        h, w = im.shape[:2]
        x = im if input_format == "RGB" else im[:, :, ::-1]
        x = resize.get_transform(x).apply_image(x)
        tensor = torch.as_tensor(np.ascontiguousarray(x.transpose(2, 0, 1))).float()
        out.append({"image": tensor, "height": h, "width": w})
    return out


def detections(model: nn.Module, inputs: List[dict]) -> List[Dict[str, Tensor]]:
    """Run ``model`` on ``inputs``: its ``Instances`` as plain tensors."""
    res = []
    for o in model(inputs):
        inst = o["instances"].to("cpu")
        res.append(
            {"boxes": inst.pred_boxes.tensor, "scores": inst.scores, "labels": inst.pred_classes}
        )
    return res


def load_predictor(config_file: str, opts: list) -> Predictor:
    """The student of a Detectron2 (KD or plain) config with its ``MODEL.WEIGHTS``."""
    # the student alone: no teacher is built or loaded
    cfg = student_config(load_config(config_file, opts, freeze=False))
    register_config_datasets(cfg)
    if not cfg.MODEL.WEIGHTS:
        raise MissingFileError("no weights: MODEL.WEIGHTS is empty", "give MODEL.WEIGHTS")
    if "://" not in cfg.MODEL.WEIGHTS and not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise MissingFileError(
            f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS!r} does not exist", "check the path"
        )
    model = build_model(cfg)
    student_checkpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    k = int(getattr(model, "num_classes", 0) or model.roi_heads.num_classes)
    resize = T.ResizeShortestEdge(
        [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
    )
    datasets = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    return Predictor(
        model=model,
        backend="detectron2",
        cfg=cfg,
        inputs_fn=partial(model_inputs, input_format=cfg.INPUT.FORMAT, resize=resize),
        detections_fn=detections,
        class_names=class_names_of(datasets, k, MetadataCatalog),
    )
