"""Trainable layers that map student features into the teacher's feature space."""

from __future__ import annotations

from typing import Dict, Mapping

from torch import Tensor, nn

__all__ = ["FeatureAdapter"]


class FeatureAdapter(nn.Module):
    """One independent conv per FPN stride, student channels -> teacher channels.

    The default is the Conv3x3 (padding 1, bias, no activation) that FRS, GK and DeFeat use;
    ``kernel_size=1`` gives the 1x1 variant. Only strides present in both detectors get a layer.

    Args:
        student_channels, teacher_channels: channels keyed by stride.
        kernel_size: 1 or 3.
        identity_when_equal: where student and teacher have the same channels, use no layer at
            all (``nn.Identity``): the "align conv only if the channels differ" rule of the FGD,
            MGD and mmrazor CWD / PKD recipes.
    """

    def __init__(
        self,
        student_channels: Mapping[int, int],
        teacher_channels: Mapping[int, int],
        kernel_size: int = 3,
        identity_when_equal: bool = False,
    ):
        super().__init__()
        if kernel_size not in (1, 3):
            raise ValueError(f"FeatureAdapter kernel_size must be 1 or 3, got {kernel_size}")
        self.strides = sorted(set(student_channels) & set(teacher_channels))
        if not self.strides:
            raise ValueError(
                f"student strides {sorted(student_channels)} and teacher strides "
                f"{sorted(teacher_channels)} have none in common; feature distillation needs "
                "FPN levels of the same stride"
            )
        self.convs = nn.ModuleDict()
        for s in self.strides:
            c_s, c_t = student_channels[s], teacher_channels[s]
            if identity_when_equal and c_s == c_t:
                self.convs[str(s)] = nn.Identity()
            else:
                self.convs[str(s)] = nn.Conv2d(c_s, c_t, kernel_size, padding=kernel_size // 2)

    def forward(self, features: Dict[int, Tensor]) -> Dict[int, Tensor]:
        """``{stride: (N, C_s, H, W)}`` -> ``{stride: (N, C_t, H, W)}`` for the shared strides."""
        return {s: self.convs[str(s)](features[s]) for s in self.strides}
