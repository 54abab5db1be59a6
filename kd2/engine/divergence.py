"""The divergence guard: stop a run whose finite loss explodes, before the weights are ruined.

A term ``> MAX_LOSS`` (absolute), or a total loss ``> FACTOR`` times its median over the last
``WINDOW`` iterations (once ``MIN_ITERS`` iterations are seen), stops training like a NaN does:
before the optimizer step, without writing a checkpoint. The defaults (1e4, 50x, 50, 20) sit far
above what training does normally — detection and distillation losses start at a few units, and
early spikes on the bundled pairs stay within a few times the running median — while a diverging
run passes 1e4 within a few iterations of leaving its normal range (a 2-image batch at the
demo's 8-image learning rate reached 1e23 by iteration 20). The history is not checkpointed: a
resumed run starts a new one, so resume stays exact.
"""

from __future__ import annotations

import collections
import statistics
from typing import Dict

__all__ = ["DivergenceGuard"]


class DivergenceGuard:
    """Watches the loss values of each step; :meth:`check` says why a run diverged, or ``None``.

    Args:
        max_loss: absolute bound on every term and the total.
        factor: bound on the total relative to its running median.
        window: iterations in the running median.
        min_iters: iterations seen before the relative rule applies.
    """

    def __init__(self, max_loss: float, factor: float, window: int, min_iters: int):
        self.max_loss = float(max_loss)
        self.factor = float(factor)
        self.min_iters = int(min_iters)
        self.history: collections.deque = collections.deque(maxlen=max(1, int(window)))

    @classmethod
    def from_config(cls, node) -> DivergenceGuard | None:
        """``cfg.SOLVER.DIVERGENCE`` -> a guard, or ``None`` when disabled."""
        if not node.ENABLED:
            return None
        return cls(node.MAX_LOSS, node.FACTOR, node.WINDOW, node.MIN_ITERS)

    def check(self, values: Dict[str, float], total: float) -> str | None:
        """Judge one step's finite ``values`` (loss terms) and ``total``; record the total."""
        terms = dict(values, total_loss=total)
        worst = max(terms, key=lambda k: abs(terms[k]))
        if abs(terms[worst]) > self.max_loss:
            return (
                f"{worst} = {terms[worst]:.3g} exceeds SOLVER.DIVERGENCE.MAX_LOSS {self.max_loss:g}"
            )
        if len(self.history) >= self.min_iters:
            median = statistics.median(self.history)
            if median > 0 and total > self.factor * median:
                return (
                    f"total_loss = {total:.3g} is {total / median:.0f}x its median {median:.3g} "
                    f"over the last {len(self.history)} iterations (SOLVER.DIVERGENCE.FACTOR "
                    f"{self.factor:g})"
                )
        self.history.append(total)
        return None
