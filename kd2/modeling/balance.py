"""Automatic gradient-share control of the distillation terms (``KD.BALANCE``).

A paper's loss weights are tuned for one detector, one dataset and one schedule. With
``KD.BALANCE.MODE "grad_share"`` every ``loss_kd_*`` term gets a multiplier, adapted every
``PERIOD`` iterations (from ``WARMUP`` on) so that the term's share of the trunk gradient stays
inside ``[LOW, HIGH]`` — the idea of RT-DETRv4's controller for its single distillation term,
applied to every term of any method. The share a term is held to is measured against the
detection losses: ``‖g_term‖ / (‖g_term‖ + ‖g_detection‖)`` at the trunk
(:mod:`kd2.modeling.kd_diagnostics`). For a method with one term it is exactly the term's
``grad_share/``; with several terms each is measured against the detection gradient alone, so
every term can sit in the band at once (shares of the summed norms could not: four terms cannot
each hold half of the total). Per period and term, with ``s`` the smoothed share (an
exponential average, momentum ``0.5``, of the measured shares) and ``t`` the band's middle:

* inside the band: no change;
* outside: ``m ← m · clip(r^½, 1/MAX_STEP, MAX_STEP)`` with ``r = (t / (1 − t)) / (s / (1 − s))``
  — the factor that would bring the term's odds to the target's if the other terms stayed put,
  damped (square root: half the way in log space) and clipped to ``MAX_STEP = 10``, so a
  dominating term reaches the band in a bounded number of periods — about ``log_10`` of its odds
  ratio while far away, a few halvings of the remaining log-distance near it — without
  oscillating;
* a term without gradient at the trunk (share 0) is left alone.

The multipliers are part of the state (``get_extra_state``): saved in every checkpoint and
restored exactly by ``--resume``. Every process applies the same update: the measured shares are
averaged over processes first.
"""

from __future__ import annotations

import math

from torch import nn

__all__ = ["GradShareBalancer"]


class GradShareBalancer(nn.Module):
    """Per-term multipliers kept inside a gradient-share band.

    Args:
        low, high: the band, ``0 < low < high < 1``.
        period: iterations between updates.
        warmup: iterations before the first update.
        max_step: the largest factor of one update (``> 1``).
        momentum: weight of the previous smoothed share.
    """

    def __init__(
        self,
        low: float,
        high: float,
        period: int,
        warmup: int = 0,
        max_step: float = 10.0,
        momentum: float = 0.5,
    ):
        super().__init__()
        if not 0.0 < low < high < 1.0:
            raise ValueError(f"KD.BALANCE needs 0 < LOW < HIGH < 1, got LOW={low}, HIGH={high}")
        if period < 1:
            raise ValueError(f"KD.BALANCE.PERIOD must be >= 1, got {period}")
        if max_step <= 1.0:
            raise ValueError(f"the balancer's max_step must be > 1, got {max_step}")
        self.low, self.high = float(low), float(high)
        self.period, self.warmup = int(period), int(warmup)
        self.max_step, self.momentum = float(max_step), float(momentum)
        self.multipliers: dict[str, float] = {}
        self.smoothed: dict[str, float] = {}
        self.updates = 0

    def multiplier(self, term: str) -> float:
        return self.multipliers.get(term, 1.0)

    def due(self, iteration: int) -> bool:
        """Whether :meth:`update` runs at ``iteration`` (the gradient shares are measured then)."""
        return iteration >= self.warmup and iteration % self.period == 0

    def update(self, shares: dict[str, float]) -> dict[str, float]:
        """One control step from the measured shares ``{"loss_kd_x": share, ...}`` (of the
        multiplied terms); returns the new multipliers."""
        target = 0.5 * (self.low + self.high)
        odds_target = target / (1.0 - target)
        for term, share in shares.items():
            if not term.startswith("loss_kd_"):
                continue
            prev = self.smoothed.get(term)
            s = share if prev is None else self.momentum * prev + (1.0 - self.momentum) * share
            self.smoothed[term] = s
            if s <= 0.0 or self.low <= s <= self.high:
                continue
            s = min(s, 1.0 - 1e-6)
            ratio = odds_target / (s / (1.0 - s))
            step = min(max(math.sqrt(ratio), 1.0 / self.max_step), self.max_step)
            m = self.multiplier(term) * step
            self.multipliers[term] = min(max(m, 1e-8), 1e8)
            # the smoothed share follows the change, so the next period does not over-correct
            odds = s / (1.0 - s) * step
            self.smoothed[term] = odds / (1.0 + odds)
        self.updates += 1
        return dict(self.multipliers)

    def get_extra_state(self) -> dict:
        return {
            "multipliers": dict(self.multipliers),
            "smoothed": dict(self.smoothed),
            "updates": self.updates,
        }

    def set_extra_state(self, state: dict) -> None:
        self.multipliers = {str(k): float(v) for k, v in state.get("multipliers", {}).items()}
        self.smoothed = {str(k): float(v) for k, v in state.get("smoothed", {}).items()}
        self.updates = int(state.get("updates", 0))

    def extra_repr(self) -> str:
        return f"band=[{self.low}, {self.high}], period={self.period}, warmup={self.warmup}"
