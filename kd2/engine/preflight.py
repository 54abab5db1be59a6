"""The pre-flight check of a distillation run (``KD.PREFLIGHT``), before its first step.

"Distillation made my model worse" and "mAP ≈ 0 on my dataset" are the most common complaints
about detection-KD toolkits; most of them are visible before training starts. On a few training
batches and a slice of the validation set this check measures:

* **the teacher's AP** on ``VAL_IMAGES`` images of ``DATASETS.TEST[0]``: a teacher at ≈ 0 AP
  (below ``MIN_TEACHER_AP`` AP points) stops the run with what to check — its weights, its
  classes, its input format — unless the user lowers the threshold;
* **the teacher sees the student's image**: class counts and input formats agree (the backend
  reports how the teacher's input is made from the student's);
* **each KD term at its configured weight** (warm-ups at their end): its value, its gradient at
  the student's trunk (:mod:`kd2.modeling.kd_diagnostics`) — norm, share, cosine with the
  detection gradient — and a warning naming the term, its method and a suggested factor when the
  term's gradient is more than 10 × or less than 1/100 of the detection gradient.

It prints one table, writes ``OUTPUT_DIR/preflight.json``, and leaves no trace on the run: the
global RNGs (torch, NumPy, Python's ``random``: Detectron2's augmentations and sampler seeds draw
from NumPy) are restored, the model's buffers (BatchNorm statistics) are restored, nothing is
accumulated into ``.grad`` and no optimizer step is taken, so a run with the check trains
exactly like one without it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from kd2.modeling.kd_diagnostics import (
    DETECTION,
    gradient_statistics,
    term_gradients,
    trunk_parameters,
)

__all__ = ["PreflightError", "preserved_random_state", "run_preflight", "term_advice"]

logger = logging.getLogger(__name__)

#: A KD term whose trunk gradient is above HIGH_RATIO or below LOW_RATIO times the detection
#: gradient is flagged; the suggested factor brings it to TARGET_RATIO.
HIGH_RATIO, LOW_RATIO, TARGET_RATIO = 10.0, 0.01, 0.25


class PreflightError(RuntimeError):
    """The pre-flight check found a problem that would waste the run."""


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Torch's (CPU and CUDA), NumPy's and Python's global RNG states as they were on entry,
    whatever the block draws: the check's data loaders, evaluation and forwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def term_advice(term: str, ratio: float, method: str | None) -> str | None:
    """A warning for a KD term whose trunk gradient is ``ratio`` × the detection gradient."""
    if ratio <= 0 or LOW_RATIO <= ratio <= HIGH_RATIO:
        return None
    factor = TARGET_RATIO / ratio
    where = f" (method {method}: its weight is in KD.{method.upper()})" if method else ""
    size = "more than 10x" if ratio > HIGH_RATIO else "less than 1/100 of"
    return (
        f"{term}: its gradient at the student's trunk is {ratio:.3g} x the detection gradient "
        f"({size} the detection gradient); multiply its weight by about {factor:.3g}{where}, "
        "or set KD.BALANCE.MODE grad_share to let kd2 keep it in a gradient-share band"
    )


def _mean(dicts: list[Mapping[str, float]]) -> dict[str, float]:
    keys = sorted(set().union(*dicts)) if dicts else []
    return {k: sum(d.get(k, 0.0) for d in dicts) / len(dicts) for k in keys}


def measure_terms(
    model: nn.Module,
    batches: Iterable,
    forward: Callable[[object], Mapping[str, Tensor]],
    reference_iteration: int,
    restore_iteration: int,
) -> tuple[dict[str, float], dict[str, float]]:
    """Each term's value and trunk-gradient statistics, averaged over ``batches``, without side
    effects on ``model`` (see the module doc). ``forward(batch)`` runs one training forward of
    ``model`` and returns its loss dict. Returns ``(values, statistics)``."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    balance = getattr(model, "kd_balance", None)
    diag_period = getattr(model, "kd_diag_period", 0)
    values, stats = [], []
    try:
        model.kd_balance = None
        model.kd_diag_period = 0
        with preserved_random_state():
            model.train()
            model.kd_before_step(reference_iteration)
            params = trunk_parameters(model)
            for batch in batches:
                losses = forward(batch)
                values.append({k: float(v.detach()) for k, v in losses.items()})
                stats.append(gradient_statistics(term_gradients(losses, params)))
                del losses
    finally:
        model.kd_balance = balance
        model.kd_diag_period = diag_period
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        model.kd_before_step(restore_iteration)
        model.train(was_training)
    return _mean(values), _mean(stats)


def _term_table(
    values: Mapping[str, float], stats: Mapping[str, float], owners: Mapping[str, str]
) -> tuple[dict, list[str]]:
    """Per loss term (the detection losses together first) its value, gradient norm, share,
    cosine and ratio to the detection gradient; and the advice for the terms out of scale."""
    det_norm = stats.get(f"grad_norm/{DETECTION}", 0.0)
    terms, warnings = {}, []
    for name in [DETECTION] + sorted(k for k in values if k.startswith("loss_kd_")):
        norm = stats.get(f"grad_norm/{name}", 0.0)
        value = (
            sum(v for k, v in values.items() if not k.startswith("loss_kd_"))
            if name == DETECTION
            else values[name]
        )
        ratio = norm / det_norm if det_norm > 0 else float("nan")
        terms[name] = {
            "value": value,
            "grad_norm": norm,
            "grad_share": stats.get(f"grad_share/{name}", 0.0),
            "grad_cos": stats.get(f"grad_cos/{name}", 0.0),
            "ratio_to_detection": 1.0 if name == DETECTION else ratio,
            "method": owners.get(name),
        }
        if name != DETECTION:
            if norm == 0.0:
                terms[name]["note"] = "does not reach the trunk (head-only term)"
            elif math.isfinite(ratio):
                advice = term_advice(name, ratio, owners.get(name))
                if advice:
                    warnings.append(advice)
    return terms, warnings


def _refuse_a_bad_teacher(
    input_checks: list[tuple[bool, str]],
    teacher_ap: float | None,
    min_teacher_ap: float,
    val_images: int,
    output_dir: str,
) -> None:
    """Stop the run when the teacher reads another image than the student, or is too weak."""
    bad = [line for ok, line in input_checks if not ok]
    if bad:
        raise PreflightError(
            "the teacher does not see the image the student sees: "
            + "; ".join(bad)
            + ". Fix the teacher's config (or set KD.PREFLIGHT.ENABLED False to skip the check)"
        )
    if teacher_ap is not None and teacher_ap < min_teacher_ap:
        raise PreflightError(
            f"the teacher's AP on {val_images} validation images is {teacher_ap:.2f} (below "
            f"KD.PREFLIGHT.MIN_TEACHER_AP = {min_teacher_ap}): it would teach noise. Check "
            "KD.TEACHER.WEIGHTS (the right file, a trained checkpoint), that its config's classes "
            "are the student dataset's (NUM_CLASSES, category order), and its input format "
            "(PIXEL_MEAN / PIXEL_STD, RGB vs BGR). To distil from it anyway set "
            "KD.PREFLIGHT.MIN_TEACHER_AP 0.0 (or KD.PREFLIGHT.ENABLED False). Report: "
            f"{os.path.join(output_dir, 'preflight.json')}"
        )


def run_preflight(
    model: nn.Module,
    batches: Iterable,
    forward: Callable[[object], Mapping[str, Tensor]],
    *,
    output_dir: str,
    teacher_ap: float | None,
    val_images: int,
    min_teacher_ap: float,
    input_checks: list[tuple[bool, str]],
    start_iteration: int = 0,
    write: bool = True,
) -> dict:
    """Run the check (see the module doc); returns the report written to ``preflight.json``.

    Args:
        model: the distillation model (unwrapped from DDP).
        batches: a few training batches, in the form ``forward`` takes.
        forward: one training forward of ``model`` on a batch -> its loss dict.
        output_dir: where ``preflight.json`` goes.
        teacher_ap: the teacher's COCO AP (points) on ``val_images`` validation images, or
            ``None`` when the config has no test set.
        min_teacher_ap: below it the run stops (:class:`PreflightError`).
        input_checks: the backend's ``(ok, line)`` on how the teacher's input is made from the
            student's; a line that is not ok stops the run.
        start_iteration: the run's first iteration (restored after the measurement).
        write: log and write the report (the main process); every process measures and raises.
    """
    if teacher_ap is not None and not math.isfinite(teacher_ap):
        teacher_ap = 0.0  # COCOeval gives nan when the teacher detects nothing at all
    warmups = [getattr(model, "kd_warmup_iters", 0)]
    warmups += [getattr(m, "warmup_iters", 0) for m in model.kd_methods.values()]
    reference = max(int(w) for w in warmups)
    values, stats = measure_terms(model, batches, forward, reference, start_iteration)
    terms, warnings = _term_table(values, stats, getattr(model, "kd_term_owner", {}))
    report = {
        "teacher_ap": teacher_ap,
        "val_images": val_images,
        "min_teacher_ap": min_teacher_ap,
        "input_checks": [line for _, line in input_checks],
        "reference_iteration": reference,
        "terms": terms,
        "warnings": warnings,
    }
    if write:
        logger.info("pre-flight check (KD.PREFLIGHT):\n%s", format_report(report))
        for w in warnings:
            logger.warning("pre-flight: %s", w)
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "preflight.json"), "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    _refuse_a_bad_teacher(input_checks, teacher_ap, min_teacher_ap, val_images, output_dir)
    return report


def format_report(report: dict) -> str:
    """The report as one readable table."""
    lines = []
    ap = report["teacher_ap"]
    lines.append(
        f"teacher AP on {report['val_images']} val images: "
        + (
            "not measured (no DATASETS.TEST, or a teacher of the other framework)"
            if ap is None
            else f"{ap:.2f}"
        )
        + f" (minimum {report['min_teacher_ap']})"
    )
    lines += [f"input: {c}" for c in report["input_checks"]]
    head = f"{'term':<28} {'value':>10} {'grad norm':>10} {'share':>7} {'cos(det)':>9} {'x det':>8}"
    lines += [head, "-" * len(head)]
    for name, t in report["terms"].items():
        lines.append(
            f"{name:<28} {t['value']:>10.4g} {t['grad_norm']:>10.3g} {t['grad_share']:>7.3f} "
            f"{t['grad_cos']:>9.3f} {t['ratio_to_detection']:>8.3g}"
            + (f"  {t['note']}" if t.get("note") else "")
        )
    return "\n".join(lines)
