"""MGD: masked generative distillation (Yang et al., ECCV 2022).

Per FPN level (official ``yzd-v/MGD``, ``mmdet/distillation/losses/mgd.py``, and its mmrazor
port): the student map — after a 1×1 align conv, only where the channels differ — is multiplied
by a random spatial mask that drops a fraction ``λ`` of the positions (one mask per image,
shared over channels, redrawn every step: uniform ``[0, 1)`` values, a position dropped where the
value exceeds ``1 − λ``); a generator ``conv3×3 – ReLU – conv3×3`` (``C → C``, one per level, not
shared) must rebuild the **whole** teacher map from it. Loss = ``α · Σ (G(M ⊙ F_s) − F_t)² / N``,
a sum over the map divided by the batch size, summed over levels.

Defaults (``methods-2026.md`` §2.4): one-stage detectors α 2e-5, λ 0.65 on 5 levels (P3–P7);
Faster R-CNN α 5e-7, λ 0.45 on P2–P5. The released one-stage rows also start the student's neck
and head from the teacher (``KD.INHERIT_TEACHER ["neck", "head"]``); Faster R-CNN's do not.

The mask is drawn from the default generator of the feature's device (the official code draws on
the CPU and moves it), i.e. from the training RNG that kd2's checkpoints save per process, so a
resumed run draws the same masks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .utils import adapt_features, compute_dtype, level_adapter, shared_strides

__all__ = ["MGD", "MGD_DEFAULTS", "masked_generation_loss", "random_pixel_mask"]

#: ``(α, λ, levels)`` by detector family.
MGD_DEFAULTS = {"faster_rcnn": (5e-7, 0.45, 4), "one_stage": (2e-5, 0.65, 5)}


def random_pixel_mask(
    n: int,
    h: int,
    w: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """MGD's random spatial mask.

    Args:
        n, h, w: batch size and map size.
        ratio: ``λ`` in ``[0, 1]``, the expected fraction of positions dropped.
        generator: the RNG to draw from (default: the device's default generator).
        device: where to draw (default: the generator's device, else the CPU).

    Returns:
        ``(N, 1, H, W)`` float, ``1`` = kept, ``0`` = dropped (where ``U[0, 1) > 1 − λ``).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"MGD mask ratio must be in [0, 1], got {ratio}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand((n, 1, h, w), generator=generator, device=device)
    return (u <= 1.0 - ratio).float()


def masked_generation_loss(generated: Tensor, teacher: Tensor) -> Tensor:
    """``Σ (generated − teacher)² / N`` in fp32 (fp64 when a map is fp64).

    Args:
        generated: ``(N, C, H, W)`` the generator's output.
        teacher: ``(N, C, H, W)`` (treated as a constant: detached).
    """
    if generated.shape != teacher.shape:
        raise ValueError(
            f"generated map {tuple(generated.shape)} and teacher map {tuple(teacher.shape)} differ"
        )
    dtype = compute_dtype(generated, teacher)
    diff = generated.to(dtype) - teacher.detach().to(dtype)
    return diff.pow(2).sum() / generated.shape[0]


def _generator(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 3, padding=1),
    )


@KD_METHOD_REGISTRY.register()
class MGD(KDMethod):
    """Masked generative distillation of the FPN maps.

    Config (``cfg.KD.MGD``): ``ALPHA`` and ``MASK_RATIO`` (< 0: the detector's defaults, see
    :data:`MGD_DEFAULTS`), ``STRIDES`` (empty: P2–P5 for Faster R-CNN, 5 levels otherwise).

    Loss: ``loss_kd_mgd``. Trainable: the align convs (where channels differ) and one generator
    per level, on the student side only.
    """

    card = MethodCard(
        title="MGD",
        summary="masked generative distillation of the FPN maps",
        paper="Yang et al., Masked Generative Distillation (ECCV 2022)",
        code="yzd-v/MGD",
        project="FeatureDistillation",
        terms=("loss_kd_mgd",),
        families=("faster_rcnn", "retinanet", "fcos", "gfl", "ssd", "detr"),
    )

    teacher_parts = frozenset({"features"})

    def __init__(
        self,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        *,
        alpha: float = -1.0,
        mask_ratio: float = -1.0,
        strides: Sequence[int] = (),
        arch: str = "one_stage",
    ):
        super().__init__()
        family = "faster_rcnn" if arch == "two_stage" else "one_stage"
        d_alpha, d_ratio, self.default_levels = MGD_DEFAULTS[family]
        self.alpha = d_alpha if alpha < 0 else float(alpha)
        self.mask_ratio = d_ratio if mask_ratio < 0 else float(mask_ratio)
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise ValueError(f"KD.MGD.MASK_RATIO must be in [0, 1], got {self.mask_ratio}")
        self.adapter = level_adapter(
            student_channels, teacher_channels, strides, self.default_levels
        )
        self.generators = nn.ModuleDict(
            {str(s): _generator(teacher_channels[s]) for s in self.adapter.strides}
        )

    @classmethod
    def from_config(
        cls,
        node,
        *,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        num_classes: int,
        arch: str,
    ) -> MGD:
        return cls(
            student_channels,
            teacher_channels,
            alpha=node.ALPHA,
            mask_ratio=node.MASK_RATIO,
            strides=node.STRIDES,
            arch=arch,
        )

    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        strides = shared_strides(self.adapter, student.features, teacher.features)
        s_maps, t_maps = adapt_features(self.adapter, student.features, teacher.features, strides)
        terms = []
        for st, s, t in zip(strides, s_maps, t_maps):
            n, _, h, w = s.shape
            mask = random_pixel_mask(n, h, w, self.mask_ratio, device=s.device)
            generated = self.generators[str(st)](s * mask)
            terms.append(masked_generation_loss(generated, t))
        return {"loss_kd_mgd": torch.stack(terms).sum() * self.alpha}
