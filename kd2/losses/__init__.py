"""Distillation losses, written once against :mod:`kd2.structures`.

Each module holds plain functions on tensors (shapes in their docstrings) plus one registered
:class:`KDMethod` that reads the student and teacher records. Nothing here imports Detectron2,
torchvision or transformers. Importing this package registers every method in
:data:`KD_METHOD_REGISTRY`.
"""

from .base import FAMILIES, KD_METHOD_REGISTRY, TEACHER_PARTS, KDMethod, MethodCard
from .bckd import BCKD, bckd_losses
from .classifier_kd import ClassifierKD, classifier_kd_cls_loss, classifier_kd_loc_loss, crop_boxes
from .crosskd import CrossKD, quality_focal_kd_loss, recolor_features
from .cwd import CWD, channel_wise_distillation_loss
from .defeat import DeFeat, defeat_gt_masks, defeat_head_loss, defeat_neck_loss
from .detr_distill import DETRDistill, matched_logit_losses, target_aware_mask
from .dfine_ld import DFineLD, decoupled_distillation_loss
from .dsi import DSI, semantic_alignment_loss
from .fbkd import (
    FBKD,
    NonLocalBlock,
    fbkd_attention_transfer_loss,
    fbkd_masked_feature_loss,
    fbkd_nonlocal_loss,
    fbkd_spatial_mask,
)
from .fgd import (
    FGD,
    GlobalContextBlock,
    channel_attention,
    fgd_attention_loss,
    fgd_feature_loss,
    fgd_global_loss,
    fgd_masks,
    spatial_attention,
)
from .fgfi import FGFI, fgfi_imitation_mask, fgfi_loss
from .fitnet import FitNet, fitnet_loss
from .frs import FRS, feature_richness, frs_feature_loss, frs_head_loss
from .gid import GID, general_instance_scores, select_general_instances
from .global_knowledge import GlobalKD, robustness
from .hinton import Hinton, binary_kl_div_with_logits, hinton_dense_loss, hinton_roi_loss
from .kd_detr import KDDETR, point_losses
from .ld import LD, localization_distillation_loss
from .mgd import MGD, masked_generation_loss, random_pixel_mask
from .pfi import PFI, pfi_loss
from .pkd import PKD, pearson_distillation_loss
from .query_matching import match_queries
from .rank_mimicking import RM, rank_mimicking_loss
from .rkd import RKD, rkd_angle_loss, rkd_distance_loss
from .teach_detr import TeachDETR, teach_detr_losses
from .utils import assign_fpn_levels, box_iou, masked_squared_error, softmax_kl_div

__all__ = [
    "TeachDETR",
    "teach_detr_losses",
    "DFineLD",
    "DETRDistill",
    "DSI",
    "semantic_alignment_loss",
    "matched_logit_losses",
    "target_aware_mask",
    "KDDETR",
    "point_losses",
    "decoupled_distillation_loss",
    "match_queries",
    "FAMILIES",
    "MethodCard",
    "FBKD",
    "FGD",
    "GlobalContextBlock",
    "NonLocalBlock",
    "channel_attention",
    "fbkd_attention_transfer_loss",
    "fbkd_masked_feature_loss",
    "fbkd_nonlocal_loss",
    "fbkd_spatial_mask",
    "fgd_attention_loss",
    "fgd_feature_loss",
    "fgd_global_loss",
    "fgd_masks",
    "spatial_attention",
    "CWD",
    "CrossKD",
    "BCKD",
    "bckd_losses",
    "GID",
    "LD",
    "MGD",
    "PKD",
    "RKD",
    "general_instance_scores",
    "localization_distillation_loss",
    "quality_focal_kd_loss",
    "recolor_features",
    "select_general_instances",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "channel_wise_distillation_loss",
    "masked_generation_loss",
    "pearson_distillation_loss",
    "random_pixel_mask",
    "ClassifierKD",
    "classifier_kd_cls_loss",
    "classifier_kd_loc_loss",
    "crop_boxes",
    "FGFI",
    "FRS",
    "KD_METHOD_REGISTRY",
    "PFI",
    "RM",
    "TEACHER_PARTS",
    "DeFeat",
    "FitNet",
    "GlobalKD",
    "Hinton",
    "KDMethod",
    "assign_fpn_levels",
    "binary_kl_div_with_logits",
    "box_iou",
    "defeat_gt_masks",
    "defeat_head_loss",
    "defeat_neck_loss",
    "feature_richness",
    "fgfi_imitation_mask",
    "fgfi_loss",
    "fitnet_loss",
    "frs_feature_loss",
    "frs_head_loss",
    "hinton_dense_loss",
    "hinton_roi_loss",
    "masked_squared_error",
    "pfi_loss",
    "rank_mimicking_loss",
    "robustness",
    "softmax_kl_div",
]
