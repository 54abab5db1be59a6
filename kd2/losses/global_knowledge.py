"""Global Knowledge distillation (Tang et al., ECCV 2022): the robust distilling module (RDM).

Every instance is represented against a few **prototypes** per class and FPN level: real
instances picked by the prototype generation module (PGM, :func:`kd2.ops.pgm_select`, run by
:class:`kd2.modeling.prototypes.PrototypeRefresher`) and indexed identically in the student's and
the teacher's feature spaces. How differently the two spaces represent an instance is its
**robustness** ``η = 1 − |max_k cos(s, P^s_k) − max_k cos(t, P^t_k)|``; ``η`` down-weights noisy
instances in the distillation (``docs/algorithms.md`` §1.7):

* **Feature imitation** (decoupled, DeFeat-style, η-weighted). Per FPN level ``l`` with
  ``d = (φ_l(F^s_l) − F^t_l)²`` (``φ_l`` a Conv3×3 adapter) and ``M_l`` the η-painted
  foreground map::

      L_fg,l = Σ M·d / max(1, 2·C·Σ M)
      L_bg,l = Σ (1 − [M > 0])·d / max(1, 2·C·Σ(1 − [M > 0]))

  ``loss_kd_gk_fg = a · FG_WEIGHT · agg_l L_fg,l`` and likewise ``bg``; ``agg`` is the mean
  over levels for two-stage detectors and the sum for one-stage ones (the released code's two
  strategies). Because the FG term is normalised by ``Σ M``, η only *re-distributes* weight
  among instances.
* **Soft labels** (η-weighted, not attenuated): ``mean_i η_i · T² · (1/C) Σ_c KL_c`` with
  ``T = 2`` and the KL averaged over the ``C`` classes (mmdet's KD loss); two-stage: the ROI
  heads of both detectors on the student's positive sampled ROIs (``C = K + 1``), η from the
  ROI features; one-stage: the ``K`` sigmoid logits of the positive anchors through a softmax,
  η of each positive anchor at the level the **56-px rule gives for the anchor box** — not the
  anchor's own level — i.e. exactly the η that anchor paints into the feature mask. This follows
  DAVAR-Lab-ML ``ECCV22_Distilling_Object_Detectors_with_Global_Knowledge/ObjectPerceptron/
  mmdetection/third_party/kd/mmdet/strategy/kd_one_stage_strategy.py``, ``soft_weight``
  (l. 430-471): ``roi_box`` are the positive anchors (``sampling_result.pos_bboxes``, un-decoded
  anchor boxes, which ``proposal_replace_gt`` puts in place of the GTs), ``level =
  _map_roi_levels(roi_box, level_num)`` (l. 141-146: ``sqrt((w+1)(h+1))``, 56 px, over all the
  FPN levels), and η compares the box-mean-pooled **raw** student and teacher neck maps of that
  level (crop ``⌊|y1|/s⌋ .. ⌊|y2|/s⌋`` inclusive) with that level's prototypes of the anchor's
  GT class. (The released code pairs the weights, listed image by image, with logits listed
  level by level, which only lines up for one image per GPU; kd2 pairs each anchor's logits with
  its own η.)
* **Global knowledge** (the paper's explicit loss, off by default — the released config never
  adds it): per level, SmoothL1 (β = 1, mean) between ``η·cos(f^s, P^s_{l,all})`` and
  ``η·cos(f^t, P^t_{l,all})``, cosines to the prototypes of **all** classes, summed over
  levels, times ``GLOBAL_WEIGHT`` (5) and the attenuation.

``a = 1 − epoch / num_epochs`` (the released ``kd_attenuation``) scales the feature and global
terms, never the soft labels.

**Instances** (the released ``proposal_replace_gt=True``): two-stage — the student's positive
sampled ROIs; one-stage — the boxes of the positive anchors; each labelled by its assigned GT's
class. An instance paints the map of its level (the 56-px rule on ``sqrt((w+1)(h+1))``) with its
η at that level, over the cells ``rows [⌊y1/s⌋, min(⌊y2/s⌋, H)) × cols [⌊x1/s⌋, min(⌊x2/s⌋, W))``;
later instances **overwrite** earlier ones. An instance whose footprint is empty on an axis
(a box inside one cell row/column) paints the single cell ``(⌊y1/s⌋, ⌊x1/s⌋)`` and combines with
the value there by **max** instead (kd2's reading of the code's 1-cell special case). Its feature
``f`` is :func:`kd2.ops.box_mean_pool` of the **raw** (un-adapted) FPN map: rows ``⌊y1/s⌋ ..
⌊y2/s⌋`` inclusive, one cell larger than the painted footprint, as in the code.

Classes without prototypes yet (no valid PGM instance, or before the first refresh) get
``η = 1``: their instances are distilled unweighted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd2.losses.adapters import FeatureAdapter
from kd2.ops import box_mean_pool
from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .utils import (
    adapt_features,
    assign_fpn_levels,
    compute_dtype,
    masked_squared_error,
    require_sigmoid_dense,
    shared_strides,
    softmax_kl_div,
    to_compute,
    zero_like_loss,
)

__all__ = [
    "GlobalKD",
    "global_knowledge_loss",
    "prototype_cosines",
    "robust_decoupled_feature_loss",
    "robust_fg_masks",
    "robust_soft_label_loss",
    "robustness",
    "robustness_by_class",
]


def prototype_cosines(instances: Tensor, prototypes: Tensor) -> Tensor:
    """Cosine similarities ``(M, P)`` of instances ``(M, D)`` to prototypes ``(P, D)`` (fp32, or
    fp64 when an input is; an all-zero vector has cosine 0 to everything)."""
    dtype = compute_dtype(instances, prototypes)
    a = F.normalize(instances.to(dtype), dim=-1, eps=1e-12)
    b = F.normalize(prototypes.to(dtype), dim=-1, eps=1e-12)
    return a @ b.t()


def _eta_from_maxima(q_s: Tensor, q_t: Tensor) -> Tensor:
    """``1 − |q_s − q_t|`` clamped into ``[0, 1]``; non-finite values give ``0``."""
    eta = 1.0 - (q_s - q_t).abs()
    return torch.nan_to_num(eta, nan=0.0, posinf=0.0, neginf=0.0).clamp(0.0, 1.0)


def robustness(
    student_inst: Tensor,
    teacher_inst: Tensor,
    student_protos: Tensor,
    teacher_protos: Tensor,
) -> Tensor:
    """Robustness ``η`` of instances of **one** class against that class's prototypes.

    Args:
        student_inst / teacher_inst: ``(M, D_s)`` / ``(M, D_t)`` row-aligned instance features.
        student_protos / teacher_protos: ``(P, D_s)`` / ``(P, D_t)`` the class's prototypes.

    Returns:
        ``(M,)`` fp32 (fp64 when an input is fp64), detached:
        ``η_i = 1 − |max_k cos(s_i, Ps_k) − max_k cos(t_i, Pt_k)|``,
        clamped into ``[0, 1]`` (FPN features can be negative, so the two maxima lie in
        ``[−1, 1]`` and the raw value in ``[−1, 1]``; the clamp keeps η a weight). ``P = 0``
        gives ``η = 1``; ``M = 0`` an empty tensor. Non-finite inputs give ``η = 0``.
    """
    if student_inst.shape[0] != teacher_inst.shape[0]:
        raise ValueError(
            f"student ({student_inst.shape[0]}) and teacher ({teacher_inst.shape[0]}) instance "
            "counts differ; the rows must be the same instances"
        )
    if student_protos.shape[0] != teacher_protos.shape[0]:
        raise ValueError(
            f"student ({student_protos.shape[0]}) and teacher ({teacher_protos.shape[0]}) "
            "prototype counts differ; prototypes are indexed identically in both spaces"
        )
    with torch.no_grad():
        m = student_inst.shape[0]
        dtype = compute_dtype(student_inst, teacher_inst, student_protos, teacher_protos)
        if student_protos.shape[0] == 0:
            return torch.ones(m, dtype=dtype, device=student_inst.device)
        if m == 0:
            return torch.zeros(0, dtype=dtype, device=student_inst.device)
        q_s = prototype_cosines(student_inst, student_protos).amax(dim=1)
        q_t = prototype_cosines(teacher_inst, teacher_protos).amax(dim=1)
        return _eta_from_maxima(q_s, q_t)


def robustness_by_class(
    student_inst: Tensor,
    teacher_inst: Tensor,
    labels: Tensor,
    student_protos: Tensor,
    teacher_protos: Tensor,
    valid: Tensor,
) -> Tensor:
    """:func:`robustness` for instances of mixed classes, each against its own class.

    Args:
        student_inst / teacher_inst: ``(M, D_s)`` / ``(M, D_t)``.
        labels: ``(M,)`` classes in ``[0, K)``.
        student_protos / teacher_protos: ``(K, P, D_s)`` / ``(K, P, D_t)`` per-class prototypes.
        valid: ``(K,)`` bool, classes that have prototypes (others get ``η = 1``).

    Returns:
        ``(M,)`` fp32 (fp64 when an input is fp64) detached η.
    """
    with torch.no_grad():
        m = student_inst.shape[0]
        dtype = compute_dtype(student_inst, teacher_inst, student_protos, teacher_protos)
        eta = torch.ones(m, dtype=dtype, device=student_inst.device)
        if m == 0:
            return eta
        k, p = student_protos.shape[:2]
        cos_s = prototype_cosines(student_inst, student_protos.reshape(k * p, -1)).view(m, k, p)
        cos_t = prototype_cosines(teacher_inst, teacher_protos.reshape(k * p, -1)).view(m, k, p)
        idx = labels.long().view(m, 1, 1).expand(m, 1, p)
        q_s = cos_s.gather(1, idx).amax(dim=(1, 2))
        q_t = cos_t.gather(1, idx).amax(dim=(1, 2))
        has = valid.to(eta.device)[labels.long()]
        return torch.where(has, _eta_from_maxima(q_s, q_t), eta)


@torch.no_grad()
def robust_fg_masks(
    boxes: Tensor,
    batch_index: Tensor,
    levels: Tensor,
    eta: Tensor,
    strides: Sequence[int],
    grid_sizes: Sequence[tuple[int, int]],
    num_images: int,
) -> list[Tensor]:
    """η-painted foreground maps (see the module docstring for the footprint and overwrite rule).

    Args:
        boxes: ``(M, 4)`` XYXY input pixels, in painting order.
        batch_index: ``(M,)`` image of each box.
        levels: ``(M,)`` level index of each box into ``strides``.
        eta: ``(M,)`` value each box paints.
        strides / grid_sizes: per level the stride and ``(H_l, W_l)``.
        num_images: ``N``.

    Returns:
        per level an ``(N, H_l, W_l)`` map in ``[0, 1]``, fp32 (fp64 for an fp64 ``eta``).
    """
    device = boxes.device
    dtype = compute_dtype(eta)
    masks = [torch.zeros((num_images, h, w), dtype=dtype, device=device) for h, w in grid_sizes]
    if boxes.numel() == 0:
        return masks
    b = to_compute(boxes)
    for lvl, (s, (h, w)) in enumerate(zip(strides, grid_sizes)):
        sel = levels == lvl
        if not bool(sel.any()):
            continue
        bl, el, il = b[sel], eta[sel].to(dtype), batch_index[sel]
        x0 = torch.trunc(bl[:, 0] / s).clamp(0, w - 1)
        y0 = torch.trunc(bl[:, 1] / s).clamp(0, h - 1)
        x1 = torch.trunc(bl[:, 2] / s).clamp(max=w)
        y1 = torch.trunc(bl[:, 3] / s).clamp(max=h)
        degenerate = (x1 <= x0) | (y1 <= y0)
        ys = torch.arange(h, device=device, dtype=bl.dtype)[None, :, None]
        xs = torch.arange(w, device=device, dtype=bl.dtype)[None, None, :]
        in_box = (
            (ys >= y0[:, None, None])
            & (ys < y1[:, None, None])
            & (xs >= x0[:, None, None])
            & (xs < x1[:, None, None])
            & ~degenerate[:, None, None]
        )
        in_cell = (ys == y0[:, None, None]) & (xs == x0[:, None, None]) & degenerate[:, None, None]
        for n in il.unique().tolist():
            on = il == n  # this image's boxes, still in painting order
            box_n, cell_n, e_n = in_box[on], in_cell[on], el[on]
            rank = torch.arange(e_n.numel(), device=device).view(-1, 1, 1)
            # the last box (in order) covering each cell wins ...
            last = torch.where(box_n, rank, -1).amax(dim=0)  # (H, W)
            base = torch.where(last >= 0, e_n[last.clamp(min=0)], 0.0)
            # ... unless a later 1-cell box there is larger (max, not overwrite)
            later = cell_n & (rank > last[None])
            cell_val = torch.where(later, e_n.view(-1, 1, 1), 0.0).amax(dim=0)
            masks[lvl][n] = torch.maximum(base, cell_val)
    return masks


def robust_decoupled_feature_loss(
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    masks: Sequence[Tensor],
) -> tuple[list[Tensor], list[Tensor]]:
    """Per-level η-weighted FG and plain BG imitation terms.

    Args:
        student_features: per level ``(N, C, H, W)`` adapted student maps.
        teacher_features: per level ``(N, C, H, W)`` teacher maps.
        masks: per level ``(N, H, W)`` η maps from :func:`robust_fg_masks`.

    Returns:
        ``(fg_terms, bg_terms)``, per level fp32 scalars (fp64 when a map is fp64)
        ``Σ M·d / max(1, 2·C·Σ M)`` and
        ``Σ (1 − [M>0])·d / max(1, 2·C·Σ(1 − [M>0]))``.
    """
    if not (len(student_features) == len(teacher_features) == len(masks)) or not masks:
        raise ValueError("need the same non-zero number of student maps, teacher maps and masks")
    fg_terms, bg_terms = [], []
    for s, t, m in zip(student_features, teacher_features, masks):
        c = s.shape[1]
        fg = m.to(compute_dtype(s, t, m))
        bg = (fg <= 0).to(fg.dtype)
        fg_terms.append(masked_squared_error(s, t, fg) / (2.0 * c * fg.sum()).clamp(min=1.0))
        bg_terms.append(masked_squared_error(s, t, bg) / (2.0 * c * bg.sum()).clamp(min=1.0))
    return fg_terms, bg_terms


def robust_soft_label_loss(
    student_logits: Tensor, teacher_logits: Tensor, eta: Tensor, temperature: float = 2.0
) -> Tensor:
    """``mean_i η_i · T² · (1/C) Σ_c p^t_ic log(p^t_ic / p^s_ic)`` with ``p = softmax(z / T)``.

    Args:
        student_logits / teacher_logits: ``(M, C)`` logits of the same instances.
        eta: ``(M,)`` robustness weights (detached).

    Returns:
        fp32 scalar (fp64 when an input is fp64); ``0`` (with a graph) when ``M = 0``.
    """
    if student_logits.shape[0] == 0:
        return zero_like_loss(student_logits)
    kl = softmax_kl_div(student_logits, teacher_logits, temperature)  # (M,), includes T²
    return (to_compute(eta.detach(), kl) * kl / student_logits.shape[1]).mean()


def global_knowledge_loss(
    student_inst: Tensor,
    teacher_inst: Tensor,
    student_protos: Tensor,
    teacher_protos: Tensor,
    eta: Tensor,
) -> Tensor:
    """The paper's global-knowledge alignment on one level.

    Args:
        student_inst / teacher_inst: ``(M, D_s)`` / ``(M, D_t)`` instance features.
        student_protos / teacher_protos: ``(Q, D_s)`` / ``(Q, D_t)`` the prototypes of **all**
            classes of the level.
        eta: ``(M,)`` robustness.

    Returns:
        ``SmoothL1_mean(η·cos(s, Ps), η·cos(t, Pt))`` (β = 1); gradients reach the student
        instances only. ``0`` when there are no instances or no prototypes.
    """
    if student_inst.shape[0] == 0 or student_protos.shape[0] == 0:
        return zero_like_loss(student_inst)
    w = to_compute(eta.detach(), student_inst, teacher_inst)[:, None]
    g_s = prototype_cosines(student_inst, student_protos.detach()) * w
    with torch.no_grad():
        g_t = prototype_cosines(teacher_inst, teacher_protos) * w
    return F.smooth_l1_loss(g_s, g_t, beta=1.0)


class _PrototypeBank(nn.Module):
    """Per-stride prototypes as buffers, so checkpoints (and exact resume) carry them."""

    def __init__(self, strides, channels, num_classes: int, num_prototypes: int):
        super().__init__()
        self.strides = list(strides)
        for s in self.strides:
            self.register_buffer(f"p{s}", torch.zeros(num_classes, num_prototypes, channels[s]))

    def get(self, stride: int) -> Tensor:
        return getattr(self, f"p{stride}")


@KD_METHOD_REGISTRY.register()
class GlobalKD(KDMethod):
    """Global Knowledge distillation: PGM prototypes + the robust distilling module.

    Config (``cfg.KD.GLOBALKD``): ``FG_WEIGHT`` (1), ``BG_WEIGHT`` (4), ``SOFT_WEIGHT`` (1),
    ``TEMPERATURE`` (2), ``ATTENUATION`` (True), ``GLOBAL_LOSS`` (False — the released code's
    default; True adds the paper's explicit loss), ``GLOBAL_WEIGHT`` (5), ``ADAPTER_KERNEL`` (3),
    and the PGM settings read by :class:`kd2.modeling.prototypes.PrototypeRefresher`
    (``NUM_PROTOTYPES`` 10, ``ALPHA`` 10, ``BANDWIDTH`` 0.1, ``QUANTILE`` 0.4, ``MIN_BOX_SIZE``
    30 — boxes strictly larger, ``MAX_IMAGES_PER_CLASS`` 800, ``SEED`` 1, ``REFRESH_PERIOD`` 0 =
    one epoch).

    Losses: ``loss_kd_gk_fg``, ``loss_kd_gk_bg``, ``loss_kd_gk_soft`` (when ``SOFT_WEIGHT > 0``)
    and ``loss_kd_gk_global`` (with ``GLOBAL_LOSS``).

    The prototypes live in buffers (``protos_student.p<stride>`` ``(K, P, C_s)``,
    ``protos_teacher.p<stride>`` ``(K, P, C_t)``, ``valid.<stride>`` ``(K,)``) set by
    :meth:`set_prototypes`; they are saved with the method's state (checkpoints, resume).
    """

    card = MethodCard(
        title="Global Knowledge",
        summary="PGM prototypes and robust distilling (kd2._C kernels)",
        paper="Tang et al., Distilling Object Detectors with Global Knowledge (ECCV 2022)",
        code="hikvision-research/DAVAR-Lab-ML",
        project="GlobalKD",
        terms=("loss_kd_gk_fg", "loss_kd_gk_bg", "loss_kd_gk_soft", "loss_kd_gk_global"),
        families=("faster_rcnn", "retinanet", "fcos", "gfl"),
    )

    needs_prototypes = True

    def __init__(
        self,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        *,
        num_classes: int,
        arch: str,
        num_prototypes: int = 10,
        fg_weight: float = 1.0,
        bg_weight: float = 4.0,
        soft_weight: float = 1.0,
        temperature: float = 2.0,
        attenuation: bool = True,
        global_loss: bool = False,
        global_weight: float = 5.0,
        adapter_kernel: int = 3,
    ):
        super().__init__()
        if arch not in ("one_stage", "two_stage"):
            raise ValueError(f"GlobalKD arch must be 'one_stage' or 'two_stage', got {arch!r}")
        if temperature <= 0:
            raise ValueError(f"GlobalKD TEMPERATURE must be > 0, got {temperature}")
        if num_prototypes < 1:
            raise ValueError(f"GlobalKD NUM_PROTOTYPES must be >= 1, got {num_prototypes}")
        self.arch = arch
        self.num_classes = int(num_classes)
        self.num_prototypes = int(num_prototypes)
        self.fg_weight = float(fg_weight)
        self.bg_weight = float(bg_weight)
        self.soft_weight = float(soft_weight)
        self.temperature = float(temperature)
        self.attenuation = bool(attenuation)
        self.global_loss = bool(global_loss)
        self.global_weight = float(global_weight)
        self.adapter = FeatureAdapter(student_channels, teacher_channels, int(adapter_kernel))
        self.strides = list(self.adapter.strides)
        k, p = self.num_classes, self.num_prototypes
        self.protos_student = _PrototypeBank(self.strides, student_channels, k, p)
        self.protos_teacher = _PrototypeBank(self.strides, teacher_channels, k, p)
        for s in self.strides:
            self.register_buffer(f"valid_{s}", torch.zeros(k, dtype=torch.bool))
        self.register_buffer("refreshed_at", torch.tensor(-1, dtype=torch.long))
        head = "roi" if arch == "two_stage" else "dense"
        self.teacher_parts = frozenset({"features", head} if self.soft_weight > 0 else {"features"})
        # Set by the prototype refresher; attenuation is 1 until it is.
        self.epoch_iters = 0
        self.max_iter = 0
        self.iteration = 0

    @classmethod
    def from_config(
        cls,
        node,
        *,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        num_classes: int,
        arch: str,
    ) -> GlobalKD:
        return cls(
            student_channels,
            teacher_channels,
            num_classes=num_classes,
            arch=arch,
            num_prototypes=node.NUM_PROTOTYPES,
            fg_weight=node.FG_WEIGHT,
            bg_weight=node.BG_WEIGHT,
            soft_weight=node.SOFT_WEIGHT,
            temperature=node.TEMPERATURE,
            attenuation=node.ATTENUATION,
            global_loss=node.GLOBAL_LOSS,
            global_weight=node.GLOBAL_WEIGHT,
            adapter_kernel=node.ADAPTER_KERNEL,
        )

    # -- prototypes and schedule ------------------------------------------------------------
    def set_prototypes(
        self, stride: int, student: Tensor, teacher: Tensor, valid: Tensor, iteration: int
    ) -> None:
        """Install one level's prototypes: ``student (K, P, C_s)``, ``teacher (K, P, C_t)``,
        ``valid (K,)`` bool (classes without PGM instances keep ``η = 1``)."""
        bank_s, bank_t = self.protos_student.get(stride), self.protos_teacher.get(stride)
        if student.shape != bank_s.shape or teacher.shape != bank_t.shape:
            raise ValueError(
                f"stride {stride}: prototypes {tuple(student.shape)} / {tuple(teacher.shape)} do "
                f"not match the expected {tuple(bank_s.shape)} / {tuple(bank_t.shape)}"
            )
        bank_s.copy_(student)
        bank_t.copy_(teacher)
        getattr(self, f"valid_{stride}").copy_(valid)
        self.refreshed_at.fill_(int(iteration))

    def has_prototypes(self) -> bool:
        return int(self.refreshed_at) >= 0

    def before_step(self, iteration: int) -> None:
        self.iteration = int(iteration)

    def attenuation_factor(self) -> float:
        """``1 − epoch / num_epochs`` (epochs of ``epoch_iters`` iterations), or 1."""
        if not self.attenuation or self.epoch_iters <= 0 or self.max_iter <= 0:
            return 1.0
        num_epochs = math.ceil(self.max_iter / self.epoch_iters)
        epoch = min(self.iteration // self.epoch_iters, num_epochs - 1)
        return 1.0 - epoch / num_epochs

    def _eta(self, stride, s_inst, t_inst, labels) -> Tensor:
        return robustness_by_class(
            s_inst,
            t_inst,
            labels,
            self.protos_student.get(stride),
            self.protos_teacher.get(stride),
            getattr(self, f"valid_{stride}"),
        )

    # -- instances ----------------------------------------------------------------------------
    def _instances(self, student: StepRecord) -> tuple[Tensor, Tensor, Tensor]:
        """``(boxes (M, 4), batch_index (M,), labels (M,))``; one-stage: the positive anchors'
        boxes (un-decoded), row-major over ``(image, anchor)``."""
        k = self.num_classes
        if self.arch == "two_stage":
            roi = student.roi
            if roi is None:
                raise ValueError("GlobalKD (two-stage) needs the student's ROI record")
            boxes, index, labels = [], [], []
            for i, (p, lab) in enumerate(zip(roi.proposals, roi.labels)):
                pos = (lab >= 0) & (lab < k)
                boxes.append(p[pos].detach())
                labels.append(lab[pos])
                index.append(torch.full((int(pos.sum()),), i, dtype=torch.long, device=p.device))
            return torch.cat(boxes), torch.cat(index), torch.cat(labels)
        dense = student.dense
        if dense is None or dense.labels is None:
            raise ValueError("GlobalKD (one-stage) needs the student's dense-head assignment")
        anchors = torch.cat(dense.anchors)  # (R, 4)
        pos = (dense.labels >= 0) & (dense.labels < k)  # (N, R)
        img, anchor = pos.nonzero(as_tuple=True)
        return anchors[anchor], img, dense.labels[img, anchor]

    # -- forward ----------------------------------------------------------------------------
    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        strides = shared_strides(self.adapter, student.features, teacher.features)
        boxes, index, labels = self._instances(student)
        n = student.images.shape[0]
        grid = [tuple(student.features[s].shape[-2:]) for s in strides]
        levels = assign_fpn_levels(boxes, len(strides)) if boxes.numel() else index.clone()
        eta_dtype = compute_dtype(*(student.features[s] for s in strides))
        eta_own = torch.ones(boxes.shape[0], dtype=eta_dtype, device=boxes.device)
        global_terms = []
        for lvl, s in enumerate(strides):
            on = levels == lvl
            need_all = self.global_loss
            if not bool(on.any()) and not need_all:
                continue
            sel = torch.ones_like(on) if need_all else on
            f_s = box_mean_pool(student.features[s], boxes[sel], index[sel], s)
            f_t = box_mean_pool(teacher.features[s].detach(), boxes[sel], index[sel], s)
            eta = self._eta(s, f_s.detach(), f_t, labels[sel])
            eta_own[on] = eta[on[sel]]
            if need_all and self.has_prototypes():
                valid = getattr(self, f"valid_{s}")
                ps = self.protos_student.get(s)[valid].flatten(0, 1)
                pt = self.protos_teacher.get(s)[valid].flatten(0, 1)
                global_terms.append(global_knowledge_loss(f_s, f_t, ps, pt, eta))
        masks = robust_fg_masks(boxes, index, levels, eta_own, strides, grid, n)
        s_maps, t_maps = adapt_features(self.adapter, student.features, teacher.features, strides)
        fg_terms, bg_terms = robust_decoupled_feature_loss(s_maps, t_maps, masks)
        reduce = (lambda xs: torch.stack(xs).mean()) if self.arch == "two_stage" else sum
        a = self.attenuation_factor()
        losses = {
            "loss_kd_gk_fg": reduce(fg_terms) * (a * self.fg_weight),
            "loss_kd_gk_bg": reduce(bg_terms) * (a * self.bg_weight),
        }
        if self.soft_weight > 0:
            # one-stage: the instances are the positive anchors, and their soft labels take the η
            # computed above at the anchor box's 56-px level (``soft_weight`` of the released
            # one-stage strategy), so the mask and the soft labels weigh an anchor alike.
            losses["loss_kd_gk_soft"] = self._soft_loss(student, teacher, eta_own) * (
                self.soft_weight
            )
        if self.global_loss:
            total = sum(global_terms) if global_terms else zero_like_loss(s_maps[0])
            losses["loss_kd_gk_global"] = total * (a * self.global_weight)
        return losses

    def _soft_loss(self, student: StepRecord, teacher: StepRecord, anchor_eta: Tensor) -> Tensor:
        """The η-weighted soft-label KL. ``anchor_eta`` (one-stage only): the η of every
        positive anchor at its box's 56-px level, as painted into the feature mask."""
        k = self.num_classes
        if self.arch == "two_stage":
            s_roi, t_roi = student.roi, teacher.roi
            if t_roi is None or t_roi.cls_logits is None:
                raise ValueError("GlobalKD soft labels need the teacher's ROI head outputs")
            labels = s_roi.cat_labels
            pos = (labels >= 0) & (labels < k)
            if not bool(pos.any()):
                return zero_like_loss(s_roi.cls_logits)
            boxes = torch.cat(s_roi.proposals)[pos]
            # ROI features: 7x7 RoIAlign, globally averaged; the ROI's level by mmdet's rule.
            dtype = compute_dtype(s_roi.roi_features, t_roi.roi_features)
            f_s = s_roi.roi_features[pos].detach().to(dtype).mean(dim=(2, 3))
            f_t = t_roi.roi_features[pos].to(dtype).mean(dim=(2, 3))
            roi_strides = self.strides[: min(4, len(self.strides))]
            lvl = assign_fpn_levels(boxes, len(roi_strides), plus_one=False)
            eta = torch.ones(boxes.shape[0], dtype=dtype, device=boxes.device)
            for i, s in enumerate(roi_strides):
                on = lvl == i
                if bool(on.any()):
                    eta[on] = self._eta(s, f_s[on], f_t[on], labels[pos][on])
            return robust_soft_label_loss(
                s_roi.cls_logits[pos], t_roi.cls_logits[pos], eta, self.temperature
            )
        s_dense, t_dense = student.dense, teacher.dense
        require_sigmoid_dense("GlobalKD", s_dense)
        if t_dense is None:
            raise ValueError("GlobalKD soft labels need the teacher's dense head outputs")
        # the positive anchors in the order of :meth:`_instances` (row-major over (image, anchor))
        pos = (s_dense.labels >= 0) & (s_dense.labels < k)
        s_logits = torch.cat(s_dense.cls_logits, dim=1)[pos]
        t_logits = torch.cat(t_dense.cls_logits, dim=1)[pos]
        if s_logits.shape[0] == 0:
            return zero_like_loss(s_logits)
        if anchor_eta.shape[0] != s_logits.shape[0]:
            raise ValueError(
                f"GlobalKD: {anchor_eta.shape[0]} instance weights for {s_logits.shape[0]} "
                "positive anchors"
            )
        return robust_soft_label_loss(s_logits, t_logits, anchor_eta, self.temperature)
