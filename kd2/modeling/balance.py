"""Automatic gradient-share control of the distillation terms (``KD.BALANCE``).

A paper's loss weights are tuned for one detector, one dataset and one schedule. With
``KD.BALANCE.MODE "grad_share"`` the ``loss_kd_*`` terms get a multiplier, adapted every
``PERIOD`` iterations (from ``WARMUP`` on) so that the distillation's share of the student's
trunk gradient, ``S = ‖g_kd‖ / (‖g_kd‖ + ‖g_detection‖)`` with ``g_kd`` the gradient of the sum
of the ``loss_kd_*`` terms (:mod:`kd2.modeling.kd_diagnostics`: ``grad_share/kd``), stays inside
``[LOW, HIGH]`` — the idea of RT-DETRv4's controller for its single distillation term, whose
share is that of its one loss. Measuring the sum costs two trunk backward passes whatever the
number of terms; before December 2026 ``S`` summed the terms' own norms,
``Σ_kd ‖g_term‖``, one backward per term (the same for a method with one term; larger where
terms pull apart), which made the controller's steps cost 7.5–8.6 % of training for the
four-term methods (``benchmarks/results/diag_overhead_period20_idle.json``). Every KD
term is multiplied by the same factor, so the ratios between a method's terms stay the paper's
(and, with several methods, the user's); for a method with one term ``S`` is that term's share.
A first version held each term's share against the detection gradient separately: on DeFeat's
four terms each stayed inside the band while together they left the detection losses 5 % of the
trunk gradient, and the run still diverged (docs/balance_and_diagnostics.md, "How the band was
chosen").

Per period, with ``s`` the smoothed share (an exponential average, momentum ``0.5``, of the
measured ``S``) and ``t`` the band's middle:

* inside the band: no change;
* outside: ``m ← m · clip(r^½, 1/MAX_STEP, MAX_STEP)`` with ``r = (t / (1 − t)) / (s / (1 − s))``
  — the factor that would bring the KD terms' odds to the target's if the detection gradient
  stayed put,
  damped (square root: half the way in log space) and clipped to ``MAX_STEP = 10``, so
  dominating terms reach the band in a bounded number of periods — about ``log_10`` of its odds
  ratio while far away, a few halvings of the remaining log-distance near it — without
  oscillating;
* no KD gradient at the trunk (the measured ``S = 0``: a head-only term, or the KD warm-up's
  zero factor): no change, and the smoothed share is left alone — a period that measured
  nothing is not evidence that the share fell. (The rule reads the measured ``S``, not ``s``: a
  smoothed share stays positive for many periods after the KD gradient has gone.)

``target="nearest"`` is RT-DETRv4's GAM rule instead (its ``distill_adaptive_params``): ``t`` is
the bound nearest to ``s`` and the step is the whole odds ratio ``r`` (still clipped to
``MAX_STEP``) — the least change that puts the share back inside the band.

``target="minimal"`` keeps the methods' own weights whenever they would give a share inside the
band, and otherwise the multiplier closest to 1 that does: with the KD gradient proportional to
``m``, the odds at ``m = 1`` are ``o₁ = (s / (1 − s)) / m``, the multipliers that put the share
in the band are ``[odds(LOW) / o₁, odds(HIGH) / o₁]``, and ``m`` moves (clipped to ``MAX_STEP``)
to the one of them nearest to 1 — also inside the band, so a transient early share (a random
student far from its teacher) does not cut the distillation for the rest of the run.

**Calibration** (:meth:`GradShareBalancer.calibrate`, ``KD.BALANCE.CALIBRATE``): the updates
above are feedback, and a term that starts far out of scale — FitNet at weight 1000 on the
bundled Faster R-CNN pair: 1.3e4 at iteration 0, 99.98 % of the trunk gradient, odds ~4000
against the band's 7/3 — would reach the band only after several periods (``MAX_STEP`` per
period from ``WARMUP`` on), while the divergence guard (:mod:`kd2.engine.divergence`) stops such
a run at its first step. Measured (``faster_rcnn_MNv3_FitNet_w1000_gradshare``, 3 seeds): share
0.70 at iteration 0, final AP 19.4 ± 1.2 against FitNet at weight 1's 19.7 ± 0.6.
So on the first batch of a fresh run, before the first optimizer step, the distiller measures
the share ``S₁`` at the methods' own weights and sets the multiplier in closed form: every KD
term's trunk gradient is proportional to the common multiplier, so the share's odds at ``m``
are exactly ``m · odds(S₁)``, and ``m = odds(t) / odds(S₁)`` puts it at ``t`` — the target's rule
carried to its end at once (the band's middle for ``"middle"``, the nearest bound for
``"nearest"``, the multiplier nearest to 1 inside the band for ``"minimal"``; a share already
inside the band keeps ``m = 1`` for the first two). It is not clipped to ``MAX_STEP``: the clip
damps feedback on measurements that move, the calibration solves for one batch exactly.

The multipliers are part of the state (``get_extra_state``): saved in every checkpoint and
restored exactly by ``--resume``. Every process applies the same update: the measured shares are
averaged over processes first.
"""

from __future__ import annotations

import math

from torch import nn

__all__ = ["KD_GROUP", "GradShareBalancer"]

#: The key of the distillation terms' common multiplier in the controller's state.
KD_GROUP = "loss_kd"

#: Where a share is sent (``KD.BALANCE.TARGET``); see the module doc.
TARGETS = ("middle", "nearest", "minimal")


def _odds(p: float) -> float:
    return p / (1.0 - p)


class GradShareBalancer(nn.Module):
    """The KD terms' common multiplier, kept inside a gradient-share band.

    Args:
        low, high: the band, ``0 < low < high < 1``.
        period: iterations between updates.
        warmup: iterations before the first update.
        max_step: the largest factor of one update (``> 1``).
        momentum: weight of the previous smoothed share.
        target: ``"middle"`` (half the way to the band's middle), ``"nearest"`` (the whole
            way to the nearest bound, RT-DETRv4's rule) or ``"minimal"`` (the multiplier
            nearest to 1 that keeps the share in the band, applied inside the band too).
    """

    def __init__(
        self,
        low: float,
        high: float,
        period: int,
        warmup: int = 0,
        max_step: float = 10.0,
        momentum: float = 0.5,
        target: str = "middle",
    ):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"KD.BALANCE.TARGET must be one of {TARGETS}, got {target!r}")
        if not 0.0 < low < high < 1.0:
            raise ValueError(f"KD.BALANCE needs 0 < LOW < HIGH < 1, got LOW={low}, HIGH={high}")
        if period < 1:
            raise ValueError(f"KD.BALANCE.PERIOD must be >= 1, got {period}")
        if max_step <= 1.0:
            raise ValueError(f"the balancer's max_step must be > 1, got {max_step}")
        self.low, self.high = float(low), float(high)
        self.period, self.warmup = int(period), int(warmup)
        self.max_step, self.momentum = float(max_step), float(momentum)
        self.target = target
        self.multipliers: dict[str, float] = {}
        self.smoothed: dict[str, float] = {}
        self.updates = 0
        #: whether :meth:`calibrate` ran (a resumed run restores it: no second calibration)
        self.calibrated = False

    def multiplier(self, term: str) -> float:
        """The factor of the loss term ``term`` (1 for anything but a ``loss_kd_*`` term)."""
        return self.multipliers.get(KD_GROUP, 1.0) if term.startswith("loss_kd_") else 1.0

    def due(self, iteration: int) -> bool:
        """Whether :meth:`update` runs at ``iteration`` (the gradient shares are measured then)."""
        return iteration >= self.warmup and iteration % self.period == 0

    def update(self, share: float) -> float:
        """One control step from the measured KD share ``S`` of the (multiplied) terms; returns
        the new multiplier."""
        self.updates += 1
        m = self.multipliers.get(KD_GROUP, 1.0)
        if share <= 0.0:  # no KD gradient at the trunk: nothing was measured
            return m
        prev = self.smoothed.get(KD_GROUP)
        s = share if prev is None else self.momentum * prev + (1.0 - self.momentum) * share
        self.smoothed[KD_GROUP] = s
        inside = self.low <= s <= self.high
        if inside and self.target != "minimal":
            return m
        s = min(s, 1.0 - 1e-6)
        if self.target == "middle":  # damped: half the way, in log odds, to the middle
            ratio = math.sqrt(_odds(0.5 * (self.low + self.high)) / _odds(s))
        elif self.target == "nearest":
            ratio = _odds(self.low if s < self.low else self.high) / _odds(s)
        else:  # "minimal"
            own_odds = _odds(s) / m  # the share's odds at the methods' own weights
            best = min(max(1.0, _odds(self.low) / own_odds), _odds(self.high) / own_odds)
            ratio = best / m
        step = min(max(ratio, 1.0 / self.max_step), self.max_step)
        if step == 1.0:
            return m
        m = min(max(m * step, 1e-8), 1e8)
        self.multipliers[KD_GROUP] = m
        # the smoothed share follows the change, so the next period does not over-correct
        odds = _odds(s) * step
        self.smoothed[KD_GROUP] = odds / (1.0 + odds)
        return m

    def calibrate(self, share: float, odds: float | None = None) -> float:
        """Set the multiplier from the KD share ``S₁`` measured at the methods' own weights
        (multiplier 1) so that the share lands on the target (the module doc, "Calibration");
        returns the multiplier. The smoothed share starts at the share this multiplier gives.
        ``S₁ = 0`` (no KD gradient at the trunk) leaves everything as it is.

        ``odds``: ``S₁``'s odds, ``‖g_kd‖ / ‖g_detection‖``, when the norms are at hand:
        exact where ``S₁`` itself rounds to 1 (a term 1e12 times the detection gradient)."""
        self.calibrated = True
        self.updates += 1
        if share <= 0.0:
            return self.multipliers.get(KD_GROUP, 1.0)
        own = odds if odds is not None and 0.0 < odds < math.inf else None
        own = own or _odds(min(share, 1.0 - 1e-12))
        if self.target == "minimal":
            m = min(max(1.0, _odds(self.low) / own), _odds(self.high) / own)
        elif self.low <= share <= self.high:
            m = 1.0
        elif self.target == "middle":
            m = _odds(0.5 * (self.low + self.high)) / own
        else:  # "nearest"
            m = _odds(self.low if share < self.low else self.high) / own
        m = min(max(m, 1e-8), 1e8)
        if m != 1.0:
            self.multipliers[KD_GROUP] = m
        odds = own * m
        self.smoothed[KD_GROUP] = odds / (1.0 + odds)
        return m

    def get_extra_state(self) -> dict:
        return {
            "multipliers": dict(self.multipliers),
            "smoothed": dict(self.smoothed),
            "updates": self.updates,
            "calibrated": self.calibrated,
        }

    def set_extra_state(self, state: dict) -> None:
        self.multipliers = {str(k): float(v) for k, v in state.get("multipliers", {}).items()}
        self.smoothed = {str(k): float(v) for k, v in state.get("smoothed", {}).items()}
        self.updates = int(state.get("updates", 0))
        # a checkpoint from before the calibration existed: its run is past its first step
        self.calibrated = bool(state.get("calibrated", True))

    def extra_repr(self) -> str:
        return (
            f"band=[{self.low}, {self.high}], period={self.period}, warmup={self.warmup}, "
            f"target={self.target}"
        )
