"""Tests of kd2.data.report (the dataset report), tools/analyze_dataset.py and the crowded
small-object generator of kd2.data.synthetic."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import cv2
import numpy as np
import pytest

from kd2.config import get_cfg
from kd2.data import load_coco_json
from kd2.data.report import (
    anchor_sizes_of,
    dataset_report,
    format_report,
    plot_box_sizes,
    write_dataset_report,
)
from kd2.data.synthetic import generate_crowded_dataset, generate_synthetic_dataset
from tests.helpers import REPO, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["a", "b", "c"]


def _cfg(arch: str = "FasterRCNN", num_classes: int = 3, **overrides):
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = arch
    for key in ("ROI_HEADS", "RETINANET", "FCOS", "SSD"):
        getattr(cfg.MODEL, key).NUM_CLASSES = num_classes
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, value)
    return cfg


def _rec(h: int, w: int, boxes, labels) -> dict:
    return {
        "file_name": f"/data/img_{h}x{w}.png",
        "height": h,
        "width": w,
        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, dtype=np.int64),
    }


def _square_records(
    n_images: int, per_image: int, box: float, side: int = 800, label_of=lambda k: k % 3
) -> list:
    """``n_images`` ``side``-px square images with ``per_image`` ``box``-px boxes each."""
    recs, k = [], 0
    for _ in range(n_images):
        boxes, labels = [], []
        for j in range(per_image):
            x = (j * 7) % max(side - box, 1)
            boxes.append([x, 10, x + box, 10 + box])
            labels.append(label_of(k))
            k += 1
        recs.append(_rec(side, side, boxes, labels))
    return recs


# --------------------------------------------------------------------------------------------
# the report's numbers
# --------------------------------------------------------------------------------------------


def test_report_numbers_hand_computed() -> None:
    records = [
        # scale = min(800 / 400, 1333 / 600) = 2.0
        _rec(400, 600, [[0, 0, 10, 10], [0, 0, 20, 5], [10, 10, 50, 50]], [0, 1, 0]),
        # scale = min(800 / 1000, 1333 / 2000) = 0.6665
        _rec(2000, 1000, [[0, 0, 30, 30]], [1]),
        # scale = min(800 / 500, 1333 / 500) = 1.6; no boxes
        _rec(500, 500, np.zeros((0, 4)), np.zeros((0,))),
    ]
    r = dataset_report(records, _cfg(num_classes=2), class_names=["x", "y"])
    assert r["architecture"] == "FasterRCNN" and r["num_classes"] == 2
    assert r["num_images"] == 3 and r["num_boxes"] == 4
    assert r["boxes_per_image"] == {"min": 0, "median": 1.0, "max": 3, "mean": 4 / 3}
    assert r["images_without_boxes"] == 1
    assert r["image_sides"] == {
        "short_min": 400,
        "short_max": 1000,
        "long_min": 500,
        "long_max": 2000,
    }
    rs = r["resize"]
    assert (rs["min_size"], rs["max_size"]) == (800, 1333)
    assert rs["scale_min"] == pytest.approx(0.6665)
    assert rs["scale_median"] == pytest.approx(1.6)
    assert rs["scale_max"] == pytest.approx(2.0)
    assert rs["num_images_downscaled"] == 0
    # original sqrt(w*h): 10, 10, 40 (image 1) and 30 (image 2)
    bo = r["box_size_original"]
    assert (bo["min"], bo["p50"], bo["max"]) == pytest.approx((10.0, 20.0, 40.0))
    # input: 20, 20, 80 and 30 * 0.6665 = 19.995
    bi = r["box_size_input"]
    assert bi["min"] == pytest.approx(19.995)
    assert bi["p50"] == pytest.approx(20.0)
    assert bi["max"] == pytest.approx(80.0)
    assert bi["p5"] == pytest.approx(19.995 + 0.15 * 0.005)  # numpy's linear interpolation
    assert r["anchor_sizes"] == [[32.0], [64.0], [128.0], [256.0], [512.0]]
    assert r["anchor_source"] == "torchvision default"
    assert (r["smallest_anchor"], r["small_box_threshold"]) == (32.0, 16.0)
    assert r["small_boxes"] == {"count": 0, "fraction": 0.0}
    assert r["class_counts"] == [
        {"id": 0, "name": "x", "count": 2},
        {"id": 1, "name": "y", "count": 2},
    ]
    assert sum(r["box_size_histogram"]["counts"]) == 4
    assert r["limits"]["TEST.DETECTIONS_PER_IMAGE"] == 100
    json.dumps(r)  # serialisable as is
    text = format_report(r)
    assert "3 images, 4 boxes" in text and "x 2, y 2" in text


def test_resize_and_anchors_per_architecture() -> None:
    # SSD: a fixed square; per-axis scales 320/640 and 320/320 -> geometric mean sqrt(0.5)
    recs = [_rec(320, 640, [[0, 0, 100, 100]], [0])]
    cfg = _cfg("SSD", **{"MODEL.BACKBONE.NAME": "mobilenet_v3_large", "MODEL.SSD.SIZE": 320})
    r = dataset_report(recs, cfg)
    assert r["resize"]["rule"] == "fixed" and r["resize"]["fixed_size"] == [320, 320]
    assert r["resize"]["scale_min"] == pytest.approx(np.sqrt(0.5))
    assert r["box_size_input"]["p50"] == pytest.approx(100 * np.sqrt(0.5))
    assert r["smallest_anchor"] == pytest.approx(0.2 * 320)  # SSDLite's smallest default box
    vgg, src = anchor_sizes_of(_cfg("SSD", **{"MODEL.BACKBONE.NAME": "vgg16"}))
    assert src == "SSD default boxes" and vgg[0][0] == pytest.approx(0.07 * 300) and len(vgg) == 6
    retina, _ = anchor_sizes_of(_cfg("RetinaNet"))
    assert retina[0] == [32.0, 40.0, 50.0] and retina[-1] == [512.0, 645.0, 812.0]
    assert anchor_sizes_of(_cfg("FCOS"))[0] == [[8.0], [16.0], [32.0], [64.0], [128.0]]
    custom = _cfg(**{"MODEL.ANCHOR_GENERATOR.SIZES": [[8], [16]]})
    assert anchor_sizes_of(custom) == ([[8.0], [16.0]], "MODEL.ANCHOR_GENERATOR.SIZES")
    # multi-scale training: the last MIN_SIZE_TRAIN entry is used
    cfg = _cfg(**{"INPUT.MIN_SIZE_TRAIN": (400, 600), "INPUT.MAX_SIZE_TRAIN": 1000})
    r = dataset_report([_rec(300, 300, [[0, 0, 50, 50]], [0])], cfg)
    assert r["resize"]["scale_max"] == pytest.approx(2.0)
    assert r["resize"]["min_size_choices"] == [400, 600]


# --------------------------------------------------------------------------------------------
# the four warnings
# --------------------------------------------------------------------------------------------


def test_clean_data_gives_no_warning() -> None:
    r = dataset_report(_square_records(20, 5, 40.0), _cfg(), class_names=NAMES)
    assert r["warnings"] == [], r["warnings"]
    assert "no warnings" in format_report(r)


def test_small_box_warning_and_its_threshold() -> None:
    cfg = _cfg()
    # 15 of 100 boxes are 10 px (< 16 px = half the 32-px anchor at scale 1): warned
    recs = _square_records(17, 5, 40.0) + _square_records(3, 5, 10.0)
    r = dataset_report(recs, cfg, class_names=NAMES)
    assert r["small_boxes"]["count"] == 15
    (w,) = [w for w in r["warnings"] if "half the smallest anchor" in w]
    assert w.startswith("15% of the boxes (15 of 100)")
    assert "MODEL.ANCHOR_GENERATOR.SIZES" in w and "INPUT.MIN_SIZE_TRAIN" in w
    # 5 of 100 (5 %): below the 10 % threshold, no warning
    recs = _square_records(19, 5, 40.0) + _square_records(1, 5, 10.0)
    assert not any("anchor" in w for w in dataset_report(recs, cfg, NAMES)["warnings"])
    # the same small boxes are fine with small anchors
    small = _cfg(**{"MODEL.ANCHOR_GENERATOR.SIZES": [[8], [16], [32], [64], [128]]})
    assert dataset_report(_square_records(20, 5, 10.0), small, NAMES)["warnings"] == []


def test_downscale_warning() -> None:
    # 2000-px squares: scale = min(800 / 2000, 1333 / 2000) = 0.4; 60-px boxes stay 24 px
    r = dataset_report(_square_records(20, 5, 60.0, side=2000), _cfg(), class_names=NAMES)
    (w,) = r["warnings"]
    assert w.startswith("20 of 20 images are shrunk more than 2x")
    assert "smallest scale 0.40" in w and "a 10-px object there becomes 4.0 px" in w
    assert "INPUT.MAX_SIZE_TRAIN 2000" in w
    assert r["resize"]["num_images_downscaled"] == 20
    # one such image among 20 (5 % < 10 % of the images): quiet; one shrunk 5x: warned
    recs = _square_records(19, 5, 60.0) + _square_records(1, 5, 60.0, side=2000)
    assert dataset_report(recs, _cfg(), class_names=NAMES)["warnings"] == []
    recs = _square_records(19, 5, 60.0) + _square_records(1, 5, 200.0, side=4000)
    (w,) = dataset_report(recs, _cfg(), class_names=NAMES)["warnings"]
    assert w.startswith("1 of 20 images") and "smallest scale 0.20" in w


def test_rare_class_warning_names_the_class() -> None:
    # class "c" gets 3 of 100 boxes (>= 1 % but < 10 boxes)
    recs = _square_records(20, 5, 40.0, label_of=lambda k: 2 if k < 3 else k % 2)
    (w,) = dataset_report(recs, _cfg(), class_names=NAMES)["warnings"]
    assert "'c' (3 boxes, 3.0%)" in w and "'a'" not in w and "'b'" not in w
    # relative to the mean per class: 15 of 600 boxes is >= 10 but < 0.1 x 200
    recs = _square_records(60, 10, 40.0, label_of=lambda k: 2 if k < 15 else k % 2)
    (w,) = dataset_report(recs, _cfg(), class_names=NAMES)["warnings"]
    assert "fewer than 20 boxes" in w and "'c' (15 boxes, 2.5%)" in w
    recs = _square_records(60, 10, 40.0, label_of=lambda k: 2 if k < 25 else k % 2)
    assert dataset_report(recs, _cfg(), class_names=NAMES)["warnings"] == []
    # a class without any box is named too (NUM_CLASSES 4, the fourth never occurs)
    r = dataset_report(_square_records(20, 5, 40.0), _cfg(num_classes=4))
    (w,) = r["warnings"]
    assert "'class 3' (0 boxes" in w


def test_crowded_image_warnings() -> None:
    recs = _square_records(9, 12, 40.0) + _square_records(1, 150, 40.0)
    r = dataset_report(recs, _cfg(**{"MODEL.RPN.POST_NMS_TOPK_TRAIN": 120}), class_names=NAMES)
    det = [w for w in r["warnings"] if "TEST.DETECTIONS_PER_IMAGE 100" in w]
    assert len(det) == 1 and "most: 150" in det[0] and "Set TEST.DETECTIONS_PER_IMAGE 200" in det[0]
    assert "maxDets=100" in det[0]
    rpn = [w for w in r["warnings"] if "MODEL.RPN.POST_NMS_TOPK_TRAIN 120" in w]
    assert len(rpn) == 1 and "POST_NMS_TOPK_TEST" not in rpn[0].split("Raise")[0]
    # raised limits: quiet
    cfg = _cfg(**{"TEST.DETECTIONS_PER_IMAGE": 200})
    assert dataset_report(recs, cfg, class_names=NAMES)["warnings"] == []


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def test_write_dataset_report_json_and_png(tmp_path: Path) -> None:
    recs = _square_records(17, 5, 40.0) + _square_records(3, 5, 10.0)
    report = write_dataset_report(recs, _cfg(), str(tmp_path / "out"), class_names=NAMES)
    data = json.loads((tmp_path / "out" / "dataset_report.json").read_text())
    assert data == report and data["num_boxes"] == 100 and len(data["warnings"]) == 1
    png = (tmp_path / "out" / "dataset_report.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    img = cv2.imread(str(tmp_path / "out" / "dataset_report.png"))
    assert img is not None and img.shape[0] > 200 and img.shape[1] > 300
    # from raw sizes too
    path = plot_box_sizes(np.array([3.0, 5.0, 20.0, 300.0]), [[8], [16]], str(tmp_path / "s.png"))
    assert Path(path).read_bytes().startswith(PNG_MAGIC)


# --------------------------------------------------------------------------------------------
# the crowded generator
# --------------------------------------------------------------------------------------------

CROWDED = dict(
    num_train=3,
    num_val=1,
    min_side=300,
    max_side=500,
    objects_per_image=(30, 60),
    min_object=10,
    max_object=30,
    seed=0,
)


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return generate_crowded_dataset(str(tmp_path_factory.mktemp("crowded") / "a"), **CROWDED)


def test_crowded_generator_is_deterministic(crowded: dict, tmp_path: Path) -> None:
    other = generate_crowded_dataset(str(tmp_path / "b"), **CROWDED)
    for key in ("train_json", "val_json"):
        assert Path(crowded[key]).read_bytes() == Path(other[key]).read_bytes()
    for key in ("train_image_root", "val_image_root"):
        names = sorted(p.name for p in Path(crowded[key]).iterdir())
        assert names == sorted(p.name for p in Path(other[key]).iterdir()) and names
        for n in names:
            assert (Path(crowded[key]) / n).read_bytes() == (Path(other[key]) / n).read_bytes()
    seed1 = generate_crowded_dataset(str(tmp_path / "c"), **{**CROWDED, "seed": 1})
    assert Path(crowded["train_json"]).read_bytes() != Path(seed1["train_json"]).read_bytes()


def test_crowded_generator_statistics(crowded: dict) -> None:
    data = json.loads(Path(crowded["train_json"]).read_text())
    assert {"info", "licenses", "images", "annotations", "categories"} <= set(data)
    assert [c["id"] for c in data["categories"]] == [1, 2, 3]
    assert len(data["images"]) == 3
    assert any(im["width"] != im["height"] for im in data["images"])
    for im in data["images"]:
        assert 300 <= im["width"] <= 500 and 300 <= im["height"] <= 500
        pixels = cv2.imread(str(Path(crowded["train_image_root"]) / im["file_name"]))
        assert pixels.shape == (im["height"], im["width"], 3)
        anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
        assert 30 <= len(anns) <= 60
        boxes = np.array([a["bbox"] for a in anns])
        x, y, w, h = boxes.T
        assert np.all(x >= 0) and np.all(y >= 0)
        assert np.all(x + w <= im["width"]) and np.all(y + h <= im["height"])
        longer = np.maximum(w, h)
        assert np.all(longer >= 0.75 * 10) and np.all(longer <= 1.2 * 30 + 2)
        for a, b in combinations(boxes, 2):  # objects never overlap
            assert (
                a[0] + a[2] <= b[0]
                or b[0] + b[2] <= a[0]
                or a[1] + a[3] <= b[1]
                or (b[1] + b[3] <= a[1])
            )
        assert all(a["iscrowd"] == 0 and a["area"] > 0 for a in anns)
        assert {a["category_id"] for a in anns} <= {1, 2, 3}
    recs, meta = load_coco_json(crowded["train_json"], crowded["train_image_root"])
    assert len(recs) == 3 and len(meta["thing_classes"]) == 3
    with pytest.raises(ValueError, match="min_side"):
        generate_crowded_dataset("/nonexistent", min_side=40, max_side=60)


def test_default_generator_still_deterministic(tmp_path: Path) -> None:
    kw = dict(num_train=3, num_val=1, image_size=64)
    a = generate_synthetic_dataset(str(tmp_path / "a"), **kw)
    b = generate_synthetic_dataset(str(tmp_path / "b"), **kw)
    for key in ("train_json", "val_json"):
        assert Path(a[key]).read_bytes() == Path(b[key]).read_bytes()
    for n in ("000001.png", "000002.png", "000003.png"):
        pa, pb = Path(a["train_image_root"]) / n, Path(b["train_image_root"]) / n
        assert pa.read_bytes() == pb.read_bytes()
    assert json.loads(Path(a["train_json"]).read_text())["images"][0]["width"] == 64


# --------------------------------------------------------------------------------------------
# the demo's data stays quiet; the tool
# --------------------------------------------------------------------------------------------


def test_demo_config_on_synthetic_data_gives_no_warning(tmp_path: Path) -> None:
    from kd2.engine import setup_cfg

    paths = generate_synthetic_dataset(str(tmp_path / "syn"), num_train=30, num_val=5)
    recs, meta = load_coco_json(paths["train_json"], paths["train_image_root"])
    cfg = setup_cfg(str(REPO / "configs" / "synthetic" / "faster_rcnn_R18_teacher.yaml"))
    r = dataset_report(recs, cfg, class_names=meta["thing_classes"])
    assert r["warnings"] == [], r["warnings"]
    assert r["resize"]["scale_min"] == r["resize"]["scale_max"] == 1.0


def test_analyze_dataset_tool(tmp_path: Path) -> None:
    paths = generate_crowded_dataset(
        str(tmp_path / "crowd"),
        num_train=2,
        num_val=1,
        min_side=300,
        max_side=400,
        objects_per_image=(110, 130),
        min_object=8,
        max_object=16,
    )
    name = f"{paths['train_json']}:{paths['train_image_root']}"
    out = tmp_path / "report"
    r = run_cli(
        [
            "--config-file",
            "configs/synthetic/faster_rcnn_R18_teacher.yaml",
            "--output",
            str(out),
            "DATASETS.TRAIN",
            f"('{name}',)",
            "MODEL.ROI_HEADS.NUM_CLASSES",
            "3",
        ],
        tool="analyze_dataset.py",
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Dataset report (FasterRCNN): 2 images" in r.stdout
    assert "WARNING" in r.stdout and "TEST.DETECTIONS_PER_IMAGE 100" in r.stdout
    assert "shrunk more than 2x" in r.stdout  # 300-400 px images into 128 px
    data = json.loads((out / "dataset_report.json").read_text())
    assert data["num_images"] == 2 and data["boxes_per_image"]["min"] >= 110
    assert [c["name"] for c in data["class_counts"]] == [
        "red_circle",
        "orange_ellipse",
        "red_rounded_square",
    ]
    assert (out / "dataset_report.png").read_bytes().startswith(PNG_MAGIC)
