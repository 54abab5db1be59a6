#!/usr/bin/env python
"""Run a distillation config's teacher once over its training set and store what its methods read.

The cache (``kd2/engine/teacher_cache.py``) holds one entry per training image and flip, in
memory-mapped safetensors shards (float16 by default); training with ``KD.TEACHER.CACHE <dir>``
reads it instead of running the teacher. An interrupted build resumes where it stopped; a
directory holding a cache of another teacher, config or dataset is refused. kd2's own loop
(``MODEL.BACKEND torchvision`` / ``transformers``) reads caches.

Examples::

    python tools/cache_teacher.py --config-file configs/synthetic/fcos_MNv3_PKD.yaml \\
        KD.TEACHER.WEIGHTS output/fcos_R18_teacher/model_final.pth
    python tools/train_net.py --config-file configs/synthetic/fcos_MNv3_PKD.yaml \\
        KD.TEACHER.WEIGHTS output/fcos_R18_teacher/model_final.pth \\
        KD.TEACHER.CACHE output/fcos_MNv3_PKD/teacher_cache
"""

import argparse
import json
import os

from kd2.engine import setup_cfg
from kd2.engine.defaults import setup_logger
from kd2.engine.teacher_cache import build_teacher_cache
from kd2.modeling.backends import get_backend
from kd2.utils.errors import ConfigError, run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True, help="the distillation config")
    p.add_argument(
        "--output", default="", help="the cache directory (default: OUTPUT_DIR/teacher_cache)"
    )
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--shard-size", type=int, default=256, help="entries per shard")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not os.path.isfile(args.config_file):
        raise ConfigError(f"--config-file {args.config_file!r} does not exist")
    cfg = setup_cfg(args.config_file, args.opts)
    if cfg.MODEL.BACKEND not in ("torchvision", "transformers"):
        raise ConfigError(
            f"MODEL.BACKEND {cfg.MODEL.BACKEND!r}: teacher caches are read by kd2's own loop "
            "(torchvision and transformers students)",
            "cache a torchvision or transformers student's config",
        )
    if not cfg.KD.METHODS:
        raise ConfigError(f"{args.config_file} has no KD.METHODS: it learns from no teacher")
    output = args.output or os.path.join(cfg.OUTPUT_DIR, "teacher_cache")
    setup_logger()
    trainer_cls = get_backend(cfg.MODEL.BACKEND).trainer
    model = trainer_cls.build_model(cfg)
    manifest = build_teacher_cache(
        cfg,
        model,
        output,
        dtype=args.dtype,
        shard_size=args.shard_size,
        target_offset=trainer_cls.label_offset(model),
    )
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


if __name__ == "__main__":
    run_main(main)
