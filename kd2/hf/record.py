"""Fill kd2's canonical record (:mod:`kd2.structures`) from a transformers DETR-family forward.

* ``features``: the hybrid encoder's multi-scale output maps (``encoder_last_hidden_state``),
  keyed by their stride in the network input (``config.feat_strides``): where the feature
  methods (FitNet, CWD, PKD, MGD, FGD) attach, as RT-DETRv4 attaches its distillation;
* ``queries``: the decoder's per-layer class logits and boxes on its matching queries
  (:class:`~kd2.structures.QueryOutputs`) — in training the decoder also answers the
  contrastive-denoising queries, concatenated **before** the matching ones
  (``denoising_meta_values["dn_num_split"]``); they are split off here, once, so no method can
  distil a denoising query against a teacher's matching query;
* D-FINE / DEIMv2: the per-edge distributions (``intermediate_predicted_corners``), the boxes
  they refine (``initial_reference_points``) and their bin settings;
* the student's Hungarian assignment of its last layer to the ground truth, by the model's own
  matcher (``RTDetrHungarianMatcher`` with the config's costs).

In training D-FINE's decoder also reports the first layer's pre-refinement prediction as an
extra first entry of ``intermediate_logits`` / ``intermediate_reference_points``; the record keeps
the layers that have distributions, so that layer ``l`` of every field is the same layer.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from kd2.structures import QueryOutputs, StepRecord

from .models import check_queries

#: the key of a teacher record's ``extras`` holding its encoder maps and its selected queries
#: (inverse-sigmoid boxes), what :mod:`kd2.hf.points` decodes the distillation points from
POINT_SOURCE = "hf_point_source"

__all__ = ["encoder_levels", "features_by_stride", "hungarian_matches", "query_outputs"]


def encoder_levels(detector: nn.Module) -> Tuple[List[int], List[int]]:
    """The strides and channels of the encoder's output maps of a ``<Model>ForObjectDetection``."""
    config = detector.config
    strides = [int(s) for s in config.feat_strides]
    return strides, [int(config.encoder_hidden_dim)] * len(strides)


def features_by_stride(maps: Sequence[Tensor], strides: Sequence[int]) -> Dict[int, Tensor]:
    """``{stride: (N, C, H_l, W_l)}`` of the encoder's output maps, finest first."""
    if len(maps) != len(strides):
        raise ValueError(f"{len(maps)} encoder maps for the strides {list(strides)}")
    return dict(zip(strides, maps))


def _split_denoising(outputs) -> int:
    meta = getattr(outputs, "denoising_meta_values", None)
    return int(meta["dn_num_split"][0]) if meta else 0


def _layers(t: Tensor | None, dn: int, keep: int) -> Tensor | None:
    """``(N, L, Q_dn + Q, ...)`` -> the matching queries of the last ``keep`` layers,
    ``(keep, N, Q, ...)``."""
    if t is None:
        return None
    return t[:, -keep:, dn:].transpose(0, 1)


def query_outputs(detector: nn.Module, outputs) -> QueryOutputs:
    """The decoder part of the record from a forward's ``outputs`` (training or eval mode)."""
    dn = _split_denoising(outputs)
    corners = getattr(outputs, "intermediate_predicted_corners", None)
    logits = outputs.intermediate_logits
    keep = corners.shape[1] if corners is not None else logits.shape[1]
    distribution = None
    if corners is not None:
        c = detector.config
        distribution = (int(c.max_num_bins), float(c.reg_scale), float(c.up))
    return QueryOutputs(
        logits=_layers(logits, dn, keep),
        boxes=_layers(outputs.intermediate_reference_points, dn, keep),
        hidden=outputs.last_hidden_state[:, dn:],
        corners=_layers(corners, dn, keep),
        reference_points=_layers(getattr(outputs, "initial_reference_points", None), dn, keep),
        distribution=distribution,
    )


def hungarian_matches(
    detector: nn.Module, logits: Tensor, boxes: Tensor, labels: List[Dict[str, Tensor]]
) -> List[Tuple[Tensor, Tensor]]:
    """Per image ``(query_index, gt_index)``: the model's own Hungarian matcher on the last
    layer's ``logits`` ``(N, Q, K)`` and normalised ``cxcywh`` ``boxes`` ``(N, Q, 4)`` against the
    transformers ``labels``."""
    from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher

    matcher = RTDetrHungarianMatcher(detector.config)
    with torch.no_grad():
        found = matcher({"logits": logits.detach(), "pred_boxes": boxes.detach()}, labels)
    return [(q.to(logits.device), g.to(logits.device)) for q, g in found]


def base_record(
    pixel_values: Tensor,
    targets: Sequence[Dict[str, Tensor]],
    sizes: Sequence[Tuple[int, int]],
    features: Dict[int, Tensor],
    num_classes: int,
) -> StepRecord:
    """The record's input part: GT boxes in pixels of the square network input."""
    side_h, side_w = pixel_values.shape[-2:]
    gt = []
    for t, (h, w) in zip(targets, sizes):
        scale = t["boxes"].new_tensor([side_w / w, side_h / h, side_w / w, side_h / h])
        gt.append(t["boxes"].float() * scale)
    return StepRecord(
        images=pixel_values,
        image_sizes=[(int(side_h), int(side_w))] * len(targets),
        gt_boxes=gt,
        gt_labels=[t["labels"] for t in targets],
        features=features,
        num_classes=num_classes,
    )


def teacher_record(
    teacher: nn.Module, images: Tensor, student: StepRecord, parts, strides: Sequence[int]
) -> StepRecord:
    """A transformers teacher's record (eval mode, no denoising queries: its last decoder layer)
    on ``images``, the student's batch in the teacher's input convention."""
    detector = teacher.detector
    check_queries(detector, *images.shape[-2:], "the student's batch the teacher reads")
    out = detector(pixel_values=images)
    rec = student.teacher_view()
    own, _ = encoder_levels(detector)
    maps = features_by_stride(out.encoder_last_hidden_state, own)
    rec.features = {s: maps[s] for s in strides} if "features" in parts else {}
    if parts & {"queries", "points"}:
        rec.queries = query_outputs(detector, out)
    if "points" in parts:
        # what the teacher's answers to the distillation points are decoded from
        rec.extras[POINT_SOURCE] = (list(out.encoder_last_hidden_state), out.init_reference_points)
    return rec
