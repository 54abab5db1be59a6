#!/usr/bin/env python
"""Train or evaluate a LazyConfig experiment (``configs/**/*.py``) whose model may be a kd2
distillation meta-architecture. Detectron2's ``lazyconfig_train_net`` flow, with kd2's
student-only checkpointer (the teacher is never saved or loaded by ``train.init_checkpoint``) and
pre-flight check (``model.kd_cfg.PREFLIGHT``: the teacher's AP on the test set's first images, each
KD term's gradient share; ``preflight.json`` in ``train.output_dir``).

    python tools/lazyconfig_train_net.py --config-file FILE.py [--resume] [--eval-only] \\
        [--num-gpus N] key=value ...
"""

import logging

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
    launch,
)
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from kd2.d2 import kd_step_hook, student_checkpointer, student_model_config
from kd2.d2.engine import create_ddp_model  # Detectron2's, plus CPU models (gloo)
from kd2.d2.lazy import lazy_preflight_hook
from kd2.engine.launch import die_with_parent
from kd2.engine.run_dir import lock_output_dir

logger = logging.getLogger("kd2.lazyconfig_train_net")


def do_test(cfg, model):
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    print_csv_format(results)
    return results


def do_train(args, cfg):
    model = instantiate(cfg.model).to(cfg.train.device)
    logger.info("model:\n%s", model)
    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, loader, optim)
    checkpointer = student_checkpointer(model, cfg.train.output_dir, trainer=trainer)

    trainer.register_hooks(
        [
            lazy_preflight_hook(cfg),  # KD.PREFLIGHT, before the first step of a fresh run
            kd_step_hook(),
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if comm.is_main_process()
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    if comm.get_world_size() > 1:  # a spawned worker: die with the launcher, never orphaned
        die_with_parent()
    if comm.is_main_process():  # one run per output directory, before anything is written
        lock_output_dir(cfg.train.output_dir)
    default_setup(cfg, args)
    if args.eval_only:  # the student alone: no teacher is built or loaded
        model = instantiate(student_model_config(cfg.model)).to(cfg.train.device)
        student_checkpointer(model).load(cfg.train.init_checkpoint)
        return do_test(cfg, create_ddp_model(model))
    do_train(args, cfg)


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
