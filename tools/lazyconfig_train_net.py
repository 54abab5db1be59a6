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
import os

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
from kd2.utils.env import check_device
from kd2.utils.errors import ConfigError, MissingFileError, UnknownNameError, run_main

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


def check_override_key(cfg, key: str, config_file: str) -> None:
    """An override ``key`` (``a.b.c``) that the config does not have is an error naming the
    closest key (omegaconf would silently add it); keys under a ``kd_config`` call are checked
    by :func:`kd2.d2.lazy.kd_config` against kd2's schema."""
    from kd2.config.config import closest_name
    from kd2.d2.lazy import kd_config

    node, path = cfg, []
    for part in key.split("."):
        if hasattr(node, "keys") and node.get("_target_") is kd_config:
            return
        if not hasattr(node, "keys") or part not in node:
            keys = [str(k) for k in node.keys()] if hasattr(node, "keys") else []
            where = ".".join(path) or "the top level"
            raise UnknownNameError(
                f"override {key!r}: {config_file!r} has no key {part!r} under {where}",
                f"did you mean {'.'.join(path + [closest_name(part, keys)])!r}?"
                if keys
                else "check the key",
            )
        node, path = node[part], path + [part]


def load_lazy_config(config_file: str, opts) -> object:
    """``LazyConfig.load`` + ``apply_overrides`` with kd2's messages for a missing file, a file
    that does not run, and an override of a key the config does not have."""
    if not os.path.isfile(config_file):
        raise MissingFileError(
            f"--config-file {config_file!r} does not exist", "give a LazyConfig .py file"
        )
    try:
        cfg = LazyConfig.load(config_file)
    except (SyntaxError, ImportError, NameError) as e:
        raise ConfigError(
            f"LazyConfig {config_file!r} cannot be loaded ({type(e).__name__}: {e})",
            "fix the file (it is Python, run as Detectron2's LazyConfig.load)",
        ) from None
    for override in opts:
        check_override_key(cfg, override.split("=", 1)[0], config_file)
    try:
        return LazyConfig.apply_overrides(cfg, opts)
    except (KeyError, AttributeError, ValueError) as e:
        raise ConfigError(
            f"the overrides {list(opts)} do not apply to {config_file!r} ({e})",
            "give key=value pairs whose keys the config has, e.g. train.max_iter=100",
        ) from None


def main(args):
    cfg = load_lazy_config(args.config_file, args.opts)
    check_device(cfg.train.get("device", "cpu"), "train.device")
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


def cli() -> None:
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    run_main(cli)
