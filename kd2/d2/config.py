"""``add_kd_config``: the ``KD`` section of kd2's schema, added to a Detectron2 config;
``load_config``: a Detectron2 yaml + overrides with kd2's error messages."""

from __future__ import annotations

from detectron2.config import CfgNode, get_cfg

from kd2.config.config import (
    base_chain,
    explain_merge_error,
    validate_kd_methods,
    validate_values,
)
from kd2.config.defaults import _C as _KD2_DEFAULTS

__all__ = ["add_kd_config", "load_config"]


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
    # KDTrainer's divergence guard and learning-rate check, as on the torchvision backend
    # (kd2.engine.divergence, kd2.engine.batch_scaling); both opt-in on Detectron2 for now. The
    # guard (a non-finite loss always stops the run, before backward): SOLVER.DIVERGENCE.ENABLED
    # True — off by default because the Detectron2 pipeline checks (configs/Detectron2-Quick, the
    # tests' random teachers) start with distillation terms 1e5x the detection losses, which it
    # stops at iteration 0. BASE_LR_BATCH_SIZE 0: not declared (a Detectron2 merge does not track
    # where BASE_LR was set), no check; set it to the batch BASE_LR was tuned for to get the
    # warning (or SCALE_LR_WITH_BATCH's linear scaling).
    cfg.SOLVER.DIVERGENCE = CfgNode(_KD2_DEFAULTS.SOLVER.DIVERGENCE.clone())
    cfg.SOLVER.DIVERGENCE.ENABLED = False
    cfg.SOLVER.BASE_LR_BATCH_SIZE = 0
    cfg.SOLVER.SCALE_LR_WITH_BATCH = False


def load_config(config_file: str, opts=(), freeze: bool = True) -> CfgNode:
    """Detectron2's ``get_cfg()`` + :func:`add_kd_config` + ``config_file`` + ``opts``.

    The merge errors are kd2's (:func:`kd2.config.config.explain_merge_error`): an unknown key
    names the closest one, a tuple written in YAML flow style says to write a list; a cyclic or
    missing ``_BASE_`` and invalid YAML are named before Detectron2 reads the file; the KD
    method names and values are checked as on the torchvision backend.
    """
    cfg = get_cfg()
    add_kd_config(cfg)
    base_chain(config_file)  # a cycle, a missing base or bad YAML: one clear error
    try:
        cfg.merge_from_file(config_file)
    except (KeyError, AssertionError, ValueError) as e:
        raise explain_merge_error(e, cfg, f" in {config_file}") from None
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError, ValueError) as e:
        raise explain_merge_error(e, cfg, " in the command-line overrides") from None
    validate_kd_methods(cfg)
    validate_values(cfg)
    if freeze:
        cfg.freeze()
    return cfg
