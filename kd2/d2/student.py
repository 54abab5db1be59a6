"""The plain student of a distillation config — for evaluation, export and prediction, which
never build or load the teacher (a distilled student copied to another machine evaluates without
its teacher's file).

A kd2 checkpoint's ``"model"`` entry holds the student alone, with exactly the keys of the plain
Detectron2 model, so the plain model loads it as it is.
"""

from __future__ import annotations

import copy

from detectron2.config import CfgNode
from detectron2.utils.registry import locate

from .gfl import GFL
from .meta_arch import DistillFCOS, DistillGeneralizedRCNN, DistillGFL, DistillRetinaNet

__all__ = ["student_config", "student_model_config"]

_PLAIN = {
    cls: next(b for b in cls.__mro__ if b.__module__.startswith("detectron2."))
    for cls in (DistillGeneralizedRCNN, DistillRetinaNet, DistillFCOS)
}
_PLAIN[DistillGFL] = GFL  # kd2's own Detectron2 detector


def student_config(cfg: CfgNode) -> CfgNode:
    """A yaml config whose ``MODEL.META_ARCHITECTURE`` is the student's plain class
    (``DistillGeneralizedRCNN`` -> ``GeneralizedRCNN``) and whose ``KD.METHODS`` is empty;
    ``cfg`` itself when it is not a distillation config."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if not arch.startswith("Distill"):
        return cfg
    out = cfg.clone()
    out.defrost()
    out.MODEL.META_ARCHITECTURE = arch[len("Distill") :]
    out.KD.METHODS = []
    if cfg.is_frozen():
        out.freeze()
    return out


def student_model_config(model_cfg):
    """A LazyConfig ``model`` node for the plain student: the ``Distill*`` target replaced by
    its Detectron2 base class (or the class its ``plain_model`` names: kd2.lazyconfig's
    transformers students), the ``teacher`` and ``kd_cfg`` arguments dropped (so the teacher
    is neither instantiated nor loaded)."""
    target = model_cfg.get("_target_")
    target = locate(target) if isinstance(target, str) else target
    plain = _PLAIN.get(target) or getattr(target, "plain_model", None)
    if plain is None:
        return model_cfg
    out = copy.deepcopy(model_cfg)
    out._target_ = plain
    for key in ("teacher", "kd_cfg"):
        out.pop(key, None)
    return out
