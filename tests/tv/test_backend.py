"""torchvision backend: native-loss equivalence, teacher isolation, record conventions."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

from kd2.tv.build import build_detector, build_plain_detector
from kd2.tv.record import infer_strides
from tests.helpers import NUM_CLASSES, batch, kd_cfg, save_teacher, tiny_cfg

ARCHS = ["FasterRCNN", "RetinaNet", "FCOS"]
METHODS = {
    "FasterRCNN": ["FitNet", "Hinton", "FGFI", "DeFeat", "CWD", "PKD", "MGD", "FGD", "FBKD", "RKD"],
    "RetinaNet": ["FitNet", "Hinton", "FGFI", "DeFeat", "CWD", "PKD", "MGD", "FGD", "FBKD", "RKD"],
    "FCOS": ["FitNet", "Hinton", "FGFI", "DeFeat", "CWD", "PKD", "MGD", "FGD", "FBKD", "RKD"],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_student_step_reproduces_native_losses(tmp_path, arch):
    cfg = kd_cfg(tmp_path, arch, ["FitNet"])
    kd = build_detector(cfg).train()
    plain = build_plain_detector(tiny_cfg(arch)).train()
    plain.load_state_dict(kd.student_state_dict())
    images, targets = batch(arch, with_empty=True)
    torch.manual_seed(7)
    native = plain(images, copy.deepcopy(targets))
    torch.manual_seed(7)
    _, ours = kd.student_step(images, copy.deepcopy(targets))
    assert set(native) == set(ours)
    for k in native:
        torch.testing.assert_close(ours[k], native[k], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_kd_forward_all_methods_and_teacher_isolation(tmp_path, arch):
    cfg = kd_cfg(tmp_path, arch, METHODS[arch])
    model = build_detector(cfg)
    teacher = model.teacher
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    # the teacher is outside the module tree
    assert not any(k.startswith(("_teacher", "teacher")) for k in model.state_dict())
    assert all(p is not q for p in model.parameters() for q in teacher.parameters())
    model.train()
    assert model.training and not teacher.training
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    images, targets = batch(arch, with_empty=True)
    losses = model(images, targets)
    kd_keys = [k for k in losses if k.startswith("loss_kd_")]
    assert kd_keys, losses
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    adapters = [p for n, p in model.named_parameters() if n.startswith("kd_methods.")]
    assert adapters and all(p.grad is not None for p in adapters)
    opt.step()
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, t_before[k], rtol=0, atol=0)
    # eval mode returns the student's detections
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}


def test_record_conventions_two_stage(tmp_path):
    cfg = kd_cfg(tmp_path, "FasterRCNN", ["Hinton"])
    model = build_detector(cfg).train()
    images, targets = batch("FasterRCNN", with_empty=False)
    rec, _ = model.student_step(images, targets)
    assert rec.strides == [4, 8, 16, 32, 64]
    assert [t.tolist() for t in rec.gt_labels] == [[0, 2], [1]]  # canonical, not +1
    roi = rec.roi
    assert roi.cls_logits.shape[1] == NUM_CLASSES + 1
    assert roi.box_deltas.shape[1:] == (NUM_CLASSES, 4)
    labels = roi.cat_labels
    assert labels.min() >= 0 and labels.max() <= NUM_CLASSES
    # GT boxes are appended to the proposals, so every GT class appears as a positive
    assert {0, 1, 2} <= set(labels.tolist())
    # background sits in the last column: the canonical logits are the raw ones rotated
    raw = model.roi_heads.box_predictor(roi.box_head_features)[0]
    torch.testing.assert_close(roi.cls_logits[:, -1], raw[:, 0])
    torch.testing.assert_close(roi.cls_logits[:, :-1], raw[:, 1:])
    rpn = rec.rpn
    assert rpn.num_classes == 1 and set(rpn.labels.unique().tolist()) <= {-1, 0, 1}
    assert sum(t.shape[1] for t in rpn.cls_logits) == rpn.labels.shape[1]
    teacher_rec = model.teacher_step(rec)
    assert teacher_rec.roi.cls_logits.shape == roi.cls_logits.shape
    assert teacher_rec.features[4].shape[1] == 64  # teacher FPN width differs (adapter bridges)


@pytest.mark.parametrize("arch", ["RetinaNet", "FCOS"])
def test_record_conventions_one_stage(tmp_path, arch):
    cfg = kd_cfg(tmp_path, arch, ["Hinton"])
    model = build_detector(cfg).train()
    images, targets = batch(arch, with_empty=True)
    rec, _ = model.student_step(images, targets)
    assert rec.strides == [8, 16, 32, 64, 128]
    d = rec.dense
    assert d.num_classes == NUM_CLASSES
    total = sum(t.shape[1] for t in d.cls_logits)
    assert d.labels.shape == (2, total)
    assert (d.labels[1] == NUM_CLASSES).all()  # the empty image is all background
    fg = d.labels[0][(d.labels[0] >= 0) & (d.labels[0] < NUM_CLASSES)]
    assert set(fg.unique().tolist()) <= {0, 2} and fg.numel() > 0
    for logits, anchors, (h, w) in zip(d.cls_logits, d.anchors, d.grid_sizes):
        assert logits.shape[1] == anchors.shape[0] == h * w * d.num_anchors_per_loc
    if arch == "FCOS":
        assert d.centerness is not None and d.num_anchors_per_loc == 1


def test_student_checkpoint_loads_into_plain_torchvision(tmp_path):
    cfg = kd_cfg(tmp_path, "FasterRCNN", ["DeFeat"])
    model = build_detector(cfg)
    for arch_cls, arch in [(FasterRCNN, "FasterRCNN")]:
        plain = build_plain_detector(tiny_cfg(arch))
        assert type(plain) is arch_cls
        plain.load_state_dict(model.student_state_dict(), strict=True)


def test_plain_builders_are_torchvision_classes():
    for arch, cls in [("FasterRCNN", FasterRCNN), ("RetinaNet", RetinaNet), ("FCOS", FCOS)]:
        assert type(build_plain_detector(tiny_cfg(arch))) is cls


def test_mobilenet_student_with_resnet_teacher(tmp_path):
    cfg = kd_cfg(tmp_path, "RetinaNet", ["FitNet"], teacher_backbone="resnet50")
    cfg.MODEL.BACKBONE.NAME = "mobilenet_v3_large"
    model = build_detector(cfg).train()
    images, targets = batch("RetinaNet")
    losses = model(images, targets)
    assert torch.isfinite(losses["loss_kd_fitnet"])


def test_train_and_test_input_sizes(tmp_path):
    cfg = tiny_cfg("RetinaNet")
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 100
    model = build_plain_detector(cfg)
    x = [torch.rand(3, 50, 60)]
    model.eval()
    assert model.transform(x)[0].image_sizes[0] == (64, 76)  # scale min(64/50, 100/60)
    model.train()
    assert model.transform(x)[0].image_sizes[0] == (96, 115)


def test_infer_strides():
    assert infer_strides([(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)], (128, 128)) == [
        4,
        8,
        16,
        32,
        64,
    ]
    assert infer_strides([(5, 5), (3, 3), (2, 2)], (160, 160)) == [32, 64, 128]
    with pytest.raises(ValueError, match="same stride"):
        infer_strides([(4, 4), (4, 4)], (128, 128))


# -- bad input --------------------------------------------------------------------------


def test_missing_teacher_weights_is_clear(tmp_path):
    cfg = kd_cfg(tmp_path, "RetinaNet")
    cfg.KD.TEACHER.WEIGHTS = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth.*never downloads"):
        build_detector(cfg)


def test_unreadable_teacher_weights_is_clear(tmp_path):
    cfg = kd_cfg(tmp_path, "RetinaNet")
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    cfg.KD.TEACHER.WEIGHTS = str(bad)
    with pytest.raises(ValueError, match="cannot read weights file"):
        build_detector(cfg)


def test_teacher_student_class_mismatch(tmp_path):
    cfg = kd_cfg(tmp_path, "RetinaNet")
    cfg.MODEL.RETINANET.NUM_CLASSES = NUM_CLASSES + 2
    with pytest.raises(ValueError, match="number of classes"):
        build_detector(cfg)


def test_teacher_checkpoint_not_matching_its_config(tmp_path):
    (tmp_path / "r50").mkdir()
    _, _, r50_weights = save_teacher(tmp_path / "r50", "RetinaNet", backbone="resnet50")
    cfg = kd_cfg(tmp_path, "RetinaNet")  # its teacher config says resnet34
    cfg.KD.TEACHER.WEIGHTS = r50_weights
    with pytest.raises(ValueError, match="does not match the model"):
        build_detector(cfg)
