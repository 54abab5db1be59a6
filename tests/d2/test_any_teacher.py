"""Any teacher for any student on Detectron2: a teacher of another family, a teacher from the
other framework in both directions, and several teachers (skipped without detectron2)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (see README)")

from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from kd2.modeling.backends import input_convention  # noqa: E402
from kd2.modeling.cross_framework import to_teacher_input  # noqa: E402
from kd2.tv.build import build_detector, build_plain_detector  # noqa: E402
from tests import helpers as tvh  # noqa: E402
from tests.d2.test_detectron2 import K, batch, d2_cfg, plain_student, save_teacher  # noqa: E402


def _trains_student_only(model, inputs_or_step):
    teacher_state = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    losses = inputs_or_step()
    kd = [k for k in losses if k.startswith("loss_kd_")]
    assert kd and all(torch.isfinite(losses[k]) for k in kd)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    for k, v in model.teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_state[k], rtol=0, atol=0)
    return losses


def test_detectron2_student_learns_from_a_teacher_of_another_family(tmp_path):
    tyaml, tpth = save_teacher(tmp_path, "GeneralizedRCNN")
    cfg = d2_cfg("DistillRetinaNet")
    cfg.KD.METHODS = ["PKD", "FitNet"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = tyaml, tpth
    model = build_model(cfg).train()
    assert (
        "same stride" in model.kd_level_tables[""] and "not distilled" in model.kd_level_tables[""]
    )
    with EventStorage(0):
        _trains_student_only(model, lambda: model(batch()))
    plain_student(model, "RetinaNet")
    cfg.KD.METHODS = ["RM"]
    with pytest.raises(ValueError, match="reads the teacher's dense"):
        build_model(cfg)


def test_torchvision_student_learns_from_a_detectron2_teacher(tmp_path):
    tyaml, tpth = save_teacher(tmp_path, "GeneralizedRCNN", depth=18, fpn=32)
    cfg = tvh.tiny_cfg("FasterRCNN")
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == K
    cfg.KD.METHODS = ["FitNet", "Hinton"]  # features + the ROI head on the student's proposals
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = tyaml, tpth
    cfg.KD.TEACHER.BACKEND = "detectron2"
    model = build_detector(cfg).train()
    assert type(model.teacher).__name__ == "GeneralizedRCNN"
    assert "other framework" in model.kd_level_tables[""]
    images, targets = tvh.batch("FasterRCNN", with_empty=False)
    losses = _trains_student_only(model, lambda: model(images, targets))
    assert {"loss_kd_fitnet", "loss_kd_hinton_roi"} <= set(losses)
    plain = build_plain_detector(tvh.tiny_cfg("FasterRCNN"))
    plain.load_state_dict(model.student_state_dict(), strict=True)
    # per-anchor parts do not cross frameworks
    cfg.KD.METHODS = ["FRS"]
    with pytest.raises(ValueError, match="rpn \\(RPN\\), which a faster_rcnn teacher"):
        build_detector(cfg)


def test_the_detectron2_teacher_sees_the_torchvision_students_image():
    """The converted batch is what Detectron2's own preprocessing makes of the same image."""
    torch.manual_seed(0)
    teacher = build_model(d2_cfg("GeneralizedRCNN", 18, 32)).eval()
    student = build_plain_detector(tvh.tiny_cfg("FasterRCNN"))
    raw = torch.rand(3, 64, 96)  # RGB in [0, 1]
    tv_input = student.transform.normalize(raw)[None]
    converted = to_teacher_input(tv_input, input_convention(student), input_convention(teacher))
    d2_input = teacher.preprocess_image([{"image": raw.flip(0) * 255.0}]).tensor
    torch.testing.assert_close(converted, d2_input, rtol=0, atol=1e-4)


def test_detectron2_student_learns_from_a_torchvision_teacher_and_two_teachers(tmp_path):
    _, tv_yaml, tv_pth = tvh.save_teacher(tmp_path, "FCOS", "resnet18", 32)
    tyaml, tpth = save_teacher(tmp_path, "GeneralizedRCNN")
    cfg = d2_cfg("DistillGeneralizedRCNN")
    cfg.KD.METHODS = ["PKD"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = tv_yaml, tv_pth
    cfg.KD.TEACHER.BACKEND = "torchvision"
    model = build_model(cfg).train()
    assert type(model.teacher).__name__ == "FCOS"
    with EventStorage(0):
        _trains_student_only(model, lambda: model(batch()))
    plain_student(model, "GeneralizedRCNN")

    # two teachers: Hinton (ROI) from the Detectron2 Faster R-CNN, PKD from the torchvision FCOS
    cfg.KD.METHODS = ["Hinton", "PKD"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS, cfg.KD.TEACHER.BACKEND = tyaml, tpth, ""
    cfg.KD.TEACHERS["TV"] = type(cfg)({"CONFIG": tv_yaml, "WEIGHTS": tv_pth})
    cfg.KD.TEACHERS.TV.BACKEND = "torchvision"
    cfg.KD.PKD.TEACHER = "TV"
    model = build_model(cfg).train()
    assert model.kd_teacher_parts == {"": frozenset({"roi"}), "TV": frozenset({"features"})}
    with EventStorage(0):
        losses = _trains_student_only(model, lambda: model(batch()))
    assert {"loss_kd_hinton_roi", "loss_kd_pkd"} <= set(losses)
    assert all(p.grad is None for p in model.extra_teachers["TV"].parameters())


def test_quick_config_torchvision_teacher_detectron2_student_on_real_coco(tmp_path):
    """The quick config: a torchvision teacher teaches a Detectron2 student through
    tools/train_net.py on the real COCO subset (a few iterations, a random teacher)."""
    import os
    import subprocess
    import sys

    from kd2.config import get_cfg as tv_get_cfg
    from tests.helpers import REPO, shared_coco

    coco = shared_coco()
    if not coco.is_dir():
        pytest.skip(f"real COCO subset not found at {coco}")
    quick = os.path.join(REPO, "configs", "Detectron2-Quick")
    tcfg = tv_get_cfg()
    tcfg.merge_from_file(os.path.join(quick, "torchvision", "faster_rcnn_R34_teacher_quick.yaml"))
    torch.save({"model": build_plain_detector(tcfg).state_dict()}, tmp_path / "teacher.pth")
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "train_net.py"),
        "--config-file",
        os.path.join(quick, "faster_rcnn_R18_FPN_from_torchvision_teacher_quick.yaml"),
        "KD.TEACHER.WEIGHTS",
        str(tmp_path / "teacher.pth"),
        "OUTPUT_DIR",
        str(tmp_path / "out"),
        "SOLVER.MAX_ITER",
        "3",
        "DATASETS.TEST",
        "()",
    ]
    env = dict(os.environ, DETECTRON2_DATASETS=str(coco.parent), OMP_NUM_THREADS="2")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    log = r.stdout + r.stderr
    assert "KD level pairing" in log and "FasterRCNN, other framework" in log
    ckpt = torch.load(tmp_path / "out" / "model_final.pth", weights_only=False)
    assert not any("teacher" in k for k in ckpt["model"])


def test_bfloat16_detectron2_teacher(tmp_path):
    tyaml, tpth = save_teacher(tmp_path, "RetinaNet")
    cfg = d2_cfg("DistillRetinaNet")
    cfg.KD.METHODS = ["PKD", "Hinton"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = tyaml, tpth
    cfg.KD.TEACHER.DTYPE = "bfloat16"
    model = build_model(cfg).train()
    assert next(model.teacher.backbone.parameters()).dtype == torch.bfloat16
    with EventStorage(0):
        rec, _ = model.student_step(batch())
        with torch.no_grad():
            trec = model.teacher_step(batch(), rec)
        assert all(f.dtype == torch.float32 for f in trec.features.values())
        assert trec.dense.cls_logits[0].dtype == torch.float32
        _trains_student_only(model, lambda: model(batch()))


def test_a_detectron2_faster_rcnn_teacher_teaches_a_dfine_student(tmp_path):
    """Teach-DETR (the teacher's detections as extra targets) + PKD (its FPN features)."""
    pytest.importorskip("transformers")
    from kd2.hf import build_detector as build_hf
    from tests.hf.test_backend import hf_cfg

    tyaml, tpth = save_teacher(tmp_path, "GeneralizedRCNN", depth=18, fpn=32)
    cfg = hf_cfg(num_classes=K)
    cfg.KD.METHODS = ["TeachDETR", "PKD"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = tyaml, tpth
    cfg.KD.TEACHER.BACKEND = "detectron2"
    cfg.KD.TEACHDETR.SCORE_THRESH = 0.0  # a random teacher's scores are low
    model = build_hf(cfg).train()
    assert type(model.teacher).__name__ == "GeneralizedRCNN"
    images, targets = tvh.batch("RetinaNet", with_empty=True)
    teacher = model.teacher_step(model.student_step(images, targets)[0])
    assert teacher.detections is not None and len(teacher.detections) == 2
    losses = _trains_student_only(model, lambda: model(images, targets))
    assert {"loss_kd_pkd", "loss_kd_teachdetr_cls", "loss_kd_teachdetr_giou"} <= set(losses)
