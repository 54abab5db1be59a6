"""kd2 on Detectron2: distillation meta-architectures registered in ``META_ARCH_REGISTRY``.

Importable only where detectron2 is installed (from its official repository; it is on no package
index). The rest of kd2 never imports it.
"""

try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised where detectron2 is missing
    raise ImportError(
        "kd2.d2 needs detectron2, which is not installed. Install it from its official "
        "repository (docs/installation.md; `make install` builds it offline), e.g. "
        "`pip install --no-build-isolation -e path/to/detectron2`"
    ) from e

from . import backend  # noqa: F401 (registers the backend)
from .config import add_kd_config, load_config
from .data import register_config_datasets
from .engine import (
    KDTrainer,
    StudentView,
    kd_preflight_hook,
    kd_step_hook,
    student_checkpointer,
)
from .gfl import GFL
from .meta_arch import DistillFCOS, DistillGeneralizedRCNN, DistillGFL, DistillRetinaNet
from .student import student_config, student_model_config
from .teacher import build_teacher

__all__ = [
    "add_kd_config",
    "build_teacher",
    "DistillFCOS",
    "DistillGFL",
    "GFL",
    "DistillGeneralizedRCNN",
    "DistillRetinaNet",
    "KDTrainer",
    "load_config",
    "register_config_datasets",
    "kd_preflight_hook",
    "kd_step_hook",
    "StudentView",
    "student_checkpointer",
    "student_config",
    "student_model_config",
]
