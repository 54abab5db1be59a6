"""The image-classifier teacher of classifier-to-detector distillation (``docs/algorithms.md`` §4).

* :class:`CropClassifier` — a torchvision ResNet classifier of object crops (``K``-way fc), the
  network ``tools/train_crop_classifier.py`` trains and saves. Its input is an RGB crop
  normalised with its own ``pixel_mean`` / ``pixel_std`` (kd2's convention: ``[0, 1]`` units).
* :func:`save_crop_classifier` / :func:`load_crop_classifier` — the checkpoint format
  ``{"model": state_dict, "kd2_classifier": metadata}`` (architecture, classes, crop size,
  normalisation, class names, val top-1).
* :class:`ClassifierTeacher` — the frozen classifier as a distillation teacher. It takes crops of
  the **detector's** normalised input (whatever its normalisation, channel order and pixel
  scale: torchvision RGB ``[0, 1]``, Detectron2 BGR ``0-255``, SSD's ``std = 1/255``) and maps
  them to the classifier's normalisation with one fixed per-channel affine map, so the detector
  never has to be trained with the classifier's normalisation.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn
from torchvision.models import resnet

from kd2.utils.checkpoint import atomic_save

__all__ = [
    "CLASSIFIER_ARCHS",
    "ClassifierTeacher",
    "CropClassifier",
    "build_classifier_teacher",
    "load_crop_classifier",
    "save_crop_classifier",
]

CLASSIFIER_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
_FORMAT_KEY = "kd2_classifier"


class CropClassifier(nn.Module):
    """A torchvision ResNet classifying ``crop_size × crop_size`` object crops into ``K`` classes.

    Args:
        arch: one of :data:`CLASSIFIER_ARCHS` (the paper's teacher is ``resnet50``).
        num_classes: ``K`` (the detector's foreground classes; no background class).
        crop_size: side of the crops it is trained on (112 in the paper).
        pixel_mean / pixel_std: RGB normalisation of its input, in ``[0, 1]`` units.
        class_names: optional names, stored in the checkpoint.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        num_classes: int = 80,
        crop_size: int = 112,
        pixel_mean: Sequence[float] = (0.485, 0.456, 0.406),
        pixel_std: Sequence[float] = (0.229, 0.224, 0.225),
        class_names: Sequence[str] = (),
    ):
        super().__init__()
        if arch not in CLASSIFIER_ARCHS:
            raise ValueError(
                f"classifier arch {arch!r} is not supported; use one of {CLASSIFIER_ARCHS}"
            )
        self.arch = arch
        self.num_classes = int(num_classes)
        self.crop_size = int(crop_size)
        self.pixel_mean = [float(x) for x in pixel_mean]
        self.pixel_std = [float(x) for x in pixel_std]
        self.class_names = [str(c) for c in class_names]
        self.net = getattr(resnet, arch)(weights=None, num_classes=self.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``(M, 3, S, S)`` normalised crops -> ``(M, K)`` logits."""
        return self.net(x)

    def stem(self, x: Tensor) -> Tensor:
        """The stem ("layer 0": conv1-bn-relu-maxpool): ``(M, 3, S, S) -> (M, 64, S/4, S/4)``."""
        n = self.net
        return n.maxpool(n.relu(n.bn1(n.conv1(x))))

    def metadata(self) -> Dict[str, object]:
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "crop_size": self.crop_size,
            "pixel_mean": self.pixel_mean,
            "pixel_std": self.pixel_std,
            "class_names": self.class_names,
        }


def save_crop_classifier(path: str, model: CropClassifier, **extra: object) -> None:
    """Write ``{"model": state_dict, "kd2_classifier": metadata + extra}`` atomically."""
    meta = dict(model.metadata())
    meta.update(extra)
    atomic_save({"model": model.state_dict(), _FORMAT_KEY: meta}, path)


def load_crop_classifier(path: str) -> CropClassifier:
    """Read a checkpoint written by :func:`save_crop_classifier` (``tools/train_crop_classifier``).

    Raises ``FileNotFoundError`` / ``ValueError`` with what is wrong and how to fix it.
    """
    if not path:
        raise FileNotFoundError(
            "no classifier-teacher weights given (KD.CLASSIFIERKD.TEACHER.WEIGHTS)"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"classifier teacher {path!r} does not exist. Train one with "
            "`python tools/train_crop_classifier.py --config-file <detector config> "
            "--output <dir>` and point KD.CLASSIFIERKD.TEACHER.WEIGHTS at <dir>/model_final.pth"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"cannot read classifier teacher {path!r} ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(ckpt, dict) or _FORMAT_KEY not in ckpt or "model" not in ckpt:
        raise ValueError(
            f"{path!r} is not a kd2 crop-classifier checkpoint (no {_FORMAT_KEY!r} metadata): "
            "a detector checkpoint cannot be a classifier teacher. Write one with "
            "tools/train_crop_classifier.py"
        )
    meta = ckpt[_FORMAT_KEY]
    model = CropClassifier(
        arch=meta["arch"],
        num_classes=meta["num_classes"],
        crop_size=meta["crop_size"],
        pixel_mean=meta["pixel_mean"],
        pixel_std=meta["pixel_std"],
        class_names=meta.get("class_names", ()),
    )
    model.load_state_dict(ckpt["model"])
    model.checkpoint_metadata = meta
    return model


class ClassifierTeacher(nn.Module):
    """A frozen :class:`CropClassifier` reading crops of a detector's normalised input.

    The detector's input is ``x = (raw · scale − mean) / std`` in channel order ``channels``,
    with ``raw`` the RGB image in ``[0, 1]``; the classifier expects
    ``(raw − mean_c) / std_c`` in RGB. Both are affine per channel, so the conversion is one
    fixed map ``y_c = a_c · x_{π(c)} + b_c``.

    Args:
        classifier: the trained classifier (set to eval mode, gradients off).
        pixel_mean / pixel_std: the detector's normalisation in its own units and channel order.
        channels: ``"RGB"`` or ``"BGR"``, the detector's channel order.
        scale: the detector's pixel scale (1 for torchvision's ``[0, 1]``, 255 for Detectron2).
    """

    def __init__(
        self,
        classifier: CropClassifier,
        *,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        channels: str = "RGB",
        scale: float = 1.0,
    ):
        super().__init__()
        from .cross_framework import normalization_map

        self.classifier = classifier.eval().requires_grad_(False)
        perm, a, b = normalization_map(
            (pixel_mean, pixel_std, channels, scale),
            (classifier.pixel_mean, classifier.pixel_std, "RGB", 1.0),
        )
        self.perm: List[int] = perm
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    @property
    def crop_size(self) -> int:
        return self.classifier.crop_size

    def train(self, mode: bool = True) -> ClassifierTeacher:
        return super().train(False)  # always frozen

    def to_classifier_input(self, crops: Tensor) -> Tensor:
        """``(M, 3, S, S)`` detector-normalised crops -> the classifier's normalisation."""
        return crops[:, self.perm] * self.a + self.b

    def logits(self, crops: Tensor) -> Tensor:
        """``(M, 3, S, S)`` detector-normalised crops -> ``(M, K)`` logits."""
        return self.classifier(self.to_classifier_input(crops))

    def stem(self, crops: Tensor) -> Tensor:
        """``(M, 3, S, S)`` detector-normalised crops -> ``(M, 64, S/4, S/4)`` stem features."""
        return self.classifier.stem(self.to_classifier_input(crops))


def build_classifier_teacher(
    path: str,
    *,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    channels: str = "RGB",
    scale: float = 1.0,
) -> ClassifierTeacher:
    """Load ``path`` (see :func:`load_crop_classifier`) as a teacher of a detector whose input
    normalisation is given (see :class:`ClassifierTeacher`)."""
    return ClassifierTeacher(
        load_crop_classifier(path),
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
        channels=channels,
        scale=scale,
    )
