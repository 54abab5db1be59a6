"""Pseudo-labels (``tools/cache_teacher.py --pseudo-labels``, ``kd2/engine/pseudo_labels.py``) and
the labelled / unlabelled split (``kd2/data/subsets.py``): the filter keeps what it says, an
oracle teacher's pseudo-labels are the hidden labels exactly (boxes, non-contiguous category ids,
image ids after the labelled set's), a student trains on labels + pseudo-labels, the tool writes
a valid file with provenance from a real teacher, and every mistake is one error."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from kd2.data.coco import load_coco_json
from kd2.data.subsets import hide_labels
from kd2.engine.predictor import Predictor, read_rgb
from kd2.engine.pseudo_labels import filter_detections, pseudo_label_folder, pseudo_label_quality
from kd2.utils.errors import ConfigError, MissingFileError
from tests.helpers import REPO, engine_cfg, save_teacher, write_cfg


def _tool():
    spec = importlib.util.spec_from_file_location("cache_teacher", REPO / "tools/cache_teacher.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split(tiny_data, out, keep=0.25, seed=0):
    from kd2.data.catalog import parse_coco_name

    json_file, image_root = parse_coco_name(tiny_data[0])
    return json_file, image_root, hide_labels(json_file, image_root, str(out), keep=keep, seed=seed)


def test_filter_keeps_scores_clips_and_suppresses_within_a_class_only():
    det = {
        "boxes": torch.tensor(
            [
                [0.0, 0.0, 10.0, 10.0],  # class 0, 0.9
                [0.5, 0.5, 10.0, 10.0],  # class 0, 0.8: overlaps the first -> suppressed
                [0.5, 0.5, 10.0, 10.0],  # class 1, 0.7: another class -> kept
                [-5.0, 20.0, 70.0, 30.0],  # class 2, 0.6: clipped to the 64-px image
                [30.0, 30.0, 30.5, 40.0],  # under one pixel wide -> dropped
                [40.0, 40.0, 50.0, 50.0],  # 0.3: below the threshold -> dropped
            ]
        ),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95, 0.3]),
        "labels": torch.tensor([0, 0, 1, 2, 0, 0]),
    }
    kept = filter_detections(
        det, score_threshold=0.5, nms_iou=0.5, max_per_image=10, image_size=(64, 64)
    )
    assert kept["scores"].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert kept["labels"].tolist() == [0, 1, 2]
    assert kept["boxes"][2].tolist() == [0.0, 20.0, 64.0, 30.0]
    capped = filter_detections(
        det, score_threshold=0.5, nms_iou=1.0, max_per_image=2, image_size=(64, 64)
    )
    assert capped["scores"].tolist() == pytest.approx([0.9, 0.8])  # no NMS, the top two


def test_hide_labels_is_a_seeded_disjoint_split_with_an_image_folder(tiny_data, tmp_path):
    json_file, _, paths = _split(tiny_data, tmp_path / "a")
    labeled, hidden = (json.load(open(paths[k])) for k in ("labeled", "hidden"))
    source = json.load(open(json_file))
    ids = lambda d: {im["id"] for im in d["images"]}  # noqa: E731
    assert len(ids(labeled)) == 3 and len(ids(hidden)) == 9
    assert ids(labeled) | ids(hidden) == ids(source) and not ids(labeled) & ids(hidden)
    assert len(labeled["annotations"]) + len(hidden["annotations"]) == len(source["annotations"])
    assert labeled["categories"] == source["categories"]
    names = {im["file_name"] for im in hidden["images"]}
    assert set(os.listdir(paths["unlabeled"])) == names
    assert ids(json.load(open(_split(tiny_data, tmp_path / "b")[2]["labeled"]))) == ids(labeled)
    other = _split(tiny_data, tmp_path / "c", seed=1)[2]
    assert ids(json.load(open(other["labeled"]))) != ids(labeled)
    with pytest.raises(ConfigError, match="keeps 0"):
        _split(tiny_data, tmp_path / "d", keep=0.01)


def _oracle(hidden_json: str, unlabeled: str) -> Predictor:
    """A 'teacher' that answers each hidden image with its ground truth (score 1)."""
    records, _ = load_coco_json(hidden_json, unlabeled)
    truth = {hashlib.sha256(read_rgb(r["file_name"]).tobytes()).hexdigest(): r for r in records}

    def detections(model, images):
        out = []
        for im in images:
            r = truth[hashlib.sha256(im.tobytes()).hexdigest()]
            n = len(r["labels"])
            out.append(
                {
                    "boxes": torch.from_numpy(r["boxes"]),
                    "scores": torch.ones(n),
                    "labels": torch.from_numpy(r["labels"]),
                }
            )
        return out

    from kd2.config import get_cfg

    cfg = get_cfg()
    return Predictor(
        model=torch.nn.Linear(1, 1),
        backend="torchvision",
        cfg=cfg,
        inputs_fn=lambda images: list(images),
        detections_fn=detections,
        class_names=[f"class {i}" for i in range(6)],
    )


def test_an_oracle_teachers_pseudo_labels_are_the_hidden_labels_and_train_a_student(
    tiny_data, tmp_path
):
    _, image_root, paths = _split(tiny_data, tmp_path / "split")
    data = pseudo_label_folder(
        _oracle(paths["hidden"], paths["unlabeled"]),
        paths["unlabeled"],
        nms_iou=1.0,
        labeled_json=paths["labeled"],
        batch_size=4,
        progress=False,
    )
    labeled, hidden = (json.load(open(paths[k])) for k in ("labeled", "hidden"))
    assert data["categories"] == [{"id": c["id"], "name": c["name"]} for c in hidden["categories"]]
    assert min(im["id"] for im in data["images"]) == max(im["id"] for im in labeled["images"]) + 1
    quality = pseudo_label_quality(data, hidden)
    assert quality["precision"] == quality["recall"] == 1.0
    assert quality["true_boxes"] == len(hidden["annotations"]) == len(data["annotations"])
    info = data["info"]["pseudo_labels"]
    assert info["images"] == 9 and info["score_threshold"] == 0.5 and info["kd2_version"]
    pseudo_json = tmp_path / "pseudo.json"
    pseudo_json.write_text(json.dumps(data))
    got, _ = load_coco_json(str(pseudo_json), paths["unlabeled"])
    want, _ = load_coco_json(paths["hidden"], paths["unlabeled"])
    by_name = {r["file_name"]: r for r in want}
    for r in got:
        w = by_name[r["file_name"]]
        np.testing.assert_allclose(r["boxes"], w["boxes"], atol=0.01)
        assert r["labels"].tolist() == w["labels"].tolist()
    # a student trains on the labels and the pseudo-labels together, registered by name
    from kd2.tv import Trainer

    cfg = engine_cfg(tiny_data, tmp_path / "run", "FCOS", max_iter=2)
    cfg.DATASETS.TRAIN = (f"{paths['labeled']}:{image_root}", f"{pseudo_json}:{paths['unlabeled']}")
    trainer = Trainer(cfg)
    records = trainer.train_records()
    assert len(records) == 12 and sum(len(r["labels"]) for r in records) == sum(
        len(r["labels"]) for r in load_coco_json(*_split(tiny_data, tmp_path / "split")[:2])[0]
    )
    trainer.train()


def test_the_tool_writes_a_teachers_pseudo_labels_with_provenance(tiny_data, tmp_path):
    _, _, paths = _split(tiny_data, tmp_path / "split")
    tcfg, _, pth = save_teacher(tmp_path, "FCOS", "resnet18", 64, num_classes=6)
    # a random teacher's scores are all tiny; 64 FPN channels: GroupNorm(32, 32) rejects a
    # single image's 1x1 top level (the last batch holds one image)
    tcfg.MODEL.FCOS.SCORE_THRESH_TEST = 0.0
    tcfg.INPUT.MIN_SIZE_TEST = tcfg.INPUT.MAX_SIZE_TEST = 64
    tyaml = write_cfg(tcfg, tmp_path / "teacher.yaml")
    cfg = engine_cfg(tiny_data, tmp_path / "run", "FCOS")
    cfg.KD.METHODS = ["PKD"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = tyaml, pth
    kd_yaml = write_cfg(cfg, tmp_path / "kd.yaml")
    out = tmp_path / "pseudo" / "labels.json"
    args = ["--config-file", kd_yaml, "--pseudo-labels", paths["unlabeled"], "--output", str(out)]
    args += ["--labeled", paths["labeled"], "--ground-truth", paths["hidden"]]
    args += ["--score-threshold", "0", "--max-per-image", "5"]
    _tool().main(args)
    data = json.load(open(out))
    info = data["info"]["pseudo_labels"]
    assert info["teacher_config"] == tyaml and info["teacher_backend"] == "torchvision"
    assert info["teacher_weights_sha256"] == hashlib.sha256(open(pth, "rb").read()).hexdigest()
    assert 0 <= info["quality"]["precision"] <= 1 and info["quality"]["true_boxes"] > 0
    per_image = {}
    for a in data["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a["score"])
    assert data["annotations"] and all(len(s) <= 5 for s in per_image.values())
    assert all(s == sorted(s, reverse=True) for s in per_image.values())
    load_coco_json(str(out), paths["unlabeled"])  # a valid COCO file
    # mistakes: one error each
    tool = _tool()
    with pytest.raises(MissingFileError, match="names no image"):
        tool.main(["--config-file", kd_yaml, "--pseudo-labels", str(tmp_path / "none")])
    with pytest.raises(ConfigError, match="outside"):
        tool.main(args[:4] + ["--output", str(out), "--score-threshold", "2"])
    with pytest.raises(MissingFileError, match="KD.TEACHER.WEIGHTS is empty"):
        tool.main(args[:4] + ["--output", str(out), "KD.TEACHER.WEIGHTS", ""])
    with pytest.raises(ConfigError, match="detects nothing"):
        tool.main(args[:4] + ["--output", str(out), "KD.TEACHER.BACKEND", "foundation"])
