"""A backbone-only teacher: a vision foundation model's feature maps, on the student's grid.

:class:`FoundationTeacher` wraps a trunk — a DINOv2 / DINOv3 ViT, a DINOv3 ConvNeXt (through
transformers) or any timm model with ``features_only`` (:mod:`kd2.foundation.trunks`) — and owns
everything between the student's batch and the teacher's features:

* **its normalisation**: its :attr:`~FoundationTeacher.pixel_mean` / ``pixel_std`` (RGB, ``[0,
  1]`` units) are its input convention, so the distiller converts the student's normalised,
  padded batch into it with the one affine map every cross-framework teacher uses
  (:func:`kd2.modeling.cross_framework.to_teacher_input`) and the student's pipeline is unchanged;
* **its input size**: the batch is scaled by ``input_scale`` (an integer reduction ``1/k`` is a
  ``k × k`` average pool, as RT-DETRv4 feeds DINOv3 at half resolution; another factor is an
  antialiased bilinear resize), then zero-padded at the bottom/right to a multiple of the trunk's
  coarsest stride (the ViT patch size);
* **its geometry**: each native map (stride ``r`` of the scaled input, ``r / input_scale`` pixels
  of the student's) is resampled onto the grid of each target stride ``s`` of the student's input
  (:func:`resample_to_grid`), so a teacher level of stride ``s`` lines up cell for cell with the
  student's FPN level of stride ``s`` and every feature method reads it like a detector teacher's.

Its record (:meth:`FoundationTeacher.record`) fills ``features`` (target stride -> ``(N, D_s,
H_s, W_s)``) and ``embedding`` (a ViT's CLS token after the final norm). It has no classes, no
head and no detections.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd2.structures import StepRecord

__all__ = [
    "FoundationTeacher",
    "default_strides",
    "nearest_level",
    "resample_to_grid",
    "scale_input",
]

#: ImageNet's RGB mean / std in ``[0, 1]`` units: DINOv2's and DINOv3's processors' values.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def scale_input(images: Tensor, scale: float) -> Tensor:
    """``(N, 3, H, W)`` -> the batch scaled by ``scale``: an integer reduction ``1 / k`` is a
    ``k × k`` average pool (RT-DETRv4's ``AvgPool2d(2)`` at ``0.5``; partial windows at the
    bottom/right edge average what they cover), another factor an antialiased bilinear resize
    to ``ceil(H · scale) × ceil(W · scale)``; ``1`` returns ``images``."""
    if scale == 1.0:
        return images
    k = round(1.0 / scale)
    if scale < 1.0 and abs(1.0 / scale - k) < 1e-6:
        return F.avg_pool2d(images, k, ceil_mode=True, count_include_pad=False)
    h, w = images.shape[-2:]
    size = (math.ceil(h * scale), math.ceil(w * scale))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def resample_to_grid(
    feat: Tensor, native_stride: float, stride: int, size: Tuple[int, int]
) -> Tensor:
    """A feature map of cell size ``native_stride`` (pixels of the student's input, cell ``j``
    covering ``[j · r, (j + 1) · r)``) sampled at the centres of the ``size`` grid of cell size
    ``stride`` (cell ``i`` centred on ``(i + ½) · s``).

    Bilinear, the border cells repeated past the map's edge; a map already on that grid is
    returned as it is (cropped to ``size``). When the target cells are ``k ≥ 2`` times larger the
    map is first averaged over ``k × k`` cells, so a coarser grid sees the area it covers, not
    one sample of it.

    Args:
        feat: ``(N, C, h, w)``.
        native_stride: ``r``, the map's cell size in input pixels.
        stride: ``s``, the target grid's cell size in input pixels.
        size: ``(H_s, W_s)`` of the target grid.

    Returns:
        ``(N, C, H_s, W_s)``.
    """
    if (
        abs(native_stride - stride) < 1e-6
        and feat.shape[-2] >= size[0]
        and feat.shape[-1] >= size[1]
    ):
        return feat[..., : size[0], : size[1]]
    k = int(stride / native_stride + 1e-6)
    if k >= 2:
        feat = F.avg_pool2d(feat, k, ceil_mode=True, count_include_pad=False)
        native_stride = native_stride * k
    h, w = feat.shape[-2:]
    ys = (torch.arange(size[0], device=feat.device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(size[1], device=feat.device, dtype=torch.float32) + 0.5) * stride
    # grid_sample (align_corners=False): -1 / +1 are the outer edges of the first / last cell
    gy = 2.0 * ys / (native_stride * h) - 1.0
    gx = 2.0 * xs / (native_stride * w) - 1.0
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)
    grid = grid[None].expand(feat.shape[0], -1, -1, -1).to(feat.dtype)
    return F.grid_sample(feat, grid, mode="bilinear", padding_mode="border", align_corners=False)


def default_strides(native: Sequence[float]) -> List[int]:
    """The target strides of native strides (student pixels) when none are configured: each
    rounded to the nearest power of two, the strides every FPN has (a DINOv2 ViT-S/14 at full
    resolution: 14 -> 16)."""
    return sorted({2 ** round(math.log2(r)) for r in native})


def nearest_level(native: Sequence[float], stride: int) -> int:
    """Index of the native stride nearest ``stride`` in ratio (ties: the finer one)."""
    return min(range(len(native)), key=lambda i: (abs(math.log(native[i] / stride)), native[i]))


class FoundationTeacher(nn.Module):
    """A frozen backbone-only teacher (see the module docstring).

    Args:
        backbone: the trunk (:mod:`kd2.foundation.trunks`): ``backbone(x)`` on an ``(N, 3, H, W)``
            batch in this teacher's normalisation returns ``{key: (N, C, h, w)}`` — one map per
            level, keyed as ``backbone.levels`` lists them — and, for a ViT, ``"cls"`` ``(N, D)``.
            Named ``backbone`` so that ``KD.TEACHER.DTYPE`` / ``CHANNELS_LAST`` / ``COMPILE``
            apply to it (:mod:`kd2.modeling.teacher_runtime`).
        levels: ``(key, stride, channels)`` of each native map, stride in pixels of the scaled
            input, finest first.
        pixel_mean / pixel_std: the trunk's RGB normalisation in ``[0, 1]`` units.
        strides: the target strides (student pixels) the teacher offers; empty =
            :func:`default_strides`.
        level_for_stride: per target stride the native level it is resampled from (index into
            ``levels``); empty = the nearest in stride (:func:`nearest_level`). A ViT read at
            several layers maps them to the strides in order.
        input_scale: the factor the student's batch is scaled by before the trunk.
        pad_multiple: the scaled batch is zero-padded to a multiple of it (the patch size).
        name: the model, for messages and the level table.
    """

    def __init__(
        self,
        backbone: nn.Module,
        levels: Sequence[Tuple[str, int, int]],
        *,
        pixel_mean: Sequence[float] = IMAGENET_MEAN,
        pixel_std: Sequence[float] = IMAGENET_STD,
        strides: Sequence[int] = (),
        level_for_stride: Sequence[int] = (),
        input_scale: float = 1.0,
        pad_multiple: int = 1,
        name: str = "foundation model",
    ):
        super().__init__()
        if input_scale <= 0:
            raise ValueError(f"input_scale must be > 0, got {input_scale}")
        self.backbone = backbone
        self.levels = [(str(k), int(r), int(c)) for k, r, c in levels]
        self.input_scale = float(input_scale)
        native = [r / self.input_scale for _, r, _ in self.levels]
        self.strides = sorted(int(s) for s in strides) if strides else default_strides(native)
        if level_for_stride and len(level_for_stride) != len(self.strides):
            raise ValueError(
                f"level_for_stride {list(level_for_stride)} needs one level per stride "
                f"{self.strides}"
            )
        self.source = {
            s: int(level_for_stride[i]) if level_for_stride else nearest_level(native, s)
            for i, s in enumerate(self.strides)
        }
        self.pixel_mean = [float(x) for x in pixel_mean]
        self.pixel_std = [float(x) for x in pixel_std]
        self.pad_multiple = max(1, int(pad_multiple))
        self.name = name

    @property
    def channels(self) -> Dict[int, int]:
        """Channels of the offered maps, by target stride."""
        return {s: self.levels[i][2] for s, i in self.source.items()}

    def native_stride(self, level: int) -> float:
        """Cell size of native level ``level`` in pixels of the student's input."""
        return self.levels[level][1] / self.input_scale

    def prepare(self, images: Tensor) -> Tensor:
        """The trunk's input from a batch in this teacher's normalisation: scaled, then padded to
        a multiple of :attr:`pad_multiple`."""
        x = scale_input(images, self.input_scale)
        m = self.pad_multiple
        ph, pw = (-x.shape[-2]) % m, (-x.shape[-1]) % m
        return F.pad(x, (0, pw, 0, ph)) if ph or pw else x

    def forward(
        self, images: Tensor, sizes: Dict[int, Tuple[int, int]] | None = None
    ) -> Tuple[Dict[int, Tensor], Tensor | None]:
        """``(features, embedding)`` of an ``(N, 3, H, W)`` batch in this teacher's normalisation.

        ``features``: per target stride ``s``, ``(N, C, H_s, W_s)`` on the grid ``sizes[s]``
        (default ``ceil(H / s) × ceil(W / s)``), float32. ``embedding``: ``(N, D)`` (a ViT's CLS
        token) or ``None``.
        """
        out = self.backbone(self.prepare(images))
        h, w = images.shape[-2:]
        sizes = dict(sizes or {})
        features = {}
        for s, level in self.source.items():
            size = sizes.get(s, (math.ceil(h / s), math.ceil(w / s)))
            native = out[self.levels[level][0]].float()
            features[s] = resample_to_grid(native, self.native_stride(level), s, size)
        cls = out.get("cls")
        return features, cls.float() if cls is not None else None

    @torch.no_grad()
    def record(self, images: Tensor, student: StepRecord, strides: Sequence[int]) -> StepRecord:
        """The teacher's record of a student's step: ``images`` the student's padded batch in
        this teacher's normalisation; each map on the grid of the student's level of the same
        stride (where the student has one)."""
        sizes = {s: tuple(student.features[s].shape[-2:]) for s in strides if s in student.features}
        features, embedding = self(images, sizes)
        rec = student.teacher_view()
        rec.features = {s: features[s] for s in strides if s in features}
        rec.embedding = embedding
        return rec
