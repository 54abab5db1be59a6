"""Tests of kd2.data.synthetic: determinism, COCO structure, classes and boxes."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from kd2.data import load_coco_json
from kd2.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic_dataset, main

SMALL = dict(num_train=8, num_val=4, image_size=96)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return generate_synthetic_dataset(str(tmp_path_factory.mktemp("syn") / "a"), **SMALL)


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def test_same_seed_is_byte_identical(tiny: dict, tmp_path: Path) -> None:
    other = generate_synthetic_dataset(str(tmp_path / "b"), **SMALL)
    for key in ("train_json", "val_json"):
        assert Path(tiny[key]).read_bytes() == Path(other[key]).read_bytes()
    for key in ("train_image_root", "val_image_root"):
        names = sorted(p.name for p in Path(tiny[key]).iterdir())
        assert names == sorted(p.name for p in Path(other[key]).iterdir())
        for n in names:
            a = cv2.imread(str(Path(tiny[key]) / n))
            b = cv2.imread(str(Path(other[key]) / n))
            assert a.shape == (96, 96, 3) and np.array_equal(a, b)
            assert (Path(tiny[key]) / n).read_bytes() == (Path(other[key]) / n).read_bytes()


def test_other_seed_differs_and_val_independent_of_num_train(tiny: dict, tmp_path: Path) -> None:
    other = generate_synthetic_dataset(str(tmp_path / "c"), **{**SMALL, "seed": 1})
    assert Path(tiny["train_json"]).read_bytes() != Path(other["train_json"]).read_bytes()
    more = generate_synthetic_dataset(str(tmp_path / "d"), **{**SMALL, "num_train": 3})
    assert Path(tiny["val_json"]).read_bytes() == Path(more["val_json"]).read_bytes()


def test_coco_structure_classes_and_boxes(tiny: dict) -> None:
    for split, n in (("train", 8), ("val", 4)):
        data = _load(tiny[f"{split}_json"])
        assert {"info", "licenses", "images", "annotations", "categories"} <= set(data)
        ids = [c["id"] for c in data["categories"]]
        assert ids == [1, 2, 3, 5, 7, 9]  # non-contiguous on purpose
        assert [c["name"] for c in data["categories"]] == [c.name for c in SYNTHETIC_CLASSES[:6]]
        assert len(data["images"]) == n
        per_image: dict = {img["id"]: 0 for img in data["images"]}
        for a in data["annotations"]:
            assert a["iscrowd"] == 0 and a["area"] > 0 and a["category_id"] in ids
            x, y, w, h = a["bbox"]
            assert w >= 3 and h >= 3 and x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96
            per_image[a["image_id"]] += 1
        counts = list(per_image.values())
        assert 0 in counts, "each split must contain an image without objects"
        assert all(0 <= c <= 8 for c in counts) and sum(c > 0 for c in counts) >= n - 1
        assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])


def test_loads_with_contiguous_ids(tiny: dict) -> None:
    records, meta = load_coco_json(tiny["train_json"], tiny["train_image_root"])
    assert meta["thing_dataset_id_to_contiguous_id"] == {1: 0, 2: 1, 3: 2, 5: 3, 7: 4, 9: 5}
    labels = np.concatenate([r["labels"] for r in records])
    assert labels.min() >= 0 and labels.max() <= 5
    assert any(len(r["labels"]) == 0 for r in records)


def test_overwrite_and_cli(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_synthetic_dataset(tiny["root"], **SMALL)
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--num-train", "2", "--num-val", "1", "--image-size", "64"]
    assert main([*argv, "--num-classes", "8", "--seed", "3"]) == 0
    assert "train_json" in capsys.readouterr().out
    data = _load(str(out / "annotations" / "instances_train.json"))
    assert [c["id"] for c in data["categories"]] == [1, 2, 3, 5, 7, 9, 11, 13]
    assert main([*argv, "--overwrite"]) == 0
    assert len(list((out / "train").iterdir())) == 2
