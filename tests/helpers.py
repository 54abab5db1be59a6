"""Tiny detectors and batches shared by the backend and engine tests."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from kd2.config import get_cfg
from kd2.tv.build import build_plain_detector

NUM_CLASSES = 3


def shared_coco() -> Path:
    """The real mini COCO in ``../shared/datasets/coco`` (override: ``KD2_SHARED_COCO``)."""
    default = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "coco"
    return Path(os.environ.get("KD2_SHARED_COCO", default))


def method_node(name: str, **overrides):
    """The schema's ``cfg.KD.<NAME>`` of the method ``name`` with ``overrides`` (keys of the
    node): what the backends hand ``from_config``."""
    from kd2.config import method_node_name

    node = getattr(get_cfg().KD, method_node_name(name)).clone()
    for key, value in overrides.items():
        if key not in node:
            raise KeyError(f"KD.{method_node_name(name)} has no {key}")
        node[key] = value
    return node


def tiny_cfg(
    arch: str = "RetinaNet",
    backbone: str = "resnet18",
    channels: int = 32,
    num_classes: int = NUM_CLASSES,
    guard: bool = False,
):
    """A small detector config. ``guard``: the divergence guard (``SOLVER.DIVERGENCE``) on, as
    in a user's run — every test of the guard or of ``KD.BALANCE`` (the two work together: the
    controller's calibration keeps a dominating term below the guard) must pass it."""
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = arch
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.MODEL.FPN.OUT_CHANNELS = channels
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.MODEL.FCOS.NUM_CLASSES = num_classes
    cfg.MODEL.GFL.NUM_CLASSES = num_classes
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 200
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.INPUT.MIN_SIZE_TRAIN = (96,)
    cfg.INPUT.MAX_SIZE_TRAIN = 128
    cfg.INPUT.MIN_SIZE_TEST = 96
    cfg.INPUT.MAX_SIZE_TEST = 128
    # The tests' teachers are randomly initialised: their distillation losses can be huge by
    # design, so the guard is off unless asked for. Its tests (tests/engine/test_first_contact.py)
    # and the controller's (tests/engine/test_kd_control.py) turn it on.
    cfg.SOLVER.DIVERGENCE.ENABLED = guard
    cfg.KD.PREFLIGHT.ENABLED = False  # likewise the pre-flight check (it refuses such teachers)
    if arch == "FasterRCNN":
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[8], [16], [32], [64], [128]]
    elif arch == "GFL":  # one anchor per location, OCTAVE_BASE_SCALE x stride
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = []
    else:
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    return cfg


def save_teacher(
    tmp_path,
    arch: str = "RetinaNet",
    backbone: str = "resnet34",
    channels=64,
    num_classes: int = NUM_CLASSES,
):
    """Write a (randomly initialised) teacher config + checkpoint; returns (cfg, yaml, pth)."""
    tcfg = tiny_cfg(arch, backbone, channels, num_classes)
    torch.manual_seed(123)
    teacher = build_plain_detector(tcfg)
    yaml_path = os.path.join(tmp_path, f"teacher_{arch}.yaml")
    pth_path = os.path.join(tmp_path, f"teacher_{arch}.pth")
    with open(yaml_path, "w") as f:
        f.write(tcfg.dump())
    torch.save({"model": teacher.state_dict()}, pth_path)
    return tcfg, yaml_path, pth_path


def kd_cfg(
    tmp_path, arch="RetinaNet", methods=("FitNet",), teacher_backbone="resnet34", guard=False
):
    _, yaml_path, pth_path = save_teacher(tmp_path, arch, teacher_backbone)
    cfg = tiny_cfg(arch, guard=guard)
    cfg.KD.METHODS = list(methods)
    cfg.KD.TEACHER.CONFIG = yaml_path
    cfg.KD.TEACHER.WEIGHTS = pth_path
    return cfg


def batch(arch: str = "RetinaNet", with_empty: bool = True):
    """Two images (one optionally without boxes) and torchvision-style targets."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 80, 112, generator=g)]
    off = 1 if arch == "FasterRCNN" else 0
    targets = [
        {
            "boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 90.0, 60.0]]),
            "labels": torch.tensor([0, 2]) + off,
        },
        {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1]) + off},
    ]
    if with_empty:
        targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    return images, targets


def engine_cfg(tiny_data, out, arch="RetinaNet", max_iter=6, guard=False):
    """A tiny 6-class training config on the synthetic data ``tiny_data = (train, val)``
    (``guard``: see :func:`tiny_cfg`)."""
    cfg = tiny_cfg(arch, guard=guard)
    cfg.MODEL.RETINANET.NUM_CLASSES = cfg.MODEL.ROI_HEADS.NUM_CLASSES = 6
    cfg.MODEL.FCOS.NUM_CLASSES = 6
    cfg.MODEL.GFL.NUM_CLASSES = 6
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 64
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 64
    cfg.DATASETS.TRAIN = (tiny_data[0],)
    cfg.DATASETS.TEST = ()
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.BASE_LR_BATCH_SIZE = 2  # the rate above is meant for this batch
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.STEPS = (4,)
    cfg.SOLVER.WARMUP_ITERS = 2
    cfg.SOLVER.CHECKPOINT_PERIOD = 2
    cfg.OUTPUT_DIR = str(out)
    return cfg


REPO = Path(__file__).resolve().parents[1]


def write_cfg(cfg, path) -> str:
    """Dump ``cfg`` to ``path`` (a yaml the CLI can read); returns the path."""
    with open(path, "w") as f:
        f.write(cfg.dump())
    return str(path)


def cli_env(**extra) -> dict:
    """The environment of a CLI subprocess: no progress bar, one thread, no GPU."""
    env = dict(os.environ, KD2_NO_PROGRESS="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def run_cli(args, tool: str = "train_net.py", timeout: int = 300, **env_extra):
    """Run ``tools/<tool> args`` to completion; returns the ``CompletedProcess``."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, str(REPO / "tools" / tool), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(**env_extra),
        cwd=REPO,
    )


@contextmanager
def captured(logger_name: str):
    """The messages logged to ``logger_name`` inside the block (kd2's loggers may not propagate
    to the root logger that pytest's ``caplog`` watches)."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda r: records.append(r.getMessage())
    log = logging.getLogger(logger_name)
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
