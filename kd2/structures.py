"""The canonical per-step record of a detector's training forward.

Every backend (torchvision, Detectron2) fills the same record, and every loss in
:mod:`kd2.losses` reads only this record. The conventions are Detectron2's:

* foreground classes are contiguous ``0..K-1``;
* softmax (ROI) heads carry the background in the **last** column ``K``;
* sigmoid (dense) heads have no background channel; a softmax dense head (SSD) carries it in
  the last column ``K`` like the ROI heads (``DenseOutputs.softmax``);
* dense labels: ``-1`` = ignore, ``0..K-1`` = foreground, ``K`` = background;
* boxes are XYXY in pixels of the padded network input (``images``);
* FPN levels are keyed by their stride (``int``), finest first;
* within one level, dense predictions are ordered location-major (y, x) with the
  anchor index fastest, exactly like the anchors.

Shapes use ``N`` images, ``R_l = H_l * W_l * A`` dense predictions at level ``l``,
``M`` sampled ROIs over the whole batch, ``C`` feature channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor

__all__ = [
    "DenseOutputs",
    "HeadSplit",
    "QueryOutputs",
    "RoiOutputs",
    "StepRecord",
    "check_target_boxes",
]


def check_target_boxes(targets) -> None:
    """Refuse a degenerate training box (``x2 <= x1`` or ``y2 <= y1``) in torchvision-style
    ``targets`` (per image ``boxes`` ``(G, 4)`` XYXY)."""
    for t in targets:
        if t["boxes"].numel() and not torch.all(t["boxes"][:, 2:] > t["boxes"][:, :2]):
            raise ValueError(f"degenerate box (x2 <= x1 or y2 <= y1) in target {t}")


@dataclass
class HeadSplit:
    """A dense head's two towers cut after their ``k``-th conv block, before its activation
    (CrossKD's tap; filled by the backends only when a method asks for it).

    Attributes:
        k: conv blocks run before the cut (``0``: the FPN maps themselves).
        cls_features / reg_features: per level ``(N, C, H_l, W_l)`` features at the cut of the
            classification and box towers.
        resume: ``resume(cls_features, reg_features)`` runs the rest of **this** head on other
            features of the same shapes and returns ``{"cls_logits", "box_deltas", "box_dist"}``
            per level in this record's layout (see :func:`kd2.modeling.head_split.resume_head`).
    """

    k: int
    cls_features: List[Tensor]
    reg_features: List[Tensor]
    resume: Callable[[List[Tensor], List[Tensor]], Dict[str, List[Tensor] | None]]


@dataclass
class DenseOutputs:
    """Outputs of a dense head (RetinaNet, FCOS, GFL) or of an RPN (``num_classes == 1``).

    Attributes:
        cls_logits: per level, ``(N, R_l, K)`` raw sigmoid logits, or ``(N, R_l, K + 1)`` softmax
            logits with the background last when ``softmax`` is set (SSD).
        box_deltas: per level, ``(N, R_l, 4)`` raw regression outputs (box-coder space).
        anchors: per level, ``(R_l, 4)`` XYXY anchors, shared by every image.
        strides: per level, the stride in input pixels.
        num_anchors_per_loc: ``A``; ``R_l == H_l * W_l * A``. SSD places a different number of
            default boxes on each level: then a list, one ``A_l`` per level.
        num_classes: ``K`` (1 for an RPN's objectness).
        centerness: per level ``(N, R_l, 1)`` logits (FCOS), else ``None``.
        labels: ``(N, sum_l R_l)`` canonical assignment (``-1`` ignore, ``K`` background), or
            ``None`` when the record belongs to a teacher (teachers reuse the student's).
        matched_gt_boxes: ``(N, sum_l R_l, 4)`` GT box matched to each prediction
            (meaningful where ``labels`` is foreground), or ``None``.
        box_coder: the framework's box transform (torchvision ``decode_single(deltas, anchors)``
            or Detectron2 ``apply_deltas(deltas, anchors)``; see
            :func:`kd2.losses.utils.decode_boxes`), used to turn ``box_deltas`` into boxes.
        grid_sizes: per level ``(H_l, W_l)``.
        softmax: the head is a softmax classifier over ``K + 1`` (background last).
        box_dist: per level ``(N, R_l, 4 * (reg_max + 1))`` distribution logits of a GFL-style
            head (the four sides ``l, t, r, b`` in order, ``reg_max + 1`` bins each, after the
            level's learnable scale), else ``None``. For such a head ``box_deltas`` holds the
            expected side distances ``Σ_i softmax(z)_i · i`` in units of the level stride, which
            ``box_coder`` decodes from the anchors' centres.
        head_split: the towers' features at a cut, when a method asked for one
            (:class:`HeadSplit`), else ``None``.
    """

    cls_logits: List[Tensor]
    box_deltas: List[Tensor]
    anchors: List[Tensor]
    strides: List[int]
    num_anchors_per_loc: int | List[int]
    num_classes: int
    grid_sizes: List[Tuple[int, int]]
    centerness: List[Tensor] | None = None
    labels: Tensor | None = None
    matched_gt_boxes: Tensor | None = None
    box_coder: object | None = None
    softmax: bool = False
    box_dist: List[Tensor] | None = None
    head_split: HeadSplit | None = None

    def anchors_per_level(self) -> List[int]:
        """``A_l`` of every level."""
        a = self.num_anchors_per_loc
        return list(a) if isinstance(a, (list, tuple)) else [a] * len(self.cls_logits)

    def level_maps(self, tensors: List[Tensor]) -> List[Tensor]:
        """Reshape per-level ``(N, R_l, D)`` tensors into maps ``(N, A * D, H_l, W_l)``.

        The channel index of the result is ``a * D + d``, as in the raw head output.
        """
        out = []
        for t, (h, w), a in zip(tensors, self.grid_sizes, self.anchors_per_level()):
            n, _, d = t.shape
            out.append(t.reshape(n, h, w, a * d).permute(0, 3, 1, 2))
        return out

    def split_per_level(self, flat: Tensor) -> List[Tensor]:
        """Split a ``(N, sum_l R_l, ...)`` tensor (e.g. ``labels``) into per-level pieces."""
        return list(torch.split(flat, [t.shape[1] for t in self.cls_logits], dim=1))


@dataclass
class RoiOutputs:
    """Second-stage outputs on the **student's** sampled proposals.

    Attributes:
        proposals: per image ``(M_i, 4)`` sampled proposal boxes (detached); ``M = sum M_i``.
        labels: per image ``(M_i,)`` canonical classes, ``K`` = background.
        matched_gt_boxes: per image ``(M_i, 4)``.
        roi_features: ``(M, C, P, P)`` pooled ROI features (``P = 7`` usually).
        box_head_features: ``(M, D)`` box-head output.
        cls_logits: ``(M, K + 1)`` softmax logits, background last.
        box_deltas: ``(M, K, 4)`` class-specific deltas (no background slot).
        box_coder: the ROI head's box transform (see :class:`DenseOutputs`), to decode
            ``box_deltas`` against ``proposals``.
    """

    proposals: List[Tensor]
    labels: List[Tensor]
    matched_gt_boxes: List[Tensor]
    roi_features: Tensor
    box_head_features: Tensor
    cls_logits: Tensor
    box_deltas: Tensor
    box_coder: object | None = None

    def with_outputs(
        self,
        roi_features: Tensor,
        box_head_features: Tensor,
        cls_logits: Tensor,
        box_deltas: Tensor,
    ) -> RoiOutputs:
        """Another network's ROI-head outputs on these same sampled ROIs (the teacher's head
        run on the student's proposals): proposals, labels and matched GT are shared."""
        return RoiOutputs(
            proposals=self.proposals,
            labels=self.labels,
            matched_gt_boxes=self.matched_gt_boxes,
            roi_features=roi_features,
            box_head_features=box_head_features,
            cls_logits=cls_logits,
            box_deltas=box_deltas,
            box_coder=self.box_coder,
        )

    @property
    def cat_labels(self) -> Tensor:
        """``(M,)`` labels of all images concatenated."""
        return torch.cat(self.labels)


@dataclass
class QueryOutputs:
    """A DETR-family decoder's predictions on its **matching** queries (the training-time
    contrastive-denoising queries are split off: they answer the ground truth, not the image,
    and have no counterpart in another network).

    Attributes:
        logits: ``(L, N, Q, K)`` sigmoid class logits of each decoder layer, the last layer
            last (a teacher in eval mode records its last layer only: ``L = 1``).
        boxes: ``(L, N, Q, 4)`` boxes of each layer, normalised ``cx, cy, w, h`` of the network
            input (multiply by its size for pixels).
        hidden: ``(N, Q, D)`` the last decoder layer's query embeddings.
        corners: ``(L, N, Q, 4 * (B + 1))`` per-edge distribution logits of a fine-grained
            distribution refinement head (D-FINE, DEIM: the edges ``l, t, r, b`` in order,
            ``B + 1`` bins each), else ``None``.
        reference_points: ``(L, N, Q, 4)`` the normalised ``cxcywh`` boxes ``corners`` refine,
            else ``None``.
        distribution: ``(B, reg_scale, up)``, the bins and the weighting function ``corners``
            are read with (two distributions compare only under the same settings), else
            ``None``.
        matched: per image ``(query_index, gt_index)`` int64 pairs: the last layer's Hungarian
            assignment to the ground truth (the model's own matcher), or ``None`` (a teacher's
            record).
        points: the decoder's answers to the step's shared **distillation points** (KD-DETR),
            by group (``"teacher"``: the teacher's selected queries, ``"random"``: random
            boxes): ``(logits (L, N, P, K), boxes (L, N, P, 4))`` per group, the student's and
            the teacher's on the same points in the same order; ``None`` when no method asks.
    """

    logits: Tensor
    boxes: Tensor
    hidden: Tensor
    corners: Tensor | None = None
    reference_points: Tensor | None = None
    distribution: Tuple[int, float, float] | None = None
    matched: List[Tuple[Tensor, Tensor]] | None = None
    points: Dict[str, Tuple[Tensor, Tensor]] | None = None

    @property
    def num_queries(self) -> int:
        return int(self.logits.shape[2])


@dataclass
class StepRecord:
    """Everything a distillation loss may read about one forward of one detector.

    Attributes:
        images: ``(N, 3, Hp, Wp)`` normalised, padded batch fed to the backbone.
        image_sizes: per image ``(h, w)`` of the valid (unpadded) region.
        gt_boxes: per image ``(G_i, 4)`` XYXY in input pixels.
        gt_labels: per image ``(G_i,)`` canonical classes ``0..K-1``.
        features: FPN maps keyed by stride, each ``(N, C, H_l, W_l)``.
        num_classes: ``K``.
        dense: one-stage head outputs (RetinaNet, FCOS).
        rpn: RPN outputs of a two-stage detector (``num_classes == 1``).
        roi: ROI-head outputs of a two-stage detector.
        queries: a DETR-family decoder's outputs (:class:`QueryOutputs`); ``features`` are
            then its encoder's multi-scale maps.
        detections: a teacher's inference on the student's input (any detector): per image
            ``boxes`` ``(D, 4)`` XYXY in input pixels, ``scores`` ``(D,)``, ``labels`` ``(D,)``
            in ``0..K-1``; ``None`` unless a method reads them.
        embedding: ``(N, D)`` an image-level feature — a foundation-model teacher's CLS token
            after its final norm (:mod:`kd2.foundation`) — else ``None``.
    """

    images: Tensor
    image_sizes: List[Tuple[int, int]]
    gt_boxes: List[Tensor]
    gt_labels: List[Tensor]
    features: Dict[int, Tensor]
    num_classes: int
    dense: DenseOutputs | None = None
    rpn: DenseOutputs | None = None
    roi: RoiOutputs | None = None
    queries: QueryOutputs | None = None
    detections: List[Dict[str, Tensor]] | None = None
    embedding: Tensor | None = None
    extras: Dict[str, object] = field(default_factory=dict)

    @property
    def strides(self) -> List[int]:
        return sorted(self.features)

    def teacher_view(self) -> StepRecord:
        """A record for the teacher of this (student) step: the same input tensors and GT, no
        outputs yet. The teacher never sees other inputs and never re-assigns labels."""
        return StepRecord(
            images=self.images,
            image_sizes=self.image_sizes,
            gt_boxes=self.gt_boxes,
            gt_labels=self.gt_labels,
            features={},
            num_classes=self.num_classes,
        )

    @property
    def anchor_head(self) -> DenseOutputs | None:
        """The dense head whose anchors define "locations": the one-stage head, else the RPN."""
        return self.dense if self.dense is not None else self.rpn
