#!/usr/bin/env python
"""How far is normal training from the divergence guard's bounds?

Trains the bundled benchmark pairs' configs with their full schedules (teachers first, then the
students and distilled students that read them), records every step's loss terms, and reports
per run the largest single term and the largest ratio of the total loss to its running median
(the guard's two rules, with the config's ``SOLVER.DIVERGENCE`` window and minimum iterations).
The guard stays enabled: a run it stopped would be reported as such. Writes
``benchmarks/results/divergence_margin.json``.

Usage: ``python benchmarks/divergence_margin.py [--output DIR] [--only NAME ...]``
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))
os.environ.setdefault("KD2_NO_PROGRESS", "1")

import torch  # noqa: E402

from kd2.engine import setup_cfg  # noqa: E402
from kd2.tv import Trainer  # noqa: E402

SYN = os.path.join(ROOT, "configs", "synthetic")
# (name, config, teacher run whose model_final.pth it distils from)
RUNS = [
    ("faster_rcnn_R18_teacher", "faster_rcnn_R18_teacher.yaml", None),
    ("faster_rcnn_MNv3_student", "faster_rcnn_MNv3_student.yaml", None),
    ("faster_rcnn_MNv3_DeFeat", "faster_rcnn_MNv3_DeFeat.yaml", "faster_rcnn_R18_teacher"),
    ("faster_rcnn_MNv3_GlobalKD", "faster_rcnn_MNv3_GlobalKD.yaml", "faster_rcnn_R18_teacher"),
    ("fcos_R18_teacher", "fcos_R18_teacher.yaml", None),
    ("fcos_MNv3_student", "fcos_MNv3_student.yaml", None),
    ("fcos_MNv3_GlobalKD", "fcos_MNv3_GlobalKD.yaml", "fcos_R18_teacher"),
    ("fcos_MNv3_FRS", "fcos_MNv3_FRS.yaml", "fcos_R18_teacher"),
]


def margins(steps, node):
    """The guard's two statistics over one run's recorded steps."""
    history = collections.deque(maxlen=node.WINDOW)
    worst_ratio, worst_term = 0.0, ("", 0.0)
    for it, values in enumerate(steps):
        total = values["total_loss"]
        for k, v in values.items():
            if abs(v) > abs(worst_term[1]):
                worst_term = (f"{k} at iteration {it}", v)
        if len(history) >= node.MIN_ITERS:
            ratio = total / statistics.median(history)
            if ratio > worst_ratio:
                worst_ratio, at = ratio, it
        history.append(total)
    return {
        "max_total_over_running_median": round(worst_ratio, 3),
        "at_iteration": at,
        "largest_term": worst_term[0],
        "largest_term_value": round(worst_term[1], 4),
    }


def recording(run_step, steps):
    """``run_step`` that also appends each step's loss values to ``steps``."""

    def step(images, targets):
        steps.append(run_step(images, targets))
        return steps[-1]

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=os.path.join(ROOT, "output", "divergence_margin"))
    p.add_argument("--only", nargs="*", default=None, help="run names to (re)run")
    args = p.parse_args()
    path = os.path.join(ROOT, "benchmarks", "results", "divergence_margin.json")
    results = json.load(open(path)) if os.path.isfile(path) else {}
    for name, config, teacher in RUNS:
        if args.only is not None and name not in args.only:
            continue
        out = os.path.join(args.output, name)
        opts = ["OUTPUT_DIR", out, "SOLVER.CHECKPOINT_PERIOD", "0", "TEST.EVAL_PERIOD", "0"]
        if teacher:
            opts += ["KD.TEACHER.WEIGHTS", os.path.join(args.output, teacher, "model_final.pth")]
        cfg = setup_cfg(os.path.join(SYN, config), opts)
        trainer = Trainer(cfg)
        steps = []
        trainer.run_step = recording(trainer.run_step, steps)
        t0 = time.perf_counter()
        try:
            trainer.train()
            stopped = None
        except FloatingPointError as e:
            stopped = str(e)[:300]
        node = cfg.SOLVER.DIVERGENCE
        results[name] = {
            "config": f"configs/synthetic/{config}",
            "iterations": len(steps),
            "stopped_by_guard": stopped,
            **margins(steps, node),
            "guard": {"MAX_LOSS": node.MAX_LOSS, "FACTOR": node.FACTOR, "WINDOW": node.WINDOW},
            "torch": torch.__version__,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(name, json.dumps(results[name]), flush=True)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    worst = max(r["max_total_over_running_median"] for r in results.values())
    print(f"divergence_margin: largest total/median ratio {worst:.2f} (guard factor 50)")
    sys.exit(1 if any(r["stopped_by_guard"] for r in results.values()) else 0)


if __name__ == "__main__":
    main()
