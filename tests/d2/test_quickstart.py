"""The Detectron2 quick start on synthetic data (README.md's "Quick start: Detectron2 (yacs)",
``docs/detectron2.md``'s "Quick start on synthetic data"), command by command, at tiny scale
(skipped where detectron2 is not installed).

The commands run exactly as those pages give them — the shipped configs unchanged, from a
directory that has the repository's ``configs/`` and a ``datasets/kd2_synthetic`` written by the
pages' generation command — with overrides that only shrink the run (a few iterations, small
batches, a tiny dataset).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (see README)")

from detectron2.config import get_cfg  # noqa: E402

from kd2.d2 import add_kd_config  # noqa: E402
from tests.helpers import REPO, cli_env  # noqa: E402

SYN = os.path.join("configs", "Detectron2-Synthetic")
TEACHER = os.path.join(SYN, "faster_rcnn_R34_FPN_teacher.yaml")
STUDENT = os.path.join(SYN, "faster_rcnn_R18_FPN_student.yaml")
DEFEAT = os.path.join(SYN, "faster_rcnn_R18_FPN_DeFeat.yaml")
TINY = ["SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1"]


def load(name):
    cfg = get_cfg()
    add_kd_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, name))
    return cfg


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, SYN))))
def test_synthetic_configs_load_and_train_on_the_generated_files(name):
    cfg = load(os.path.join(SYN, name))
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 6
    assert cfg.DATASETS.TRAIN == (
        "datasets/kd2_synthetic/annotations/instances_train.json:datasets/kd2_synthetic/train",
    )
    assert cfg.DATASETS.TEST == (
        "datasets/kd2_synthetic/annotations/instances_val.json:datasets/kd2_synthetic/val",
    )
    assert cfg.OUTPUT_DIR.startswith("./output/d2_synthetic/") or name.startswith("Base")


def test_student_and_distilled_share_the_model_and_schedule():
    student, distilled = load(STUDENT), load(DEFEAT)
    assert distilled.MODEL.META_ARCHITECTURE == "DistillGeneralizedRCNN"
    assert distilled.KD.METHODS == ["DeFeat"]
    assert distilled.KD.TEACHER.CONFIG == TEACHER
    assert distilled.KD.TEACHER.WEIGHTS == "./output/d2_synthetic/teacher_R34/model_final.pth"
    for key in ("MODEL.RESNETS", "MODEL.FPN", "MODEL.ROI_BOX_HEAD", "SOLVER", "INPUT"):
        a, b = student, distilled
        for part in key.split("."):
            a, b = a[part], b[part]
        assert a == b, key
    teacher = load(TEACHER)  # a stronger teacher: deeper and wider
    assert teacher.MODEL.RESNETS.DEPTH > student.MODEL.RESNETS.DEPTH
    assert teacher.MODEL.FPN.OUT_CHANNELS > student.MODEL.FPN.OUT_CHANNELS


def run(cwd, *args):
    r = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=900, env=cli_env(), cwd=cwd
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    return r.stdout + r.stderr


def test_quickstart_commands_in_order(tmp_path):
    os.symlink(os.path.join(REPO, "configs"), tmp_path / "configs")
    train_net = os.path.join(REPO, "tools", "train_net.py")
    # 1. the data (the quick start's command; tiny here)
    run(tmp_path, "-m", "kd2.data.synthetic", "--out", "datasets/kd2_synthetic",
        "--num-train", "6", "--num-val", "3", "--image-size", "64")  # fmt: skip
    # 2. teacher, 3. baseline student, 4. distilled student: each trains and evaluates
    for config in (TEACHER, STUDENT, DEFEAT):
        # the 2-iteration teacher has AP ~ 0: the pre-flight check would (rightly) stop step 4
        extra = ["KD.PREFLIGHT.MIN_TEACHER_AP", "0.0"] if config == DEFEAT else []
        log = run(tmp_path, train_net, "--config-file", config, *TINY, *extra)
        assert "copypaste: AP,AP50" in log, log[-3000:]
    out = tmp_path / "output" / "d2_synthetic"
    for run_dir in ("teacher_R34", "student_R18", "DeFeat_R18"):
        assert (out / run_dir / "model_final.pth").is_file(), run_dir
    assert "kd" in torch.load(out / "DeFeat_R18" / "model_final.pth", weights_only=False)
    # 5. the distilled student evaluated on its own (no teacher needed)
    os.remove(out / "teacher_R34" / "model_final.pth")
    log = run(tmp_path, train_net, "--config-file", DEFEAT, "--eval-only",
              "MODEL.WEIGHTS", "output/d2_synthetic/DeFeat_R18/model_final.pth")  # fmt: skip
    assert '"AP50"' in log, log[-3000:]
