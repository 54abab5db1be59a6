"""Tests of kd2.evaluation: COCOEvaluator equals pycocotools exactly; inference loop."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kd2.data import DatasetCatalog, build_test_loader, generate_synthetic_dataset
from kd2.evaluation import BBOX_METRICS, COCOEvaluator, inference_on_dataset


def shared_coco() -> Path:
    """The mini COCO 2017 copy beside the repository (override: ``$KD2_SHARED_COCO``)."""
    env = os.environ.get("KD2_SHARED_COCO")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared/datasets/coco"


COCO_DIR = shared_coco()
VAL_JSON = COCO_DIR / "annotations/instances_val2017.json"
needs_coco = pytest.mark.skipif(not VAL_JSON.is_file(), reason=f"mini COCO not at {COCO_DIR}")


def fake_detections(raw: dict, seed: int = 0) -> dict:
    """Per image id, torchvision-style outputs derived from the GT with errors.

    Every non-crowd GT box is detected with probability 0.85 (jittered by ~8 % of its size,
    random score, 20 % wrong class), plus 0-3 random false positives per image.
    """
    rng = np.random.default_rng(seed)
    cat_ids = sorted(c["id"] for c in raw["categories"])
    to_contig = {c: i for i, c in enumerate(cat_ids)}
    images = {img["id"]: img for img in raw["images"]}
    dets: dict = {i: ([], [], []) for i in images}
    for a in raw["annotations"]:
        if a.get("iscrowd", 0) or rng.random() > 0.85:
            continue
        img = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        j = rng.normal(0, 0.08, size=4) * [w, h, w, h]
        x1, y1 = max(x + j[0], 0.0), max(y + j[1], 0.0)
        x2, y2 = min(x + w + j[2], img["width"]), min(y + h + j[3], img["height"])
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
        label = to_contig[a["category_id"]]
        if rng.random() < 0.2:
            label = int(rng.integers(0, len(cat_ids)))
        boxes, scores, labels = dets[a["image_id"]]
        boxes.append([x1, y1, x2, y2])
        scores.append(rng.random())
        labels.append(label)
    for iid, img in images.items():
        boxes, scores, labels = dets[iid]
        for _ in range(int(rng.integers(0, 4))):
            x1, y1 = rng.uniform(0, img["width"] - 20), rng.uniform(0, img["height"] - 20)
            w, h = rng.uniform(5, 200, size=2)
            boxes.append([x1, y1, min(x1 + w, img["width"]), min(y1 + h, img["height"])])
            scores.append(rng.random() * 0.5)
            labels.append(int(rng.integers(0, len(cat_ids))))
    return {
        iid: {
            "boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(s, dtype=torch.float32),
            "labels": torch.tensor(lab, dtype=torch.int64),
        }
        for iid, (b, s, lab) in dets.items()
    }


def direct_pycocotools(json_file: Path, outputs: dict, cat_ids: list) -> list:
    """The reference: plain pycocotools on the same detections."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = []
    for iid, out in outputs.items():
        for box, score, label in zip(out["boxes"], out["scores"], out["labels"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append(
                {
                    "image_id": iid,
                    "category_id": cat_ids[int(label)],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(json_file))
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s * 100) for s in ev.stats[:6]]


@needs_coco
def test_matches_pycocotools_exactly(tmp_path: Path) -> None:
    raw = json.loads(VAL_JSON.read_text())
    outputs = fake_detections(raw)
    cat_ids = sorted(c["id"] for c in raw["categories"])
    expected = direct_pycocotools(VAL_JSON, outputs, cat_ids)

    name = f"{VAL_JSON}:{COCO_DIR / 'val2017'}"
    evaluator = COCOEvaluator(name, output_dir=str(tmp_path), backend="pycocotools")
    evaluator.reset()
    ids = sorted(outputs)
    for k in range(0, len(ids), 5):  # batches of 5, as targets/outputs lists
        batch = ids[k : k + 5]
        evaluator.process([{"image_id": i} for i in batch], [outputs[i] for i in batch])
    result = evaluator.evaluate()["bbox"]

    assert list(result) == list(BBOX_METRICS)
    assert [result[k] for k in BBOX_METRICS] == expected  # exactly equal
    assert all(1.0 < v < 99.0 for v in expected), expected
    saved = json.loads((tmp_path / "coco_instances_results.json").read_text())
    assert len(saved) == sum(len(o["scores"]) for o in outputs.values())
    assert {d["category_id"] for d in saved} <= set(cat_ids)
    DatasetCatalog.remove(name)


@needs_coco
def test_empty_predictions(caplog: pytest.LogCaptureFixture) -> None:
    raw = json.loads(VAL_JSON.read_text())
    name = f"{VAL_JSON}:{COCO_DIR / 'val2017'}"
    evaluator = COCOEvaluator(name)
    empty = {
        "boxes": torch.zeros((0, 4)),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    evaluator.process([{"image_id": img["id"]} for img in raw["images"]], [empty] * 188)
    result = evaluator.evaluate()["bbox"]
    assert result == {k: 0.0 for k in BBOX_METRICS}
    assert "no detections" in caplog.text
    evaluator.reset()
    assert all(math.isnan(v) for v in evaluator.evaluate()["bbox"].values())
    with pytest.raises(ValueError, match="contiguous"):
        bad = {"boxes": torch.ones((1, 4)), "scores": torch.ones(1), "labels": torch.tensor([80])}
        evaluator.process([{"image_id": raw["images"][0]["id"]}], [bad])
    with pytest.raises(ValueError, match="not an image"):
        evaluator.process([{"image_id": -3}], [empty])
    DatasetCatalog.remove(name)


class _Oracle(torch.nn.Module):
    """Returns queued outputs in call order (a stand-in detector with one parameter)."""

    def __init__(self, outputs: list):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.queue = list(outputs)
        self.modes: list = []

    def forward(self, images: list) -> list:
        self.modes.append((self.training, torch.is_grad_enabled()))
        return [self.queue.pop(0) for _ in images]


def test_inference_on_dataset_perfect_detector(tmp_path: Path) -> None:
    paths = generate_synthetic_dataset(str(tmp_path), num_train=0, num_val=6, image_size=64)
    name = f"{paths['val_json']}:{paths['val_image_root']}"
    records = DatasetCatalog.get(name)
    perfect = [
        {
            "boxes": torch.as_tensor(r["boxes"]),
            "scores": torch.linspace(0.9, 0.5, len(r["labels"])),
            "labels": torch.as_tensor(r["labels"]),
        }
        for r in records
    ]
    model = _Oracle(perfect)
    model.train()
    result = inference_on_dataset(
        model, build_test_loader(records, batch_size=4), COCOEvaluator(name)
    )["bbox"]
    assert model.training and model.modes == [(False, False), (False, False)]
    assert result["AP"] == pytest.approx(100.0) and result["AP50"] == pytest.approx(100.0)
    DatasetCatalog.remove(name)


@needs_coco
def test_faster_coco_eval_backend_gives_the_same_metrics() -> None:
    pytest.importorskip("faster_coco_eval", reason="faster-coco-eval is not installed")
    raw = json.loads(VAL_JSON.read_text())
    name = f"{VAL_JSON}:{COCO_DIR / 'val2017'}"
    results = {}
    for seed in (0, 1):
        outputs = fake_detections(raw, seed=seed)
        for backend in ("pycocotools", "faster_coco_eval"):
            evaluator = COCOEvaluator(name, backend=backend)
            for i in sorted(outputs):
                evaluator.process([{"image_id": i}], [outputs[i]])
            results[seed, backend] = evaluator.evaluate()["bbox"]
        ref, fast = results[seed, "pycocotools"], results[seed, "faster_coco_eval"]
        for k in BBOX_METRICS:  # percent points: 1e-4 of COCO's [0, 1] scale
            assert abs(ref[k] - fast[k]) <= 1e-2, (k, ref[k], fast[k])
    with pytest.raises(ValueError, match="TEST.COCO_EVAL_BACKEND must be one of"):
        COCOEvaluator(name, backend="cocoapi")
    DatasetCatalog.remove(name)
