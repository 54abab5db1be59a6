"""CWD: channel-wise knowledge distillation for dense prediction (Shu et al., ICCV 2021).

**Loss** (mmrazor's ``ChannelWiseDivergence``, the same math as the official code): every
``(n, c)`` map of an ``(N, C, H, W)`` tensor is turned into a distribution over its ``H·W``
positions by a softmax at temperature ``τ``;
``L = τ² / (N·C) · Σ_{n,c} KL(softmax(y_t / τ) ‖ softmax(y_s / τ))``.

**Two recipes share the name** (``../shared/docs/methods-2026.md`` §2.1), both offered:

* ``"neck"`` — the FPN outputs, τ = 1, weight **10 per level** on 5 levels (mmrazor 1.x configs:
  RetinaNet P3–P7, Faster R-CNN P2–P6 including the max-pooled P6). mmrazor has no adapter
  (equal channels required); where the student's FPN is narrower kd2 adds one 1×1 conv per
  level (only there), so the recipe also runs on a narrower student.
* ``"logits"`` — the dense head's classification logits at each level, τ = 1, weight **5** (the
  0.x GFL recipe behind the published 40.2 → 41.9, hooked on ``bbox_head.gfl_cls``): one
  channel per anchor and class, ``(N, A·K, H, W)``, raw logits. One-stage detectors only.

``RECIPE "auto"`` picks by detector: ``neck`` for Faster R-CNN and RetinaNet (their released
1.x configs), ``logits`` for GFL (the published recipe) and FCOS (the published recipe's GFL head
is FCOS-style — one location per anchor, ``K`` sigmoid channels — so it is the closest to a
published FCOS recipe).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .utils import (
    adapt_features,
    distill_strides,
    level_adapter,
    require_sigmoid_dense,
    shared_strides,
    softmax_kl_div,
)

__all__ = ["CWD", "CWD_DEFAULT_WEIGHTS", "channel_wise_distillation_loss"]

#: weight per level of each recipe (mmrazor 1.x neck: 10; 0.x GFL logits: 5).
CWD_DEFAULT_WEIGHTS = {"neck": 10.0, "logits": 5.0}
_RECIPES = ("auto", "neck", "logits")


def channel_wise_distillation_loss(student: Tensor, teacher: Tensor, tau: float = 1.0) -> Tensor:
    """Channel-wise distillation of one map.

    Args:
        student: ``(N, C, H, W)``.
        teacher: ``(N, C, H, W)`` (treated as a constant: detached).
        tau: temperature ``τ > 0``.

    Returns:
        fp32 scalar (fp64 when a map is fp64)
        ``τ² · Σ_{n,c} KL(softmax_HW(t / τ) ‖ softmax_HW(s / τ)) / (N·C)``.
    """
    if student.shape != teacher.shape or student.dim() != 4:
        raise ValueError(
            f"CWD needs two (N, C, H, W) maps of one shape, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    if tau <= 0:
        raise ValueError(f"CWD temperature must be > 0, got {tau}")
    n, c, h, w = student.shape
    # softmax_kl_div: per (n, c) row, τ² · KL over the H·W positions
    kl = softmax_kl_div(student.reshape(n * c, h * w), teacher.reshape(n * c, h * w), tau)
    return kl.sum() / (n * c)


@KD_METHOD_REGISTRY.register()
class CWD(KDMethod):
    """Channel-wise distillation on the FPN maps (``neck``) or the dense head's logits
    (``logits``).

    Config (``cfg.KD.CWD``): ``RECIPE`` (``"auto"``), ``WEIGHT`` (< 0: 10 for neck, 5 for
    logits), ``TAU`` (1.0), ``STRIDES`` (empty: the 5 finest shared levels).

    Loss: ``loss_kd_cwd`` = weight × Σ over levels.
    """

    card = MethodCard(
        title="CWD",
        summary="channel-wise distributions of the FPN maps or the dense-head logits",
        paper="Shu et al., Channel-wise Knowledge Distillation (ICCV 2021)",
        code="open-mmlab/mmrazor",
        project="FeatureDistillation",
        terms=("loss_kd_cwd",),
        families=("faster_rcnn", "retinanet", "fcos", "gfl", "ssd", "detr"),
    )

    dense_across_families = True  # the logits recipe compares class maps only

    def __init__(
        self,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        *,
        recipe: str = "auto",
        weight: float = -1.0,
        tau: float = 1.0,
        strides: Sequence[int] = (),
        arch: str = "one_stage",
    ):
        super().__init__()
        if recipe not in _RECIPES:
            raise ValueError(f"KD.CWD.RECIPE must be one of {_RECIPES}, got {recipe!r}")
        if recipe == "logits" and arch != "one_stage":
            raise ValueError(
                "KD.CWD.RECIPE 'logits' distils a dense head's classification logits: one-stage "
                "detectors only; use 'neck' for a two-stage detector"
            )
        if tau <= 0:
            raise ValueError(f"KD.CWD.TAU must be > 0, got {tau}")
        self.recipe = recipe
        self.configured_weight = float(weight)
        self.tau = float(tau)
        self.configured_strides = [int(s) for s in strides]
        self.arch = arch
        self.adapter = level_adapter(student_channels, teacher_channels, strides, 5)
        if recipe == "auto":
            self.bind_detector("faster_rcnn" if arch == "two_stage" else "retinanet")
        else:
            self._set_recipe(recipe)

    def _set_recipe(self, recipe: str) -> None:
        self.resolved_recipe = recipe
        self.weight = (
            CWD_DEFAULT_WEIGHTS[recipe] if self.configured_weight < 0 else self.configured_weight
        )
        self.teacher_parts = frozenset({"features"} if recipe == "neck" else {"dense"})
        if recipe == "logits":
            self.adapter = None  # the logits recipe compares raw head outputs

    def bind_detector(self, family: str) -> None:
        if self.recipe == "auto":
            self._set_recipe("logits" if family in ("fcos", "gfl") else "neck")

    def unsupported_reason(self, arch: str, dense_softmax: bool) -> str | None:
        if self.resolved_recipe == "logits" and dense_softmax:
            return "CWD's logits recipe is defined on sigmoid dense heads; use RECIPE 'neck'"
        return super().unsupported_reason(arch, dense_softmax)

    @classmethod
    def from_config(
        cls,
        node,
        *,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        num_classes: int,
        arch: str,
    ) -> CWD:
        return cls(
            student_channels,
            teacher_channels,
            recipe=node.RECIPE,
            weight=node.WEIGHT,
            tau=node.TAU,
            strides=node.STRIDES,
            arch=arch,
        )

    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        if self.resolved_recipe == "logits":
            s_maps, t_maps = self._logit_maps(student, teacher)
        else:
            strides = shared_strides(self.adapter, student.features, teacher.features)
            s_maps, t_maps = adapt_features(
                self.adapter, student.features, teacher.features, strides
            )
        loss = torch.stack(
            [channel_wise_distillation_loss(s, t, self.tau) for s, t in zip(s_maps, t_maps)]
        ).sum()
        return {"loss_kd_cwd": loss * self.weight}

    def _logit_maps(self, student: StepRecord, teacher: StepRecord):
        if student.dense is None or teacher.dense is None:
            raise ValueError("CWD's logits recipe needs the dense head in both records")
        require_sigmoid_dense("CWD (logits recipe)", student.dense)
        s_maps = dict(
            zip(student.dense.strides, student.dense.level_maps(student.dense.cls_logits))
        )
        t_maps = dict(
            zip(teacher.dense.strides, teacher.dense.level_maps(teacher.dense.cls_logits))
        )
        available = sorted(set(s_maps) & set(t_maps))
        strides = distill_strides(available, self.configured_strides, 5)
        for st in strides:
            if s_maps[st].shape != t_maps[st].shape:
                raise ValueError(
                    f"stride {st}: student logits {tuple(s_maps[st].shape)} and teacher logits "
                    f"{tuple(t_maps[st].shape)} differ (CWD's logits recipe needs the same anchors "
                    "per location and classes)"
                )
        return [s_maps[st] for st in strides], [t_maps[st] for st in strides]
