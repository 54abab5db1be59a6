"""ClassifierKD end to end: the classifier teacher, the method on softmax and sigmoid heads of the
torchvision backend, gradient routing, composition with a detector teacher, the training tool."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kd2.data.synthetic import generate_synthetic_dataset
from kd2.losses.classifier_kd import ClassifierKD, record_positives
from kd2.modeling.classifier_teacher import (
    ClassifierTeacher,
    CropClassifier,
    build_classifier_teacher,
    load_crop_classifier,
    save_crop_classifier,
)
from kd2.tv import Trainer, build_detector
from tests.helpers import NUM_CLASSES, batch, engine_cfg, save_teacher, tiny_cfg

#: the torchvision meta-architecture of each detector family
ARCH = {"faster_rcnn": "FasterRCNN", "retinanet": "RetinaNet", "fcos": "FCOS", "ssd": "SSD"}
# (classification-branch module, box-regression module) of each torchvision student
BRANCHES = {
    "FasterRCNN": ("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"),
    "RetinaNet": ("head.classification_head", "head.regression_head"),
    "FCOS": ("head.classification_head.cls_logits", "head.regression_head.bbox_reg"),
    "SSD": ("head.classification_head", "head.regression_head"),
}


def save_classifier(path, num_classes=NUM_CLASSES, crop_size=32, seed=0):
    torch.manual_seed(seed)
    model = CropClassifier("resnet18", num_classes, crop_size)
    save_crop_classifier(str(path), model, top1=0.0)
    return str(path)


def ckd_cfg(tmp_path, arch, methods=("ClassifierKD",)):
    cfg = tiny_cfg(arch if arch != "SSD" else "RetinaNet")
    if arch == "SSD":
        cfg.MODEL.META_ARCHITECTURE = "SSD"
        cfg.MODEL.BACKBONE.NAME = "mobilenet_v3_large"
        cfg.MODEL.SSD.NUM_CLASSES = NUM_CLASSES
        cfg.MODEL.SSD.SIZE = 320
    cfg.KD.METHODS = list(methods)
    cfg.KD.CLASSIFIERKD.TEACHER.WEIGHTS = save_classifier(tmp_path / "clf.pth")
    return cfg


def ssd_batch():
    images, targets = batch("FasterRCNN", with_empty=False)  # SSD's labels are also c + 1
    return images, targets


def test_classifier_teacher_maps_any_detector_normalisation_to_its_own():
    clf = CropClassifier("resnet18", 4, 16, pixel_mean=(0.4, 0.5, 0.6), pixel_std=(0.2, 0.3, 0.25))
    raw = torch.rand(2, 3, 16, 16)  # RGB in [0, 1]
    expected = (raw - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.3, 0.25]
    ).view(1, 3, 1, 1)
    # Detectron2: BGR, 0-255, its own mean/std (given in BGR order)
    d2_mean, d2_std = [103.53, 116.28, 123.675], [57.375, 57.12, 58.395]
    bgr = raw.flip(1) * 255
    x = (bgr - torch.tensor(d2_mean).view(1, 3, 1, 1)) / torch.tensor(d2_std).view(1, 3, 1, 1)
    t = ClassifierTeacher(clf, pixel_mean=d2_mean, pixel_std=d2_std, channels="BGR", scale=255.0)
    torch.testing.assert_close(t.to_classifier_input(x), expected, atol=1e-5, rtol=1e-5)
    # SSD300: RGB, std 1/255 (0-255 units)
    s_mean, s_std = [0.48235, 0.45882, 0.40784], [1 / 255] * 3
    x = (raw - torch.tensor(s_mean).view(1, 3, 1, 1)) / torch.tensor(s_std).view(1, 3, 1, 1)
    t = ClassifierTeacher(clf, pixel_mean=s_mean, pixel_std=s_std)
    torch.testing.assert_close(t.to_classifier_input(x), expected, atol=1e-5, rtol=1e-5)
    assert not t.classifier.training and not any(p.requires_grad for p in t.parameters())
    t.train()
    assert not t.classifier.training  # always frozen


def test_classifier_checkpoint_round_trip_and_clear_errors(tmp_path):
    path = save_classifier(tmp_path / "c.pth", num_classes=5, crop_size=24, seed=3)
    a = load_crop_classifier(path)
    assert (a.arch, a.num_classes, a.crop_size) == ("resnet18", 5, 24)
    torch.manual_seed(3)
    ref = CropClassifier("resnet18", 5, 24).eval()
    x = torch.randn(2, 3, 24, 24)
    torch.testing.assert_close(a.eval()(x), ref(x))
    assert a.stem(x).shape == (2, 64, 6, 6)
    with pytest.raises(FileNotFoundError, match="train_crop_classifier"):
        load_crop_classifier(str(tmp_path / "missing.pth"))
    torch.save({"model": ref.state_dict()}, tmp_path / "detector.pth")
    with pytest.raises(ValueError, match="not a kd2 crop-classifier checkpoint"):
        load_crop_classifier(str(tmp_path / "detector.pth"))


def test_classifier_kd_needs_no_detector_teacher_and_stays_out_of_the_module_tree(tmp_path):
    cfg = ckd_cfg(tmp_path, "RetinaNet")
    model = build_detector(cfg)
    assert model.teacher is None
    method = model.kd_methods["ClassifierKD"]
    assert all(not k.startswith("kd_methods") for k in model.state_dict())
    clf_params = {id(p) for p in method.classifier.parameters()}
    assert not clf_params & {id(p) for p in model.parameters()}
    model.train()
    assert not method.classifier.classifier.training
    model.double()
    assert next(method.classifier.parameters()).dtype == torch.float64


def test_classifier_teacher_class_count_must_match(tmp_path):
    cfg = ckd_cfg(tmp_path, "RetinaNet")
    cfg.KD.CLASSIFIERKD.TEACHER.WEIGHTS = save_classifier(tmp_path / "c7.pth", num_classes=7)
    with pytest.raises(ValueError, match="7 classes but the detector has 3"):
        build_detector(cfg)
    cfg.KD.CLASSIFIERKD.TEACHER.WEIGHTS = ""
    with pytest.raises(ValueError, match="KD.CLASSIFIERKD.TEACHER.WEIGHTS"):
        build_detector(cfg)


def _grad_norm(model, name):
    module = model.get_submodule(name)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return sum(float(g.abs().sum()) for g in grads)


@pytest.mark.parametrize("arch", [ARCH[f] for f in ClassifierKD.card.families])
def test_kd_terms_reach_only_their_branch(tmp_path, arch):
    """KD-loc trains the box regression and never the classification branch; KD-cls the
    reverse. Softmax heads (Faster R-CNN's ROI head, SSD) and sigmoid heads (RetinaNet, FCOS)."""
    torch.manual_seed(0)
    model = build_detector(ckd_cfg(tmp_path, arch)).train()
    images, targets = ssd_batch() if arch == "SSD" else batch(arch, with_empty=False)
    student, _ = model.student_step(images, targets)
    pos = record_positives(student)
    assert pos.head == ("softmax" if arch in ("FasterRCNN", "SSD") else "sigmoid")
    assert len(pos.logits) > 0
    cls_branch, box_branch = BRANCHES[arch]
    losses = model.kd_methods["ClassifierKD"](student, student.teacher_view())
    assert losses["loss_kd_classifier_cls"].item() > 0
    assert losses["loss_kd_classifier_loc"].item() > 0

    losses["loss_kd_classifier_loc"].backward(retain_graph=True)
    assert _grad_norm(model, box_branch) > 0
    assert _grad_norm(model, cls_branch) == 0
    model.zero_grad(set_to_none=True)
    losses["loss_kd_classifier_cls"].backward()
    assert _grad_norm(model, cls_branch) > 0
    assert _grad_norm(model, box_branch) == 0


def test_softmax_dense_head_is_rejected_by_sigmoid_methods(tmp_path):
    from kd2.losses import RM

    model = build_detector(ckd_cfg(tmp_path, "SSD")).train()
    student, _ = model.student_step(*ssd_batch())
    assert student.dense.softmax and student.dense.cls_logits[0].shape[-1] == NUM_CLASSES + 1
    with pytest.raises(ValueError, match="softmax classifier"):
        RM()(student, student)


def test_classifier_kd_composes_with_a_detector_teacher(tmp_path):
    _, tyaml, tpth = save_teacher(tmp_path, "FasterRCNN")
    cfg = ckd_cfg(tmp_path, "FasterRCNN", methods=("DeFeat", "ClassifierKD"))
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = tyaml, tpth
    model = build_detector(cfg).train()
    assert model.teacher is not None
    losses = model(*batch("FasterRCNN"))
    for key in ("loss_kd_defeat_fg", "loss_kd_classifier_cls", "loss_kd_classifier_loc"):
        assert key in losses and torch.isfinite(losses[key]), key


@pytest.fixture(scope="module")
def ckd_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckd")
    p = generate_synthetic_dataset(str(root), num_train=24, num_val=12, image_size=64, seed=2)
    return f"{p['train_json']}:{p['train_image_root']}", f"{p['val_json']}:{p['val_image_root']}"


def test_train_crop_classifier_learns_loads_and_teaches(ckd_data, tmp_path):
    """The tool trains a classifier that beats chance on the val crops; its checkpoint is a
    ClassifierKD teacher for an SSD (softmax) and an FCOS (sigmoid) student trained end to end."""
    import tools.train_crop_classifier as tool

    train, val = ckd_data
    out = tmp_path / "clf"
    result = tool.main(
        ["--train-dataset", train, "--val-dataset", val, "--num-classes", "6"]
        + ["--arch", "resnet18", "--crop-size", "32", "--epochs", "6", "--batch-images", "4"]
        + ["--lr", "0.05", "--output", str(out)]
    )
    assert result["num_crops"] > 20
    assert result["top1"] > 100 / 6 * 1.5, result  # well above chance (16.7 %)
    assert json.load(open(out / "metrics.json"))["top1"] == result["top1"]
    weights = str(out / "model_final.pth")
    teacher = build_classifier_teacher(weights, pixel_mean=[0.5] * 3, pixel_std=[0.5] * 3)
    assert teacher.num_classes == 6 and teacher.crop_size == 32

    for arch in ("SSD", "FCOS"):
        cfg = engine_cfg((train, ""), tmp_path / arch, arch="FCOS", max_iter=3)
        if arch == "SSD":
            cfg.MODEL.META_ARCHITECTURE = "SSD"
            cfg.MODEL.BACKBONE.NAME = "mobilenet_v3_large"
            cfg.MODEL.SSD.NUM_CLASSES = 6
            cfg.MODEL.SSD.SIZE = 320
        cfg.KD.METHODS = ["ClassifierKD"]
        cfg.KD.CLASSIFIERKD.TEACHER.WEIGHTS = weights
        trainer = Trainer(cfg)
        trainer.train()
        lines = [json.loads(x) for x in open(tmp_path / arch / "metrics.json")]
        kd = [x for x in lines if "loss_kd_classifier_cls" in x]
        assert kd, arch
        assert all(x["loss_kd_classifier_loc"] > 0 for x in kd), arch
        assert os.path.isfile(tmp_path / arch / "model_final.pth")
