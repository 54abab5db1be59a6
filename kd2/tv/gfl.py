"""GFL (Generalized Focal Loss, Li et al., NeurIPS 2020) as a torchvision detection model.

Neither torchvision nor Detectron2 ships GFL or ATSS; :class:`GFL` is built like torchvision's
``RetinaNet`` / ``FCOS`` (a ``GeneralizedRCNNTransform``, a backbone with FPN, a head, the same
call convention: ``model(images, targets)`` returns a loss dict in train mode and a list of
``{"boxes", "scores", "labels"}`` in eval mode). The math follows the official GFocal code and
mmdetection 2.x (``mmdet/models/dense_heads/gfl_head.py``, ``mmdet/core/bbox/assigners/
atss_assigner.py``, ``mmdet/models/losses/gfocal_loss.py``, ``mmdet/core/bbox/transforms.py``;
config ``gfl_r50_fpn_1x_coco.py``):

* **Anchors.** One square per location, side ``octave_base_scale * stride`` (8 s), centred at
  ``(x s, y s)`` of level stride ``s`` (mmdet's ``center_offset = 0``, as torchvision's
  ``AnchorGenerator``). The strides are the nominal FPN strides (8..128), not ``image // grid``.
* **ATSS assignment** (:func:`atss_assign`): per level the ``topk`` (9) anchors whose centres are
  nearest (L2) to the GT centre; IoU threshold = mean + std (unbiased) of the candidates' IoUs;
  a candidate is positive when its IoU >= the threshold and its centre lies inside the GT
  (all four side distances > 0.01); an anchor positive for several GTs takes the GT of max IoU.
  Only *valid* anchors take part: locations inside the image's own padded size (mmdet's
  ``valid_flags`` of ``pad_shape``); the rest of the batch padding is ignored (no loss).
* **Head** (:class:`GFLHead`): per branch 4 × (conv3×3 → GroupNorm(32) → ReLU), a 3×3 conv to
  ``K`` joint class-quality logits (bias at prior 0.01), a 3×3 conv to ``4 (reg_max + 1)``
  distribution logits times a learnable :class:`Scale` per level.
* **Integral** (:func:`integral`): side distance ``= Σ_i softmax(z)_i · i`` in units of the
  stride, ``i ∈ {0..reg_max}``; boxes ``= centre ∓ / ± distance · stride``.
* **Losses** (:meth:`GFLHead.compute_loss`), all in fp32:

  - ``loss_qfl`` = 1.0 · Σ_{valid anchors, classes} QFL / ``num_pos``, QFL with β = 2 and the
    target ``IoU(decoded prediction (detached), GT)`` at the positive's class, 0 elsewhere
    (:func:`quality_focal_loss`); ``num_pos = Σ_images max(#positives, 1)``;
  - ``loss_giou`` = 2.0 · Σ_pos w · (1 − GIoU) / W on boxes in stride units;
  - ``loss_dfl`` = 0.25 · Σ_pos Σ_sides w · DFL / (4 W) (:func:`distribution_focal_loss`),
    targets = GT side distances / stride clamped to ``[0, reg_max − 0.1]``;

  with ``w`` the detached max sigmoid class score of the positive's prediction and
  ``W = max(Σ_pos w, 1)`` (mmdet 2.x ``avg_factor``).
* **Inference** (torchvision's FCOS/RetinaNet post-processing): per level the (location, class)
  pairs with ``sigmoid > score_thresh`` (0.05), the ``topk_candidates`` (1000) best, decoded and
  clipped; class-wise NMS at ``nms_thresh`` (0.6); ``detections_per_img`` (100) kept.

Labels are contiguous ``0..K-1`` (no background channel), like torchvision's RetinaNet/FCOS.
The tensor math (integral, QFL, DFL, ATSS, the losses, the box coder, ``Scale``) lives in
:mod:`kd2.modeling.gfl`, shared with the Detectron2 GFL (:mod:`kd2.d2.gfl`); this module is the
torchvision detector around it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops
from torchvision.ops.misc import Conv2dNormActivation

from kd2.modeling.gfl import (
    GFLBoxCoder,
    Scale,
    atss_assign,
    box_centres,
    distribution_focal_loss,
    gfl_losses,
    integral,
    quality_focal_loss,
)

__all__ = [
    "GFL",
    "GFLBoxCoder",
    "GFLHead",
    "Scale",
    "atss_assign",
    "distribution_focal_loss",
    "gfl_losses",
    "integral",
    "quality_focal_loss",
]


def _tower(in_channels: int, num_convs: int, norm_layer: Callable[..., nn.Module]) -> nn.Sequential:
    tower = nn.Sequential(
        *[
            Conv2dNormActivation(in_channels, in_channels, norm_layer=norm_layer)
            for _ in range(num_convs)
        ]
    )
    for m in tower.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return tower


def _to_rows(x: Tensor) -> Tensor:
    """``(N, C, H, W)`` -> ``(N, H W, C)`` (location-major, like the anchors)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c)


class GFLClassificationHead(nn.Module):
    """The joint class-quality branch: 4 conv-GN-ReLU, then a 3×3 conv to ``K`` logits."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_convs: int = 4,
        prior_probability: float = 0.01,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv = _tower(in_channels, num_convs, norm_layer or partial(nn.GroupNorm, 32))
        self.cls_logits = nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=1)
        nn.init.normal_(self.cls_logits.weight, std=0.01)
        nn.init.constant_(
            self.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability)
        )

    def forward(self, x: List[Tensor]) -> Tensor:
        return torch.cat([_to_rows(self.cls_logits(self.conv(f))) for f in x], dim=1)


class GFLRegressionHead(nn.Module):
    """The box branch: 4 conv-GN-ReLU, a 3×3 conv to ``4 (reg_max + 1)`` distribution logits, a
    learnable :class:`Scale` per level."""

    def __init__(
        self,
        in_channels: int,
        num_levels: int,
        reg_max: int = 16,
        num_convs: int = 4,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.reg_max = reg_max
        self.conv = _tower(in_channels, num_convs, norm_layer or partial(nn.GroupNorm, 32))
        self.bbox_reg = nn.Conv2d(in_channels, 4 * (reg_max + 1), kernel_size=3, padding=1)
        nn.init.normal_(self.bbox_reg.weight, std=0.01)
        nn.init.zeros_(self.bbox_reg.bias)
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)])

    def forward(self, x: List[Tensor]) -> Tensor:
        if len(x) != len(self.scales):
            raise ValueError(f"GFL head has {len(self.scales)} levels, got {len(x)} feature maps")
        return torch.cat(
            [_to_rows(s(self.bbox_reg(self.conv(f)))) for f, s in zip(x, self.scales)], dim=1
        )


class GFLHead(nn.Module):
    """GFL's head and its losses.

    Args:
        in_channels: FPN channels (the towers keep them).
        num_classes: ``K``.
        num_levels: FPN levels (one :class:`Scale` each).
        reg_max: distribution bins ``0..reg_max``.
        num_convs: convs per tower.
        qfl_beta: QFL's ``β``.
        loss_weights: ``(QFL, DFL, GIoU)`` weights.
        octave_base_scale: anchor side / stride (for :attr:`box_coder`).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_levels: int = 5,
        reg_max: int = 16,
        num_convs: int = 4,
        prior_probability: float = 0.01,
        norm_layer: Callable[..., nn.Module] | None = None,
        qfl_beta: float = 2.0,
        loss_weights: Tuple[float, float, float] = (1.0, 0.25, 2.0),
        octave_base_scale: float = 8.0,
    ) -> None:
        super().__init__()
        self.reg_max = reg_max
        self.qfl_beta = float(qfl_beta)
        self.loss_weights = tuple(float(w) for w in loss_weights)
        self.box_coder = GFLBoxCoder(octave_base_scale)
        self.classification_head = GFLClassificationHead(
            in_channels, num_classes, num_convs, prior_probability, norm_layer
        )
        self.regression_head = GFLRegressionHead(
            in_channels, num_levels, reg_max, num_convs, norm_layer
        )

    def forward(self, x: List[Tensor]) -> Dict[str, Tensor]:
        """``cls_logits (N, R, K)`` and ``bbox_regression (N, R, 4 (reg_max + 1))`` (the
        distribution logits after the level's :class:`Scale`), levels concatenated."""
        return {
            "cls_logits": self.classification_head(x),
            "bbox_regression": self.regression_head(x),
        }

    def compute_loss(
        self,
        targets: List[Dict[str, Tensor]],
        head_outputs: Dict[str, Tensor],
        anchors: List[Tensor],
        matched_idxs: List[Tensor],
        strides: Sequence[int],
    ) -> Dict[str, Tensor]:
        """``loss_qfl``, ``loss_dfl`` and ``loss_giou`` of a batch.

        Args:
            targets: per image ``boxes (G_i, 4)`` and ``labels (G_i,)`` in ``0..K-1``.
            head_outputs: :meth:`forward`'s dict.
            anchors: per level ``(R_l, 4)`` anchors shared by the images.
            matched_idxs: per image ``(R,)``: GT index, ``-1`` background, ``-2`` ignored.
            strides: per level stride.
        """
        cls_logits = head_outputs["cls_logits"]
        n, r, k = cls_logits.shape
        anchor_stride = torch.cat(
            [a.new_full((a.shape[0],), float(s)) for a, s in zip(anchors, strides)]
        )
        matched = torch.stack(matched_idxs)  # (N, R)
        labels = torch.full((n, r), k, dtype=torch.int64, device=cls_logits.device)
        gt = cls_logits.new_zeros((n, r, 4), dtype=torch.float32)
        for i, (m, t) in enumerate(zip(matched_idxs, targets)):
            fg = m >= 0
            if fg.any():
                labels[i, fg] = t["labels"][m[fg]]
                gt[i, fg] = t["boxes"][m[fg]].float()
        labels[matched == -2] = -1
        return gfl_losses(
            cls_logits,
            head_outputs["bbox_regression"],
            torch.cat(anchors),
            anchor_stride,
            labels,
            gt,
            self.reg_max,
            self.qfl_beta,
            self.loss_weights,
        )


# -- the detector -------------------------------------------------------------------------


class GFL(nn.Module):
    """GFL with ATSS assignment, in torchvision's detection-model style.

    The input is a list of ``(3, H, W)`` tensors in ``[0, 1]``; in training mode also targets
    (``boxes`` XYXY, ``labels`` in ``0..K-1``). Train mode returns ``{"loss_qfl", "loss_dfl",
    "loss_giou"}``; eval mode a list of ``{"boxes", "scores", "labels"}`` per image, in the
    original image coordinates.

    Args:
        backbone: returns an ``OrderedDict`` of FPN maps (finest first) and has
            ``out_channels``.
        num_classes: ``K`` (no background class).
        min_size, max_size, image_mean, image_std: ``GeneralizedRCNNTransform`` arguments.
        head: defaults to :class:`GFLHead`.
        anchor_strides: the nominal stride of every FPN level.
        octave_base_scale: anchor side / stride (ATSS: 8).
        reg_max: distribution bins ``0..reg_max``.
        atss_topk: ATSS candidates per level and GT.
        qfl_beta, loss_weights: see :class:`GFLHead` (used when ``head`` is ``None``).
        score_thresh, nms_thresh, detections_per_img, topk_candidates: post-processing.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        min_size: int = 800,
        max_size: int = 1333,
        image_mean: List[float] | None = None,
        image_std: List[float] | None = None,
        head: nn.Module | None = None,
        anchor_strides: Sequence[int] = (8, 16, 32, 64, 128),
        octave_base_scale: float = 8.0,
        reg_max: int = 16,
        atss_topk: int = 9,
        qfl_beta: float = 2.0,
        loss_weights: Tuple[float, float, float] = (1.0, 0.25, 2.0),
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        **kwargs,
    ):
        super().__init__()
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone should have an out_channels attribute (the FPN width)")
        if reg_max < 1:
            raise ValueError(f"reg_max must be >= 1, got {reg_max}")
        self.backbone = backbone
        self.anchor_strides = [int(s) for s in anchor_strides]
        self.octave_base_scale = float(octave_base_scale)
        self.reg_max = int(reg_max)
        self.atss_topk = int(atss_topk)
        if head is None:
            head = GFLHead(
                backbone.out_channels,
                num_classes,
                num_levels=len(self.anchor_strides),
                reg_max=self.reg_max,
                qfl_beta=qfl_beta,
                loss_weights=loss_weights,
                octave_base_scale=self.octave_base_scale,
            )
        self.head = head
        self.box_coder = GFLBoxCoder(self.octave_base_scale)
        if image_mean is None:
            image_mean = [0.485, 0.456, 0.406]
        if image_std is None:
            image_std = [0.229, 0.224, 0.225]
        self.transform = GeneralizedRCNNTransform(
            min_size, max_size, image_mean, image_std, **kwargs
        )
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates

    # -- anchors and assignment ------------------------------------------------------------
    def grid_anchors(self, images: ImageList, features: List[Tensor]) -> List[Tensor]:
        """Per level ``(H_l W_l, 4)`` anchors (location-major), shared by the batch."""
        if len(features) != len(self.anchor_strides):
            raise ValueError(
                f"GFL has {len(self.anchor_strides)} anchor strides {self.anchor_strides} but the "
                f"backbone returned {len(features)} feature maps"
            )
        hp, wp = images.tensors.shape[-2:]
        out = []
        for f, s in zip(features, self.anchor_strides):
            h, w = f.shape[-2:]
            # a config check of eager runs (an exported graph's sizes are symbols)
            if not torch.compiler.is_compiling() and (h, w) != (-(-hp // s), -(-wp // s)):
                raise ValueError(
                    f"a feature map of {h}x{w} on a {hp}x{wp} input is not stride {s}; "
                    f"GFL's anchor strides {self.anchor_strides} must be the FPN's"
                )
            ys = torch.arange(h, device=f.device, dtype=torch.float32) * s
            xs = torch.arange(w, device=f.device, dtype=torch.float32) * s
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            ctr = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 4)
            half = self.octave_base_scale * s / 2
            out.append(ctr + ctr.new_tensor([-half, -half, half, half]))
        return out

    def valid_anchors(self, anchors: List[Tensor], image_sizes: List[Tuple[int, int]]) -> Tensor:
        """``(N, R)`` bool: anchors whose location lies inside the image's own padded size
        (mmdet's ``valid_flags``: ``x < ceil(W_pad / s)`` ⟺ ``x s < W_pad``)."""
        ctr = box_centres(torch.cat(anchors))
        div = int(self.transform.size_divisible)
        rows = []
        for h, w in image_sizes:
            hp, wp = -(-int(h) // div) * div, -(-int(w) // div) * div
            rows.append((ctr[:, 0] < wp) & (ctr[:, 1] < hp))
        return torch.stack(rows)

    def assign_targets(
        self,
        targets: List[Dict[str, Tensor]],
        anchors: List[Tensor],
        image_sizes: List[Tuple[int, int]],
    ) -> List[Tensor]:
        """ATSS on the valid anchors of each image: per image ``(R,)`` GT index, ``-1``
        background, ``-2`` ignored (an invalid anchor in the batch padding)."""
        flat = torch.cat(anchors)
        level = torch.cat(
            [torch.full((a.shape[0],), i, device=flat.device) for i, a in enumerate(anchors)]
        )
        valid = self.valid_anchors(anchors, image_sizes)
        out = []
        for t, v in zip(targets, valid):
            m = torch.full((flat.shape[0],), -2, dtype=torch.int64, device=flat.device)
            counts = torch.bincount(level[v], minlength=len(anchors)).tolist()
            m[v] = atss_assign(flat[v], counts, t["boxes"], self.atss_topk)
            out.append(m)
        return out

    def compute_loss(
        self,
        targets: List[Dict[str, Tensor]],
        head_outputs: Dict[str, Tensor],
        anchors: List[Tensor],
        image_sizes: List[Tuple[int, int]],
    ) -> Dict[str, Tensor]:
        matched = self.assign_targets(targets, anchors, image_sizes)
        return self.head.compute_loss(targets, head_outputs, anchors, matched, self.anchor_strides)

    # -- inference ---------------------------------------------------------------------------
    def postprocess_detections(
        self,
        head_outputs: Dict[str, Tensor],
        anchors: List[Tensor],
        image_shapes: List[Tuple[int, int]],
    ) -> List[Dict[str, Tensor]]:
        counts = [a.shape[0] for a in anchors]
        logits = head_outputs["cls_logits"].split(counts, dim=1)
        dists = head_outputs["bbox_regression"].split(counts, dim=1)
        detections = []
        for i, image_shape in enumerate(image_shapes):
            boxes_all, scores_all, labels_all = [], [], []
            for lg, dl, anc in zip(logits, dists, anchors):
                k = lg.shape[-1]
                scores = torch.sigmoid(lg[i]).flatten()
                keep = scores > self.score_thresh
                scores = scores[keep]
                idxs = torch.where(keep)[0]
                # torchvision's k: min(topk, #candidates) in eager, a graph value when traced
                scores, top = scores.topk(det_utils._topk_min(scores, self.topk_candidates, 0))
                idxs = idxs[top]
                anchor_idxs = torch.div(idxs, k, rounding_mode="floor")
                distances = integral(dl[i, anchor_idxs], self.reg_max)
                boxes = self.box_coder.decode(distances, anc[anchor_idxs])
                boxes_all.append(box_ops.clip_boxes_to_image(boxes, image_shape))
                scores_all.append(scores)
                labels_all.append(idxs % k)
            boxes, scores, labels = (
                torch.cat(boxes_all),
                torch.cat(scores_all),
                torch.cat(labels_all),
            )
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)
            keep = keep[: self.detections_per_img]
            detections.append(
                {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
            )
        return detections

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self, images: List[Tensor], targets: List[Dict[str, Tensor]] | None = None
    ) -> Dict[str, Tensor] | List[Dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("in training mode, targets must be given")
            for t in targets:
                b = t["boxes"]
                if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[-1] != 4:
                    raise ValueError(f"expected target boxes of shape (G, 4), got {b}")
        # the sizes as they are (ints in eager; int() would bake them into an exported graph)
        original_image_sizes = [(img.shape[-2], img.shape[-1]) for img in images]
        images, targets = self.transform(images, targets)
        if self.training:
            for t in targets:
                b = t["boxes"]
                if b.numel() and not bool(torch.all(b[:, 2:] > b[:, :2])):
                    raise ValueError(f"degenerate box (x2 <= x1 or y2 <= y1) in target {t}")
        features = self.backbone(images.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        maps = list(features.values())
        head_outputs = self.head(maps)
        anchors = self.grid_anchors(images, maps)
        if self.training:
            return self.compute_loss(targets, head_outputs, anchors, images.image_sizes)
        detections = self.postprocess_detections(head_outputs, anchors, images.image_sizes)
        return self.transform.postprocess(detections, images.image_sizes, original_image_sizes)
