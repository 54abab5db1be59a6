"""``pgm_select``: the prototype generation module of Global-Knowledge distillation."""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch
from torch import Tensor

from kd2.ops import _ext, reference

__all__ = ["pgm_select"]


def pgm_select(
    feats_a: Tensor,
    feats_b: Tensor,
    num_prototypes: int = 10,
    alpha: float = 10.0,
    bandwidth: float = 0.1,
    quantile: float = 0.4,
) -> Tensor:
    """Pick prototype instances for one class and one level (PGM of "Distilling Object Detectors
    with Global Knowledge", Tang et al., ECCV 2022).

    The rows of ``feats_a`` (student) and ``feats_b`` (teacher) are the same N instances in two
    feature spaces. The prototypes are the rows that jointly reconstruct all instances best in
    both spaces, found by joint matching pursuit:

    1. L2-normalise the rows (``x / max(‖x‖, 1e-12)``) and form the cosine Gram matrices
       ``G_a``, ``G_b`` (N, N).
    2. Density ``ρ_i = Σ_j exp(−((1 − G_ij) / bandwidth)²)`` in each space (j = i included).
       With ``τ`` the ``⌊quantile·N⌋``-th smallest density (0-based), the candidates Γ are the
       rows (ascending) with ``ρ_a > τ_a`` and ``ρ_b > τ_b``; if none qualifies, all rows.
    3. ``num_prototypes`` rounds, on ``P_a = G_a[Γ, :]``, ``P_b = G_b[Γ, :]`` (K, N), the inner
       products of the candidate atoms with the current residuals: score
       ``S_k = Σ_n (1+α)(P_a[k,n]² + P_b[k,n]²) + 2α P_a[k,n] P_b[k,n]``; pick ``γ = argmax S``
       (ties -> lowest k), i.e. row ``Γ[γ]``; coefficients
       ``w_a = ((1+α) P_a[γ] + α P_b[γ]) / (1+2α)``, ``w_b = (α P_a[γ] + (1+α) P_b[γ]) / (1+2α)``;
       update ``P_a -= G_a[Γ, Γ[γ]] w_aᵀ``, ``P_b -= G_b[Γ, Γ[γ]] w_bᵀ``.

    This is exactly the official explicit-residual algorithm (argmin of the joint reconstruction
    error ``‖R_a − x̂ w_aᵀ‖² + ‖R_b − x̂ w_bᵀ‖² + α‖w_a − w_b‖²``, see
    :func:`kd2.ops.reference.pgm_select_explicit`): for unit atoms that error is
    ``‖R_a‖² + ‖R_b‖² − S_k / (1+2α)``. Atoms are not orthogonalised, so a row can be picked more
    than once. Cost: two N×N×D matmuls and O(rounds·K·N); nothing of size K×D×N is formed.

    Computed in float32, or float64 when an input is float64; no gradient flows.

    Args:
        feats_a: (N, D_a) floating-point instance features in the first (student) space.
        feats_b: (N, D_b) the same instances, row-aligned, in the second (teacher) space.
        num_prototypes: rounds of matching pursuit (≥ 0).
        alpha: weight (≥ 0) of the agreement term ``α‖w_a − w_b‖²``.
        bandwidth: kernel width (> 0) of the density estimate.
        quantile: in [0, 1): the density threshold's quantile.

    Returns:
        (num_prototypes,) int64 row indices into the N instances, in pick order (repeats
        possible, also when N < num_prototypes); empty when N = 0. Same device as the inputs.
    """
    _check_args(feats_a, feats_b, num_prototypes, alpha, bandwidth, quantile)
    args = (int(num_prototypes), float(alpha), float(bandwidth), float(quantile))
    if _ext.extension_available():
        return torch.ops.kd2.pgm_select(feats_a.detach(), feats_b.detach(), *args)
    _ext.warn_fallback()
    return reference.pgm_select_reference(feats_a.detach(), feats_b.detach(), *args)


def _check_args(
    feats_a: Tensor,
    feats_b: Tensor,
    num_prototypes: int,
    alpha: float,
    bandwidth: float,
    quantile: float,
) -> None:
    for name, t in (("feats_a", feats_a), ("feats_b", feats_b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"pgm_select: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(
                f"pgm_select: {name} must be (N, D) with one row per instance, got shape "
                f"{tuple(t.shape)}; flatten pooled features with .flatten(1)"
            )
        if not t.is_floating_point():
            raise TypeError(
                f"pgm_select: {name} must be floating point, got {t.dtype}; use {name}.float()"
            )
    if feats_a.shape[0] != feats_b.shape[0]:
        raise ValueError(
            f"pgm_select: feats_a and feats_b must hold the same N instances row by row, got "
            f"N = {feats_a.shape[0]} and {feats_b.shape[0]}"
        )
    if feats_a.device != feats_b.device:
        raise ValueError(
            f"pgm_select: feats_a is on {feats_a.device} but feats_b on {feats_b.device}; "
            "move them to one device"
        )
    if isinstance(num_prototypes, bool) or not isinstance(num_prototypes, Integral):
        raise TypeError(
            f"pgm_select: num_prototypes must be an int, got {type(num_prototypes).__name__}"
        )
    if num_prototypes < 0:
        raise ValueError(f"pgm_select: num_prototypes must be >= 0, got {num_prototypes}")
    for name, v in (("alpha", alpha), ("bandwidth", bandwidth), ("quantile", quantile)):
        if isinstance(v, bool) or not isinstance(v, Real):
            raise TypeError(f"pgm_select: {name} must be a number, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"pgm_select: {name} must be finite, got {v}")
    if alpha < 0:
        raise ValueError(f"pgm_select: alpha must be >= 0, got {alpha}")
    if bandwidth <= 0:
        raise ValueError(f"pgm_select: bandwidth must be > 0, got {bandwidth}")
    if not 0 <= quantile < 1:
        raise ValueError(f"pgm_select: quantile must be in [0, 1), got {quantile}")
