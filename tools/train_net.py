#!/usr/bin/env python
"""Train or evaluate a detector with kd2: teachers, baseline students and distilled students.

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

from kd2.engine import Trainer, default_argument_parser, default_setup, evaluate, launch, setup_cfg
from kd2.engine.checkpoint import last_checkpoint
from kd2.tv.build import build_plain_detector, load_checkpoint_state

logger = logging.getLogger("kd2.train_net")


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
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
