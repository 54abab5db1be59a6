"""The second benchmark's data: the "crowded" profile of kd2.data.synthetic
(generate_crowded_benchmark, ``--profile crowded``), its builtin catalog names and its configs."""

from __future__ import annotations

import importlib.util
import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

import kd2.data.catalog as catalog
from kd2.data import DatasetCatalog, MetadataCatalog, load_coco_json
from kd2.data.report import dataset_report
from kd2.data.synthetic import CROWDED_BENCHMARK, generate_crowded_benchmark, main
from tests.helpers import REPO

SMALL = dict(num_train=4, num_val=2)
CLASS_IDS = [1, 2, 3, 5, 7, 9]
CONFIGS = {
    "faster_rcnn_R18_teacher": ("FasterRCNN", "resnet18", 64),
    "faster_rcnn_MNv3_student": ("FasterRCNN", "mobilenet_v3_large", 32),
    "fcos_R18_teacher": ("FCOS", "resnet18", 64),
    "fcos_MNv3_student": ("FCOS", "mobilenet_v3_large", 64),
}


@pytest.fixture(autouse=True)
def _fresh_cache():
    DatasetCatalog.clear_cache()
    yield
    DatasetCatalog.clear_cache()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return generate_crowded_benchmark(str(tmp_path_factory.mktemp("crowded") / "a"), **SMALL)


def _files(paths: dict) -> dict:
    out = {}
    for key in ("train_json", "val_json"):
        out[key] = Path(paths[key]).read_bytes()
    for key in ("train_image_root", "val_image_root"):
        for p in sorted(Path(paths[key]).iterdir()):
            out[f"{key}/{p.name}"] = p.read_bytes()
    return out


def test_same_seed_is_byte_identical(tiny: dict, tmp_path: Path) -> None:
    a = _files(tiny)
    assert len(a) == 2 + SMALL["num_train"] + SMALL["num_val"]
    assert a == _files(generate_crowded_benchmark(str(tmp_path / "b"), **SMALL))
    other = generate_crowded_benchmark(str(tmp_path / "c"), **SMALL, seed=1)
    assert Path(other["train_json"]).read_bytes() != a["train_json"]
    # val images do not depend on the number of train images
    fewer = generate_crowded_benchmark(str(tmp_path / "d"), num_train=1, num_val=2)
    assert Path(fewer["val_json"]).read_bytes() == a["val_json"]


def test_profile_statistics(tiny: dict) -> None:
    gaps = []
    for split, n in (("train", SMALL["num_train"]), ("val", SMALL["num_val"])):
        data = json.loads(Path(tiny[f"{split}_json"]).read_text())
        assert [c["id"] for c in data["categories"]] == CLASS_IDS
        assert data["info"]["generator_args"]["clustered"] == CROWDED_BENCHMARK["clustered"]
        assert len(data["images"]) == n
        for im in data["images"]:
            h, w = im["height"], im["width"]
            assert 256 <= h <= 512 and 256 <= w <= 512
            anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
            # 20-200 objects, the upper end scaled by the image area; every object placed
            top = max(20, int(200 * h * w / 512**2))
            assert 20 <= len(anns) <= top <= 200
            boxes = np.array([a["bbox"] for a in anns])
            x, y, bw, bh = boxes.T
            assert np.all(x >= 0) and np.all(y >= 0) and np.all(x + bw <= w) and np.all(y + bh <= h)
            assert np.all(np.minimum(bw, bh) >= 3)  # visible boxes are at least 3 px
            # extents (diameters) 4-30 px: a box's longer side is 0.75-1.2x the extent
            assert np.all(np.maximum(bw, bh) <= 1.2 * 30 + 2)
            assert {a["category_id"] for a in anns} <= set(CLASS_IDS)
            assert all(a["iscrowd"] == 0 and a["area"] > 0 for a in anns)
            for a, b in combinations(boxes, 2):  # never overlapping; gap = Chebyshev distance
                gx = max(b[0] - (a[0] + a[2]), a[0] - (b[0] + b[2]))
                gy = max(b[1] - (a[1] + a[3]), a[1] - (b[1] + b[3]))
                assert max(gx, gy) >= 1
                gaps.append(max(gx, gy))
    sizes = np.concatenate(
        [
            np.sqrt(np.prod(np.array([a["bbox"] for a in d["annotations"]])[:, 2:], axis=1))
            for d in (json.loads(Path(tiny[f"{s}_json"]).read_text()) for s in ("train", "val"))
        ]
    )
    assert sizes.min() < 6 and sizes.max() > 20  # the whole 4-30 px range is used
    assert np.mean(np.array(gaps) <= 2) > 0.001  # clusters of nearly touching objects
    records, meta = load_coco_json(tiny["train_json"], tiny["train_image_root"])
    assert len(records) == SMALL["num_train"] and len(meta["thing_classes"]) == 6


def test_cli_profile(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert (
        main(["--profile", "crowded", "--out", str(out), "--num-train", "1", "--num-val", "1"]) == 0
    )
    assert "train_json" in capsys.readouterr().out
    data = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert data["info"]["generator_args"]["generator"] == "crowded"
    assert len(data["images"]) == 1 and len(data["annotations"]) >= 20
    with pytest.raises(SystemExit):
        main(["--profile", "crowded", "--out", str(tmp_path / "x"), "--image-size", "256"])
    assert "--image-size" in capsys.readouterr().err


def test_builtin_names_generated_on_first_use(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("synthetic_crowded_train", "synthetic_crowded_val"):
        assert name in DatasetCatalog.list()
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    monkeypatch.setattr(
        catalog, "SYNTHETIC_CROWDED_GENERATOR_KWARGS", {"num_train": 2, "num_val": 1}
    )
    assert len(DatasetCatalog.get("synthetic_crowded_val")) == 1
    root = tmp_path / "kd2_synthetic_crowded"
    assert (root / "annotations" / "instances_train.json").is_file()
    assert not (tmp_path / "kd2_synthetic").exists()  # the first profile is not touched
    assert len(DatasetCatalog.get("synthetic_crowded_train")) == 2
    meta = MetadataCatalog.get("synthetic_crowded_train")
    assert meta.thing_classes[0] == "red_circle" and len(meta.thing_classes) == 6
    data = json.loads((root / "annotations" / "instances_val.json").read_text())
    assert all(256 <= im["width"] <= 512 for im in data["images"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_load_and_suit_the_data(name: str, tiny: dict) -> None:
    from kd2.engine import setup_cfg
    from kd2.tv.build import num_classes_of

    arch, backbone, fpn = CONFIGS[name]
    cfg = setup_cfg(str(REPO / "configs" / "synthetic_crowded" / f"{name}.yaml"))
    assert cfg.MODEL.META_ARCHITECTURE == arch and cfg.MODEL.BACKBONE.NAME == backbone
    assert cfg.MODEL.FPN.OUT_CHANNELS == fpn and num_classes_of(cfg) == 6
    assert cfg.DATASETS.TRAIN == ("synthetic_crowded_train",)
    assert cfg.DATASETS.TEST == ("synthetic_crowded_val",)
    assert cfg.TEST.DETECTIONS_PER_IMAGE >= 200
    assert cfg.OUTPUT_DIR.endswith(f"synthetic_crowded/{name}")
    records, meta = load_coco_json(tiny["train_json"], tiny["train_image_root"])
    report = dataset_report(records, cfg, class_names=meta["thing_classes"])
    assert report["warnings"] == [], report["warnings"]
    assert report["resize"]["scale_min"] >= 1.0  # images are never shrunk
    if arch == "FasterRCNN":
        assert min(s[0] for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES) <= 4
        assert cfg.MODEL.RPN.POST_NMS_TOPK_TEST >= cfg.TEST.DETECTIONS_PER_IMAGE


def test_pairs_share_batch_and_input_and_are_in_gains() -> None:
    from kd2.engine import setup_cfg

    def cfg(n):
        return setup_cfg(str(REPO / "configs" / "synthetic_crowded" / f"{n}.yaml"))

    for det in ("faster_rcnn", "fcos"):
        t, s = cfg(f"{det}_R18_teacher"), cfg(f"{det}_MNv3_student")
        assert t.SOLVER.MAX_ITER >= s.SOLVER.MAX_ITER
        assert t.SOLVER.IMS_PER_BATCH == s.SOLVER.IMS_PER_BATCH
        assert (t.INPUT.MIN_SIZE_TRAIN, t.INPUT.MAX_SIZE_TEST) == (
            s.INPUT.MIN_SIZE_TRAIN,
            s.INPUT.MAX_SIZE_TEST,
        )
    spec = importlib.util.spec_from_file_location("kd2_gains", REPO / "benchmarks" / "gains.py")
    gains = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gains)
    assert gains.PAIRS["faster_rcnn_crowded"] == (
        "configs/synthetic_crowded/faster_rcnn_R18_teacher.yaml",
        "configs/synthetic_crowded/faster_rcnn_MNv3_student.yaml",
    )
    assert gains.PAIRS["fcos_crowded"] == (
        "configs/synthetic_crowded/fcos_R18_teacher.yaml",
        "configs/synthetic_crowded/fcos_MNv3_student.yaml",
    )
    for pair in gains.PAIRS.values():
        assert all((REPO / p).is_file() for p in pair)
