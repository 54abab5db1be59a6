#!/usr/bin/env python
"""Train the classifier teacher of classifier-to-detector distillation (ClassifierKD).

A torchvision ResNet learns to classify the GT boxes of a COCO-format detection dataset,
cropped exactly as the distillation loss crops them (spatial-transformer crops of the
normalised image at ``--crop-size``), with the detector's input normalisation. It reports top-1
on the val crops (overall and per class) and writes ``OUTPUT/model_final.pth``, the file
``KD.CLASSIFIERKD.TEACHER.WEIGHTS`` points at.

Examples::

    # the teacher of the quick configs: datasets, classes and normalisation from a detector config
    python tools/train_crop_classifier.py \
        --config-file configs/synthetic/faster_rcnn_MNv3_student.yaml \
        --arch resnet18 --crop-size 64 --epochs 8 --output output/synthetic/crop_classifier
    # the paper's teacher: ResNet-50 on COCO crops at 112 px (for a Detectron2 detector, name the
    # datasets; ClassifierKD converts the detector's normalisation to the classifier's)
    python tools/train_crop_classifier.py --train-dataset coco_2017_train \
        --val-dataset coco_2017_val --arch resnet50 --crop-size 112 --epochs 12 \
        --device cuda --output output/coco/crop_classifier_R50
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from kd2.config import get_cfg
from kd2.data import DatasetCatalog, MetadataCatalog, register_config_datasets
from kd2.engine import setup_logger
from kd2.engine.crop_classifier import train_crop_classifier
from kd2.modeling.classifier_teacher import CLASSIFIER_ARCHS
from kd2.tv.build import num_classes_of
from kd2.utils.errors import ConfigError, run_main

logger = logging.getLogger("kd2.train_crop_classifier")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--config-file",
        default="",
        help="a kd2 detector config: its first DATASETS.TRAIN / DATASETS.TEST, number of classes "
        "and MODEL.PIXEL_MEAN / PIXEL_STD (torchvision backend) are used",
    )
    p.add_argument("--train-dataset", default="", help="registered dataset name (overrides)")
    p.add_argument("--val-dataset", default="", help="registered dataset name (overrides)")
    p.add_argument("--num-classes", type=int, default=0, help="K (default: from the data)")
    p.add_argument("--arch", default="resnet50", choices=CLASSIFIER_ARCHS)
    p.add_argument("--crop-size", type=int, default=112)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-images", type=int, default=16, help="images per step (all objects)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--jitter", type=float, default=0.1, help="box jitter, fraction of the side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", required=True, help="output directory")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace):
    """Dataset names, K and the normalisation from the flags and/or the detector config."""
    train, val, k = args.train_dataset, args.val_dataset, args.num_classes
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    if args.config_file:
        cfg = get_cfg()
        cfg.merge_from_file(args.config_file)
        if cfg.MODEL.BACKEND != "torchvision":
            raise ConfigError(
                f"{args.config_file}: only kd2 (torchvision-backend) configs can be read here",
                "for a Detectron2 detector pass --train-dataset / --val-dataset",
            )
        register_config_datasets(cfg)
        train = train or (cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else "")
        val = val or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "")
        k = k or num_classes_of(cfg)
        mean, std = list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)
    if not train or not val:
        raise ConfigError(
            "no training data named",
            "give --config-file, or both --train-dataset and --val-dataset",
        )
    return train, val, k, mean, std


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    setup_logger(args.output)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    train, val, k, mean, std = resolve(args)
    train_records, val_records = DatasetCatalog.get(train), DatasetCatalog.get(val)
    names = list(MetadataCatalog.get(train).get("thing_classes", []))
    k = k or len(names)
    labels = {int(c) for r in train_records for c in r["labels"]}
    if not k or (labels and max(labels) >= k):
        raise ConfigError(
            f"{train}: labels reach {max(labels) if labels else None} but K = {k}",
            "pass --num-classes or a config with the dataset's number of classes",
        )
    logger.info(
        "crop classifier %s on %s (%d images, %d objects), val %s, K=%d, crops %d px",
        args.arch,
        train,
        len(train_records),
        sum(len(r["boxes"]) for r in train_records),
        val,
        k,
        args.crop_size,
    )
    result = train_crop_classifier(
        train_records,
        val_records,
        output_dir=args.output,
        num_classes=k,
        arch=args.arch,
        crop_size=args.crop_size,
        pixel_mean=mean,
        pixel_std=std,
        epochs=args.epochs,
        batch_images=args.batch_images,
        lr=args.lr,
        weight_decay=args.weight_decay,
        jitter=args.jitter,
        seed=args.seed,
        device=args.device,
        class_names=names,
    )
    per_class = ", ".join(
        f"{names[c] if c < len(names) else c}: {v:.1f}" for c, v in result["per_class_top1"].items()
    )
    print(f"per-class top-1: {per_class}")
    print(
        f"crop_classifier: top1={result['top1']:.2f} val_crops={result['num_crops']} "
        f"weights={result['weights']} train_seconds={result['train_seconds']:.0f}"
    )
    sys.stdout.flush()
    return json.loads(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
