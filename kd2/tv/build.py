"""Build torchvision detectors (and their KD subclasses) from a kd2 config.

Plain models are exactly torchvision's ``FasterRCNN`` / ``RetinaNet`` / ``FCOS`` / ``SSD``
classes, so a student checkpoint written by kd2 loads into a plain torchvision model of the same
architecture. ``GFL`` (which torchvision lacks) is kd2's :class:`kd2.tv.gfl.GFL`, built in the same
style; its checkpoints load back into that class.
Weights are never downloaded: ``weights=None`` everywhere, and ``MODEL.WEIGHTS`` /
``KD.TEACHER.WEIGHTS`` are local paths.

Class conventions: kd2's data gives contiguous labels ``0..K-1``. torchvision's Faster R-CNN
and SSD reserve class 0 for the background, so they are built with ``K + 1`` classes and trained
on ``label + 1`` (:func:`label_offset`); RetinaNet, FCOS and GFL have no background channel and
are built with ``K`` classes.
"""

from __future__ import annotations

import logging
from typing import Dict, List

from torch import nn
from torchvision.models import mobilenet_v3_large, resnet
from torchvision.models.detection import (
    FCOS,
    FasterRCNN,
    RetinaNet,
    ssd300_vgg16,
    ssdlite320_mobilenet_v3_large,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _mobilenet_extractor
from torchvision.models.detection.ssd import SSD
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import (
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

from kd2.config import NUM_CLASSES_KEYS
from kd2.modeling.cross_framework import build_teacher_of_config, build_teacher_of_node
from kd2.modeling.distiller import teachers_needed
from kd2.utils.checkpoint import load_checkpoint_state

from .gfl import GFL

__all__ = [
    "ARCHITECTURES",
    "NUM_CLASSES_KEYS",
    "build_detector",
    "build_teacher",
    "label_offset",
    "load_checkpoint_state",
    "num_classes_of",
]

logger = logging.getLogger(__name__)

ARCHITECTURES = ("FasterRCNN", "RetinaNet", "FCOS", "SSD", "GFL")
_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


def num_classes_of(cfg) -> int:
    """``K``, the number of foreground classes of the configured architecture."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "FasterRCNN":
        return cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if arch == "RetinaNet":
        return cfg.MODEL.RETINANET.NUM_CLASSES
    if arch == "FCOS":
        return cfg.MODEL.FCOS.NUM_CLASSES
    if arch == "SSD":
        return cfg.MODEL.SSD.NUM_CLASSES
    if arch == "GFL":
        return cfg.MODEL.GFL.NUM_CLASSES
    raise ValueError(
        f"MODEL.META_ARCHITECTURE={arch!r} is not a torchvision architecture kd2 supports; "
        f"use one of {ARCHITECTURES}"
    )


def label_offset(model: nn.Module) -> int:
    """1 for Faster R-CNN and SSD (background is class 0 in torchvision), else 0."""
    return 1 if isinstance(model, (FasterRCNN, SSD)) else 0


def _build_backbone(cfg, arch: str) -> nn.Module:
    name = cfg.MODEL.BACKBONE.NAME
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    trainable = cfg.MODEL.BACKBONE.TRAINABLE_LAYERS
    norm_name = cfg.MODEL.BACKBONE.NORM
    if norm_name not in ("BN", "FrozenBN"):
        raise ValueError(f"MODEL.BACKBONE.NORM must be 'BN' or 'FrozenBN', got {norm_name!r}")
    norm_layer = FrozenBatchNorm2d if norm_name == "FrozenBN" else nn.BatchNorm2d
    two_stage = arch == "FasterRCNN"

    if name in _RESNETS:
        body = getattr(resnet, name)(weights=None, norm_layer=norm_layer)
        if not 0 <= trainable <= 5:
            raise ValueError(f"MODEL.BACKBONE.TRAINABLE_LAYERS must be in [0, 5], got {trainable}")
        layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable]
        if trainable == 5:
            layers_to_train.append("bn1")
        for pname, p in body.named_parameters():
            if all(not pname.startswith(layer) for layer in layers_to_train):
                p.requires_grad_(False)
        returned = [1, 2, 3, 4] if two_stage else [2, 3, 4]
        return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned)}
        stage_channels = body.inplanes // 8  # channels of layer1's output
        in_channels_list = [stage_channels * 2 ** (k - 1) for k in returned]
        extra = LastLevelMaxPool() if two_stage else LastLevelP6P7(out_channels, out_channels)
        return BackboneWithFPN(
            body, return_layers, in_channels_list, out_channels, extra_blocks=extra
        )
    if name == "mobilenet_v3_large":
        body = mobilenet_v3_large(weights=None, norm_layer=norm_layer)
        extra = LastLevelMaxPool() if two_stage else LastLevelP6P7(out_channels, out_channels)
        # torchvision's default taps are two stride-32 maps; kd2 keys levels by stride, so tap
        # the first block of the stride-4/8/16 stages and the last layer (stride 32).
        num_stages = 6
        returned = [1, 2, 3, 5] if two_stage else [2, 3, 5]
        backbone = _mobilenet_extractor(
            body,
            True,
            min(trainable, num_stages),
            returned_layers=returned,
            extra_blocks=extra,
        )
        if out_channels != backbone.out_channels:  # torchvision fixes the FPN width at 256
            in_list = [blk[0].in_channels for blk in backbone.fpn.inner_blocks]
            backbone.fpn = FeaturePyramidNetwork(in_list, out_channels, extra_blocks=extra)
            backbone.out_channels = out_channels
        return backbone
    if name == "dinov2_vit":
        from .vit_backbone import build_vit_backbone

        extra = LastLevelMaxPool() if two_stage else LastLevelP6P7(out_channels, out_channels)
        strides = [4, 8, 16, 32] if two_stage else [8, 16, 32]
        return build_vit_backbone(cfg.MODEL.BACKBONE.VIT, strides, out_channels, extra)
    raise ValueError(
        f"MODEL.BACKBONE.NAME={name!r} is not supported; use one of "
        f"{list(_RESNETS) + ['mobilenet_v3_large', 'dinov2_vit']}"
    )


def _anchor_generator(cfg, arch: str) -> AnchorGenerator | None:
    sizes: List[List[int]] = cfg.MODEL.ANCHOR_GENERATOR.SIZES
    if arch == "GFL" and sizes:
        raise ValueError(
            "GFL places one anchor per location, a square of MODEL.GFL.OCTAVE_BASE_SCALE x the "
            f"level's stride (ATSS); it does not read MODEL.ANCHOR_GENERATOR.SIZES ({sizes}): "
            "leave them empty"
        )
    if not sizes:
        return None
    ratios = cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS
    if arch == "FCOS":
        if any(len(level) != 1 for level in sizes):
            raise ValueError(
                "FCOS places one point per location: MODEL.ANCHOR_GENERATOR.SIZES needs exactly "
                f"one size per level (the level's stride), got {sizes}"
            )
        ratios = [[1.0]]
    if len(ratios) == 1:
        ratios = ratios * len(sizes)
    if len(ratios) != len(sizes):
        raise ValueError(
            f"MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS has {len(ratios)} entries but SIZES has "
            f"{len(sizes)}; give one list of ratios per level, or a single list for all levels"
        )
    return AnchorGenerator(tuple(tuple(s) for s in sizes), tuple(tuple(r) for r in ratios))


def ssd_kwargs(cfg) -> Dict[str, object]:
    """``SSD`` constructor arguments: the components of torchvision's own builders.

    ``vgg16`` is ``ssd300_vgg16`` (fixed 300 px input, its default boxes and steps);
    ``mobilenet_v3_large`` is ``ssdlite320_mobilenet_v3_large`` at ``MODEL.SSD.SIZE`` (its default
    boxes are relative to the input size). Weights are never downloaded.
    """
    s, k = cfg.MODEL.SSD, cfg.MODEL.SSD.NUM_CLASSES
    name, size = cfg.MODEL.BACKBONE.NAME, int(cfg.MODEL.SSD.SIZE)
    common = dict(
        num_classes=k + 1,
        weights=None,
        weights_backbone=None,
        # kd2 never loads torchvision's pretrained weights, and torchvision trains every layer
        # of a randomly initialised SSD (it ignores and warns about any other value).
        trainable_backbone_layers=None,
        image_mean=list(cfg.MODEL.PIXEL_MEAN),
        image_std=list(cfg.MODEL.PIXEL_STD),
        score_thresh=s.SCORE_THRESH_TEST,
        nms_thresh=s.NMS_THRESH_TEST,
        detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE,
        topk_candidates=s.TOPK_CANDIDATES_TEST,
    )
    if name == "vgg16":
        if size != 300:
            raise ValueError(
                f"SSD with BACKBONE.NAME 'vgg16' is SSD300 (its default boxes assume 300 px); got "
                f"MODEL.SSD.SIZE {size}. Use 300, or the 'mobilenet_v3_large' (SSDLite) backbone"
            )
        model = ssd300_vgg16(**common)
    elif name == "mobilenet_v3_large":
        model = ssdlite320_mobilenet_v3_large(**common)
    else:
        raise ValueError(
            f"SSD supports MODEL.BACKBONE.NAME 'vgg16' (SSD300) or 'mobilenet_v3_large' (SSDLite), "
            f"got {name!r}"
        )
    return dict(
        backbone=model.backbone,
        anchor_generator=model.anchor_generator,
        size=(size, size),
        num_classes=k + 1,
        head=model.head,
        image_mean=list(cfg.MODEL.PIXEL_MEAN),
        image_std=list(cfg.MODEL.PIXEL_STD),
        score_thresh=model.score_thresh,
        nms_thresh=model.nms_thresh,
        detections_per_img=model.detections_per_img,
        topk_candidates=model.topk_candidates,
    )


def detector_kwargs(cfg) -> Dict[str, object]:
    """The keyword arguments of the torchvision constructor for ``cfg`` (backbone included)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    k = num_classes_of(cfg)
    if arch == "SSD":
        return ssd_kwargs(cfg)
    common = dict(
        backbone=_build_backbone(cfg, arch),
        min_size=tuple(cfg.INPUT.MIN_SIZE_TRAIN),
        max_size=cfg.INPUT.MAX_SIZE_TRAIN,
        image_mean=list(cfg.MODEL.PIXEL_MEAN),
        image_std=list(cfg.MODEL.PIXEL_STD),
    )
    anchors = _anchor_generator(cfg, arch)
    if arch == "FasterRCNN":
        r, h = cfg.MODEL.RPN, cfg.MODEL.ROI_HEADS
        kw = dict(
            num_classes=k + 1,
            rpn_pre_nms_top_n_train=r.PRE_NMS_TOPK_TRAIN,
            rpn_pre_nms_top_n_test=r.PRE_NMS_TOPK_TEST,
            rpn_post_nms_top_n_train=r.POST_NMS_TOPK_TRAIN,
            rpn_post_nms_top_n_test=r.POST_NMS_TOPK_TEST,
            rpn_nms_thresh=r.NMS_THRESH,
            rpn_batch_size_per_image=r.BATCH_SIZE_PER_IMAGE,
            rpn_positive_fraction=r.POSITIVE_FRACTION,
            box_batch_size_per_image=h.BATCH_SIZE_PER_IMAGE,
            box_positive_fraction=h.POSITIVE_FRACTION,
            box_score_thresh=h.SCORE_THRESH_TEST,
            box_nms_thresh=h.NMS_THRESH_TEST,
            box_detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE,
        )
        if anchors is not None:
            kw["rpn_anchor_generator"] = anchors
        if cfg.MODEL.ROI_BOX_HEAD.FC_DIM != 1024:
            from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

            d = cfg.MODEL.ROI_BOX_HEAD.FC_DIM
            kw["box_head"] = TwoMLPHead(cfg.MODEL.FPN.OUT_CHANNELS * 7 * 7, d)
            kw["box_predictor"] = FastRCNNPredictor(d, k + 1)
            kw["num_classes"] = None  # torchvision takes the class count from the predictor
    elif arch == "RetinaNet":
        r = cfg.MODEL.RETINANET
        kw = dict(
            num_classes=k,
            score_thresh=r.SCORE_THRESH_TEST,
            nms_thresh=r.NMS_THRESH_TEST,
            detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE,
            topk_candidates=r.TOPK_CANDIDATES_TEST,
        )
        if anchors is not None:
            kw["anchor_generator"] = anchors
    elif arch == "GFL":
        g = cfg.MODEL.GFL
        kw = dict(
            num_classes=k,
            reg_max=g.REG_MAX,
            octave_base_scale=g.OCTAVE_BASE_SCALE,
            atss_topk=g.ATSS_TOPK,
            qfl_beta=g.QFL_BETA,
            loss_weights=(g.LOSS_QFL_WEIGHT, g.LOSS_DFL_WEIGHT, g.LOSS_GIOU_WEIGHT),
            score_thresh=g.SCORE_THRESH_TEST,
            nms_thresh=g.NMS_THRESH_TEST,
            detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE,
            topk_candidates=g.TOPK_CANDIDATES_TEST,
        )
    else:  # FCOS
        f = cfg.MODEL.FCOS
        kw = dict(
            num_classes=k,
            score_thresh=f.SCORE_THRESH_TEST,
            nms_thresh=f.NMS_THRESH_TEST,
            detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE,
            center_sampling_radius=f.CENTER_SAMPLING_RADIUS,
        )
        if anchors is not None:
            kw["anchor_generator"] = anchors
    kw.update(common)
    return kw


def _switch_input_size(transform: nn.Module, args) -> None:
    size = transform.kd2_train_size if transform.training else transform.kd2_test_size
    transform.min_size, transform.max_size = size


def _set_test_size(model: nn.Module, cfg) -> None:
    """Use ``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST`` in eval mode, Detectron2-style.

    torchvision resizes to ``min_size[-1]`` in eval mode; a pre-hook on the transform swaps the
    sizes with the mode, so the model itself stays a plain torchvision class.
    """
    if model.transform.fixed_size is not None:  # SSD: one fixed input size
        return
    model.transform.kd2_train_size = (tuple(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN)
    model.transform.kd2_test_size = ((cfg.INPUT.MIN_SIZE_TEST,), cfg.INPUT.MAX_SIZE_TEST)
    model.transform.register_forward_pre_hook(_switch_input_size)


def _plain_class(arch: str):
    return {
        "FasterRCNN": FasterRCNN,
        "RetinaNet": RetinaNet,
        "FCOS": FCOS,
        "SSD": SSD,
        "GFL": GFL,
    }[arch]


def build_plain_detector(cfg) -> nn.Module:
    """The plain torchvision detector described by ``cfg`` (no KD), on ``MODEL.DEVICE``."""
    arch = cfg.MODEL.META_ARCHITECTURE
    num_classes_of(cfg)  # validates the architecture name
    model = _plain_class(arch)(**detector_kwargs(cfg))
    _set_test_size(model, cfg)
    return model.to(cfg.MODEL.DEVICE)


def build_teacher(cfg, name: str = "") -> nn.Module:
    """Build a frozen teacher: ``KD.TEACHER`` (``name`` empty) or ``KD.TEACHERS.<name>`` — its
    own config file and weights; ``BACKEND: detectron2`` builds a Detectron2 model."""
    return build_teacher_of_config(cfg, name, "torchvision")


def build_torchvision_teacher(node, key: str, device: str) -> nn.Module:
    """A frozen teacher from ``node.CONFIG`` (a kd2 torchvision yaml) and ``node.WEIGHTS`` (a local
    checkpoint, loaded strictly); ``key`` names the config node in messages."""
    return build_teacher_of_node(node, key, device, build_plain_detector)


def build_detector(cfg) -> nn.Module:
    """Plain detector when ``KD.METHODS`` is empty, else its KD subclass holding the teacher
    (a detector teacher only when a method reads one)."""
    if not cfg.KD.METHODS:
        return build_plain_detector(cfg)

    from .meta_arch import KD_ARCHITECTURES

    arch = cfg.MODEL.META_ARCHITECTURE
    num_classes_of(cfg)
    used = teachers_needed(cfg.KD)
    teacher = build_teacher(cfg) if "" in used else None
    extra = {name: build_teacher(cfg, name) for name in sorted(used - {""})}
    model = KD_ARCHITECTURES[arch](
        cfg=cfg, teacher=teacher, extra_teachers=extra, **detector_kwargs(cfg)
    )
    _set_test_size(model, cfg)
    return model.to(cfg.MODEL.DEVICE)
