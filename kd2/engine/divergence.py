"""The divergence guard: stop a run whose loss explodes, before the weights are ruined — and say
whether it diverged or a term was out of scale from the start.

A term ``> MAX_LOSS`` (absolute), or a total loss ``> FACTOR`` times its median over the last
``WINDOW`` iterations (once ``MIN_ITERS`` iterations are seen), stops training like a NaN does:
before the optimizer step, without writing a checkpoint. The defaults (1e4, 50x, 50, 20) sit far
above what training does normally — detection and distillation losses start at a few units, and
early spikes on the bundled pairs stay within a few times the running median — while a diverging
run passes 1e4 within a few iterations of leaving its normal range (a 2-image batch at the
demo's 8-image learning rate reached 1e23 by iteration 20). The history is not checkpointed: a
resumed run starts a new one, so resume stays exact.

The guard judges the loss dict the optimizer receives: the ``loss_kd_*`` terms already carry the
warm-up factor and the ``KD.BALANCE`` multiplier, which the controller calibrates on the first
batch, before the first step (:mod:`kd2.modeling.balance`, "Calibration"). Two causes of a stop
need opposite advice, so the guard tells them apart (:class:`Stop`):

* **out of scale** — a finite term over ``MAX_LOSS`` that has not grown more than ``FACTOR``
  times since its first non-zero value: it was that large from the start (FitNet at weight 1000
  on the bundled Faster R-CNN pair: 1.3e4 at iteration 0, the detection losses 2.6). No learning
  rate caused it; the fix is its weight — or ``KD.BALANCE.MODE grad_share``, whose calibration
  scales the distillation terms into a gradient-share band before the first step;
* **diverged** — a non-finite loss, a term that grew past ``MAX_LOSS`` from a normal start, or a
  total rising to ``FACTOR`` times its running median: the optimizer took the weights away (a
  learning rate too high for the batch, too short a warm-up).

:func:`judge_step` and :func:`stop_message` are shared by kd2's trainer and Detectron2's
``KDTrainer`` (:func:`kd2.d2.engine.divergence_hook`), so both stop with the same message.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from typing import Dict, List

from torch import nn

from kd2.config import method_node_name
from kd2.modeling.weights_check import first_absurd_parameter, first_non_finite
from kd2.utils.checkpoint import last_checkpoint

__all__ = ["DIVERGED", "NON_FINITE", "OUT_OF_SCALE", "DivergenceGuard", "Stop", "judge_step"]
__all__ += ["stop_message"]

#: :attr:`Stop.kind` values
NON_FINITE, DIVERGED, OUT_OF_SCALE = "non-finite", "diverged", "out of scale"


@dataclasses.dataclass
class Stop:
    """Why a step stops training.

    Attributes:
        kind: :data:`NON_FINITE`, :data:`DIVERGED` or :data:`OUT_OF_SCALE`.
        iteration: the step's iteration.
        reason: the rule that fired, in words.
        terms: the offending loss terms (empty: the total alone).
        values: every term's value at the step.
    """

    kind: str
    iteration: int
    reason: str
    terms: List[str]
    values: Dict[str, float]


class DivergenceGuard:
    """Watches the loss values of each step; :meth:`judge` says why a run must stop, or ``None``.

    Args:
        max_loss: absolute bound on every term and the total.
        factor: bound on the total relative to its running median; also how far a term over
            ``max_loss`` must have grown since its first value to count as diverged rather
            than out of scale.
        window: iterations in the running median.
        min_iters: iterations seen before the relative rule applies.
    """

    def __init__(self, max_loss: float, factor: float, window: int, min_iters: int):
        self.max_loss = float(max_loss)
        self.factor = float(factor)
        self.min_iters = int(min_iters)
        self.history: collections.deque = collections.deque(maxlen=max(1, int(window)))
        #: each term's (and ``total_loss``'s) first non-zero magnitude in this run
        self.first: Dict[str, float] = {}

    @classmethod
    def from_config(cls, node) -> DivergenceGuard | None:
        """``cfg.SOLVER.DIVERGENCE`` -> a guard, or ``None`` when disabled."""
        if not node.ENABLED:
            return None
        return cls(node.MAX_LOSS, node.FACTOR, node.WINDOW, node.MIN_ITERS)

    def check(self, values: Dict[str, float], total: float) -> str | None:
        """:meth:`judge`'s reason alone."""
        verdict = self.judge(values, total)
        return verdict[1] if verdict else None

    def judge(self, values: Dict[str, float], total: float) -> tuple[str, str, List[str]] | None:
        """Judge one step's finite ``values`` (loss terms) and ``total``; record them.

        Returns ``(kind, reason, offending terms)`` (kind :data:`DIVERGED` or
        :data:`OUT_OF_SCALE`), or ``None`` when the step may go on."""
        terms = dict(values, total_loss=total)
        for k, v in terms.items():
            if v != 0.0 and k not in self.first:
                self.first[k] = abs(v)
        worst = max(terms, key=lambda k: abs(terms[k]))
        if abs(terms[worst]) > self.max_loss:
            over = sorted(
                (k for k, v in values.items() if abs(v) > self.max_loss),
                key=lambda k: -abs(values[k]),
            )
            named = over[0] if over else "total_loss"
            reason = (
                f"{named} = {terms[named]:.3g} exceeds SOLVER.DIVERGENCE.MAX_LOSS {self.max_loss:g}"
            )
            if not over:  # the total alone: its largest term is the one to blame
                over = [max(values, key=lambda k: abs(values[k]))] if values else ["total_loss"]
            grown = [k for k in over if abs(terms[k]) > self.factor * self.first[k]]
            if grown:
                first = ", ".join(f"{k} {self.first[k]:.3g}" for k in grown)
                return DIVERGED, f"{reason}, grown from its first value ({first})", grown
            first = ", ".join(f"{k} {self.first[k]:.3g}" for k in over)
            return OUT_OF_SCALE, f"{reason}, as large since its first value ({first})", over
        if len(self.history) >= self.min_iters:
            median = statistics.median(self.history)
            if median > 0 and total > self.factor * median:
                return (
                    DIVERGED,
                    f"total_loss = {total:.3g} is {total / median:.0f}x its median {median:.3g} "
                    f"over the last {len(self.history)} iterations (SOLVER.DIVERGENCE.FACTOR "
                    f"{self.factor:g})",
                    [],
                )
        self.history.append(total)
        return None


def judge_step(
    guard: DivergenceGuard | None, values: Dict[str, float], total: float, iteration: int
) -> Stop | None:
    """The verdict on one step's loss values (floats of the loss dict the optimizer receives)
    and their ``total``: a non-finite loss always stops; the ``guard`` (``None``: disabled)
    judges the finite ones."""
    if not math.isfinite(total) or not all(math.isfinite(v) for v in values.values()):
        bad = sorted(k for k, v in values.items() if not math.isfinite(v))
        return Stop(NON_FINITE, iteration, "the loss became non-finite", bad, dict(values))
    verdict = guard.judge(values, total) if guard is not None else None
    if verdict is None:
        return None
    kind, reason, terms = verdict
    return Stop(kind, iteration, reason, [t for t in terms if t != "total_loss"], dict(values))


def _detection_total(values: Dict[str, float]) -> float:
    return sum(v for k, v in values.items() if not k.startswith("loss_kd_"))


def _weight_advice(term: str, model: nn.Module, kd_cfg) -> str:
    """``KD.<METHOD>.WEIGHT (now w)`` for the method that owns ``term``, or its node."""
    method = getattr(model, "kd_term_owner", {}).get(term)
    if not method:
        return "its method's weight"
    node_name = method_node_name(method)
    node = getattr(kd_cfg, node_name, None) if kd_cfg is not None else None
    if node is not None and "WEIGHT" in node:
        return f"KD.{node_name}.WEIGHT (now {node.WEIGHT:g}; method {method})"
    return f"the weights in KD.{node_name} (method {method})"


def _out_of_scale_advice(stop: Stop, model: nn.Module, kd_cfg) -> str:
    kd_terms = [t for t in stop.terms if t.startswith("loss_kd_")]
    detection = _detection_total(stop.values)
    if not kd_terms or len(kd_terms) < len(stop.terms):
        return (
            "A detection loss this large from the first iterations points at the data (boxes, "
            "labels, NUM_CLASSES) or the initial weights (MODEL.WEIGHTS), not at the learning "
            "rate. "
        )
    balance = getattr(model, "kd_balance", None)
    parts = []
    for term in kd_terms:
        ratio = abs(stop.values[term]) / detection if detection > 0 else float("inf")
        parts.append(f"{term} is {ratio:.3g}x the detection losses ({detection:.3g})")
    weights = " / ".join(_weight_advice(t, model, kd_cfg) for t in kd_terms)
    if balance is None:
        fix = (
            "set KD.BALANCE.MODE grad_share (its calibration scales the distillation terms into "
            f"a gradient-share band before the first step), or lower {weights}"
        )
    else:
        fix = (
            "KD.BALANCE scales the distillation terms by their gradient at the student's trunk, "
            "and this value is out of scale even so (its gradient is small or does not reach "
            f"the trunk): lower {weights}, or raise SOLVER.DIVERGENCE.MAX_LOSS if the value is "
            "expected"
        )
    return (
        f"The distillation term is out of scale from the start — a weight problem, not a "
        f"divergence: {'; '.join(parts)}. To train, {fix}. "
    )


def stop_message(
    stop: Stop,
    model: nn.Module,
    *,
    output_dir: str,
    base_lr: float,
    teacher_weights: str = "",
    kd_cfg=None,
    lr_batch: str | None = None,
) -> str:
    """Why training stopped, and advice that fits the cause: a broken teacher, a term out of
    scale from the start, a diverged student, distillation terms alone, or a learning rate that
    does not fit the batch.

    Args:
        stop: :func:`judge_step`'s verdict.
        model: the (unwrapped) model: its teacher, weights and KD terms are inspected.
        output_dir: where the last good checkpoint is looked for.
        base_lr: ``SOLVER.BASE_LR`` (a lower one is suggested against divergence).
        teacher_weights: ``KD.TEACHER.WEIGHTS``, named when the teacher is broken.
        kd_cfg: the ``KD`` options (names the offending method's weight), or ``None``.
        lr_batch: :func:`kd2.engine.batch_scaling.lr_batch_mismatch`'s warning, or ``None``.
    """
    if stop.kind == NON_FINITE:
        head = f"loss became non-finite at iteration {stop.iteration}"
    elif stop.kind == OUT_OF_SCALE:
        head = f"loss term out of scale at iteration {stop.iteration}: {stop.reason}"
    else:
        head = f"training diverged at iteration {stop.iteration}: {stop.reason}"
    head = (
        f"{head} ({', '.join(stop.terms) or 'total'}; all terms: "
        f"{ {k: float(f'{v:.4g}') for k, v in stop.values.items()} }). Training stopped before "
        "updating the weights"
    )
    teacher = getattr(model, "teacher", None)
    if teacher is not None:
        broken = first_non_finite(teacher) or first_absurd_parameter(teacher)
        if broken:
            return (
                f"{head}: the teacher's weights are broken ({broken}), so KD.TEACHER.WEIGHTS "
                f"{teacher_weights!r} cannot teach — retrain or re-export the teacher; no "
                "learning rate of the student can fix this"
            )
    if stop.kind == OUT_OF_SCALE:
        return f"{head}. {_out_of_scale_advice(stop, model, kd_cfg)}".rstrip()
    last = last_checkpoint(output_dir)
    lr = base_lr / 2
    where = (
        f"The last good checkpoint is {last}: resume from it with a lower rate, e.g. "
        f"`--resume SOLVER.BASE_LR {lr:g}` (a new BASE_LR applies on resume)"
        if last
        else f"No checkpoint was written yet: restart with a lower SOLVER.BASE_LR (e.g. {lr:g})"
    )
    student = first_non_finite(model) or first_absurd_parameter(model)
    if student:
        cause = f"The student's weights have diverged ({student}). "
    elif stop.terms and all(k.startswith("loss_kd") for k in stop.terms):
        cause = (
            "Only distillation terms are at fault (the detection losses are normal): lower "
            "those methods' KD weights or set KD.WARMUP_ITERS"
            + (
                ", or KD.BALANCE.MODE grad_share. "
                if getattr(model, "kd_balance", 0) is None
                else ". "
            )
        )
    else:
        cause = ""
    if lr_batch:
        cause += f"Likely cause: {lr_batch}. "
    return (
        f"{head}. {cause}{where}; a longer SOLVER.WARMUP_ITERS or "
        "SOLVER.CLIP_GRADIENTS.ENABLED True also help against divergence."
    )
