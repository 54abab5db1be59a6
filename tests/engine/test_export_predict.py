"""The distilled student as a product: export with verification, prediction on image files.

Every family of both backends exports with the defaults (``.pt2`` through ``torch.export`` and
ONNX through the dynamo exporter), and each file, loaded back (``torch.export.load``,
onnxruntime), gives the eager student's detections on images of two sizes.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from kd2.tv.build import build_plain_detector
from tests.helpers import tiny_cfg

TV_FAMILIES = ["FasterRCNN", "RetinaNet", "FCOS", "SSD", "GFL"]
D2_FAMILIES = ["GeneralizedRCNN", "RetinaNet", "GFL"]


@torch.no_grad()
def _distinct_class_scores(model, predictors, image) -> None:
    """Random weights whose class scores neither tie nor saturate: each class predictor is
    re-drawn and scaled so that its logits on ``image`` have a standard deviation of 2. (At
    random init SSDLite's features vanish and its softmax scores are exactly 1/K; GroupNorm
    heads with large weights saturate the sigmoid at 1.0 — exact ties, whose order NMS may
    break either way, so the comparison would test nothing.)"""
    outputs: dict = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o: outputs.setdefault(m, []).append(o.flatten()))
        for m in predictors
    ]
    for m in predictors:
        m.weight.normal_()
        m.bias.zero_()
    model.eval()(image)
    for h in hooks:
        h.remove()
    for m in predictors:
        m.weight.mul_(2.0 / torch.cat(outputs[m]).std())


def _saved_model(tmp_path, arch):
    """A tiny random torchvision detector of ``arch`` (config yaml + weights) whose test
    thresholds let random weights detect something, with distinct class scores."""
    # 64 FPN channels: GroupNorm(32) of a 1x1 map with one channel per group is refused while
    # tracing
    cfg = tiny_cfg("RetinaNet" if arch == "SSD" else arch, channels=64)
    if arch == "SSD":
        cfg.MODEL.META_ARCHITECTURE = "SSD"
        cfg.MODEL.BACKBONE.NAME = "mobilenet_v3_large"
        cfg.MODEL.SSD.NUM_CLASSES = 3
        cfg.MODEL.SSD.SIZE = 320
    cfg.MODEL.BACKEND = "torchvision"
    for node in (cfg.MODEL.RETINANET, cfg.MODEL.FCOS, cfg.MODEL.GFL, cfg.MODEL.ROI_HEADS):
        node.SCORE_THRESH_TEST = 0.05
    cfg.DATASETS.TEST = ()
    torch.manual_seed(0)
    model = build_plain_detector(cfg)
    with torch.no_grad():
        if arch == "SSD":  # features that do not vanish through the random MobileNet
            for m in model.backbone.modules():
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    predictors = [
        m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d)
        and "classification_head" in name
        and m.out_channels != m.in_channels  # the predictor, not the tower
    ]
    _distinct_class_scores(model, predictors, [torch.rand(3, 96, 128)])
    weights = tmp_path / f"{arch}.pth"
    torch.save({"model": model.state_dict()}, weights)
    cfg.MODEL.WEIGHTS = str(weights)
    path = tmp_path / f"{arch}.yaml"
    path.write_text(cfg.dump())
    return str(path)


def _saved_d2_model(tmp_path, arch):
    """A tiny random Detectron2 detector (R18-FPN, 3 classes, 96-128 px) as a yacs config +
    checkpoint; ``GeneralizedRCNN`` is saved under a distillation config (its teacher is never
    built)."""
    from detectron2 import model_zoo
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from kd2.d2 import add_kd_config

    cfg = get_cfg()
    add_kd_config(cfg)
    base = "Base-RCNN-FPN.yaml" if arch == "GeneralizedRCNN" else "Base-RetinaNet.yaml"
    cfg.merge_from_file(model_zoo.get_config_file(base))
    cfg.MODEL.META_ARCHITECTURE = arch
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 300, 100
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = cfg.MODEL.RETINANET.NUM_CLASSES = 3
    cfg.MODEL.GFL.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.05
    cfg.KD.PREFLIGHT.ENABLED = False
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 128
    cfg.DATASETS.TEST = ()
    torch.manual_seed(0)
    model = build_model(cfg)
    predictors = [m for name, m in model.named_modules() if name.endswith("cls_score")]
    image = torch.rand(3, 96, 128) * 255
    _distinct_class_scores(model, predictors, [{"image": image}])
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save(f"d2_{arch}")
    cfg.MODEL.WEIGHTS = str(tmp_path / f"d2_{arch}.pth")
    if arch == "GeneralizedRCNN":  # a distillation config: no teacher is ever loaded
        cfg.MODEL.META_ARCHITECTURE = "DistillGeneralizedRCNN"
        cfg.KD.TEACHER.WEIGHTS = str(tmp_path / "missing_teacher.pth")
    path = tmp_path / f"d2_{arch}.yaml"
    path.write_text(cfg.dump())
    return str(path)


def _images(tmp_path, sizes=((96, 128), (112, 80))):
    g = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _export(config, out, images, *options):
    """``tools/export_model.py`` with ``options``; no deprecation warning may be raised."""
    from tools.export_model import main

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = main(["--config-file", config, "--output", str(out), "--sample-images",
                       *images, *options])  # fmt: skip
    deprecations = [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning))
    ]
    assert not deprecations, deprecations
    return report


def _assert_verified(report, formats, images: int = 2):
    assert list(report["files"]) == list(formats)
    for fmt, entry in report["files"].items():
        assert [c["problem"] for c in entry["checks"]] == [None] * images, fmt
    checks = report["files"][formats[0]]["checks"]
    assert sum(c["detections"] for c in checks) > 0  # the comparison compares something


def _onnx_runs(path, shape=(3, 100, 60)):
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    boxes, scores, labels = session.run(None, {"image": np.random.rand(*shape).astype("f4")})
    assert boxes.shape == (len(scores), 4) and labels.shape == scores.shape


@pytest.mark.parametrize("arch", TV_FAMILIES)
def test_torchvision_family_exports_pt2_and_onnx_by_default(tmp_path, arch):
    """One graph for every input size: checked on two sizes, the ONNX file run on a third (and
    GFL's ``.pt2``, loaded with ``torch.export.load``, compared with eager GFL there)."""
    pytest.importorskip("onnxruntime")
    config = _saved_model(tmp_path, arch)
    report = _export(config, tmp_path / "out", _images(tmp_path))
    _assert_verified(report, ["pt2", "onnx"])
    assert report["files"]["onnx"]["exporter"] == "dynamo" and report["notes"] == []
    assert report["architecture"] == arch
    saved = json.loads((tmp_path / "out" / "export.json").read_text())
    assert saved["files"]["pt2"]["file"].endswith("model.pt2")
    _onnx_runs(str(tmp_path / "out" / "model.onnx"))
    if arch == "GFL":  # its traced graphs once held the traced size (Python ints)
        _pt2_equals_eager_at_a_third_size(config, str(tmp_path / "out" / "model.pt2"))


def _pt2_equals_eager_at_a_third_size(config, path):
    import torchvision  # noqa: F401 — registers torchvision::nms for the loader

    from kd2.engine.predictor import load_predictor

    image = torch.rand(3, 72, 136)
    boxes, scores, labels = torch.export.load(path).module()(image)
    with torch.no_grad():
        eager = load_predictor(config).model([image])[0]
    assert len(scores) == len(eager["scores"]) > 0
    torch.testing.assert_close(scores, eager["scores"], atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes, eager["boxes"], atol=1e-3, rtol=0)
    assert torch.equal(labels, eager["labels"])


@pytest.mark.parametrize("arch", D2_FAMILIES)
def test_detectron2_family_exports_pt2_and_onnx_by_default(tmp_path, arch):
    """The Detectron2 backend (``TracingAdapter``; kd2's GFL included), two input sizes."""
    pytest.importorskip("detectron2", reason="detectron2 is not installed (see README)")
    pytest.importorskip("onnxruntime")
    config = _saved_d2_model(tmp_path, arch)
    report = _export(config, tmp_path / "out", _images(tmp_path))
    _assert_verified(report, ["pt2", "onnx"])
    assert report["backend"] == "detectron2" and report["architecture"] == arch
    assert report["files"]["onnx"]["exporter"] == "dynamo" and report["notes"] == []
    _onnx_runs(str(tmp_path / "out" / "model.onnx"))


def test_onnx_falls_back_to_the_legacy_exporter_with_a_reason(tmp_path, monkeypatch, capsys):
    """Where torch.export or the dynamo exporter fails, the legacy exporter writes the ONNX
    file, one line says why, and the check still holds — GFL included, on two sizes (the legacy
    GFL graph once gave 21 detections instead of 18)."""
    pytest.importorskip("onnxruntime")
    import tools.export_model as ex

    def no_program(*args, **kwargs):
        raise RuntimeError("no graph today")

    monkeypatch.setattr(ex, "export_program", no_program)
    config = _saved_model(tmp_path, "GFL")
    report = _export(config, tmp_path / "out", _images(tmp_path), "--format", "onnx")
    _assert_verified(report, ["onnx"])
    entry = report["files"]["onnx"]
    assert entry["exporter"] == "legacy" and "no graph today" in entry["fallback_reason"]
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("onnx:")] == report["notes"]
    assert len(report["notes"]) == 1 and "legacy exporter" in report["notes"][0]


def test_torchscript_only_when_asked(tmp_path):
    config = _saved_model(tmp_path, "GFL")
    images = _images(tmp_path, sizes=((96, 128), (96, 128)))
    report = _export(config, tmp_path / "out", images, "--format", "torchscript")
    _assert_verified(report, ["torchscript"])
    assert not (tmp_path / "out" / "model.pt2").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated: asked for
        loaded = torch.jit.load(str(tmp_path / "out" / "model.ts"))
    boxes, scores, labels = loaded(torch.rand(3, 96, 128))
    assert boxes.shape[1] == 4 and scores.shape == labels.shape


def test_export_refuses_a_tampered_model(tmp_path, monkeypatch):
    """A mismatch between the file and PyTorch is an error (exit 1), not a warning."""
    import tools.export_model as ex

    config = _saved_model(tmp_path, "FasterRCNN")
    real = ex.load_exported

    def tampered(path, fmt):
        run = real(path, fmt)

        def shifted(inputs):
            boxes, scores, labels = run(inputs)
            return boxes + 0.01, scores, labels

        return shifted

    monkeypatch.setattr(ex, "load_exported", tampered)
    with pytest.raises(SystemExit) as e:
        ex.main(["--config-file", config, "--format", "torchscript", "--output",
                 str(tmp_path / "o"), "--sample-images", *_images(tmp_path)[:1]])  # fmt: skip
    assert e.value.code == 1
    saved = json.loads((tmp_path / "o" / "export.json").read_text())
    assert "boxes differ" in saved["files"]["torchscript"]["checks"][0]["problem"]


def test_export_user_mistakes_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import sys

    import tools.export_model as ex
    from kd2.utils.errors import ConfigError, MissingFileError, run_main

    with pytest.raises(MissingFileError, match="does not exist"):
        ex.main(["--config-file", str(tmp_path / "none.yaml"), "--output", str(tmp_path)])
    with pytest.raises(ConfigError, match="'tflite' is not one of"):
        ex.main(["--config-file", "x.yaml", "--output", str(tmp_path), "--format", "tflite"])
    config = _saved_model(tmp_path, "FasterRCNN")
    with pytest.raises(ConfigError, match="DATASETS.TEST"):  # nothing to verify on
        ex.main(["--config-file", config, "--output", str(tmp_path / "o")])
    argv = ["--config-file", config, "--output", str(tmp_path / "o"), "--sample-images", "x.png"]
    monkeypatch.setattr(sys, "argv", ["export_model.py", *argv])
    with pytest.raises(SystemExit) as e:
        run_main(ex.main)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "kd2: error: sample image 'x.png' does not exist — check --sample-images"
    ]


def test_predict_draws_writes_json_and_skips_unreadable_files(tmp_path, capsys):
    from kd2.utils.errors import MissingFileError
    from tools.predict import main

    config = _saved_model(tmp_path, "FasterRCNN")
    folder = tmp_path / "images"
    folder.mkdir()
    _images(folder)
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "pred"
    summary = main(
        ["--config-file", config, "--input", str(folder), "--output", str(out),
         "--confidence-threshold", "0.0"]
    )  # fmt: skip
    assert summary["images"] == 2 and summary["skipped"] == [str(folder / "broken.png")]
    assert (out / "img0.png").is_file() and (out / "img1.png").is_file()
    preds = json.loads((out / "predictions.json").read_text())
    assert preds and {p["file_name"] for p in preds} == {"img0.png", "img1.png"}
    assert all(len(p["bbox"]) == 4 and 0 <= p["category_id"] < 3 for p in preds)
    assert "not a readable image" in capsys.readouterr().err
    with pytest.raises(MissingFileError, match="names no image"):
        main(["--config-file", config, "--input", str(tmp_path / "none*.jpg"), "--output",
              str(out)])  # fmt: skip


def test_detectron2_student_predicts(tmp_path):
    """A Detectron2 distillation config predicts with its student alone."""
    pytest.importorskip("detectron2", reason="detectron2 is not installed (see README)")
    from tools.predict import main as predict_main

    config = _saved_d2_model(tmp_path, "GeneralizedRCNN")
    image = _images(tmp_path, sizes=((200, 300),))[0]
    summary = predict_main(
        ["--config-file", config, "--input", image, "--output", str(tmp_path / "p"),
         "--confidence-threshold", "0.0"]
    )  # fmt: skip
    assert summary["images"] == 1 and summary["detections"] > 0
