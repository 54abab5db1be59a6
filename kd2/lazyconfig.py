"""Transformers DETR-family students and teachers in Detectron2's LazyConfig flow
(``tools/lazyconfig_train_net.py``): Detectron2's data loaders, evaluators, hooks and
checkpointer around a kd2 transformers detector.

:class:`TransformersDetector` (plain) and :class:`DistillTransformersDetector` (with teachers)
take Detectron2's batched inputs — per image a dict with ``"image"`` ``(3, H, W)`` in
``input_format`` (0-255, Detectron2's mapper), ``"instances"`` (``gt_boxes``, ``gt_classes``) in
training and ``"height"`` / ``"width"`` (the original size) — and return the model's loss dict in
training, ``[{"instances": Instances}]`` rescaled to the original size in eval mode, as every
Detectron2 meta-architecture does. Called with a list of image tensors they keep the
torchvision interface of :class:`kd2.hf.detector.HFDetector` (kd2's own loop, a student's
``detections`` part), and their state dict is ``HFDetector``'s: weights move between
``tools/train_net.py`` and LazyConfig runs as they are.

Example (``configs/Detectron2-Quick/lazy_dfine_pico_KDDETR_quick.py``)::

    model = L(DistillTransformersDetector)(
        detector=L(build_hf_detector)(model_type="d_fine", preset="pico", num_classes=80),
        image_size=256,
        teacher=L(load_teacher)(model=<a TransformersDetector LazyCall>, weights="..."),
        kd_cfg=L(kd_config)(METHODS=["KDDETR"]),
    )
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from torch import Tensor, nn

from kd2.hf.detector import HFDetector
from kd2.hf.meta_arch import KDHFDetector
from kd2.utils.errors import ConfigError

__all__ = ["DistillTransformersDetector", "TransformersDetector"]


class Detectron2Inputs:
    """Mixin (before a detector with torchvision's ``forward(images, targets)``): Detectron2's
    batched inputs in, Detectron2's outputs out; lists of tensors pass through unchanged."""

    #: the channel order of Detectron2's ``"image"`` tensors (``INPUT.FORMAT``, the mapper's
    #: ``image_format``): ``"BGR"`` or ``"RGB"``
    input_format: str = "BGR"

    def _set_input_format(self, input_format: str) -> None:
        if input_format not in ("BGR", "RGB"):
            raise ConfigError(
                f"input_format {input_format!r} is not a channel order kd2 reads",
                "give 'BGR' or 'RGB' (the data loader's image_format)",
            )
        self.input_format = input_format

    def _rgb(self, image: Tensor) -> Tensor:
        image = image.to(self.pixel_mean.device).float() / 255.0
        return image.flip(0) if self.input_format == "BGR" else image

    def forward(self, images, targets=None):
        if not len(images) or not isinstance(images[0], dict):
            return super().forward(images, targets)
        batched: Sequence[dict] = images
        rgb = [self._rgb(d["image"]) for d in batched]
        if self.training:
            device = self.pixel_mean.device
            targets = [
                {
                    "boxes": d["instances"].gt_boxes.tensor.to(device),
                    "labels": d["instances"].gt_classes.to(device),
                }
                for d in batched
            ]
            return super().forward(rgb, targets)
        out = []
        for d, image, det in zip(batched, rgb, super().forward(rgb)):
            size = tuple(image.shape[-2:])
            inst = Instances(size)
            inst.pred_boxes = Boxes(det["boxes"])
            inst.scores = det["scores"]
            inst.pred_classes = det["labels"]
            height, width = d.get("height", size[0]), d.get("width", size[1])
            out.append({"instances": detector_postprocess(inst, height, width)})
        return out


class TransformersDetector(Detectron2Inputs, HFDetector):
    """A transformers DETR-family detector (:class:`kd2.hf.detector.HFDetector`) for LazyConfig.

    Args:
        detector: the ``<Model>ForObjectDetection`` (``kd2.hf.models.build_hf_detector`` or
            ``load_hf_detector``).
        image_size / pixel_mean / pixel_std / score_thresh / detections_per_image: as
            :class:`~kd2.hf.detector.HFDetector` (mean and std of RGB images in ``[0, 1]``).
        input_format: the channel order of the data loader's images.
    """

    def __init__(self, *, detector: nn.Module, input_format: str = "BGR", **kwargs):
        super().__init__(detector, **kwargs)
        self._set_input_format(input_format)


class DistillTransformersDetector(Detectron2Inputs, KDHFDetector):
    """A transformers DETR-family student with frozen teachers for LazyConfig.

    Args:
        detector / image_size / pixel_mean / pixel_std / score_thresh / detections_per_image /
            input_format: the student, as :class:`TransformersDetector`.
        teacher: ``KD.TEACHER`` (``kd2.d2.lazy.load_teacher`` of a :class:`TransformersDetector`,
            or any backend's detector).
        kd_cfg: the ``KD`` options (``kd2.d2.lazy.kd_config``).
    """

    #: the plain class ``tools/lazyconfig_train_net.py --eval-only`` builds (no teacher)
    plain_model = TransformersDetector

    def __init__(
        self,
        *,
        detector: nn.Module,
        kd_cfg,
        teacher: nn.Module | None = None,
        input_format: str = "BGR",
        **kwargs,
    ):
        super().__init__(cfg=SimpleNamespace(KD=kd_cfg), teacher=teacher, detector=detector,
                         **kwargs)  # fmt: skip
        self._set_input_format(input_format)
