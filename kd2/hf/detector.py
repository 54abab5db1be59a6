"""A transformers DETR-family detector behind torchvision's detection interface.

:class:`HFDetector` holds one ``<Model>ForObjectDetection`` (``.detector``) and gives it the
interface kd2's trainer, evaluator and predictor already speak (torchvision's):

* ``forward(images, targets)`` in training: ``images`` a list of ``(3, H_i, W_i)`` RGB tensors in
  ``[0, 1]``, ``targets`` per image ``boxes`` ``(G_i, 4)`` XYXY in that image's pixels and
  ``labels`` ``(G_i,)`` in ``0..K-1``; returns the model's own loss terms (``loss_vfl``,
  ``loss_bbox``, ``loss_giou``, D-FINE's ``loss_fgl`` / ``loss_ddf``, with their ``_aux_<i>`` /
  ``_dn_<i>`` / ``_enc`` variants), already weighted: their sum is the model's loss;
* ``forward(images)`` in eval mode: per image ``boxes`` ``(D, 4)`` XYXY in the image's pixels,
  ``scores`` and ``labels`` (``0..K-1``): the top ``detections_per_image`` (query, class) pairs of
  the sigmoid scores, as transformers' ``post_process_object_detection(use_focal_loss=True)``.

Every image is resized to one square ``image_size`` (the DETR family's fixed training input; no
padding, so ``pixel_mask`` is not needed) and normalised with ``pixel_mean`` / ``pixel_std``.
Boxes are normalised ``cx, cy, w, h`` for the model (:func:`kd2.hf.data.to_hf_labels`): a box
keeps its normalised coordinates through the resize.

The state dict is the transformers model's under ``detector.``: ``save_student`` (kd2.hf.export)
writes ``.detector`` as a transformers directory.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd2.losses.query_matching import cxcywh_to_xyxy
from kd2.structures import check_target_boxes

from .data import to_hf_labels
from .models import backbone_parameters

__all__ = ["HFDetector", "postprocess", "resize_batch"]


def resize_batch(
    images: Sequence[Tensor], size: int, mean: Tensor, std: Tensor
) -> Tuple[Tensor, List[Tuple[int, int]]]:
    """``(N, 3, size, size)`` normalised batch of the images resized bilinearly to a square, and
    each image's own ``(h, w)``."""
    # the sizes stay symbolic while torch.export traces (the exported graph takes any size)
    sizes = [(im.shape[-2], im.shape[-1]) for im in images]
    resized = [
        F.interpolate(im[None].float(), size=(size, size), mode="bilinear", align_corners=False)
        for im in images
    ]
    batch = torch.cat(resized)
    return (batch - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), sizes


def postprocess(
    logits: Tensor,
    boxes: Tensor,
    image_sizes: Sequence[Tuple[int, int]],
    score_thresh: float,
    detections_per_image: int,
) -> List[Dict[str, Tensor]]:
    """Detections from ``logits`` ``(N, Q, K)`` and normalised ``cxcywh`` ``boxes`` ``(N, Q, 4)``:
    per image the top ``detections_per_image`` (query, class) pairs of the sigmoid scores above
    ``score_thresh``, boxes in the pixels of ``image_sizes`` (``(h, w)``)."""
    n, q, k = logits.shape
    scores = logits.sigmoid().reshape(n, q * k)
    top = min(int(detections_per_image), q * k)
    values, index = scores.topk(top, dim=1)
    out = []
    for i, (h, w) in enumerate(image_sizes):
        keep = values[i] > score_thresh
        query = index[i][keep] // k
        one = boxes.new_ones(())
        scale = torch.stack([one * w, one * h, one * w, one * h])
        xyxy = cxcywh_to_xyxy(boxes[i, query]) * scale
        out.append(
            {
                "boxes": xyxy.clamp(min=0).minimum(scale),
                "scores": values[i][keep],
                "labels": index[i][keep] % k,
            }
        )
    return out


class HFDetector(nn.Module):
    """A ``<Model>ForObjectDetection`` with torchvision's ``forward(images, targets)``.

    Args:
        detector: the transformers detector (:func:`kd2.hf.models.build_hf_detector` or
            :func:`kd2.hf.models.load_hf_detector`).
        image_size: the square input side (a multiple of 32).
        pixel_mean / pixel_std: per RGB channel, applied to images in ``[0, 1]``.
        score_thresh / detections_per_image: of the eval-mode detections.
    """

    def __init__(
        self,
        detector: nn.Module,
        image_size: int,
        pixel_mean: Sequence[float] = (0.0, 0.0, 0.0),
        pixel_std: Sequence[float] = (1.0, 1.0, 1.0),
        score_thresh: float = 0.0,
        detections_per_image: int = 100,
    ):
        super().__init__()
        if image_size % 32:
            raise ValueError(f"image_size {image_size} is not a multiple of 32 (the stride-32 map)")
        self.detector = detector
        self.image_size = int(image_size)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).float(), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).float(), persistent=False)
        self.score_thresh = float(score_thresh)
        self.detections_per_image = int(detections_per_image)

    @property
    def num_classes(self) -> int:
        return int(self.detector.config.num_labels)

    @property
    def model_type(self) -> str:
        return str(self.detector.config.model_type)

    def backbone_parameters(self) -> list:
        """The backbone's trainable parameters (``SOLVER.BACKBONE_LR_FACTOR``)."""
        return backbone_parameters(self.detector)

    def preprocess(self, images: Sequence[Tensor]) -> Tuple[Tensor, List[Tuple[int, int]]]:
        """The normalised square batch and each image's own ``(h, w)``."""
        return resize_batch(images, self.image_size, self.pixel_mean, self.pixel_std)

    def hf_labels(self, targets, sizes) -> List[Dict[str, Tensor]]:
        check_target_boxes(targets)
        return to_hf_labels(targets, sizes)

    def forward(self, images, targets=None):
        pixel_values, sizes = self.preprocess(images)
        if not self.training:
            out = self.detector(pixel_values=pixel_values)
            return postprocess(
                out.logits, out.pred_boxes, sizes, self.score_thresh, self.detections_per_image
            )
        if targets is None:
            raise ValueError("in training mode, targets must be given")
        out = self.detector(pixel_values=pixel_values, labels=self.hf_labels(targets, sizes))
        return loss_terms(out.loss_dict, pixel_values)


def loss_terms(loss_dict: Dict, like: Tensor) -> Dict[str, Tensor]:
    """The model's weighted loss terms as tensors (a term the model computes as a plain ``0``
    becomes a zero tensor)."""
    return {k: v if torch.is_tensor(v) else like.new_tensor(float(v)) for k, v in loss_dict.items()}
