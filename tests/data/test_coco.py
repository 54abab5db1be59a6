"""Tests of kd2.data.coco.load_coco_json on the real mini COCO and on malformed inputs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from kd2.data import DetectionDataset, load_coco_json, read_image


def shared_coco() -> Path:
    """The mini COCO 2017 copy beside the repository (override: ``$KD2_SHARED_COCO``)."""
    env = os.environ.get("KD2_SHARED_COCO")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared/datasets/coco"


COCO = shared_coco()
needs_coco = pytest.mark.skipif(
    not (COCO / "annotations/instances_val2017.json").is_file(),
    reason=f"mini COCO not found at {COCO} (set KD2_SHARED_COCO)",
)


@needs_coco
@pytest.mark.parametrize("split", ["train", "val"])
def test_real_mini_coco(split: str) -> None:
    json_file = COCO / f"annotations/instances_{split}2017.json"
    raw = json.loads(json_file.read_text())
    records, meta = load_coco_json(str(json_file), str(COCO / f"{split}2017"), f"mini_{split}")

    assert len(records) == len(raw["images"])
    non_crowd = [a for a in raw["annotations"] if not a.get("iscrowd", 0)]
    assert len(non_crowd) < len(raw["annotations"])  # the subset has crowd boxes to drop
    assert sum(len(r["labels"]) for r in records) == len(non_crowd)
    assert [r["image_id"] for r in records] == sorted(i["id"] for i in raw["images"])

    cat_ids = sorted(c["id"] for c in raw["categories"])
    assert meta["thing_dataset_id_to_contiguous_id"] == {c: i for i, c in enumerate(cat_ids)}
    assert meta["contiguous_id_to_dataset_id"] == dict(enumerate(cat_ids))
    names = {c["id"]: c["name"] for c in raw["categories"]}
    assert meta["thing_classes"] == [names[c] for c in cat_ids]
    assert len(meta["thing_classes"]) == 80 and meta["json_file"] == str(json_file)

    for r in records:
        assert os.path.isabs(r["file_name"]) and r["boxes"].dtype == np.float32
        assert r["boxes"].shape == (len(r["labels"]), 4) and r["labels"].dtype == np.int64
        if len(r["labels"]):
            assert r["labels"].min() >= 0 and r["labels"].max() < 80
            b = r["boxes"]
            assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
            assert (b[:, 2] <= r["width"]).all() and (b[:, 3] <= r["height"]).all()
    assert any(len(r["labels"]) == 0 for r in records)  # images without boxes are kept

    # one annotation, checked by hand: XYWH -> XYXY and the contiguous label
    a = non_crowd[0]
    rec = next(r for r in records if r["image_id"] == a["image_id"])
    same_img = [x for x in non_crowd if x["image_id"] == a["image_id"]]
    k = same_img.index(a)
    x, y, w, h = a["bbox"]
    np.testing.assert_allclose(rec["boxes"][k], [x, y, x + w, y + h], rtol=1e-6)
    assert rec["labels"][k] == cat_ids.index(a["category_id"])


def _write(tmp_path: Path, data: object, name: str = "ann.json") -> str:
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


def _valid() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 20, "width": 30},
            {"id": 2, "file_name": "b.png", "height": 20, "width": 30},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [1, 2, 3, 4], "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }


def test_missing_json(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "instances.json"
    with pytest.raises(FileNotFoundError, match="nope/instances.json"):
        load_coco_json(str(missing), str(tmp_path))


def test_malformed_json(tmp_path: Path) -> None:
    p = tmp_path / "broken.json"
    p.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken\.json.*not valid JSON"):
        load_coco_json(str(p), str(tmp_path))


def test_missing_key(tmp_path: Path) -> None:
    data = _valid()
    del data["categories"]
    with pytest.raises(ValueError, match=r"ann\.json.*categories"):
        load_coco_json(_write(tmp_path, data), str(tmp_path))


def test_bbox_with_three_numbers(tmp_path: Path) -> None:
    data = _valid()
    data["annotations"][0]["bbox"] = [1, 2, 3]
    with pytest.raises(ValueError, match=r"ann\.json.*annotation id 10.*bbox.*4 finite numbers"):
        load_coco_json(_write(tmp_path, data), str(tmp_path))


def test_unknown_image_and_category(tmp_path: Path) -> None:
    data = _valid()
    data["annotations"][0]["image_id"] = 99
    with pytest.raises(ValueError, match=r"ann\.json.*annotation id 10.*image_id 99"):
        load_coco_json(_write(tmp_path, data), str(tmp_path))
    data = _valid()
    data["annotations"][0]["category_id"] = 4
    with pytest.raises(ValueError, match=r"annotation id 10.*category_id 4"):
        load_coco_json(_write(tmp_path, data), str(tmp_path))


def test_filtering_clipping_crowd_and_empty(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    data = _valid()
    data["annotations"] += [
        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 4]},  # zero width
        {"id": 12, "image_id": 1, "category_id": 3, "bbox": [40, 5, 4, 4]},  # right of image
        {"id": 13, "image_id": 1, "category_id": 3, "bbox": [-9, -9, 5, 5]},  # above-left
        {"id": 14, "image_id": 1, "category_id": 3, "bbox": [25, 15, 10, 10]},  # clipped
        {"id": 15, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1},
    ]
    with caplog.at_level(logging.WARNING, logger="kd2.data.coco"):
        records, meta = load_coco_json(_write(tmp_path, data), str(tmp_path), "my_set")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "my_set" in warnings[0].getMessage() and "removed 3 box" in warnings[0].getMessage()

    assert meta["thing_classes"] == ["three", "seven"]  # sorted by id: 3 -> 0, 7 -> 1
    r1, r2 = records
    np.testing.assert_array_equal(r1["boxes"], [[1, 2, 4, 6], [25, 15, 30, 20]])
    np.testing.assert_array_equal(r1["labels"], [1, 0])
    assert r1["file_name"] == str(tmp_path / "a.png")
    assert r2["boxes"].shape == (0, 4) and r2["labels"].shape == (0,)
    assert r2["boxes"].dtype == np.float32 and r2["labels"].dtype == np.int64


def test_missing_and_corrupt_image_named(tmp_path: Path) -> None:
    json_file = _write(tmp_path, _valid())
    records, _ = load_coco_json(json_file, str(tmp_path / "imgs"))  # images are not checked
    ds = DetectionDataset(records, train=False)
    with pytest.raises(FileNotFoundError) as e:
        ds[0]
    assert str(tmp_path / "imgs" / "a.png") in str(e.value) and json_file in str(e.value)

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"a\.png.*ann\.json"):
        ds[0]

    cv2.imwrite(str(tmp_path / "imgs" / "b.png"), np.zeros((21, 30, 3), np.uint8))
    with pytest.raises(ValueError, match=r"b\.png.*21x30.*20x30"):
        ds[1]  # size disagrees with the annotation
    with pytest.raises(FileNotFoundError, match="x.jpg"):
        read_image(str(tmp_path / "x.jpg"))
