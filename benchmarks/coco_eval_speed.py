#!/usr/bin/env python
"""Time kd2's COCO evaluation with each ``TEST.COCO_EVAL_BACKEND`` side by side, in one run.

Detections for the real COCO val subset (``../shared/datasets/coco``): every GT box jittered,
plus false positives, up to ``--per-image`` (100, COCO's cap) per image; the same detections go
to both backends, alternately, ``--repeats`` times (median wall time of ``evaluate()``). Writes
``benchmarks/results/coco_eval_speed.json`` with the metrics of both (they must agree) and the
speed-up.

    python benchmarks/coco_eval_speed.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def detections(raw: dict, per_image: int, seed: int = 0) -> dict:
    """Per image id: ``{"boxes", "scores", "labels"}`` (XYXY, contiguous labels)."""
    rng = np.random.default_rng(seed)
    contiguous = {c: i for i, c in enumerate(sorted(c["id"] for c in raw["categories"]))}
    by_image: dict = {img["id"]: [] for img in raw["images"]}
    for a in raw["annotations"]:
        by_image[a["image_id"]].append(a)
    sizes = {img["id"]: (img["width"], img["height"]) for img in raw["images"]}
    out = {}
    for image_id, anns in by_image.items():
        w, h = sizes[image_id]
        boxes, labels = [], []
        for a in anns:
            x, y, bw, bh = a["bbox"]
            dx, dy = rng.normal(0, 0.1, 2) * [bw, bh]
            boxes.append([x + dx, y + dy, x + dx + bw, y + dy + bh])
            labels.append(contiguous[a["category_id"]])
        while len(boxes) < per_image:
            x1, y1 = rng.uniform(0, w - 2), rng.uniform(0, h - 2)
            boxes.append([x1, y1, rng.uniform(x1 + 1, w), rng.uniform(y1 + 1, h)])
            labels.append(int(rng.integers(len(contiguous))))
        out[image_id] = {
            "boxes": np.asarray(boxes[:per_image], dtype=np.float64),
            "scores": rng.uniform(0.05, 1.0, min(len(boxes), per_image)),
            "labels": np.asarray(labels[:per_image], dtype=np.int64),
        }
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--coco", default=os.path.join(ROOT, "..", "shared", "datasets", "coco"))
    p.add_argument("--per-image", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    from kd2.evaluation import COCOEvaluator
    from kd2.evaluation.coco_evaluation import COCO_EVAL_BACKENDS

    val_json = os.path.join(args.coco, "annotations", "instances_val2017.json")
    with open(val_json) as f:
        raw = json.load(f)
    dets = detections(raw, args.per_image)
    name = f"{val_json}:{os.path.join(args.coco, 'val2017')}"
    times = {b: [] for b in COCO_EVAL_BACKENDS}
    metrics = {}
    for _ in range(args.repeats):
        for backend in COCO_EVAL_BACKENDS:
            evaluator = COCOEvaluator(name, backend=backend)
            for i in sorted(dets):
                evaluator.process([{"image_id": i}], [dets[i]])
            t0 = time.perf_counter()
            metrics[backend] = evaluator.evaluate()["bbox"]
            times[backend].append(time.perf_counter() - t0)
    med = {b: statistics.median(t) for b, t in times.items()}
    import torch

    result = {
        "images": len(dets),
        "detections": int(sum(len(d["scores"]) for d in dets.values())),
        "repeats": args.repeats,
        "median_seconds": med,
        "speedup_faster_coco_eval": med["pycocotools"] / med["faster_coco_eval"],
        "metrics": metrics,
        "max_abs_metric_difference": max(
            abs(metrics["pycocotools"][k] - metrics["faster_coco_eval"][k])
            for k in metrics["pycocotools"]
        ),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "coco_eval_speed.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
