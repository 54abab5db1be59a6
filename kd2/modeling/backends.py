"""The backend seam: what kd2's core needs from a detection framework, in one place.

A backend is a package that turns one framework's detectors into kd2 students and teachers:
:mod:`kd2.tv` (torchvision), :mod:`kd2.d2` (Detectron2) and :mod:`kd2.hf` (Hugging Face
transformers); :mod:`kd2.foundation` gives backbone-only teachers (DINOv2, DINOv3, timm) to all
three. Each registers one
:class:`Backend` (its ``backend.py``) with the handful of functions the framework-independent
core calls — the distiller (:mod:`kd2.modeling.distiller`), the cross-framework teachers
(:mod:`kd2.modeling.cross_framework`) and the predictor (:mod:`kd2.engine.predictor`). The core
imports no backend: it asks this registry, which loads a backend by its module name the first
time it is asked for (:func:`get_backend`), so an optional framework that is not installed
(Detectron2) fails where it is used, with one message, and nowhere else.

Adding a backend is one package with a ``backend.py`` that calls :func:`register_backend`, and
its name in :data:`BACKEND_MODULES`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Sequence, Tuple

from torch import Tensor, nn

from kd2.structures import StepRecord
from kd2.utils.errors import ConfigError

from .level_map import TeacherInfo

__all__ = [
    "BACKEND_MODULES",
    "Backend",
    "InputConvention",
    "backend_of",
    "get_backend",
    "input_convention",
    "register_backend",
]

#: ``(mean, std, channels, scale)``: ``x = (raw · scale − mean) / std`` in channel order
#: ``channels`` (``"RGB"`` / ``"BGR"``), ``raw`` the RGB image in ``[0, 1]``.
InputConvention = Tuple[Sequence[float], Sequence[float], str, float]

#: backend name -> the module that registers it (imported on first use)
BACKEND_MODULES: Dict[str, str] = {
    "torchvision": "kd2.tv.backend",
    "detectron2": "kd2.d2.backend",
    "transformers": "kd2.hf.backend",
    "foundation": "kd2.foundation.backend",
}

#: what to do when a backend's framework is missing
_INSTALL_HINT = {
    "detectron2": "install Detectron2 (`make install` builds it offline) or use MODEL.BACKEND / "
    "KD.TEACHER.BACKEND torchvision",
    "transformers": 'install kd2 with its extra: pip install -e ".[hf]" (make install does)',
    "foundation": 'install kd2 with its extras: pip install -e ".[hf,foundation]" (make install '
    "does)",
}


@dataclass(frozen=True)
class Backend:
    """The functions kd2's core calls on one framework's detectors.

    Attributes:
        name: ``MODEL.BACKEND`` / ``KD.TEACHER.BACKEND`` value.
        owns: ``owns(model)``: the detector is one of this framework's.
        model_info: ``model_info(model)``: family, classes, FPN channels by stride, the record
            parts it can fill (:class:`~kd2.modeling.level_map.TeacherInfo`).
        input_convention: ``input_convention(model)``: how the detector normalises its input.
        size_divisibility: ``size_divisibility(model)``: the padding multiple its backbone needs
            when it reads another framework's batch.
        build_teacher: ``build_teacher(node, key, device)``: a frozen teacher from a teacher
            config node (``CONFIG``, ``WEIGHTS``); ``key`` names the node in messages.
        teacher_record: ``teacher_record(teacher, images, student, parts, strides)``: the
            teacher's :class:`~kd2.structures.StepRecord` of a step of a student of another
            framework — ``images`` the student's padded ``(N, 3, H, W)`` batch already in the
            teacher's convention, ``strides`` the teacher levels the distiller pairs.
        load_predictor: ``load_predictor(config_file, opts)``: the plain trained detector of a
            config as a :class:`kd2.engine.predictor.Predictor`.
        detect: ``detect(teacher, images)``: the detector's inference (eval mode) on RGB
            ``[0, 1]`` images at their own size — per image ``boxes`` ``(D, 4)`` XYXY in their
            pixels, ``scores``, contiguous ``labels`` (the ``detections`` record part).
        trainer: the :class:`kd2.engine.trainer.Trainer` subclass that trains this backend's
            configs on kd2's own loop; ``None`` for a framework that trains on its own
            (Detectron2: :class:`kd2.d2.KDTrainer`).
    """

    name: str
    owns: Callable[[nn.Module], bool]
    model_info: Callable[[nn.Module], TeacherInfo]
    input_convention: Callable[[nn.Module], InputConvention]
    size_divisibility: Callable[[nn.Module], int]
    build_teacher: Callable[[Any, str, str], nn.Module]
    teacher_record: Callable[[nn.Module, Tensor, StepRecord, FrozenSet[str], List[int]], StepRecord]
    load_predictor: Callable[[str, list], Any]
    trainer: Any = None
    detect: Callable[[nn.Module, List[Tensor]], List[Dict[str, Tensor]]] | None = None


_REGISTRY: Dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Make ``backend`` known by its name (a backend's ``backend.py`` calls it on import)."""
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str, key: str = "MODEL.BACKEND") -> Backend:
    """The backend ``name``, loaded on first use; ``key`` names the setting in messages.

    Raises:
        ConfigError: an unknown name, or a backend whose framework is not installed.
    """
    if name not in _REGISTRY:
        if name not in BACKEND_MODULES:
            raise ConfigError(
                f"{key} must be one of {', '.join(BACKEND_MODULES)}, got {name!r}",
                f"set {key} to one of them",
            )
        try:
            importlib.import_module(BACKEND_MODULES[name])
        except ImportError as e:
            raise ConfigError(
                f"{key} is {name}, but {name} is not installed ({e})",
                _INSTALL_HINT.get(name, f"install {name}"),
            ) from None
    return _REGISTRY[name]


def backend_of(model: nn.Module) -> Backend:
    """The backend whose framework ``model`` belongs to.

    Raises:
        ConfigError: no known backend owns it.
    """
    for backend in _REGISTRY.values():
        if backend.owns(model):
            return backend
    for name in BACKEND_MODULES:  # a framework's model, built before its backend was asked for
        if name not in _REGISTRY:
            try:
                backend = get_backend(name)
            except ConfigError:
                continue
            if backend.owns(model):
                return backend
    raise ConfigError(
        f"{type(model).__name__} is a detector of no kd2 backend ({', '.join(BACKEND_MODULES)})",
        "build teachers and students with kd2's builders (kd2.tv.build, kd2.d2)",
    )


def input_convention(model: nn.Module) -> InputConvention:
    """How ``model`` (a detector of any backend) normalises its input."""
    return backend_of(model).input_convention(model)
