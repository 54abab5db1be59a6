"""A transformers DETR student in Detectron2's LazyConfig flow (``tools/lazyconfig_train_net.py``,
docs/transformers.md "LazyConfig"): it distils from a transformers teacher on the real COCO
subset with the pre-flight check (the teacher evaluated by Detectron2's loop), saves the student
alone, which Detectron2's evaluator scores and ``--eval-only`` builds without its teacher, and
its weights are kd2's ``HFDetector``'s."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")  # the hf extra (make install; CI runs these)

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate

from kd2.d2 import student_checkpointer, student_model_config
from kd2.hf.detector import HFDetector
from kd2.hf.models import build_hf_detector
from kd2.lazyconfig import TransformersDetector
from tests.helpers import shared_coco

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAZY = os.path.join(REPO, "configs", "Detectron2-Quick", "lazy_dfine_pico_KDDETR_quick.py")


def test_a_dfine_student_distils_through_lazyconfig_and_evaluates_without_its_teacher(tmp_path):
    cfg = LazyConfig.load(LAZY)
    torch.manual_seed(0)
    teacher = instantiate(cfg.model.teacher.model)
    assert isinstance(teacher, TransformersDetector)
    DetectionCheckpointer(teacher, save_dir=str(tmp_path)).save("teacher")
    coco = shared_coco()
    if not coco.is_dir():
        pytest.skip(f"real COCO subset not found at {coco}")
    env = dict(os.environ, DETECTRON2_DATASETS=str(coco.parent), OMP_NUM_THREADS="2")
    tool = [sys.executable, os.path.join(REPO, "tools", "lazyconfig_train_net.py")]
    out = tmp_path / "out"
    r = subprocess.run(
        tool + ["--config-file", LAZY, f"model.teacher.weights={tmp_path / 'teacher.pth'}",
                f"train.output_dir={out}", "train.max_iter=3", "train.checkpointer.period=2"],
        capture_output=True, text=True, timeout=900, env=env, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.load(open(out / "preflight.json"))
    assert report["val_images"] > 0 and "loss_kd_kddetr_random_cls" in report["terms"]
    assert "loss_kd_pkd" in open(out / "metrics.json").read()
    ckpt = torch.load(out / "model_final.pth", weights_only=False)
    assert "kd" in ckpt and not any(k.startswith(("kd_", "teacher")) for k in ckpt["model"])
    # the student's weights are kd2's HFDetector's, key for key
    plain = HFDetector(build_hf_detector("d_fine", "pico", 80), image_size=256)
    plain.load_state_dict(ckpt["model"], strict=True)
    # evaluation builds the plain student (`--eval-only`): no teacher, the checkpoint as it is
    node = student_model_config(cfg.model)
    assert "teacher" not in node and "kd_cfg" not in node
    student = instantiate(node).eval()
    assert isinstance(student, TransformersDetector)
    student_checkpointer(student).load(str(out / "model_final.pth"))
    image = torch.randint(0, 256, (3, 200, 240), dtype=torch.uint8)
    (result,) = student([{"image": image, "height": 400, "width": 480}])
    boxes = result["instances"].pred_boxes.tensor
    assert result["instances"].image_size == (400, 480) and len(boxes) > 0
    assert float(boxes[:, 2].max()) <= 480 and float(boxes[:, 3].max()) <= 400
    # the training run ended with Detectron2's COCO evaluation of the student
    assert "copypaste: AP,AP50" in r.stdout + r.stderr
