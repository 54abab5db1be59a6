"""A trained detector of either backend, ready for images: ``tools/predict.py``,
``tools/export_model.py`` and ``benchmarks/inference.py`` build it the same way.

:func:`load_predictor` reads a config (any ``MODEL.BACKEND``) and ``MODEL.WEIGHTS``, builds the
**plain** detector — a distillation config gives its student alone, never the teacher or the KD
adapters (kd2 checkpoints hold the student's weights under ``"model"``) — and wraps it as a
:class:`Predictor`: one RGB ``uint8`` image in, ``{"boxes", "scores", "labels"}`` out, boxes in
the image's pixels, labels contiguous ``0..K-1`` whatever the framework's convention.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from kd2.utils.errors import ConfigError, MissingFileError

__all__ = ["Predictor", "load_predictor"]


@dataclass
class Predictor:
    """``predictor(image)`` -> detections of one image (see the module docstring).

    Attributes:
        model: the plain detector (eval mode).
        backend: ``"torchvision"`` or ``"detectron2"``.
        cfg: its config.
        class_names: per contiguous label (``"class <i>"`` when the dataset has no names).
        label_offset: subtracted from the model's labels (torchvision Faster R-CNN/SSD: 1).
    """

    model: nn.Module
    backend: str
    cfg: object
    class_names: List[str] = field(default_factory=list)
    label_offset: int = 0
    _d2_resize: object = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def model_inputs(self, images: Sequence[np.ndarray]) -> list:
        """The framework's input for RGB ``uint8`` ``(H, W, 3)`` images."""
        if self.backend == "torchvision":
            return [
                torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float().div(255.0)
                for im in images
            ]
        out = []
        for im in images:
            h, w = im.shape[:2]
            x = im if self.cfg.INPUT.FORMAT == "RGB" else im[:, :, ::-1]
            x = self._d2_resize.get_transform(x).apply_image(x)
            tensor = torch.as_tensor(np.ascontiguousarray(x.transpose(2, 0, 1))).float()
            out.append({"image": tensor, "height": h, "width": w})
        return out

    @torch.no_grad()
    def predict(self, images: Sequence[np.ndarray]) -> List[Dict[str, Tensor]]:
        """Detections of a batch of RGB ``uint8`` images (CPU tensors)."""
        inputs = self.model_inputs(images)
        if self.backend == "torchvision":
            outputs = self.model([x.to(self.device) for x in inputs])
            return [
                {
                    "boxes": o["boxes"].cpu(),
                    "scores": o["scores"].cpu(),
                    "labels": o["labels"].cpu() - self.label_offset,
                }
                for o in outputs
            ]
        outputs = self.model(inputs)
        res = []
        for o in outputs:
            inst = o["instances"].to("cpu")
            res.append(
                {
                    "boxes": inst.pred_boxes.tensor,
                    "scores": inst.scores,
                    "labels": inst.pred_classes,
                }
            )
        return res

    def __call__(self, image: np.ndarray) -> Dict[str, Tensor]:
        return self.predict([image])[0]


def _class_names(dataset_names: Sequence[str], count: int, catalog) -> List[str]:
    for name in dataset_names:
        try:
            names = catalog.get(name).get("thing_classes")
        except (KeyError, AttributeError):
            names = None
        if names and len(names) == count:
            return list(names)
    return [f"class {i}" for i in range(count)]


def load_predictor(config_file: str, opts: Sequence[str] = (), weights: str = "") -> Predictor:
    """The plain detector of ``config_file`` with ``MODEL.WEIGHTS`` (or ``weights``) loaded.

    Raises:
        MissingFileError: no ``MODEL.WEIGHTS``, or a weights file that does not exist.
        ConfigError: a Detectron2 config without Detectron2 installed.
        kd2.utils.errors.KD2Error: weights that do not fit the model (the backends' loaders).
    """
    from kd2.config import config_backend

    opts = list(opts) + (["MODEL.WEIGHTS", weights] if weights else [])
    if config_backend(config_file, opts) == "torchvision":
        return _torchvision_predictor(config_file, opts)
    return _detectron2_predictor(config_file, opts)


def _torchvision_predictor(config_file: str, opts: list) -> Predictor:
    from kd2.data.catalog import MetadataCatalog
    from kd2.engine.defaults import setup_cfg
    from kd2.tv.build import (
        build_plain_detector,
        label_offset,
        load_weights_strict,
        num_classes_of,
    )

    cfg = setup_cfg(config_file, opts)
    if not cfg.MODEL.WEIGHTS:
        raise MissingFileError(
            "no weights: MODEL.WEIGHTS is empty",
            "give MODEL.WEIGHTS (e.g. OUTPUT_DIR/model_final.pth of the run)",
        )
    model = build_plain_detector(cfg)
    load_weights_strict(model, cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS", config_file)
    model.eval()
    k = num_classes_of(cfg)
    return Predictor(
        model=model,
        backend="torchvision",
        cfg=cfg,
        class_names=_class_names(
            list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN), k, MetadataCatalog
        ),
        label_offset=label_offset(model),
    )


def _detectron2_predictor(config_file: str, opts: list) -> Predictor:
    try:
        from detectron2.config import get_cfg
        from detectron2.data import MetadataCatalog
        from detectron2.data import transforms as T
        from detectron2.modeling import build_model
    except ImportError:
        raise ConfigError(
            f"{config_file} is a Detectron2 config (it sets no MODEL.BACKEND torchvision), but "
            "detectron2 is not installed",
            "install it (`make install` builds it) or set MODEL.BACKEND torchvision",
        ) from None
    from kd2.d2 import add_kd_config, register_config_datasets, student_checkpointer
    from kd2.d2.student import student_config

    cfg = get_cfg()
    add_kd_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    cfg = student_config(cfg)  # the student alone: no teacher is built or loaded
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
    return Predictor(
        model=model,
        backend="detectron2",
        cfg=cfg,
        class_names=_class_names(
            list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN), k, MetadataCatalog
        ),
        _d2_resize=resize,
    )
