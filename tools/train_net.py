#!/usr/bin/env python
"""Train or evaluate a detector with kd2: teachers, baseline students and distilled students.

One command for both backends: a config whose ``MODEL.BACKEND`` (in the file or its ``_BASE_``
chain) is ``torchvision`` runs on kd2's torchvision backend; any other config — every Detectron2
yaml — runs on Detectron2 with :class:`kd2.d2.KDTrainer` (detectron2 must be installed).

Examples::

    # a teacher (no KD section)
    python tools/train_net.py --config-file configs/synthetic/retinanet_R50_teacher.yaml
    # a distilled student (the config's KD section names the teacher config and weights)
    python tools/train_net.py --config-file configs/synthetic/retinanet_R18_DeFeat.yaml \
        KD.TEACHER.WEIGHTS output/teacher/model_final.pth
    # resume after an interruption, evaluate only, or train on 2 processes
    python tools/train_net.py --config-file ... --resume
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/x/model_final.pth
    python tools/train_net.py --config-file ... --num-gpus 2
"""

import json
import logging
import os

import yaml

from kd2.engine import Trainer, default_argument_parser, default_setup, evaluate, launch, setup_cfg
from kd2.engine.checkpoint import last_checkpoint
from kd2.tv.build import build_plain_detector, load_checkpoint_state

logger = logging.getLogger("kd2.train_net")


def config_backend(config_file: str, opts=()) -> str:
    """``MODEL.BACKEND`` from the overrides, the file or its ``_BASE_`` chain; else detectron2."""
    for key, value in zip(opts[::2], opts[1::2]):
        if key == "MODEL.BACKEND":
            return value
    path = config_file
    while path and os.path.isfile(path):
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        backend = (data.get("MODEL") or {}).get("BACKEND")
        if backend:
            return backend
        base = data.get("_BASE_")
        if not base:
            break
        path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
    return "detectron2"


def d2_main(args):
    """Detectron2 backend: ``KDTrainer`` (PointRend-style train_net)."""
    try:
        from detectron2.config import get_cfg
        from detectron2.engine import default_setup
    except ImportError:
        raise SystemExit(
            f"{args.config_file} is a Detectron2 config (it sets no MODEL.BACKEND), but detectron2 "
            "is not installed: install it from its official repository (README, 'Detectron2'), "
            "or set MODEL.BACKEND torchvision for kd2's torchvision backend"
        ) from None
    from kd2.d2 import KDTrainer, add_kd_config, student_checkpointer

    cfg = get_cfg()
    add_kd_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    if args.eval_only:
        model = KDTrainer.build_model(cfg)
        checkpointer = student_checkpointer(model, save_dir=cfg.OUTPUT_DIR)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = KDTrainer.test(cfg, model)
        print(json.dumps(results, indent=2, default=float))
        return results
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def main(args):
    cfg = setup_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    if args.eval_only:
        # The student alone: a KD checkpoint's "model" entry is a plain detector's state dict,
        # so evaluating a distilled student needs neither the teacher nor its weights.
        model = build_plain_detector(cfg)
        weights = (last_checkpoint(cfg.OUTPUT_DIR) if args.resume else None) or cfg.MODEL.WEIGHTS
        model.load_state_dict(load_checkpoint_state(weights, "MODEL.WEIGHTS"))
        results = evaluate(cfg, model, output_dir=cfg.OUTPUT_DIR)
        print(json.dumps(results, indent=2))
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    if config_backend(args.config_file, args.opts) != "torchvision":
        from detectron2.engine import launch as d2_launch

        d2_launch(
            d2_main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url="auto" if args.dist_url == "auto" else args.dist_url,
            args=(args,),
        )
        raise SystemExit(0)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
