"""The distilled student as a product: export with verification, prediction on image files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kd2.tv.build import build_plain_detector

from .helpers import tiny_cfg


def _saved_model(tmp_path, arch):
    """A tiny random detector of ``arch`` (config yaml + weights) whose test thresholds let
    random weights detect something."""
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
    with torch.no_grad():  # spread the random class scores: near-ties make top-k ambiguous
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Conv2d) and "classification_head" in name:
                if m.out_channels != m.in_channels:  # the predictor, not the tower
                    m.weight.normal_(0, 2.0)
                    m.bias.zero_()
    weights = tmp_path / f"{arch}.pth"
    torch.save({"model": model.state_dict()}, weights)
    cfg.MODEL.WEIGHTS = str(weights)
    path = tmp_path / f"{arch}.yaml"
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


@pytest.mark.parametrize("arch", ["FasterRCNN", "RetinaNet", "FCOS"])
def test_onnx_export_matches_pytorch_on_images_of_other_sizes(tmp_path, arch):
    """One graph for every input size. (kd2's GFL builds its anchor grid from Python ints, so its
    traced graph holds one size: the TorchScript test covers it at the traced size. A random
    SSD's softmax scores tie exactly, so which class wins a tie is not comparable.)"""
    pytest.importorskip("onnxruntime")
    from tools.export_model import main

    config = _saved_model(tmp_path, arch)
    images = _images(tmp_path)
    report = main(
        ["--config-file", config, "--format", "onnx", "--output", str(tmp_path / "out"),
         "--sample-images", *images]
    )  # fmt: skip
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert [c["problem"] for c in report["checks"]] == [None, None]
    assert sum(c["detections"] for c in report["checks"]) > 0  # the comparison compares something
    saved = json.loads((tmp_path / "out" / "export.json").read_text())
    assert saved["architecture"] == ("FasterRCNN" if arch == "FasterRCNN" else arch)


@pytest.mark.parametrize("arch", ["FasterRCNN", "GFL"])
def test_torchscript_export_matches_pytorch(tmp_path, arch):
    from tools.export_model import main

    config = _saved_model(tmp_path, arch)
    images = _images(tmp_path, sizes=((96, 128), (96, 128)))
    report = main(
        ["--config-file", config, "--format", "torchscript", "--output", str(tmp_path / "out"),
         "--sample-images", *images]
    )  # fmt: skip
    assert [c["problem"] for c in report["checks"]] == [None, None]
    loaded = torch.jit.load(str(tmp_path / "out" / "model.ts"))
    boxes, scores, labels = loaded(torch.rand(3, 96, 128))
    assert boxes.shape[1] == 4 and scores.shape == labels.shape


def test_export_refuses_a_tampered_model(tmp_path, monkeypatch):
    """A mismatch between the file and PyTorch is an error, not a warning."""
    import tools.export_model as ex

    config = _saved_model(tmp_path, "FasterRCNN")
    images = _images(tmp_path)
    real = ex.run_exported

    def tampered(path, fmt, inputs):
        boxes, scores, labels = real(path, fmt, inputs)
        return boxes + 1.0, scores, labels

    monkeypatch.setattr(ex, "run_exported", tampered)
    with pytest.raises(SystemExit) as e:
        ex.main(["--config-file", config, "--format", "onnx", "--output", str(tmp_path / "o"),
                 "--sample-images", *images])  # fmt: skip
    assert e.value.code == 1


def test_predict_draws_writes_json_and_skips_unreadable_files(tmp_path, capsys):
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
    with pytest.raises(SystemExit, match="names no image"):
        main(["--config-file", config, "--input", str(tmp_path / "none*.jpg"), "--output",
              str(out)])  # fmt: skip


def test_detectron2_student_exports_and_predicts(tmp_path):
    """A Detectron2 config: export through detectron2.export, verified; prediction on files."""
    pytest.importorskip("detectron2", reason="detectron2 is not installed (see README)")
    pytest.importorskip("onnxruntime")
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from kd2.d2 import add_kd_config
    from tools.export_model import main as export_main
    from tools.predict import main as predict_main

    from .helpers import REPO

    cfg = get_cfg()
    add_kd_config(cfg)
    cfg.merge_from_file(
        str(REPO / "configs" / "Detectron2-Quick" / "faster_rcnn_R18_FPN_DeFeat_quick.yaml")
    )
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"  # the student's checkpoint is plain
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.DATASETS.TEST = ()
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("student")
    cfg.MODEL.META_ARCHITECTURE = "DistillGeneralizedRCNN"  # a distillation config: no teacher
    cfg.KD.TEACHER.WEIGHTS = str(tmp_path / "missing_teacher.pth")  # is ever loaded
    cfg.MODEL.WEIGHTS = str(tmp_path / "student.pth")
    config = tmp_path / "d2.yaml"
    config.write_text(cfg.dump())
    images = _images(tmp_path, sizes=((200, 300), (240, 180)))
    report = export_main(
        ["--config-file", str(config), "--format", "onnx", "--output", str(tmp_path / "x"),
         "--sample-images", *images]
    )  # fmt: skip
    assert report["backend"] == "detectron2" and report["architecture"] == "GeneralizedRCNN"
    assert [c["problem"] for c in report["checks"]] == [None, None]
    summary = predict_main(
        ["--config-file", str(config), "--input", images[0], "--output", str(tmp_path / "p"),
         "--confidence-threshold", "0.0"]
    )  # fmt: skip
    assert summary["images"] == 1 and summary["detections"] > 0
