"""Pure-PyTorch reference implementations of :mod:`kd2.ops`.

They define what the compiled kernels compute (the tests compare against them), and kd2 falls back
to the vectorised ones (:func:`box_mean_pool_torch`, :func:`pgm_select_reference`) when the
extension ``kd2._C`` is not built. They take the same arguments as the public functions but do not
re-check them.

* :func:`box_mean_pool_reference` — one slice-and-mean per box, the ground truth;
* :func:`box_mean_pool_torch` — the same with summed-area tables (``cumsum``), differentiable;
* :func:`pgm_select_reference` — the PGM in Gram form, as the kernels run it;
* :func:`pgm_select_explicit` — the PGM as the Global-Knowledge code writes it: explicit residuals
  and, for every candidate, the (K, D, N) reconstruction error.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "box_cell",
    "box_cells",
    "box_mean_pool_reference",
    "box_mean_pool_torch",
    "normalize_rows",
    "pgm_density",
    "pgm_candidates",
    "pgm_select_reference",
    "pgm_select_explicit",
]


# ---- box_mean_pool ---------------------------------------------------------------------------


def box_cell(coord: float, stride: float, size: int) -> int:
    """Cell index of one coordinate: ``floor(|coord| / stride)`` clamped into ``[0, size - 1]``.

    The division is in double precision (as in the kernels). NaN maps to 0, ±inf to ``size - 1``.
    """
    v = abs(float(coord)) / float(stride)
    if not v > 0.0:  # 0 or NaN
        return 0
    if v >= size - 1:
        return size - 1
    return int(math.floor(v))


def box_cells(boxes: Tensor, stride: float, height: int, width: int) -> tuple[Tensor, ...]:
    """Vectorised cell rectangles of ``boxes`` (M, 4) XYXY: four (M,) int64 tensors.

    Returns ``(r0, r1, c0, c1)``: rows ``r0..r1`` and columns ``c0..c1`` (inclusive), with the
    two rows and the two columns of each box sorted (see :func:`kd2.ops.box_mean_pool`).
    """
    b = boxes.to(torch.float64).abs()
    v = b / torch.full_like(b, float(stride))  # elementwise IEEE division, like the kernels
    v = torch.floor(torch.nan_to_num(v, nan=0.0))
    limit = torch.tensor(
        [width - 1, height - 1, width - 1, height - 1], dtype=v.dtype, device=v.device
    )
    v = torch.minimum(v.clamp_min(0.0), limit).long()
    r0, r1 = torch.minimum(v[:, 1], v[:, 3]), torch.maximum(v[:, 1], v[:, 3])
    c0, c1 = torch.minimum(v[:, 0], v[:, 2]), torch.maximum(v[:, 0], v[:, 2])
    return r0, r1, c0, c1


def box_mean_pool_reference(
    features: Tensor, boxes: Tensor, batch_index: Tensor, stride: float
) -> Tensor:
    """Per-box loop: ``features[n, :, r0:r1+1, c0:c1+1].mean((1, 2))`` for each box. (M, C)."""
    _, c, h, w = features.shape
    rows = []
    for box, n in zip(boxes.tolist(), batch_index.tolist()):
        ya, yb = box_cell(box[1], stride, h), box_cell(box[3], stride, h)
        xa, xb = box_cell(box[0], stride, w), box_cell(box[2], stride, w)
        r0, r1, c0, c1 = min(ya, yb), max(ya, yb), min(xa, xb), max(xa, xb)
        rows.append(features[n, :, r0 : r1 + 1, c0 : c1 + 1].mean(dim=(1, 2)))
    if not rows:
        return features.new_zeros((0, c))
    return torch.stack(rows)


def box_mean_pool_torch(
    features: Tensor, boxes: Tensor, batch_index: Tensor, stride: float
) -> Tensor:
    """Vectorised :func:`box_mean_pool_reference`: summed-area tables (float64) and 4 lookups.

    Memory: one float64 copy of ``features`` plus its table. Differentiable w.r.t. features.
    """
    n, c, h, w = features.shape
    m = boxes.shape[0]
    if m == 0 or c == 0:
        return features.new_zeros((m, c))
    r0, r1, c0, c1 = box_cells(boxes, stride, h, w)
    sat = features.to(torch.float64).cumsum(2).cumsum(3)
    sat = torch.nn.functional.pad(sat, (1, 0, 1, 0))  # (N, C, H + 1, W + 1), zero row / column
    b = batch_index
    total = sat[b, :, r1 + 1, c1 + 1] - sat[b, :, r0, c1 + 1] - sat[b, :, r1 + 1, c0]
    total = total + sat[b, :, r0, c0]  # (M, C)
    count = ((r1 - r0 + 1) * (c1 - c0 + 1)).to(torch.float64)
    return (total / count[:, None]).to(features.dtype)


# ---- pgm_select ------------------------------------------------------------------------------


def _compute_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    promoted = torch.promote_types(a.dtype, b.dtype)
    return torch.float64 if promoted == torch.float64 else torch.float32


def normalize_rows(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``x / max(‖x‖₂, eps)`` row by row: (N, D) -> (N, D)."""
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(eps)


def pgm_density(gram: Tensor, bandwidth: float) -> Tensor:
    """Densities ``ρ_i = Σ_j exp(−((1 − G_ij) / bandwidth)²)``: (N, N) cosine Gram -> (N,).

    The sum runs over all j (i included) and is accumulated in float64.
    """
    d = (1 - gram) / bandwidth
    return torch.exp(-d * d).sum(dim=1, dtype=torch.float64).to(gram.dtype)


def pgm_candidates(gram_a: Tensor, gram_b: Tensor, bandwidth: float, quantile: float) -> Tensor:
    """Candidate rows Γ (K,) int64, ascending: dense in both spaces, or all rows if none is.

    With ``τ`` the ``⌊quantile·N⌋``-th smallest density (0-based), Γ = {i : ρ_a,i > τ_a and
    ρ_b,i > τ_b}; when that is empty, Γ = all N rows. N must be > 0.
    """
    n = gram_a.shape[0]
    q = min(int(math.floor(quantile * n)), n - 1)
    rho_a, rho_b = pgm_density(gram_a, bandwidth), pgm_density(gram_b, bandwidth)
    tau_a, tau_b = rho_a.sort().values[q], rho_b.sort().values[q]
    cand = torch.nonzero((rho_a > tau_a) & (rho_b > tau_b)).squeeze(1)
    if cand.numel() == 0:
        cand = torch.arange(n, device=gram_a.device)
    return cand


def pgm_select_reference(
    feats_a: Tensor,
    feats_b: Tensor,
    num_prototypes: int = 10,
    alpha: float = 10.0,
    bandwidth: float = 0.1,
    quantile: float = 0.4,
) -> Tensor:
    """PGM in Gram form (see :func:`kd2.ops.pgm_select`): picked rows (num_prototypes,) int64.

    Memory O(N² + K·N); nothing of size K × D × N is formed.
    """
    n = feats_a.shape[0]
    device = feats_a.device
    if n == 0 or num_prototypes == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    dt = _compute_dtype(feats_a, feats_b)
    xa, xb = normalize_rows(feats_a.detach().to(dt)), normalize_rows(feats_b.detach().to(dt))
    ga, gb = xa @ xa.T, xb @ xb.T
    cand = pgm_candidates(ga, gb, bandwidth, quantile)
    pa, pb = ga[cand], gb[cand]  # (K, N): inner products of the candidate atoms and residuals
    picks = []
    for _ in range(num_prototypes):
        a, b = pa.to(torch.float64), pb.to(torch.float64)
        score = ((1 + alpha) * (a * a + b * b) + 2 * alpha * a * b).sum(dim=1)
        best = int(torch.argmax(score))  # first maximum: ties -> lowest candidate
        j = int(cand[best])
        picks.append(j)
        wa = (((1 + alpha) * a[best] + alpha * b[best]) / (1 + 2 * alpha)).to(dt)
        wb = ((alpha * a[best] + (1 + alpha) * b[best]) / (1 + 2 * alpha)).to(dt)
        pa = pa - ga[cand, j][:, None] * wa[None, :]
        pb = pb - gb[cand, j][:, None] * wb[None, :]
    return torch.tensor(picks, dtype=torch.long, device=device)


def pgm_select_explicit(
    feats_a: Tensor,
    feats_b: Tensor,
    num_prototypes: int = 10,
    alpha: float = 10.0,
    bandwidth: float = 0.1,
    quantile: float = 0.4,
    chunk_size: int | None = None,
) -> Tensor:
    """PGM with explicit residuals, as in the Global-Knowledge code: picked rows (rounds,) int64.

    Residuals ``R_a = X̂_aᵀ`` (D_a, N), ``R_b`` likewise. Each round, for every candidate k with
    atoms ``u = x̂_a[Γ_k]``, ``v = x̂_b[Γ_k]``: ``p_a = R_aᵀu``, ``p_b = R_bᵀv`` (N,), the closed-form
    coefficients ``w_a = ((1+α)p_a + αp_b)/(1+2α)``, ``w_b = (αp_a + (1+α)p_b)/(1+2α)``, and the
    error ``E_k = ‖R_a − u w_aᵀ‖²_F + ‖R_b − v w_bᵀ‖²_F + α‖w_a − w_b‖²``, computed by forming
    the (K, D, N) reconstructions with broadcasting; the pick is ``argmin_k E_k`` (ties -> lowest)
    and ``R ← R − u wᵀ`` in each space.

    Args:
        chunk_size: candidates per (chunk, D, N) block; ``None`` forms all K at once. Chunking
            bounds the memory without changing the arithmetic.
    """
    n = feats_a.shape[0]
    device = feats_a.device
    if n == 0 or num_prototypes == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    dt = _compute_dtype(feats_a, feats_b)
    xa, xb = normalize_rows(feats_a.detach().to(dt)), normalize_rows(feats_b.detach().to(dt))
    cand = pgm_candidates(xa @ xa.T, xb @ xb.T, bandwidth, quantile)
    atoms_a, atoms_b = xa[cand], xb[cand]  # (K, D_a), (K, D_b)
    ra, rb = xa.T.clone(), xb.T.clone()  # residuals (D_a, N), (D_b, N)
    k_total = cand.numel()
    step = k_total if chunk_size is None else max(1, int(chunk_size))

    def coefficients(ua: Tensor, ub: Tensor) -> tuple[Tensor, Tensor]:
        pa, pb = ua @ ra, ub @ rb  # (k, N)
        wa = ((1 + alpha) * pa + alpha * pb) / (1 + 2 * alpha)
        wb = (alpha * pa + (1 + alpha) * pb) / (1 + 2 * alpha)
        return wa, wb

    def sq_error(atoms: Tensor, w: Tensor, residual: Tensor) -> Tensor:
        err = atoms[:, :, None] * w[:, None, :]  # (k, D, N) reconstructions
        err -= residual[None]
        return err.square_().sum(dim=(1, 2))

    picks = []
    for _ in range(num_prototypes):
        errors = []
        for s in range(0, k_total, step):
            ua, ub = atoms_a[s : s + step], atoms_b[s : s + step]
            wa, wb = coefficients(ua, ub)
            e = sq_error(ua, wa, ra) + sq_error(ub, wb, rb) + alpha * (wa - wb).square().sum(1)
            errors.append(e)
        best = int(torch.argmin(torch.cat(errors).to(torch.float64)))
        picks.append(int(cand[best]))
        wa, wb = coefficients(atoms_a[best : best + 1], atoms_b[best : best + 1])
        ra = ra - atoms_a[best][:, None] * wa
        rb = rb - atoms_b[best][:, None] * wb
    return torch.tensor(picks, dtype=torch.long, device=device)
