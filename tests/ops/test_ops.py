"""kd2.ops: the compiled kernels of kd2._C against the pure-PyTorch references, and the fallback.

The kernel tests skip (with the reason) when the extension is not built; the CUDA tests skip
without a GPU or without the CUDA kernels.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import kd2.ops
from kd2.ops import _ext, reference

requires_ext = pytest.mark.skipif(
    not kd2.ops.extension_available(),
    reason="kd2._C is not built: pip install --no-build-isolation -e .",
)
requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and kd2.ops.extension_has_cuda()),
    reason="needs a GPU and kd2._C built with its CUDA kernels",
)


# ---- box_mean_pool ---------------------------------------------------------------------------


def _z(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


def _idx(values):
    return torch.tensor(values, dtype=torch.long)


def random_boxes(m: int, h: int, w: int, stride: float, gen: torch.Generator) -> torch.Tensor:
    """Boxes in image pixels spanning, and often leaving, an (h, w) map at ``stride``."""
    img_h, img_w = h * stride, w * stride
    x = torch.rand(m, 2, generator=gen) * 1.6 * img_w - 0.3 * img_w
    y = torch.rand(m, 2, generator=gen) * 1.6 * img_h - 0.3 * img_h
    boxes = torch.stack([x.min(1).values, y.min(1).values, x.max(1).values, y.max(1).values], 1)
    kind = torch.randint(0, 6, (m,), generator=gen)
    boxes[kind == 0, 2] = boxes[kind == 0, 0]  # degenerate: x1 == x2
    boxes[kind == 1, 3] = boxes[kind == 1, 1]  # degenerate: y1 == y2
    boxes[kind == 2] = boxes[kind == 2].flip(1)  # inverted: (x2, y2, x1, y1)
    boxes[kind == 3] += torch.tensor([2.0, 2.0, 2.0, 2.0]) * max(img_w, img_h)  # fully outside
    return boxes


def test_box_mean_pool_hand_computed():
    # Image 0: 3 x 4 map with cell (r, c) = 4r + c; image 1: the same times 10. Stride 8.
    base = torch.arange(12.0).reshape(1, 1, 3, 4)
    features = torch.cat([base, 10 * base])
    boxes = torch.tensor(
        [
            [0.0, 0.0, 15.0, 7.0],  # row 0, columns 0..1: (0 + 1) / 2
            [8.0, 8.0, 31.0, 23.0],  # rows 1..2, columns 1..3: (5+6+7+9+10+11) / 6
            [8.0, 8.0, 31.0, 23.0],  # the same on image 1
            [100.0, 100.0, 200.0, 200.0],  # fully outside: clamped onto cell (2, 3)
            [-20.0, -9.0, 3.0, 3.0],  # |x1|/8 -> col 2, |y1|/8 -> row 1: rows 0..1, cols 0..2
            [9.0, 0.0, 9.0, 20.0],  # x1 == x2: column 1, rows 0..2: (1 + 5 + 9) / 3
            [31.0, 23.0, 8.0, 8.0],  # inverted box: same cells as box 1
            [7.9, 7.9, 8.0, 8.0],  # rows 0..1, cols 0..1: (0 + 1 + 4 + 5) / 4
            [-7.9, -7.9, -7.9, -7.9],  # a small negative box is cell (0, 0)
        ]
    )
    batch_index = torch.tensor([0, 0, 1, 0, 0, 0, 0, 0, 0])
    expected = torch.tensor([0.5, 8.0, 80.0, 11.0, 3.0, 5.0, 8.0, 2.5, 0.0])[:, None]
    assert torch.equal(reference.box_mean_pool_reference(features, boxes, batch_index, 8), expected)
    for dtype in (torch.float32, torch.float64):
        out = kd2.ops.box_mean_pool(features.to(dtype), boxes, batch_index, 8)
        assert out.dtype == dtype and out.shape == (9, 1)
        torch.testing.assert_close(out, expected.to(dtype), rtol=0, atol=1e-6)
    # stride 4 on the same map: box 1 covers rows 2..2 (clamped from 2..5), columns 2..3
    out = kd2.ops.box_mean_pool(features, boxes[1:2], batch_index[:1], 4)
    torch.testing.assert_close(out, torch.tensor([[(10.0 + 11.0) / 2]]))


@requires_ext
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_box_mean_pool_matches_reference(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    n, c = (
        int(torch.randint(1, 4, (1,), generator=gen)),
        int(torch.randint(1, 9, (1,), generator=gen)),
    )
    h, w = (
        int(torch.randint(1, 13, (1,), generator=gen)),
        int(torch.randint(1, 13, (1,), generator=gen)),
    )
    stride = [1, 4, 8, 16, 32, 2.5][seed]
    m = int(torch.randint(1, 40, (1,), generator=gen))
    features = torch.randn(n, c, h, w, generator=gen, dtype=dtype) + 3.0  # offset: exposes bias
    boxes = random_boxes(m, h, w, stride, gen).to(dtype)
    batch_index = torch.randint(0, n, (m,), generator=gen)
    out = kd2.ops.box_mean_pool(features, boxes, batch_index, stride)
    expected = reference.box_mean_pool_reference(features, boxes, batch_index, stride)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    # the vectorised fallback agrees too
    vec = reference.box_mean_pool_torch(features, boxes, batch_index, stride)
    torch.testing.assert_close(vec, expected, rtol=tol, atol=tol)


@requires_ext
def test_box_mean_pool_backward_matches_reference_autograd():
    gen = torch.Generator().manual_seed(7)
    features = torch.randn(2, 5, 9, 11, generator=gen, dtype=torch.float64)
    boxes = random_boxes(30, 9, 11, 8, gen).double()
    batch_index = torch.randint(0, 2, (30,), generator=gen)
    weights = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (kd2.ops.box_mean_pool, reference.box_mean_pool_reference):
        x = features.clone().requires_grad_()
        (fn(x, boxes, batch_index, 8) * weights).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)
    assert grads[0].abs().sum() > 0


@requires_ext
def test_box_mean_pool_gradcheck():
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    boxes = random_boxes(8, 5, 6, 4, gen).double()
    batch_index = torch.randint(0, 2, (8,), generator=gen)
    fn = lambda x: kd2.ops.box_mean_pool(x, boxes, batch_index, 4)
    assert torch.autograd.gradcheck(fn, (features,))
    assert torch.autograd.gradgradcheck(fn, (features,))


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_box_mean_pool_empty(dtype):
    features = torch.randn(2, 4, 5, 5, dtype=dtype, requires_grad=True)
    out = kd2.ops.box_mean_pool(features, _z(0, 4), _idx([]), 8)
    assert out.shape == (0, 4) and out.dtype == dtype
    out.sum().backward()
    assert torch.equal(features.grad, torch.zeros_like(features))


@requires_ext
def test_box_mean_pool_low_precision():
    gen = torch.Generator().manual_seed(11)
    features = torch.randn(1, 6, 8, 8, generator=gen)
    boxes = random_boxes(10, 8, 8, 8, gen)
    batch_index = torch.zeros(10, dtype=torch.long)
    for dtype in (torch.float16, torch.bfloat16):
        x = features.to(dtype)
        out = kd2.ops.box_mean_pool(x, boxes, batch_index, 8)
        assert out.dtype == dtype and out.shape == (10, 6)
        # the sums run in float64: only the final rounding to dtype differs from the reference
        expected = reference.box_mean_pool_reference(x.double(), boxes, batch_index, 8)
        torch.testing.assert_close(out, expected.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((_z(3, 4, 4), _z(1, 4), _idx([0]), 8), ValueError, "N, C, H, W"),
        ((_z(1, 3, 4, 4), _z(1, 5), _idx([0]), 8), ValueError, r"\(M, 4\)"),
        ((_z(1, 3, 4, 4), _z(2, 4), _z(2, dtype=torch.int32), 8), TypeError, "long"),
        ((_z(1, 3, 4, 4), _z(2, 4), _idx([0, 0, 0]), 8), ValueError, "M = 2"),
        ((_z(1, 3, 4, 4), _z(1, 4), _idx([0]), 0), ValueError, "stride"),
        ((_z(1, 3, 4, 4), _z(1, 4), _idx([0]), float("nan")), ValueError, "stride"),
        ((_z(1, 3, 4, 4), _z(1, 4), _idx([1]), 8), ValueError, r"\[0, 1\)"),
        ((_z(1, 3, 4, 4), _z(1, 4), _idx([-1]), 8), ValueError, r"\[0, 1\)"),
        ((_z(1, 3, 4, 4, dtype=torch.long), _z(1, 4), _idx([0]), 8), TypeError, "floating"),
        ((_z(1, 3, 4, 4), _z(1, 4, dtype=torch.long), _idx([0]), 8), TypeError, "floating"),
        ((_z(1, 3, 0, 4), _z(1, 4), _idx([0]), 8), ValueError, "empty"),
    ],
)
def test_box_mean_pool_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        kd2.ops.box_mean_pool(*args)


@requires_ext
def test_box_mean_pool_kernel_checks_batch_index():
    # torch.ops.kd2 directly (no Python checks): the kernel must not read out of bounds.
    with pytest.raises(RuntimeError, match="batch_index"):
        torch.ops.kd2.box_mean_pool(_z(1, 2, 3, 3), _z(1, 4), torch.tensor([1]), 8.0)


# ---- pgm_select ------------------------------------------------------------------------------


def clustered(
    n: int, d: int, seed: int, clusters: int = 4, spread: float = 0.15, dtype=torch.float64
):
    """n rows in d dimensions around `clusters` random centres (well separated for small spread)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=gen, dtype=dtype)
    labels = torch.randint(0, clusters, (n,), generator=gen)
    return centres[labels] + spread * torch.randn(n, d, generator=gen, dtype=dtype)


def brute_pgm(fa, fb, rounds, alpha, bandwidth, quantile, candidates=None):
    """Independent pure-Python PGM (explicit residuals, lists of floats) for tiny inputs."""
    fa, fb = fa.tolist(), fb.tolist()
    n = len(fa)
    dot = lambda u, v: sum(x * y for x, y in zip(u, v))

    def normed(rows):
        return [[x / max(math.sqrt(dot(r, r)), 1e-12) for x in r] for r in rows]

    xa, xb = normed(fa), normed(fb)

    def density(x):
        return [
            sum(math.exp(-(((1 - dot(x[i], x[j])) / bandwidth) ** 2)) for j in range(n))
            for i in range(n)
        ]

    if candidates is None:
        da, db = density(xa), density(xb)
        q = int(math.floor(quantile * n))
        ta, tb = sorted(da)[q], sorted(db)[q]
        candidates = [i for i in range(n) if da[i] > ta and db[i] > tb] or list(range(n))
    ra, rb = [list(r) for r in xa], [list(r) for r in xb]  # residual of instance m: ra[m]
    picks = []
    for _ in range(rounds):
        best, best_err, best_w = None, math.inf, None
        for c in candidates:
            pa, pb = [dot(xa[c], r) for r in ra], [dot(xb[c], r) for r in rb]
            wa = [((1 + alpha) * x + alpha * y) / (1 + 2 * alpha) for x, y in zip(pa, pb)]
            wb = [(alpha * x + (1 + alpha) * y) / (1 + 2 * alpha) for x, y in zip(pa, pb)]
            err = sum(
                (r[i] - xa[c][i] * wa[m]) ** 2 for m, r in enumerate(ra) for i in range(len(r))
            )
            err += sum(
                (r[i] - xb[c][i] * wb[m]) ** 2 for m, r in enumerate(rb) for i in range(len(r))
            )
            err += alpha * sum((x - y) ** 2 for x, y in zip(wa, wb))
            if err < best_err:
                best, best_err, best_w = c, err, (wa, wb)
        picks.append(best)
        wa, wb = best_w
        ra = [[r[i] - xa[best][i] * wa[m] for i in range(len(r))] for m, r in enumerate(ra)]
        rb = [[r[i] - xb[best][i] * wb[m] for i in range(len(r))] for m, r in enumerate(rb)]
    return picks


@requires_ext
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("alpha", [0.0, 1.0, 10.0])
def test_pgm_select_matches_reference_and_explicit(seed, alpha):
    n = 40 + 7 * seed
    fa = clustered(n, 12, seed)
    fb = clustered(n, 9, seed + 100) + fa[:, :9]  # correlated, different dimension
    args = (10, alpha, 0.3, 0.4)
    picks = kd2.ops.pgm_select(fa, fb, *args)
    assert picks.dtype == torch.long and picks.shape == (10,)
    assert picks.tolist() == reference.pgm_select_reference(fa, fb, *args).tolist()
    assert picks.tolist() == reference.pgm_select_explicit(fa, fb, *args).tolist()
    assert picks.tolist() == reference.pgm_select_explicit(fa, fb, *args, chunk_size=5).tolist()


@requires_ext
@pytest.mark.parametrize("seed", range(3))
def test_pgm_select_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    fa = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    fb = fa[:, :3] + 0.5 * torch.randn(9, 3, generator=gen, dtype=torch.float64)
    picks = kd2.ops.pgm_select(fa, fb, 6, 2.0, 0.8, 0.3).tolist()
    assert picks == brute_pgm(fa, fb, 6, 2.0, 0.8, 0.3)


@requires_ext
def test_pgm_select_float32():
    fa, fb = clustered(300, 32, 1, dtype=torch.float32), clustered(300, 24, 2, dtype=torch.float32)
    picks = kd2.ops.pgm_select(fa, fb)
    assert picks.tolist() == reference.pgm_select_reference(fa, fb).tolist()
    assert picks.tolist() == reference.pgm_select_explicit(fa.double(), fb.double()).tolist()


@requires_ext
def test_pgm_select_empty_and_single():
    empty = kd2.ops.pgm_select(_z(0, 5), _z(0, 3))
    assert empty.dtype == torch.long and empty.shape == (0,)
    assert kd2.ops.pgm_select(torch.randn(6, 5), torch.randn(6, 3), num_prototypes=0).shape == (0,)
    one = kd2.ops.pgm_select(torch.randn(1, 5), torch.randn(1, 3), num_prototypes=4)
    assert one.tolist() == [0, 0, 0, 0]


@requires_ext
def test_pgm_select_identical_rows_pick_lowest():
    # All rows equal: every density ties (no candidate, fallback to all rows) and every score
    # ties, so each round must pick row 0.
    fa = torch.tensor([[1.0, 2.0, 3.0]]).repeat(7, 1)
    fb = torch.tensor([[0.5, -1.0]]).repeat(7, 1)
    for dtype in (torch.float32, torch.float64):
        assert kd2.ops.pgm_select(fa.to(dtype), fb.to(dtype), 5).tolist() == [0] * 5


def test_pgm_density_and_threshold_by_hand():
    # bandwidth 1: cosine 1 -> 1, cosine 0 -> e^-1, cosine -1 -> e^-4.
    xa = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    xb = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    e1, e4 = math.exp(-1), math.exp(-4)
    rho_a = reference.pgm_density(xa @ xa.T, 1.0)
    expected_a = [2 + e1 + e4, 2 + e1 + e4, 1 + 3 * e1, 1 + e1 + 2 * e4]
    torch.testing.assert_close(rho_a, torch.tensor(expected_a, dtype=torch.float64))
    rho_b = reference.pgm_density(xb @ xb.T, 1.0)
    expected_b = [2 + e1 + e4, 1 + e1 + 2 * e4, 2 + e1 + e4, 1 + 3 * e1]
    torch.testing.assert_close(rho_b, torch.tensor(expected_b, dtype=torch.float64))
    # quantile 0.4, N = 4: tau is the sorted index 1, i.e. 1 + 3/e in both spaces, so
    # a keeps rows {0, 1}, b keeps rows {0, 2}: the only candidate is row 0.
    cand = reference.pgm_candidates(xa @ xa.T, xb @ xb.T, 1.0, 0.4)
    assert cand.tolist() == [0]
    # quantile 0: tau is the minimum; a keeps {0, 1, 2}, b keeps {0, 2, 3}
    assert reference.pgm_candidates(xa @ xa.T, xb @ xb.T, 1.0, 0.0).tolist() == [0, 2]
    expected = brute_pgm(xa, xb, 4, 10.0, 1.0, 0.4)
    assert expected == [0, 0, 0, 0]
    assert reference.pgm_select_reference(xa, xb, 4, 10.0, 1.0, 0.4).tolist() == expected
    if kd2.ops.extension_available():
        assert kd2.ops.pgm_select(xa, xb, 4, 10.0, 1.0, 0.4).tolist() == expected
        # without the density filter the pursuit would not stay on row 0
        assert brute_pgm(xa, xb, 4, 10.0, 1.0, 0.4, candidates=[0, 1, 2, 3]) != expected


@requires_ext
def test_pgm_select_density_filter_excludes_outlier():
    # Two tight clusters at 0 and 60 degrees, and one row on the bisector (30 degrees). The
    # bisector reconstructs everything best (sum of cos^2 = 20 * 0.75 > 10 + 10 * 0.25) but is
    # alone, hence the least dense: the candidates exclude it.
    gen = torch.Generator().manual_seed(0)
    angles = torch.cat(
        [0.02 * torch.randn(10, generator=gen), math.pi / 3 + 0.02 * torch.randn(10, generator=gen)]
    )
    angles = torch.cat([angles, torch.tensor([math.pi / 6])]).double()
    fa = torch.stack([angles.cos(), angles.sin()], 1)
    fb = torch.stack(
        [angles.sin(), -angles.cos(), torch.zeros(21, dtype=torch.float64)], 1
    )  # rotated copy
    assert brute_pgm(fa, fb, 1, 10.0, 0.1, 0.4, candidates=list(range(21))) == [20]
    picks = kd2.ops.pgm_select(fa, fb, 3).tolist()
    assert 20 not in picks
    assert picks == brute_pgm(fa, fb, 3, 10.0, 0.1, 0.4)


@requires_ext
def test_pgm_select_no_candidate_fallback():
    # Rows 0, 1 are dense only in space a; rows 2, 3 only in space b: no row is dense in both,
    # so the candidates fall back to all rows.
    fa = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [-1.0, 0.3]], dtype=torch.float64)
    fb = torch.tensor([[0.0, 1.0], [-1.0, 0.3], [1.0, 0.0], [1.0, 0.05]], dtype=torch.float64)
    na, nb = reference.normalize_rows(fa), reference.normalize_rows(fb)
    rho_a, rho_b = reference.pgm_density(na @ na.T, 0.5), reference.pgm_density(nb @ nb.T, 0.5)
    tau_a, tau_b = rho_a.sort().values[1], rho_b.sort().values[1]
    assert not ((rho_a > tau_a) & (rho_b > tau_b)).any()
    assert reference.pgm_candidates(na @ na.T, nb @ nb.T, 0.5, 0.4).tolist() == [0, 1, 2, 3]
    picks = kd2.ops.pgm_select(fa, fb, 6, 1.0, 0.5, 0.4).tolist()
    assert picks == brute_pgm(fa, fb, 6, 1.0, 0.5, 0.4)
    assert picks == reference.pgm_select_explicit(fa, fb, 6, 1.0, 0.5, 0.4).tolist()


@requires_ext
def test_pgm_select_repeated_pick():
    # 3 rows and 10 rounds: some row must be picked again (no orthogonalisation), and the
    # Gram-form updates must follow the explicit residuals through the repeats.
    gen = torch.Generator().manual_seed(5)
    fa = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    fb = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    picks = kd2.ops.pgm_select(fa, fb, 10, 10.0, 2.0, 0.0).tolist()
    assert len(set(picks)) < len(picks)
    assert picks == reference.pgm_select_explicit(fa, fb, 10, 10.0, 2.0, 0.0).tolist()
    assert picks == brute_pgm(fa, fb, 10, 10.0, 2.0, 0.0)
    # and a repeat with more rows than rounds
    fa, fb = clustered(30, 8, 3), clustered(30, 8, 4)
    picks = kd2.ops.pgm_select(fa, fb, 10, 10.0, 0.3, 0.4).tolist()
    assert len(set(picks)) < len(picks)
    assert picks == reference.pgm_select_explicit(fa, fb, 10, 10.0, 0.3, 0.4).tolist()


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((_z(4, 3, 1), _z(4, 3)), {}, ValueError, r"\(N, D\)"),
        ((_z(4, 3), _z(5, 3)), {}, ValueError, "same N"),
        ((_z(4, 3, dtype=torch.long), _z(4, 3)), {}, TypeError, "floating"),
        ((_z(4, 3), _z(4, 3)), {"num_prototypes": -1}, ValueError, "num_prototypes"),
        ((_z(4, 3), _z(4, 3)), {"num_prototypes": 2.5}, TypeError, "int"),
        ((_z(4, 3), _z(4, 3)), {"bandwidth": 0.0}, ValueError, "bandwidth"),
        ((_z(4, 3), _z(4, 3)), {"quantile": 1.0}, ValueError, "quantile"),
        ((_z(4, 3), _z(4, 3)), {"alpha": -1.0}, ValueError, "alpha"),
    ],
)
def test_pgm_select_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        kd2.ops.pgm_select(*args, **kwargs)


# ---- the fallback without the extension ------------------------------------------------------


def test_fallback_without_extension(monkeypatch):
    monkeypatch.setitem(sys.modules, "kd2._C", None)  # `import kd2._C` now raises ImportError
    monkeypatch.setattr(_ext, "_state", _ext._State())
    calls = []
    for name in ("box_mean_pool_torch", "pgm_select_reference"):
        real = getattr(reference, name)
        spy = lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k)
        monkeypatch.setattr(reference, name, spy)
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    boxes = random_boxes(12, 6, 7, 8, gen).double()
    batch_index = torch.randint(0, 2, (12,), generator=gen)
    fa, fb = clustered(25, 6, 0), clustered(25, 5, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not kd2.ops.extension_available()
        out = kd2.ops.box_mean_pool(features, boxes, batch_index, 8)
        kd2.ops.box_mean_pool(features, boxes, batch_index, 8)
        picks = kd2.ops.pgm_select(fa, fb)
    ours = [w for w in caught if issubclass(w.category, kd2.ops.ExtensionNotBuiltWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "pip install --no-build-isolation -e ." in str(ours[0].message)
    assert calls == ["box_mean_pool_torch", "box_mean_pool_torch", "pgm_select_reference"]
    expected = reference.box_mean_pool_reference(features, boxes, batch_index, 8)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.sum().backward()  # the fallback is differentiable
    assert features.grad is not None
    assert picks.tolist() == brute_pgm(fa, fb, 10, 10.0, 0.1, 0.4)


def test_import_without_extension_never_fails():
    code = (
        "import sys, warnings; sys.modules['kd2._C'] = None\n"
        "import torch, kd2.ops\n"
        "assert not kd2.ops.extension_available()\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    out = kd2.ops.box_mean_pool(torch.ones(1, 2, 3, 3), torch.zeros(1, 4), "
        "torch.zeros(1, dtype=torch.long), 8)\n"
        "assert out.tolist() == [[1.0, 1.0]] and len(w) == 1, w\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# ---- torch.library registrations: fake kernels, autograd, torch.compile ------------------


@requires_ext
def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 5, 6, generator=gen, requires_grad=True)
    boxes = random_boxes(7, 5, 6, 8, gen)
    batch_index = torch.randint(0, 2, (7,), generator=gen)
    ops = torch.ops.kd2
    torch.library.opcheck(ops.box_mean_pool.default, (features, boxes, batch_index, 8.0))
    grad = torch.randn(7, 3, generator=gen, requires_grad=True)
    torch.library.opcheck(
        ops.box_mean_pool_backward.default, (grad, boxes, batch_index, 8.0, 2, 5, 6)
    )
    fa, fb = clustered(30, 6, 0, dtype=torch.float32), clustered(30, 4, 1, dtype=torch.float32)
    torch.library.opcheck(ops.pgm_select.default, (fa, fb, 5, 10.0, 0.1, 0.4))


@requires_ext
def test_torch_compile():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 4, 6, 6, generator=gen)
    boxes = random_boxes(9, 6, 6, 8, gen)
    batch_index = torch.randint(0, 2, (9,), generator=gen)
    fa, fb = clustered(20, 6, 0, dtype=torch.float32), clustered(20, 4, 1, dtype=torch.float32)

    def step(x, fa, fb):
        pooled = kd2.ops.box_mean_pool(x, boxes, batch_index, 8)
        return (pooled**2).sum(), kd2.ops.pgm_select(fa, fb, 4)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x1, x2 = features.clone().requires_grad_(), features.clone().requires_grad_()
    loss1, picks1 = compiled(x1, fa, fb)
    loss2, picks2 = step(x2, fa, fb)
    loss1.backward()
    loss2.backward()
    torch.testing.assert_close(loss1, loss2)
    torch.testing.assert_close(x1.grad, x2.grad)
    assert picks1.tolist() == picks2.tolist()


# ---- CUDA: the CUDA kernels against the CPU kernels (run on a GPU machine) -------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_box_mean_pool_cuda_matches_cpu(dtype):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(3, 16, 25, 31, generator=gen).to(dtype)
    boxes = random_boxes(200, 25, 31, 8, gen)
    batch_index = torch.randint(0, 3, (200,), generator=gen)
    weights = torch.randn(200, 16, generator=gen).to(dtype)
    results = []
    for device in ("cpu", "cuda"):
        x = features.to(device).requires_grad_()
        out = kd2.ops.box_mean_pool(x, boxes.to(device), batch_index.to(device), 8)
        (out * weights.to(device)).sum().backward()
        results.append((out.cpu(), x.grad.cpu()))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(results[1][0], results[0][0], rtol=tol, atol=tol)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=tol, atol=tol)


@requires_cuda
def test_box_mean_pool_cuda_chunked_and_gradcheck():
    # Large enough that the float64 tables are built in several chunks (> 256 MiB).
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(4, 130, 256, 256, generator=gen)
    boxes = random_boxes(300, 256, 256, 4, gen)
    batch_index = torch.randint(0, 4, (300,), generator=gen)
    cpu = kd2.ops.box_mean_pool(features, boxes, batch_index, 4)
    gpu = kd2.ops.box_mean_pool(features.cuda(), boxes.cuda(), batch_index.cuda(), 4)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    b = random_boxes(8, 5, 6, 4, gen).double().cuda()
    bi = torch.randint(0, 2, (8,), generator=gen).cuda()
    assert torch.autograd.gradcheck(lambda t: kd2.ops.box_mean_pool(t, b, bi, 4), (x,))
    with pytest.raises(RuntimeError, match="batch_index"):
        torch.ops.kd2.box_mean_pool(x, b, bi + 5, 4.0)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pgm_select_cuda_matches_cpu(dtype):
    # seeds whose densities near the threshold and top scores differ by > 1e-5 (relative), far
    # above float32 rounding, so that cuBLAS and CPU BLAS Gram matrices pick alike
    for seed in (0, 2, 4):
        fa, fb = clustered(500, 64, seed, dtype=dtype), clustered(500, 48, seed + 10, dtype=dtype)
        cpu = kd2.ops.pgm_select(fa, fb)
        gpu = kd2.ops.pgm_select(fa.cuda(), fb.cuda())
        assert gpu.device.type == "cuda" and gpu.dtype == torch.long
        assert gpu.cpu().tolist() == cpu.tolist()
        assert gpu.cpu().tolist() == reference.pgm_select_reference(fa.cuda(), fb.cuda()).tolist()
    assert kd2.ops.pgm_select(
        torch.zeros(0, 3, device="cuda"), torch.zeros(0, 2, device="cuda")
    ).shape == (0,)
    one = kd2.ops.pgm_select(torch.randn(1, 3, device="cuda"), torch.randn(1, 2, device="cuda"), 3)
    assert one.tolist() == [0, 0, 0]
    same = torch.ones(5, 3, device="cuda")
    assert kd2.ops.pgm_select(same, same, 4).tolist() == [0, 0, 0, 0]


@requires_cuda
def test_opcheck_cuda():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 5, 6, generator=gen).cuda().requires_grad_()
    boxes = random_boxes(7, 5, 6, 8, gen).cuda()
    batch_index = torch.randint(0, 2, (7,), generator=gen).cuda()
    torch.library.opcheck(torch.ops.kd2.box_mean_pool.default, (features, boxes, batch_index, 8.0))
    fa, fb = (
        clustered(30, 6, 0, dtype=torch.float32).cuda(),
        clustered(30, 4, 1, dtype=torch.float32).cuda(),
    )
    torch.library.opcheck(torch.ops.kd2.pgm_select.default, (fa, fb, 5, 10.0, 0.1, 0.4))
