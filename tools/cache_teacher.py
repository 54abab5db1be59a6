#!/usr/bin/env python
"""Run a distillation config's teacher once over its training set and store what its methods read;
or (``--pseudo-labels <image folder>``) write its detections on unlabelled images as a COCO file.

The cache (``kd2/engine/teacher_cache.py``) holds one entry per training image and flip, in
memory-mapped safetensors shards (float16 by default); training with ``KD.TEACHER.CACHE <dir>``
reads it instead of running the teacher. An interrupted build resumes where it stopped; a
directory holding a cache of another teacher, config or dataset is refused. Every backend's
trainer reads caches: kd2's loop (torchvision, transformers) and Detectron2's ``KDTrainer``.

Examples::

    python tools/cache_teacher.py --config-file configs/synthetic/fcos_MNv3_PKD.yaml \\
        KD.TEACHER.WEIGHTS output/fcos_R18_teacher/model_final.pth
    python tools/train_net.py --config-file configs/synthetic/fcos_MNv3_PKD.yaml \\
        KD.TEACHER.WEIGHTS output/fcos_R18_teacher/model_final.pth \\
        KD.TEACHER.CACHE output/fcos_MNv3_PKD/teacher_cache

Pseudo-labels (``kd2/engine/pseudo_labels.py``; any backend's detector teacher: the config's
``KD.TEACHER``, or the config itself with ``MODEL.WEIGHTS`` when it has no teacher)::

    python tools/cache_teacher.py --config-file configs/synthetic/fcos_MNv3_PKD.yaml \
        --pseudo-labels my_unlabelled_images/ --output pseudo.json --labeled my_labels.json \
        KD.TEACHER.WEIGHTS output/fcos_R18_teacher/model_final.pth
    # then train on both: DATASETS.TRAIN "('my_labels', 'pseudo.json:my_unlabelled_images')"
"""

import argparse
import json
import os

from kd2.config import config_backend
from kd2.engine import setup_cfg
from kd2.engine.defaults import setup_logger
from kd2.engine.teacher_cache import build_teacher_cache
from kd2.modeling.backends import get_backend
from kd2.utils.checkpoint import write_text_atomic
from kd2.utils.errors import ConfigError, MissingFileError, run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True, help="the distillation config")
    p.add_argument(
        "--output", default="", help="the cache directory (default: OUTPUT_DIR/teacher_cache)"
    )
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--shard-size", type=int, default=256, help="entries per shard")
    g = p.add_argument_group("pseudo-labels")
    g.add_argument(
        "--pseudo-labels",
        default="",
        metavar="FOLDER",
        help="write the teacher's detections on this image folder (or glob) as a COCO file "
        "(--output, default OUTPUT_DIR/pseudo_labels.json) instead of a cache",
    )
    g.add_argument("--score-threshold", type=float, default=0.5, help="keep scores >= this")
    g.add_argument("--nms-iou", type=float, default=0.6, help="per-class NMS IoU (1 = no NMS)")
    g.add_argument("--max-per-image", type=int, default=100)
    g.add_argument(
        "--labeled",
        default="",
        help="the labelled COCO file the pseudo-labels go with: its categories are used and "
        "image ids start after its largest",
    )
    g.add_argument("--first-image-id", type=int, default=0, help="0 = after --labeled's, or 1")
    g.add_argument(
        "--ground-truth",
        default="",
        help="a COCO file of the same images: report the pseudo-labels' precision and recall",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not os.path.isfile(args.config_file):
        raise ConfigError(f"--config-file {args.config_file!r} does not exist")
    backend = config_backend(args.config_file, args.opts)
    if backend == "detectron2":
        get_backend("detectron2")  # one clear error when Detectron2 is not installed
        from kd2.d2 import load_config
        from kd2.d2.data import register_config_datasets

        cfg = load_config(args.config_file, args.opts)
        register_config_datasets(cfg)
    else:
        cfg = setup_cfg(args.config_file, args.opts)
    if args.pseudo_labels:
        return write_pseudo_labels(cfg, args)
    if not cfg.KD.METHODS:
        raise ConfigError(f"{args.config_file} has no KD.METHODS: it learns from no teacher")
    output = args.output or os.path.join(cfg.OUTPUT_DIR, "teacher_cache")
    setup_logger()
    options = {"dtype": args.dtype, "shard_size": args.shard_size}
    if backend == "detectron2":
        from kd2.d2 import KDTrainer
        from kd2.d2.teacher_cache import build_d2_teacher_cache

        manifest = build_d2_teacher_cache(cfg, KDTrainer.build_model(cfg), output, **options)
    else:
        trainer_cls = get_backend(backend).trainer
        model = trainer_cls.build_model(cfg)
        offset = trainer_cls.label_offset(model)
        manifest = build_teacher_cache(cfg, model, output, target_offset=offset, **options)
    stats = manifest["stats"]
    print(
        json.dumps(
            {
                "cache": output,
                "entries": stats["entries"],
                "megabytes": round(stats["bytes"] / 1e6, 2),
                "kilobytes_per_entry": round(stats["bytes_per_entry"] / 1e3, 2),
                "build_seconds": stats["build_seconds"],
                "use_with": f"KD.TEACHER.CACHE {output}",
            },
            indent=1,
        )
    )
    return manifest


def _teacher_predictor(cfg, args):
    """The detector that labels: ``KD.TEACHER`` when the config has one, else the config's own
    model with ``MODEL.WEIGHTS``; and its config file."""
    from kd2.engine.predictor import load_predictor

    node = cfg.KD.TEACHER
    if not node.CONFIG:
        return load_predictor(args.config_file, args.opts), args.config_file
    if str(node.BACKEND).lower() == "foundation":
        raise ConfigError(
            "KD.TEACHER.BACKEND foundation: a backbone-only teacher detects nothing",
            "pseudo-label with a detector teacher",
        )
    if not node.WEIGHTS:
        raise MissingFileError(
            "KD.TEACHER.WEIGHTS is empty: the teacher has no weights to label with",
            "give KD.TEACHER.WEIGHTS <the teacher's checkpoint>",
        )
    return load_predictor(node.CONFIG, weights=node.WEIGHTS), node.CONFIG


def write_pseudo_labels(cfg, args) -> dict:
    """``--pseudo-labels``: the teacher's detections on the folder, written atomically."""
    from kd2.engine.pseudo_labels import pseudo_label_folder, pseudo_label_quality
    from kd2.engine.run_dir import make_writable_dir

    for flag in ("labeled", "ground_truth"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise MissingFileError(f"--{flag.replace('_', '-')} {path!r} does not exist")
    output = args.output or os.path.join(cfg.OUTPUT_DIR, "pseudo_labels.json")
    make_writable_dir(os.path.dirname(os.path.abspath(output)), "--output")
    setup_logger()
    predictor, teacher_config = _teacher_predictor(cfg, args)
    data = pseudo_label_folder(
        predictor,
        args.pseudo_labels,
        score_threshold=args.score_threshold,
        nms_iou=args.nms_iou,
        max_per_image=args.max_per_image,
        labeled_json=args.labeled,
        first_image_id=args.first_image_id,
        teacher={"config": teacher_config},
    )
    summary = dict(data["info"]["pseudo_labels"])
    if args.ground_truth:
        with open(args.ground_truth, encoding="utf-8") as f:
            summary["quality"] = pseudo_label_quality(data, json.load(f))
        data["info"]["pseudo_labels"]["quality"] = summary["quality"]
    write_text_atomic(output, json.dumps(data, separators=(",", ":")))
    summary["output"] = output
    summary["use_with"] = f"DATASETS.TRAIN \"('<labelled set>', '{output}:{args.pseudo_labels}')\""
    print(json.dumps(summary, indent=1))
    return data


if __name__ == "__main__":
    run_main(main)
