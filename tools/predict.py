#!/usr/bin/env python
"""Run a trained detector (a teacher, a baseline or a distilled student; either backend) on
images: each image is drawn with its boxes, class names and scores (PNG), and every detection
goes to ``predictions.json`` (COCO style: ``file_name``, ``category_id`` = the contiguous label,
``bbox`` XYWH, ``score``).

    python tools/predict.py --config-file configs/synthetic/faster_rcnn_MNv3_FGFI.yaml \\
        --input 'datasets/kd2_synthetic/val/*.png' --output output/predictions \\
        MODEL.WEIGHTS output/synthetic/faster_rcnn_MNv3_FGFI/model_final.pth

``--input`` is one image, a folder (every image in it) or a glob. A distillation config
predicts with its student alone: the teacher is neither built nor loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kd2.utils.errors import ConfigError, DataError, MissingFileError, run_main  # noqa: E402


def draw(image, det: dict, names: list, threshold: float):
    """A PIL image with the detections above ``threshold``: a box, ``name score`` above it."""
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(image)
    pen = ImageDraw.Draw(canvas)
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230), (210, 245, 60)]  # fmt: skip
    for box, score, label in zip(det["boxes"], det["scores"], det["labels"]):
        if score < threshold:
            continue
        color = palette[int(label) % len(palette)]
        x1, y1, x2, y2 = (float(v) for v in box)
        pen.rectangle([x1, y1, x2, y2], outline=color, width=2)
        name = names[int(label)] if int(label) < len(names) else str(int(label))
        text = f"{name} {float(score):.2f}"
        tw, th = pen.textbbox((0, 0), text)[2:]
        ty = max(0.0, y1 - th - 2)
        pen.rectangle([x1, ty, x1 + tw + 4, ty + th + 2], fill=color)
        pen.text((x1 + 2, ty + 1), text, fill=(255, 255, 255))
    return canvas


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--input", required=True, help="an image, a folder or a glob")
    p.add_argument("--output", required=True, help="folder for the PNGs and predictions.json")
    p.add_argument("--confidence-threshold", type=float, default=0.5)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS W")
    args = p.parse_args(argv)
    if not os.path.isfile(args.config_file):
        raise MissingFileError(
            f"--config-file {args.config_file!r} does not exist", "check the path"
        )
    if not 0.0 <= args.confidence_threshold <= 1.0:
        raise ConfigError(
            f"--confidence-threshold {args.confidence_threshold} is outside [0, 1]",
            "give a score between 0 and 1, e.g. 0.5",
        )
    from kd2.engine.predictor import image_files, load_predictor, read_rgb

    files = image_files(args.input)
    from tqdm import tqdm

    from kd2.engine.run_dir import make_writable_dir

    predictor = load_predictor(args.config_file, args.opts)
    make_writable_dir(args.output, "--output")
    results, skipped = [], []
    for path in tqdm(files, desc="predict", disable=len(files) < 2):
        image = read_rgb(path)
        if image is None:
            skipped.append(path)
            continue
        det = predictor(image)
        keep = det["scores"] >= args.confidence_threshold
        det = {k: v[keep] for k, v in det.items()}
        stem = os.path.splitext(os.path.basename(path))[0]
        draw(image, det, predictor.class_names, args.confidence_threshold).save(
            os.path.join(args.output, f"{stem}.png")
        )
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(),
                                     det["labels"].tolist()):  # fmt: skip
            x1, y1, x2, y2 = box
            results.append(
                {
                    "file_name": os.path.basename(path),
                    "category_id": int(label),
                    "category_name": predictor.class_names[int(label)],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    with open(os.path.join(args.output, "predictions.json"), "w") as f:
        json.dump(results, f)
    summary = {
        "images": len(files) - len(skipped),
        "skipped": skipped,
        "detections": len(results),
        "output": args.output,
    }
    print(json.dumps(summary))
    if skipped and len(skipped) == len(files):
        raise DataError(
            f"no input image could be read ({len(skipped)} skipped)",
            "give files PIL can open (JPEG, PNG, ...)",
        )
    return summary


if __name__ == "__main__":
    run_main(main)
