"""Any teacher for any student (torchvision backend): other detector families, level pairing by
stride or by index, refusals that name the missing part and the methods that apply, and several
teachers in one run."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from kd2.modeling.distiller import DistillerMixin
from kd2.modeling.level_map import LevelPair, TeacherInfo, level_table, pair_levels, student_view
from kd2.structures import StepRecord
from kd2.tv.build import build_detector, build_plain_detector
from tests.helpers import NUM_CLASSES, batch, save_teacher, tiny_cfg


def _pair_cfg(tmp_path, student_arch, teacher_arch, methods, **extra_teachers):
    """``student_arch`` student, ``teacher_arch`` teacher (resnet34, 64-channel FPN); each
    ``extra_teachers`` name -> arch becomes a ``KD.TEACHERS`` entry."""
    _, yaml_path, pth_path = save_teacher(tmp_path, teacher_arch, "resnet34")
    cfg = tiny_cfg(student_arch)
    cfg.KD.METHODS = list(methods)
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = yaml_path, pth_path
    for name, arch in extra_teachers.items():
        _, y, p = save_teacher(tmp_path, arch, "resnet18", 32)
        cfg.KD.TEACHERS[name] = type(cfg)({"CONFIG": y, "WEIGHTS": p, "BACKEND": ""})
    return cfg


def _train_step(model, arch):
    images, targets = batch(arch, with_empty=False)
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    return losses


# ------------------------------------------------------------------------------ level pairs


def test_levels_pair_by_stride_and_by_index_when_none_is_shared():
    pairs = pair_levels({4: 32, 8: 32, 16: 32}, {8: 64, 16: 64, 32: 64})
    assert [(p.student_stride, p.teacher_stride) for p in pairs] == [(8, 8), (16, 16)]
    assert not any(p.resized for p in pairs)
    pairs = pair_levels({4: 32, 8: 32}, {16: 64, 32: 64, 64: 64})
    assert [(p.student_stride, p.teacher_stride) for p in pairs] == [(4, 16), (8, 32)]
    table = level_table(pairs, {4: 32, 8: 32}, {16: 64, 32: 64, 64: 64}, "title")
    assert "by index, student resized" in table and "teacher levels not used: strides [64]" in table


def test_student_view_resizes_to_the_teachers_maps_and_keys_by_their_strides():
    s = {4: torch.randn(1, 2, 8, 8, requires_grad=True), 8: torch.randn(1, 2, 4, 4)}
    t = {16: torch.randn(1, 3, 2, 2), 32: torch.randn(1, 3, 1, 1)}
    rec = StepRecord(torch.zeros(1, 3, 32, 32), [(32, 32)], [], [], s, 3)
    trec = StepRecord(torch.zeros(1, 3, 32, 32), [(32, 32)], [], [], t, 3)
    pairs = [LevelPair(4, 16, 2, 3), LevelPair(8, 32, 2, 3)]
    view = student_view(rec, pairs, trec)
    assert sorted(view.features) == [16, 32] and view.features[16].shape == (1, 2, 2, 2)
    view.features[16].sum().backward()
    assert s[4].grad is not None
    same = [LevelPair(4, 4, 2, 2)]
    assert student_view(rec, same, trec) is rec


def test_distiller_pairs_by_index_and_feeds_methods_resized_maps():
    from kd2.config import get_cfg

    class Student(DistillerMixin, nn.Module):
        def _kd_model_info(self, model):
            chans = {4: 8, 8: 8} if model is self else {16: 16, 32: 16}
            return TeacherInfo(chans, 3, frozenset({"features"}), "faster_rcnn", None, "X")

    cfg = get_cfg()
    cfg.KD.METHODS = ["FitNet"]
    student = Student()
    student._init_distiller(
        cfg.KD,
        nn.Linear(1, 1),
        num_classes=3,
        teacher_num_classes=3,
        student_channels={4: 8, 8: 8},
        teacher_channels={16: 16, 32: 16},
    )
    assert "by index, student resized" in student.kd_level_tables[""]
    s_feats = {4: torch.randn(1, 8, 16, 16, requires_grad=True), 8: torch.randn(1, 8, 8, 8)}
    t_feats = {16: torch.randn(1, 16, 4, 4), 32: torch.randn(1, 16, 2, 2)}
    rec = StepRecord(torch.zeros(1, 3, 64, 64), [(64, 64)], [], [], s_feats, 3)
    trec = StepRecord(torch.zeros(1, 3, 64, 64), [(64, 64)], [], [], t_feats, 3)
    losses = student.distill_losses(rec, trec)
    assert losses["loss_kd_fitnet"] > 0
    losses["loss_kd_fitnet"].backward()
    assert s_feats[4].grad is not None


# ---------------------------------------------------------------------- other families


@pytest.mark.parametrize(
    "student_arch,teacher_arch,methods",
    [
        ("FasterRCNN", "FCOS", ["PKD", "FitNet"]),
        ("FasterRCNN", "RetinaNet", ["GlobalKD"]),
        ("FCOS", "FasterRCNN", ["PKD", "FitNet", "GlobalKD"]),
        ("RetinaNet", "FCOS", ["FGFI", "CWD"]),
        ("GFL", "FasterRCNN", ["MGD", "RKD"]),
    ],
)
def test_teacher_of_another_family_trains_the_student_only(
    tmp_path, caplog, student_arch, teacher_arch, methods
):
    cfg = _pair_cfg(tmp_path, student_arch, teacher_arch, methods)
    cfg.KD.GLOBALKD.SOFT_WEIGHT = 0.0  # the feature terms: no head of the student's kind
    with caplog.at_level(logging.INFO, logger="kd2.modeling.distiller"):
        model = build_detector(cfg).train()
    assert any("KD level pairing" in r.message for r in caplog.records)
    table = model.kd_level_tables[""]
    assert "same stride" in table and type(model.teacher).__name__ in table
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    losses = _train_step(model, student_arch)
    assert [k for k in losses if k.startswith("loss_kd_")]
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.teacher.state_dict().items())
    plain = build_plain_detector(tiny_cfg(student_arch))
    plain.load_state_dict(model.student_state_dict(), strict=True)  # student-only checkpoint


@pytest.mark.parametrize(
    "student_arch,teacher_arch,method,needle",
    [
        ("FasterRCNN", "FCOS", "Hinton", "roi (ROI box head), which a fcos teacher does not have"),
        ("FCOS", "FasterRCNN", "RM", "dense (one-stage dense head), which a faster_rcnn teacher"),
        ("FCOS", "RetinaNet", "RM", "predictions per location, the student's 1"),
        ("FCOS", "GFL", "GID", "needs a teacher of the student's family (fcos)"),
        ("RetinaNet", "FCOS", "CrossKD", "needs a teacher of the student's family"),
    ],
)
def test_a_method_needing_a_part_the_teacher_lacks_is_refused(
    tmp_path, student_arch, teacher_arch, method, needle
):
    cfg = _pair_cfg(tmp_path, student_arch, teacher_arch, [method])
    with pytest.raises(ValueError) as e:
        build_detector(cfg)
    msg = str(e.value)
    assert f"KD method {method!r} cannot learn from the teacher (KD.TEACHER)" in msg
    assert needle in msg and "these methods apply: " in msg and "PKD" in msg
    applicable = msg.split("these methods apply: ")[1].split(", ")
    assert method not in applicable  # the list is checked the way the refused method was


def test_class_logit_maps_cross_dense_families_with_equal_predictions_per_location(tmp_path):
    cfg = _pair_cfg(tmp_path, "GFL", "FCOS", ["CWD"])  # CWD auto on GFL = the logits recipe
    model = build_detector(cfg).train()
    assert model.kd_methods["CWD"].resolved_recipe == "logits"
    assert "loss_kd_cwd" in _train_step(model, "GFL")


# ---------------------------------------------------------------------- several teachers


def test_two_teachers_each_run_only_their_methods_parts(tmp_path):
    cfg = _pair_cfg(tmp_path, "FasterRCNN", "FasterRCNN", ["Hinton", "PKD"], FCOS="FCOS")
    cfg.KD.PKD.TEACHER = "FCOS"
    model = build_detector(cfg).train()
    assert sorted(model.extra_teachers) == ["FCOS"]
    assert model.kd_method_teacher == {"Hinton": "", "PKD": "FCOS"}
    assert model.kd_teacher_parts == {"": frozenset({"roi"}), "FCOS": frozenset({"features"})}
    images, targets = batch("FasterRCNN", with_empty=False)
    calls = []
    fcos = model.extra_teachers["FCOS"]
    fcos.head.register_forward_hook(lambda *a: calls.append("fcos head"))
    fcos.backbone.register_forward_hook(lambda *a: calls.append("fcos backbone"))
    losses = model(images, targets)
    assert calls == ["fcos backbone"]  # PKD reads features only: the FCOS head never runs
    assert {"loss_kd_hinton_roi", "loss_kd_pkd"} <= set(losses)
    sum(losses.values()).backward()
    for t in (model.teacher, fcos):
        assert not t.training and all(p.grad is None for p in t.parameters())
    assert not any("FCOS" in k or "teacher" in k for k in model.state_dict())


def test_unknown_or_incomplete_teacher_names_are_clear_errors(tmp_path):
    cfg = _pair_cfg(tmp_path, "FasterRCNN", "FasterRCNN", ["PKD"])
    cfg.KD.PKD.TEACHER = "FCOS"
    with pytest.raises(ValueError, match=r"names teacher 'FCOS', but KD.TEACHERS defines \[\]"):
        build_detector(cfg)
    cfg.KD.TEACHERS["FCOS"] = type(cfg)({"CONFIG": "x.yaml"})
    with pytest.raises(ValueError, match="KD.TEACHERS.FCOS needs WEIGHTS"):
        build_detector(cfg)


def test_a_method_may_learn_from_a_named_teacher_only(tmp_path):
    """No KD.TEACHER at all: the one method names its teacher in KD.TEACHERS."""
    _, y, p = save_teacher(tmp_path, "FCOS", "resnet18", 32)
    cfg = tiny_cfg("FasterRCNN")
    cfg.KD.METHODS = ["FitNet"]
    cfg.KD.FITNET.TEACHER = "ONE"
    cfg.KD.TEACHERS["ONE"] = type(cfg)({"CONFIG": y, "WEIGHTS": p})
    model = build_detector(cfg).train()
    assert model.teacher is None and list(model.extra_teachers) == ["ONE"]
    assert "loss_kd_fitnet" in _train_step(model, "FasterRCNN")
    assert NUM_CLASSES == model.num_classes_kd
