"""FitNets hint loss (Romero et al., 2015) as full-map FPN feature imitation.

The original hint loss is ``½ ‖F_t − r(F_s)‖²``, a **sum** over every element. On FPN maps that
sum grows with the image size and the channel count (hundreds of thousands of elements per
level), so kd2 uses a size-independent normalisation: per level ``½ · mean_{N,C,H,W}
(φ(F_s) − F_t)²``, then **summed** over the shared strides. The original scale is recovered by
multiplying ``WEIGHT`` by ``N·C·H·W`` of a level. There is no hint pre-training stage: the loss is
simply added to the detection loss ("full-map imitation", the usual detection baseline).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from kd2.losses.adapters import FeatureAdapter
from kd2.structures import StepRecord

from .base import KD_METHOD_REGISTRY, KDMethod, MethodCard
from .utils import adapt_features, compute_dtype, shared_strides

__all__ = ["FitNet", "fitnet_loss"]


def fitnet_loss(student_features: Sequence[Tensor], teacher_features: Sequence[Tensor]) -> Tensor:
    """Full-map hint loss ``Σ_levels ½ · mean((φ(F_s) − F_t)²)``.

    Args:
        student_features: per level ``(N, C, H_l, W_l)`` **already adapted** student maps.
        teacher_features: per level ``(N, C, H_l, W_l)`` teacher maps (detached).

    Returns:
        fp32 scalar (fp64 when a map is fp64).
    """
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError("fitnet_loss needs the same non-zero number of student and teacher maps")
    loss = None
    for s, t in zip(student_features, teacher_features):
        dtype = compute_dtype(s, t)
        term = 0.5 * (s.to(dtype) - t.detach().to(dtype)).pow(2).mean()
        loss = term if loss is None else loss + term
    return loss


@KD_METHOD_REGISTRY.register()
class FitNet(KDMethod):
    """FitNets full-map imitation on every FPN stride shared by student and teacher.

    Config (``cfg.KD.FITNET``): ``WEIGHT`` (1.0), ``ADAPTER_KERNEL`` (3; 1 or 3).

    Loss: ``loss_kd_fitnet``.
    """

    card = MethodCard(
        title="FitNets",
        summary="full-map imitation of the FPN features",
        paper="Romero et al., FitNets (ICLR 2015)",
        code="open-mmlab/mmrazor (port)",
        project="Baselines",
        terms=("loss_kd_fitnet",),
        families=("faster_rcnn", "retinanet", "fcos", "gfl", "ssd", "detr"),
    )

    teacher_parts = frozenset({"features"})

    def __init__(
        self,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        *,
        weight: float = 1.0,
        adapter_kernel: int = 3,
    ):
        super().__init__()
        self.weight = float(weight)
        self.adapter = FeatureAdapter(student_channels, teacher_channels, int(adapter_kernel))

    @classmethod
    def from_config(
        cls,
        node,
        *,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        num_classes: int,
        arch: str,
    ) -> FitNet:
        return cls(
            student_channels,
            teacher_channels,
            weight=node.WEIGHT,
            adapter_kernel=node.ADAPTER_KERNEL,
        )

    def forward(self, student: StepRecord, teacher: StepRecord) -> dict[str, Tensor]:
        strides = shared_strides(self.adapter, student.features, teacher.features)
        s, t = adapt_features(self.adapter, student.features, teacher.features, strides)
        return {"loss_kd_fitnet": fitnet_loss(s, t) * self.weight}
