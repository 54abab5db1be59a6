"""The transformers backend: ``MODEL.BACKEND transformers`` trains every DETR-family type on kd2's
loop with exact resume; the record splits off the denoising queries; the feature methods train on
the hybrid encoder's maps with a DETR teacher and across backends; the student exports to a
transformers directory that loads with no kd2 code."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")  # the hf extra; make install installs it (CI runs these)

from kd2.config import get_cfg
from kd2.hf import MODEL_TYPES, Trainer, build_detector, build_plain_detector
from kd2.hf.export import INPUT_FILE, save_transformers_directory
from kd2.hf.models import load_hf_detector
from kd2.modeling.distiller import _applicable_methods
from kd2.modeling.kd_diagnostics import term_gradients, trunk_parameters
from kd2.utils.errors import ConfigError
from tests.helpers import NUM_CLASSES, batch, run_cli, write_cfg
from tests.helpers import save_teacher as save_tv_teacher
from tests.helpers import tiny_cfg as tiny_tv_cfg

#: every method the build checks accept for a DETR student and teacher
DETR_METHODS = ["CWD", "DSI", "DeFeat", "FBKD", "FGD", "FitNet", "MGD", "PKD", "RKD"]


def hf_cfg(model_type: str = "d_fine", preset: str = "pico", num_classes: int = NUM_CLASSES):
    cfg = get_cfg()
    cfg.MODEL.BACKEND = "transformers"
    cfg.MODEL.META_ARCHITECTURE = "DETR"
    cfg.MODEL.PIXEL_MEAN = [0.0, 0.0, 0.0]
    cfg.MODEL.PIXEL_STD = [1.0, 1.0, 1.0]
    cfg.MODEL.HF.MODEL_TYPE = model_type
    cfg.MODEL.HF.PRESET = preset
    cfg.MODEL.HF.NUM_CLASSES = num_classes
    cfg.MODEL.HF.IMAGE_SIZE = 64
    cfg.MODEL.HF.NUM_QUERIES = 20
    cfg.MODEL.HF.NUM_DENOISING = 10
    cfg.SOLVER.DIVERGENCE.ENABLED = False  # random-init teachers: see tests/helpers.tiny_cfg
    cfg.KD.PREFLIGHT.ENABLED = False
    return cfg


def save_hf_teacher(tmp_path, model_type: str = "d_fine", num_classes: int = NUM_CLASSES):
    tcfg = hf_cfg(model_type, num_classes=num_classes)
    torch.manual_seed(11)
    teacher = build_plain_detector(tcfg)
    yaml_path = write_cfg(tcfg, tmp_path / f"teacher_{model_type}.yaml")
    pth_path = str(tmp_path / f"teacher_{model_type}.pth")
    torch.save({"model": teacher.state_dict()}, pth_path)
    return yaml_path, pth_path


def kd_hf_cfg(tmp_path, methods, model_type="d_fine"):
    cfg = hf_cfg(model_type)
    cfg.KD.METHODS = list(methods)
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = save_hf_teacher(tmp_path, model_type)
    return cfg


def test_the_build_checks_accept_the_feature_methods_for_detr():
    student = build_plain_detector(hf_cfg())
    from kd2.hf.meta_arch import model_info

    info = model_info(student)
    assert info.family == "detr"
    assert info.parts == {"features", "queries", "points", "detections"}
    assert sorted(info.channels) == [8, 16, 32]
    applies = _applicable_methods(info, info, "one_stage", False, NUM_CLASSES)
    assert applies == sorted([*DETR_METHODS, "DETRDistill", "DFineLD", "KDDETR", "TeachDETR"])


def test_student_step_reproduces_the_models_own_losses_and_splits_denoising(tmp_path):
    cfg = kd_hf_cfg(tmp_path, ["FitNet"])
    kd = build_detector(cfg).train()
    plain = build_plain_detector(hf_cfg()).train()
    plain.load_state_dict(kd.student_state_dict(), strict=True)
    images, targets = batch(with_empty=True)
    torch.manual_seed(5)
    native = plain(images, copy.deepcopy(targets))
    torch.manual_seed(5)
    rec, ours = kd.student_step(images, copy.deepcopy(targets))
    assert set(native) == set(ours) and "loss_ddf_aux_0" in ours
    for k in native:
        torch.testing.assert_close(ours[k], native[k], rtol=0, atol=0)
    q = rec.queries
    layers = kd.detector.config.decoder_layers
    # matching queries only (20), every layer with a distribution, the input's boxes in pixels
    assert q.logits.shape == (layers, 2, 20, NUM_CLASSES) and q.boxes.shape == (layers, 2, 20, 4)
    assert q.corners.shape[:3] == (layers, 2, 20) and q.distribution[0] == 32
    assert q.hidden.shape[:2] == (2, 20)
    assert [tuple(f.shape[-2:]) for f in rec.features.values()] == [(8, 8), (4, 4), (2, 2)]
    (qi, gi), (qe, ge) = q.matched
    assert len(qi) == len(gi) == 2 and len(qe) == len(ge) == 0
    assert int(qi.max()) < 20
    # GT in pixels of the 64-px square input: image 0 is 96 x 128
    torch.testing.assert_close(rec.gt_boxes[0][0], torch.tensor([5.0, 8.0, 30.0, 140 / 3]))


@pytest.mark.parametrize("method", DETR_METHODS)
def test_every_feature_method_trains_a_detr_student_from_a_detr_teacher(tmp_path, method):
    model = build_detector(kd_hf_cfg(tmp_path, [method])).train()
    teacher = model.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    # three objects: RKD's relations need more than two (empty images: the record test)
    images, targets = batch(with_empty=False)
    losses = model(images, targets)
    kd = {k: v for k, v in losses.items() if k.startswith("loss_kd_")}
    assert kd and all(torch.isfinite(v) for v in losses.values()), losses
    grads = term_gradients(losses, trunk_parameters(model), per_term=False)
    kd_norm = sum(float(g.norm()) for g in grads["kd"] if g is not None)
    assert kd_norm > 0 and torch.isfinite(torch.tensor(kd_norm))
    sum(losses.values()).backward()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in teacher.parameters())


def test_a_method_reading_a_dense_head_is_refused_with_the_ones_that_apply(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_detector(kd_hf_cfg(tmp_path, ["Hinton"]))
    assert "dense" in e.value.what and "PKD" in e.value.fix


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
def test_every_type_trains_on_kd2s_loop_and_resumes_exactly(tiny_data, tmp_path, model_type):
    def cfg_for(out, max_iter):
        cfg = hf_cfg(model_type, num_classes=6)
        cfg.DATASETS.TRAIN = (tiny_data[0],)
        cfg.DATASETS.TEST = ()
        cfg.SOLVER.OPTIMIZER = "AdamW"
        cfg.SOLVER.BASE_LR = 1e-4
        cfg.SOLVER.BACKBONE_LR_FACTOR = 0.5
        cfg.SOLVER.IMS_PER_BATCH = 2
        cfg.SOLVER.BASE_LR_BATCH_SIZE = 2
        cfg.SOLVER.MAX_ITER = max_iter
        cfg.SOLVER.STEPS = (3,)
        cfg.SOLVER.WARMUP_ITERS = 1
        cfg.SOLVER.CHECKPOINT_PERIOD = 2
        cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
        cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.1
        cfg.OUTPUT_DIR = str(out)
        return cfg

    whole = Trainer(cfg_for(tmp_path / "whole", 4))
    whole.train()
    groups = whole.optimizer.param_groups
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.5)
    part = Trainer(cfg_for(tmp_path / "part", 2))
    part.train()
    resumed = Trainer(cfg_for(tmp_path / "part", 4))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    resumed.train()
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_detr_teacher_teaches_a_torchvision_fcos_student(tmp_path):
    cfg = tiny_tv_cfg("FCOS")
    cfg.KD.METHODS = ["PKD"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = save_hf_teacher(tmp_path)
    cfg.KD.TEACHER.BACKEND = "transformers"
    from kd2.tv import build_detector as build_tv

    model = build_tv(cfg).train()
    images, targets = batch("FCOS", with_empty=True)
    losses = model(images, targets)
    assert torch.isfinite(losses["loss_kd_pkd"]) and float(losses["loss_kd_pkd"]) > 0
    sum(losses.values()).backward()


def test_a_torchvision_cnn_teacher_teaches_a_detr_student(tmp_path):
    _, yaml_path, pth_path = save_tv_teacher(tmp_path, "FasterRCNN", channels=32)
    cfg = hf_cfg()
    cfg.KD.METHODS = ["PKD"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = yaml_path, pth_path
    cfg.KD.TEACHER.BACKEND = "torchvision"
    model = build_detector(cfg).train()
    images, targets = batch(with_empty=True)
    losses = model(images, targets)
    assert torch.isfinite(losses["loss_kd_pkd"]) and float(losses["loss_kd_pkd"]) > 0


def test_the_student_exports_to_a_transformers_directory(tmp_path):
    model = build_detector(kd_hf_cfg(tmp_path, ["PKD"])).eval()
    plain = build_plain_detector(hf_cfg())
    plain.load_state_dict(model.student_state_dict(), strict=True)  # no teacher or KD keys
    out = save_transformers_directory(model, str(tmp_path / "export"))
    from transformers import AutoModelForObjectDetection

    loaded = AutoModelForObjectDetection.from_pretrained(out, local_files_only=True).eval()
    again = load_hf_detector(out).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want = model.detector(pixel_values=x).logits
        torch.testing.assert_close(loaded(pixel_values=x).logits, want)
        torch.testing.assert_close(again(pixel_values=x).logits, want)
    settings = json.loads((tmp_path / "export" / INPUT_FILE).read_text())
    assert settings["image_size"] == 64 and settings["pixel_std"] == [1.0, 1.0, 1.0]


def test_train_net_trains_a_transformers_config_and_refuses_a_wrong_architecture(
    tiny_data, tmp_path
):
    cfg = hf_cfg(num_classes=6)
    cfg.DATASETS.TRAIN = (tiny_data[0],)
    cfg.DATASETS.TEST = (tiny_data[1],)
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR_BATCH_SIZE = 2
    cfg.SOLVER.OPTIMIZER = "AdamW"
    cfg.SOLVER.BASE_LR = 1e-4
    cfg.SOLVER.MAX_ITER = 2
    cfg.SOLVER.WARMUP_ITERS = 1
    cfg.OUTPUT_DIR = str(tmp_path / "run")
    path = write_cfg(cfg, tmp_path / "detr.yaml")
    done = run_cli(["--config-file", path])
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.json").read_text().splitlines()]
    assert "bbox" in lines[-1]["eval"][tiny_data[1]]
    bad = run_cli(["--config-file", path, "MODEL.META_ARCHITECTURE", "FCOS"])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "kd2: error: MODEL.BACKEND transformers builds DETR-family" in bad.stderr


def test_the_student_exports_to_pt2_and_onnx_verified_on_two_sizes(tmp_path):
    """``tools/export_model.py`` on a D-FINE: one ``.pt2`` graph for any input size, ONNX (the
    legacy exporter: transformers' D-FINE does not convert with the dynamo exporter in torch
    2.14), each checked against eager PyTorch on images of two sizes."""
    pytest.importorskip("onnxruntime")
    from tests.engine.test_export_predict import (
        _assert_verified,
        _distinct_class_scores,
        _export,
        _images,
    )

    cfg = hf_cfg()
    torch.manual_seed(3)
    model = build_plain_detector(cfg)
    # the encoder's query selection (a random one ties: the anchors outside the image all score
    # its bias) and the last decoder layer's classes (the one eval mode runs)
    hf = model.detector.model
    heads = [hf.enc_score_head, hf.decoder.class_embed[-1]]
    _distinct_class_scores(model, heads, [torch.rand(3, 96, 128)])
    weights = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    cfg.MODEL.WEIGHTS = str(weights)
    config = write_cfg(cfg, tmp_path / "detr.yaml")
    report = _export(config, tmp_path / "out", _images(tmp_path))
    _assert_verified(report, ["pt2", "onnx"])
    assert report["backend"] == "transformers" and report["architecture"] == "HFDetector"
    assert report["files"]["onnx"]["exporter"] == "legacy"


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
def test_every_type_trains_with_the_detr_methods(tmp_path, model_type):
    """A student of each type learns from a teacher of its type with a feature method, Teach-DETR,
    KD-DETR, DETRDistill and (D-FINE, DEIMv2: the types with distributions) D-FINE's
    localization KD."""
    methods = ["PKD", "TeachDETR", "KDDETR", "DETRDistill"] + (
        ["DFineLD"] if model_type in ("d_fine", "deimv2") else []
    )
    cfg = kd_hf_cfg(tmp_path, methods, model_type)
    cfg.KD.TEACHDETR.SCORE_THRESH = 0.0  # a random teacher's scores are low
    cfg.KD.KDDETR.RANDOM_POINTS = 16
    model = build_detector(cfg).train()
    images, targets = batch(with_empty=False)
    losses = model(images, targets)
    kd = {k: v for k, v in losses.items() if k.startswith("loss_kd_")}
    assert {model.kd_term_owner[k] for k in kd} == set(methods)
    assert all(torch.isfinite(v) for v in losses.values())
    grads = term_gradients(losses, trunk_parameters(model), per_term=False)
    assert sum(float(g.norm()) for g in grads["kd"] if g is not None) > 0
    sum(losses.values()).backward()


def test_more_queries_than_encoder_locations_is_a_clear_error():
    cfg = hf_cfg()
    cfg.MODEL.HF.NUM_QUERIES = 200  # a 64-px input has 8 x 8 + 4 x 4 + 2 x 2 = 84 locations
    with pytest.raises(ConfigError, match="200 queries from its encoder's 84 locations"):
        build_plain_detector(cfg)


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
def test_distillation_points_are_decoded_as_the_model_decodes_its_queries(model_type):
    """Each anchor reads its own token, so a random-init model (boxes at their anchors) decoding
    its own selected queries as points reproduces its forward."""
    from kd2.hf.points import decode_points, decoder_memory, point_tokens

    torch.manual_seed(0)
    detector = build_plain_detector(hf_cfg(model_type)).detector.eval()
    shapes = [(8, 8), (4, 4), (2, 2)]
    anchors, valid = detector.model.generate_anchors(tuple(shapes))
    assert bool(valid.all())
    assert point_tokens(anchors.sigmoid(), shapes)[0].tolist() == list(range(8 * 8 + 4 * 4 + 4))
    with torch.no_grad():
        out = detector(pixel_values=torch.rand(2, 3, 64, 64))
        memory = decoder_memory(detector.model, list(out.encoder_last_hidden_state))
        logits, boxes = decode_points(detector, memory, out.init_reference_points)
    torch.testing.assert_close(logits[-1], out.logits)
    torch.testing.assert_close(boxes[-1], out.pred_boxes)


def test_kd_detr_students_and_teachers_answer_the_same_points(tmp_path):
    cfg = kd_hf_cfg(tmp_path, ["KDDETR"])
    cfg.KD.KDDETR.RANDOM_POINTS = 5
    model = build_detector(cfg).train()
    images, targets = batch()
    student, _ = model.student_step(images, targets)
    with torch.no_grad():
        teachers = model.teacher_records(student)
    model._kd_answer_points(student, teachers)
    s, t = student.queries.points, teachers[""].queries.points
    assert s["teacher"][0].shape[2] == t["teacher"][0].shape[2] == cfg.MODEL.HF.NUM_QUERIES
    assert s["random"][0].shape[1:3] == t["random"][0].shape[1:3] == (len(images), 5)
    assert s["random"][0].requires_grad and not t["random"][0].requires_grad
