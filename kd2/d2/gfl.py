"""GFL (Generalized Focal Loss, ATSS assignment) as a Detectron2 meta-architecture.

The Detectron2 counterpart of :mod:`kd2.tv.gfl` (whose docstring gives the math): the same
detector, built like Detectron2's ``FCOS`` on :class:`DenseDetector` (``preprocess_image``,
``backbone``, ``head``, ``forward_training`` / ``forward_inference``, Detectron2's batched input
dicts and ``Instances``). Everything numeric comes from :mod:`kd2.modeling.gfl`, shared with
:mod:`kd2.tv.gfl` — ATSS assignment, the losses (QFL, DFL, GIoU with their weights and
normalisers), the integral, the box coder and ``Scale`` — so with the same weights and input
both backends give the same head outputs, anchors, labels, losses and detections
(``tests/d2/test_gfl.py``).

Detectron2 specifics:

* **Anchors**: ``DefaultAnchorGenerator(sizes=[[octave_base_scale * s]], aspect_ratios=[1.0],
  offset=0.0)``: one square of side ``8 s`` per location centred at ``(x s, y s)``, the values of
  :meth:`kd2.tv.gfl.GFL.grid_anchors`; ``s`` is the backbone's stride of each head feature.
* **Valid anchors**: locations inside each image's *own* padded size, i.e. ``Instances.image_size``
  padded alone as ``ImageList.from_tensors`` would (``backbone.size_divisibility`` and
  ``padding_constraints``); the rest of the batch padding is ignored (label ``-1``, no loss).
* **Head** (:class:`GFLHead`): Detectron2's ``RetinaNetHead`` layout (flat ``cls_subnet`` /
  ``bbox_subnet`` of ``conv 3x3, GroupNorm(32), ReLU``, ``cls_score``, ``bbox_pred``) plus a
  learnable ``Scale`` per level. The tower convs have no bias when normalised (mmdet's
  ``ConvModule`` and torchvision's ``Conv2dNormActivation``, hence kd2's torchvision GFL).
* **Labels** (:meth:`GFL.label_anchors`): Detectron2's dense convention, ``-1`` ignore,
  ``0..K-1`` foreground, ``K`` background, per image, with the matched GT boxes.
* **Config**: registered in ``META_ARCH_REGISTRY`` as ``"GFL"`` and ``@configurable``; the yacs
  keys are ``MODEL.GFL.*`` (added by :func:`kd2.d2.add_kd_config`: the torchvision backend's keys
  plus ``IN_FEATURES``, ``NUM_CONVS``, ``NORM``, ``PRIOR_PROB``), ``TEST.DETECTIONS_PER_IMAGE``,
  ``MODEL.PIXEL_MEAN/STD``, ``INPUT.FORMAT``. ``MODEL.ANCHOR_GENERATOR`` is not read. For
  LazyConfig, :func:`gfl_lazy_model` gives the plain model.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms, get_norm
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from kd2.modeling.gfl import GFLBoxCoder, Scale, atss_assign, gfl_losses, integral
from kd2.modeling.prototypes import own_padded_size
from kd2.structures import DenseOutputs

__all__ = ["GFL", "GFLBox2BoxTransform", "GFLHead", "gfl_lazy_model"]


class GFLBox2BoxTransform(GFLBoxCoder):
    """:class:`kd2.modeling.gfl.GFLBoxCoder` with Detectron2's ``Box2BoxTransform`` method names, so
    that ``DenseDetector._decode_per_level_predictions`` decodes GFL's side distances."""

    def apply_deltas(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """``(R, 4)`` side distances (stride units) on ``(R, 4)`` anchors -> ``(R, 4)`` XYXY."""
        return self.decode(deltas, boxes)

    def get_deltas(self, src_boxes: Tensor, target_boxes: Tensor) -> Tensor:
        """``(R, 4)`` target boxes -> their side distances from the ``src_boxes`` anchors."""
        return self.encode(target_boxes, src_boxes)


def _tower(in_channels: int, conv_dims: Sequence[int], norm: str) -> nn.Sequential:
    layers: List[nn.Module] = []
    for c_in, c_out in zip([in_channels, *conv_dims], conv_dims):
        layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=not norm))
        if norm:
            layers.append(get_norm(norm, c_out))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class GFLHead(nn.Module):
    """GFL's head in Detectron2's ``RetinaNetHead`` layout.

    Args:
        input_shape: one :class:`ShapeSpec` per FPN level (their channels must agree).
        num_classes: ``K`` joint class-quality outputs (no background channel).
        conv_dims: output channels of each tower conv (4 x the FPN width in GFL).
        norm: Detectron2 norm name of the tower convs (``"GN"``: ``GroupNorm(32)``; ``""``: none,
            then the convs have a bias).
        prior_prob: initial foreground probability of ``cls_score``.
        reg_max: distribution bins ``0..reg_max`` per side.
    """

    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        conv_dims: List[int],
        norm: str = "GN",
        prior_prob: float = 0.01,
        reg_max: int = 16,
    ) -> None:
        super().__init__()
        if len({s.channels for s in input_shape}) != 1:
            raise ValueError(f"GFLHead needs FPN levels of one width, got {input_shape}")
        self.num_classes = int(num_classes)
        self.reg_max = int(reg_max)
        self._num_features = len(input_shape)
        in_channels = input_shape[0].channels
        self.cls_subnet = _tower(in_channels, conv_dims, norm)
        self.bbox_subnet = _tower(in_channels, conv_dims, norm)
        self.cls_score = nn.Conv2d(conv_dims[-1], num_classes, kernel_size=3, padding=1)
        self.bbox_pred = nn.Conv2d(conv_dims[-1], 4 * (reg_max + 1), kernel_size=3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in input_shape])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Per level ``(N, K, H_l, W_l)`` class-quality logits and ``(N, 4 (reg_max + 1), H_l,
        W_l)`` distribution logits (after the level's :class:`~kd2.modeling.gfl.Scale`)."""
        if len(features) != self._num_features:
            raise ValueError(f"GFLHead has {self._num_features} levels, got {len(features)} maps")
        logits, dists = [], []
        for feature, scale in zip(features, self.scales):
            logits.append(self.cls_score(self.cls_subnet(feature)))
            dists.append(scale(self.bbox_pred(self.bbox_subnet(feature))))
        return logits, dists


def _anchor_tensors(anchors: Sequence[Boxes | Tensor]) -> List[Tensor]:
    return [a.tensor if isinstance(a, Boxes) else a for a in anchors]


@META_ARCH_REGISTRY.register()
class GFL(DenseDetector):
    """GFL with ATSS assignment (see the module docstring).

    Train mode returns ``{"loss_qfl", "loss_dfl", "loss_giou"}`` (the formulas of
    :func:`kd2.modeling.gfl.gfl_losses`, normalised per batch as mmdet 2.x, no EMA); eval mode a
    list of ``{"instances": Instances}``.

    Args:
        backbone, head, head_in_features, pixel_mean, pixel_std: as ``DenseDetector``.
        num_classes: ``K``.
        reg_max: distribution bins ``0..reg_max`` (must be the head's).
        octave_base_scale: anchor side / stride (ATSS: 8).
        atss_topk: ATSS candidates per level and GT.
        qfl_beta: QFL's ``β``.
        loss_weights: ``(QFL, DFL, GIoU)`` weights.
        test_score_thresh, test_topk_candidates, test_nms_thresh, max_detections_per_image:
            post-processing (per level: score > thresh, the top-k; class-wise NMS; the best
            ``max_detections_per_image``), as torchvision's RetinaNet/FCOS and kd2's tv GFL.
        input_format: ``"BGR"`` or ``"RGB"``, the channel order of the 0-255 input images.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: nn.Module,
        head_in_features: List[str] | None = None,
        num_classes: int,
        reg_max: int = 16,
        octave_base_scale: float = 8.0,
        atss_topk: int = 9,
        qfl_beta: float = 2.0,
        loss_weights: Sequence[float] = (1.0, 0.25, 2.0),
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.6,
        max_detections_per_image: int = 100,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "BGR",
    ) -> None:
        super().__init__(
            backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        if reg_max < 1:
            raise ValueError(f"reg_max must be >= 1, got {reg_max}")
        if getattr(head, "reg_max", reg_max) != reg_max:
            raise ValueError(f"the head has reg_max {head.reg_max}, the detector {reg_max}")
        self.num_classes = int(num_classes)
        self.reg_max = int(reg_max)
        self.octave_base_scale = float(octave_base_scale)
        self.atss_topk = int(atss_topk)
        self.qfl_beta = float(qfl_beta)
        self.loss_weights = tuple(float(w) for w in loss_weights)
        if len(self.loss_weights) != 3:
            raise ValueError(f"loss_weights are (QFL, DFL, GIoU), got {loss_weights}")
        shapes = backbone.output_shape()
        self.anchor_strides = [int(shapes[f].stride) for f in self.head_in_features]
        self.anchor_generator = DefaultAnchorGenerator(
            sizes=[[self.octave_base_scale * s] for s in self.anchor_strides],
            aspect_ratios=[1.0],
            strides=self.anchor_strides,
            offset=0.0,
        )
        self.box2box_transform = GFLBox2BoxTransform(self.octave_base_scale)
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg) -> Dict[str, object]:
        if "GFL" not in cfg.MODEL:
            raise KeyError("cfg.MODEL.GFL is missing: call kd2.d2.add_kd_config(cfg) first")
        g = cfg.MODEL.GFL
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in g.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(f"MODEL.GFL.IN_FEATURES {missing} are not backbone outputs {shapes}")
        feature_shapes = [shapes[f] for f in g.IN_FEATURES]
        head = GFLHead(
            input_shape=feature_shapes,
            num_classes=g.NUM_CLASSES,
            conv_dims=[feature_shapes[0].channels] * g.NUM_CONVS,
            norm=g.NORM,
            prior_prob=g.PRIOR_PROB,
            reg_max=g.REG_MAX,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": list(g.IN_FEATURES),
            "num_classes": g.NUM_CLASSES,
            "reg_max": g.REG_MAX,
            "octave_base_scale": g.OCTAVE_BASE_SCALE,
            "atss_topk": g.ATSS_TOPK,
            "qfl_beta": g.QFL_BETA,
            "loss_weights": (g.LOSS_QFL_WEIGHT, g.LOSS_DFL_WEIGHT, g.LOSS_GIOU_WEIGHT),
            "test_score_thresh": g.SCORE_THRESH_TEST,
            "test_topk_candidates": g.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": g.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
        }

    # -- head outputs ------------------------------------------------------------------------
    def _transpose(self, predictions) -> List[List[Tensor]]:
        """Head maps -> per level ``(N, R_l, K)`` logits and ``(N, R_l, 4 (reg_max + 1))``."""
        return self._transpose_dense_predictions(
            predictions, [self.num_classes, 4 * (self.reg_max + 1)]
        )

    def dense_outputs(
        self, features: List[Tensor], strides: List[int] | None = None
    ) -> Tuple[DenseOutputs, List[Boxes], List[List[Tensor]]]:
        """Run the head on the ``head_in_features`` maps and lay it out as the KD record.

        Returns:
            the :class:`~kd2.structures.DenseOutputs` part (no labels): ``cls_logits`` per
            level ``(N, R_l, K)``, ``box_dist`` ``(N, R_l, 4 (reg_max + 1))``, ``box_deltas``
            their :func:`~kd2.modeling.gfl.integral` ``(N, R_l, 4)`` in stride units,
            ``anchors`` the ATSS squares ``(R_l, 4)``, ``box_coder`` a
            :class:`GFLBox2BoxTransform`; the anchors as ``Boxes``; the transposed
            ``[logits, dists]`` that :meth:`losses` takes.
        """
        logits, dists = self._transpose(self.head(features))
        anchors = self.anchor_generator(features)
        record = DenseOutputs(
            cls_logits=logits,
            box_deltas=[integral(d, self.reg_max) for d in dists],
            anchors=[b.tensor for b in anchors],
            strides=list(strides) if strides is not None else list(self.anchor_strides),
            num_anchors_per_loc=1,
            num_classes=self.num_classes,
            grid_sizes=[tuple(f.shape[-2:]) for f in features],
            box_coder=self.box2box_transform,
            box_dist=dists,
        )
        return record, anchors, [logits, dists]

    # -- assignment --------------------------------------------------------------------------
    def own_padded_size(self, image_size: Sequence[int]) -> Tuple[int, int]:
        """``(H_p, W_p)`` of one image padded alone as ``ImageList.from_tensors`` pads a batch
        (``padding_constraints``' square size, then the size divisibility)."""
        constraints = getattr(self.backbone, "padding_constraints", None) or {}
        div = int(constraints.get("size_divisibility", self.backbone.size_divisibility))
        square = int(constraints.get("square_size", 0))
        return own_padded_size((square, square) if square > 0 else image_size, div)

    def valid_anchors(
        self, anchors: Sequence[Boxes | Tensor], image_sizes: Sequence[Sequence[int]]
    ) -> Tensor:
        """``(N, R)`` bool: anchors whose location lies inside the image's own padded size."""
        flat = torch.cat(_anchor_tensors(anchors))
        ctr = (flat[:, :2] + flat[:, 2:]) / 2
        rows = []
        for size in image_sizes:
            hp, wp = self.own_padded_size(size)
            rows.append((ctr[:, 0] < wp) & (ctr[:, 1] < hp))
        return torch.stack(rows)

    @torch.no_grad()
    def label_anchors(
        self, anchors: Sequence[Boxes | Tensor], gt_instances: List[Instances]
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """ATSS on each image's valid anchors (``Instances.image_size`` is the image's size).

        Args:
            anchors: per level ``(R_l, 4)`` anchors (``Boxes`` or tensors).
            gt_instances: per image, ``gt_boxes`` and ``gt_classes`` in ``0..K-1``.

        Returns:
            per image ``(R,)`` int64 labels: ``-1`` ignore (outside the image's own padded size),
            ``0..K-1`` foreground, ``K`` background; and ``(R, 4)`` matched GT boxes (zeros where
            nothing is matched).
        """
        per_level = _anchor_tensors(anchors)
        flat = torch.cat(per_level)
        level = torch.cat(
            [torch.full((a.shape[0],), i, device=flat.device) for i, a in enumerate(per_level)]
        )
        valid = self.valid_anchors(per_level, [inst.image_size for inst in gt_instances])
        gt_labels, matched_boxes = [], []
        for inst, v in zip(gt_instances, valid):
            boxes = inst.gt_boxes.tensor
            matched = torch.full((flat.shape[0],), -1, dtype=torch.int64, device=flat.device)
            counts = torch.bincount(level[v], minlength=len(per_level)).tolist()
            matched[v] = atss_assign(flat[v], counts, boxes, self.atss_topk)
            labels = torch.full_like(matched, self.num_classes)
            if len(inst) > 0:
                fg = matched >= 0
                labels[fg] = inst.gt_classes[matched[fg]]
                matched_boxes.append(boxes[matched.clamp(min=0)])
            else:
                matched_boxes.append(flat.new_zeros((flat.shape[0], 4)))
            labels[~v] = -1
            gt_labels.append(labels)
        return gt_labels, matched_boxes

    # -- training ----------------------------------------------------------------------------
    def losses(
        self,
        anchors: Sequence[Boxes | Tensor],
        pred_logits: List[Tensor],
        gt_labels: List[Tensor],
        pred_dists: List[Tensor],
        gt_boxes: List[Tensor],
    ) -> Dict[str, Tensor]:
        """``loss_qfl``, ``loss_dfl``, ``loss_giou`` (:func:`kd2.modeling.gfl.gfl_losses`).

        The argument order of Detectron2's ``RetinaNet.losses`` / ``FCOS.losses``, with the
        distribution logits in place of the box deltas.

        Args:
            anchors: per level ``(R_l, 4)``.
            pred_logits: per level ``(N, R_l, K)``.
            gt_labels: per image ``(R,)`` from :meth:`label_anchors`.
            pred_dists: per level ``(N, R_l, 4 (reg_max + 1))``.
            gt_boxes: per image ``(R, 4)`` from :meth:`label_anchors`.
        """
        per_level = _anchor_tensors(anchors)
        labels = torch.stack(gt_labels)
        num_pos = ((labels >= 0) & (labels < self.num_classes)).sum().item()
        get_event_storage().put_scalar("num_pos_anchors", num_pos / len(gt_labels))
        strides = torch.cat(
            [a.new_full((a.shape[0],), float(s)) for a, s in zip(per_level, self.anchor_strides)]
        )
        return gfl_losses(
            torch.cat(pred_logits, dim=1),
            torch.cat(pred_dists, dim=1),
            torch.cat(per_level),
            strides,
            labels,
            torch.stack(gt_boxes),
            self.reg_max,
            self.qfl_beta,
            self.loss_weights,
        )

    def forward_training(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: Tuple[List[Tensor], List[Tensor]],
        gt_instances: List[Instances],
    ) -> Dict[str, Tensor]:
        pred_logits, pred_dists = self._transpose(predictions)
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        return self.losses(anchors, pred_logits, gt_labels, pred_dists, gt_boxes)

    # -- inference ---------------------------------------------------------------------------
    def forward_inference(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: Tuple[List[Tensor], List[Tensor]],
    ) -> List[Instances]:
        """Per image ``Instances`` (``pred_boxes``, ``scores``, ``pred_classes``) in the
        coordinates of the network input (``images.image_sizes``)."""
        pred_logits, pred_dists = self._transpose(predictions)
        anchors = self.anchor_generator(features)
        results: List[Instances] = []
        for i, image_size in enumerate(images.image_sizes):
            scores = [x[i].sigmoid() for x in pred_logits]
            distances = [integral(d[i], self.reg_max) for d in pred_dists]
            results.append(self.inference_single_image(anchors, scores, distances, image_size))
        return results

    def inference_single_image(
        self,
        anchors: List[Boxes],
        box_cls: List[Tensor],
        box_delta: List[Tensor],
        image_size: Tuple[int, int],
    ) -> Instances:
        """One image: ``box_cls`` per level ``(R_l, K)`` scores, ``box_delta`` ``(R_l, 4)`` side
        distances. Boxes are clipped to the image before the class-wise NMS (as torchvision)."""
        pred = self._decode_multi_level_predictions(
            anchors,
            box_cls,
            box_delta,
            self.test_score_thresh,
            self.test_topk_candidates,
            image_size,
        )
        pred.pred_boxes.clip(image_size)
        keep = batched_nms(
            pred.pred_boxes.tensor, pred.scores, pred.pred_classes, self.test_nms_thresh
        )
        return pred[keep[: self.max_detections_per_image]]


def gfl_lazy_model(depth: int = 50, num_classes: int = 80, fpn_channels: int = 256):
    """A LazyConfig node of the plain :class:`GFL` (``instantiate`` builds it).

    Detectron2's model-zoo ``common/models/retinanet.py`` (ResNet-FPN P3-P7, MSRA ResNet with
    FrozenBN, BGR 0-255 input) with P6 computed from P5 as in GFL/FCOS, a :class:`GFLHead` of
    four GN convs per tower and the paper's hyper-parameters (``reg_max`` 16, octave scale 8,
    ATSS top-9, loss weights 1 / 0.25 / 2, score 0.05, NMS 0.6, 100 detections).

    Args:
        depth: ResNet depth (18 and 34 drop the bottleneck-only ``stride_in_1x1``).
        num_classes: ``K``.
        fpn_channels: FPN and head width (a multiple of 32 for GroupNorm).
    """
    from detectron2.config import LazyCall as L
    from detectron2.model_zoo import get_config

    m = copy.deepcopy(get_config("common/models/retinanet.py").model)
    m._target_ = GFL
    for key in ("anchor_generator", "box2box_transform", "anchor_matcher"):
        del m[key]
    for key in ("focal_loss_alpha", "focal_loss_gamma"):
        del m[key]
    m.backbone.bottom_up.stages.depth = depth
    if depth < 50:
        m.backbone.bottom_up.stages.pop("stride_in_1x1")
    m.backbone.out_channels = fpn_channels
    m.backbone.top_block.in_feature = "p5"
    m.backbone.top_block.in_channels = "${..out_channels}"
    m.head = L(GFLHead)(
        input_shape=[ShapeSpec(channels=fpn_channels)] * 5,
        num_classes="${..num_classes}",
        conv_dims=[fpn_channels] * 4,
        norm="GN",
        prior_prob=0.01,
        reg_max="${..reg_max}",
    )
    m.num_classes = num_classes
    m.reg_max = 16
    m.octave_base_scale = 8.0
    m.atss_topk = 9
    m.qfl_beta = 2.0
    m.loss_weights = [1.0, 0.25, 2.0]
    m.test_score_thresh = 0.05
    m.test_topk_candidates = 1000
    m.test_nms_thresh = 0.6
    m.max_detections_per_image = 100
    return m
