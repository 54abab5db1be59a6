#!/usr/bin/env python
"""Train or evaluate a detector with kd2: teachers, baseline students and distilled students.

One command for the three backends: a config whose ``MODEL.BACKEND`` (in the file or its
``_BASE_`` chain) is ``torchvision`` or ``transformers`` runs on kd2's own trainer with that
backend's detectors (:class:`kd2.tv.Trainer`, :class:`kd2.hf.Trainer`); any other config — every
Detectron2 yaml — runs on Detectron2 with :class:`kd2.d2.KDTrainer` (detectron2 must be
installed).

Examples::

    # a teacher (no KD section)
    python tools/train_net.py --config-file configs/synthetic/faster_rcnn_R18_teacher.yaml
    # a distilled student (the config's KD section names the teacher config and weights)
    python tools/train_net.py --config-file configs/synthetic/faster_rcnn_MNv3_DeFeat.yaml \
        KD.TEACHER.WEIGHTS output/teacher/model_final.pth
    # resume after an interruption, evaluate only, or train on 2 processes
    python tools/train_net.py --config-file ... --resume
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/x/model_final.pth
    python tools/train_net.py --config-file ... --num-gpus 2
"""

import difflib
import json
import logging
import os

from kd2.config import BACKENDS, config_backend  # noqa: F401 (config_backend: re-exported)
from kd2.engine import default_argument_parser, default_setup, launch, setup_cfg
from kd2.engine.launch import call_reporting_user_errors, die_with_parent, worker_user_errors
from kd2.engine.run_dir import lock_output_dir
from kd2.modeling.backends import get_backend
from kd2.utils.checkpoint import find_resume_checkpoint, load_checkpoint_state
from kd2.utils.env import check_device
from kd2.utils.errors import ConfigError, MissingFileError, run_main

logger = logging.getLogger("kd2.train_net")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = "python tools/train_net.py --config-file configs/synthetic/retinanet_R34_teacher.yaml"


def _yaml_files(folder: str, recursive: bool):
    if not os.path.isdir(folder):
        return []
    if not recursive:
        names = sorted(os.listdir(folder))
        return [os.path.join(folder, n) for n in names if n.endswith((".yaml", ".yml"))]
    return [
        os.path.join(root, n)
        for root, _, names in sorted(os.walk(folder))
        for n in sorted(names)
        if n.endswith((".yaml", ".yml"))
    ]


def closest_config_files(path: str, n: int = 3):
    """Existing config files whose path or name is closest to ``path``: the ``.yaml`` files under
    the repository's ``configs/`` and in ``path``'s own directory."""
    found = _yaml_files(os.path.join(REPO, "configs"), True)
    found += _yaml_files(os.path.dirname(path) or ".", False)
    rel = {f: os.path.relpath(f) for f in found}
    shown = sorted({r if not r.startswith("..") else f for f, r in rel.items()})
    name = os.path.basename(path)

    def score(candidate: str) -> float:
        whole = difflib.SequenceMatcher(None, os.path.normpath(path), candidate).ratio()
        base = difflib.SequenceMatcher(None, name, os.path.basename(candidate)).ratio()
        return max(whole, base)

    ranked = sorted(((score(c), c) for c in shown), key=lambda x: -x[0])
    return [c for s, c in ranked[:n] if s >= 0.6]


def check_config_file(path: str) -> None:
    """A :class:`~kd2.utils.errors.KD2Error` saying what is wrong when ``--config-file`` is
    missing or names no file."""
    if not path:
        raise ConfigError("no --config-file given", f"for example:\n  {EXAMPLE}")
    if not os.path.isfile(path):
        close = closest_config_files(path)
        hint = (
            "closest existing config files: " + ", ".join(close)
            if close
            else f"no config file with a similar name under {os.path.join(REPO, 'configs')}"
        )
        what = "is a directory, not a config file" if os.path.isdir(path) else "does not exist"
        raise MissingFileError(f"--config-file {path!r} {what}", hint)


def detectron2_missing(config_file: str) -> ConfigError:
    return ConfigError(
        f"{config_file} is a Detectron2 config (it does not set MODEL.BACKEND torchvision), but "
        "detectron2 is not installed",
        "install it from its official repository (README, 'Install'), or set MODEL.BACKEND "
        "torchvision for kd2's torchvision backend",
    )


def d2_main(args):
    """Detectron2 backend: ``KDTrainer`` (PointRend-style train_net)."""
    try:
        from detectron2.engine import default_setup
    except ImportError:
        raise detectron2_missing(args.config_file) from None
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger as d2_setup_logger

    from kd2.d2 import (
        KDTrainer,
        load_config,
        register_config_datasets,
        student_checkpointer,
        student_config,
    )

    cfg = load_config(args.config_file, args.opts)
    check_device(cfg.MODEL.DEVICE)
    register_config_datasets(cfg)
    if comm.get_world_size() > 1:  # a spawned worker: die with the launcher, never orphaned
        die_with_parent()
    if comm.is_main_process():  # one run per output directory, before anything is written
        lock_output_dir(cfg.OUTPUT_DIR)
    default_setup(cfg, args)
    d2_setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="kd2")  # kd2's lines
    if args.eval_only:
        # The student alone: its checkpoint's "model" entry is a plain Detectron2 model's state
        # dict, so evaluating a distilled student needs neither the teacher nor its weights.
        cfg = student_config(cfg)
        model = KDTrainer.build_model(cfg)
        checkpointer = student_checkpointer(model, save_dir=cfg.OUTPUT_DIR)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = KDTrainer.test(cfg, model)
        print(json.dumps(results, indent=2, default=float))
        return results
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def eval_weights(cfg, resume: bool) -> dict:
    """The student's weights to evaluate: with ``--resume`` the checkpoint training would resume
    from (``last_checkpoint``'s file, else the newest readable ``model_*.pth``, with a warning),
    and ``MODEL.WEIGHTS`` only when ``OUTPUT_DIR`` holds no checkpoint at all (logged)."""
    if resume:
        found = find_resume_checkpoint(cfg.OUTPUT_DIR)
        if found is not None:
            path, ckpt = found
            logger.info("evaluating %s (iteration %d)", path, ckpt["iteration"])
            return ckpt["model"]
        if not cfg.MODEL.WEIGHTS:
            raise MissingFileError(
                f"--resume: OUTPUT_DIR {cfg.OUTPUT_DIR!r} holds no checkpoint to evaluate",
                "train first, point OUTPUT_DIR at the run, or give MODEL.WEIGHTS",
            )
        logger.warning(
            "--resume: no checkpoint in %s; evaluating MODEL.WEIGHTS %s",
            cfg.OUTPUT_DIR,
            cfg.MODEL.WEIGHTS,
        )
    return load_checkpoint_state(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")


def main(args):
    cfg = setup_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    trainer_cls = get_backend(cfg.MODEL.BACKEND).trainer
    if args.eval_only:
        # The student alone: a KD checkpoint's "model" entry is a plain detector's state dict,
        # so evaluating a distilled student needs neither the teacher nor its weights.
        model = trainer_cls.build_plain_model(cfg)
        model.load_state_dict(eval_weights(cfg, args.resume))
        results = trainer_cls.evaluate(cfg, model, output_dir=cfg.OUTPUT_DIR)
        print(json.dumps(results, indent=2))
        return results
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli() -> None:
    args = default_argument_parser().parse_args()
    check_config_file(args.config_file)
    backend = config_backend(args.config_file, args.opts)
    if backend == "detectron2":
        try:
            from detectron2.engine import launch as d2_launch
        except ImportError:
            raise detectron2_missing(args.config_file) from None

        with worker_user_errors():
            d2_launch(
                call_reporting_user_errors,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url="auto" if args.dist_url == "auto" else args.dist_url,
                args=(d2_main, args),
            )
        return
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
