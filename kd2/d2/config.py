"""``add_kd_config``: the ``KD`` section of kd2's schema, added to a Detectron2 config."""

from __future__ import annotations

from detectron2.config import CfgNode

from kd2.config.defaults import _C as _KD2_DEFAULTS

__all__ = ["add_kd_config"]


def add_kd_config(cfg: CfgNode) -> None:
    """Add ``cfg.KD`` and ``cfg.DATASETS.REGISTER`` (the same definitions as the torchvision
    backend's, one source of truth: :mod:`kd2.config.defaults`), and ``cfg.MODEL.GFL`` for
    :class:`kd2.d2.gfl.GFL` (the torchvision backend's ``MODEL.GFL`` keys plus the Detectron2
    head's ``IN_FEATURES``, ``NUM_CONVS``, ``NORM`` and ``PRIOR_PROB``). Call it before
    ``merge_from_file``, like Detectron2 projects' ``add_<x>_config``."""
    cfg.KD = CfgNode(_KD2_DEFAULTS.KD.clone())
    cfg.KD.TEACHERS.set_new_allowed(True)  # a copy does not keep the flag
    cfg.DATASETS.REGISTER = list(_KD2_DEFAULTS.DATASETS.REGISTER)
    gfl = CfgNode(_KD2_DEFAULTS.MODEL.GFL.clone())
    gfl.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    gfl.NUM_CONVS = 4
    gfl.NORM = "GN"
    gfl.PRIOR_PROB = 0.01
    cfg.MODEL.GFL = gfl
