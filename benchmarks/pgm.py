#!/usr/bin/env python
"""How much faster are kd2's compiled operators than the straightforward PyTorch code?

1. ``kd2.ops.pgm_select`` (Gram-form kernels) against the explicit prototype generation of the
   Global-Knowledge code (:func:`kd2.ops.reference.pgm_select_explicit`), which forms, every
   round, the (K, D, N) reconstruction error of all K candidates. Random clustered data, N
   instances in two spaces of D = 256, 10 prototypes, float32. Both must pick the same rows.
2. ``kd2.ops.box_mean_pool`` against a Python loop of one slice-and-mean per box
   (:func:`kd2.ops.reference.box_mean_pool_reference`): M boxes on a (2, 256, 100, 150) map.

Times are medians over ``--repeats`` runs after a warm-up (the explicit PGM: one run, no warm-up,
as it takes tens of seconds). Peak memory on CPU is the rise of the process's peak resident set
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``, minus ``VmRSS`` before), i.e.
measured, not computed; on CUDA it is ``torch.cuda.max_memory_allocated`` above the baseline.
The explicit version's memory is also estimated: one (K, D, N) tensor, which the reference keeps
alive one at a time (in-place ops); the official code holds about five.

If that estimate exceeds ``--explicit-mem-gb`` (default 8), the explicit run is skipped with the
reason, or, with ``--chunk``, run over candidate chunks that fit (same arithmetic).

Prints a table and ends with ``pgm_speedup_<device>=<x>`` (N = 2000) and
``box_pool_speedup_<device>=<x>`` (forward pass).
Usage: ``python benchmarks/pgm.py [--device cpu|cuda] [--sizes 500 2000 4000] [--chunk]``
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import statistics
import sys
import time

import torch

import kd2.ops
from kd2.ops import reference


def clustered_pair(n: int, dim: int, seed: int, clusters: int = 20) -> tuple[torch.Tensor, ...]:
    """n instances of `clusters` classes-of-appearance, seen in two related feature spaces."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, clusters, (n,), generator=gen)
    centres_a = torch.randn(clusters, dim, generator=gen)
    centres_b = centres_a @ torch.randn(dim, dim, generator=gen) / dim**0.5  # a related space
    fa = centres_a[labels] + 0.3 * torch.randn(n, dim, generator=gen)
    fb = centres_b[labels] + 0.3 * torch.randn(n, dim, generator=gen)
    return fa, fb


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """Peak memory (bytes) a block adds: RSS high-water mark on CPU, the allocator's on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _malloc_trim()  # give freed heap pages back, so reused memory counts again
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.base = self._status("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = self._status("VmHWM") - self.base


def timed(fn, device: torch.device, repeats: int, warmup: bool = True):
    """(median seconds, peak bytes of the first timed run, last result)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if warmup:
        fn()
        sync()
    times, peak, out = [], 0, None
    for i in range(repeats):
        with PeakMemory(device) as mem:
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - t0)
        if i == 0:
            peak = mem.peak
    return statistics.median(times), peak, out


def mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.0f} MB"


def bench_pgm(args, device: torch.device) -> float | None:
    print(f"\n== pgm_select: D = {args.dim}, {args.prototypes} prototypes, float32, {device} ==")
    rows, speedup = [], None
    for n in args.sizes:
        fa, fb = (t.to(device) for t in clustered_pair(n, args.dim, seed=n))
        na, nb = reference.normalize_rows(fa), reference.normalize_rows(fb)
        k = reference.pgm_candidates(na @ na.T, nb @ nb.T, 0.1, 0.4).numel()
        del na, nb
        print(f"N = {n}: {k} candidates; kd2.ops.pgm_select ...", flush=True)
        t_ours, m_ours, picks = timed(
            lambda fa=fa, fb=fb: kd2.ops.pgm_select(fa, fb, args.prototypes), device, args.repeats
        )
        print(f"  kd2.ops.pgm_select: {t_ours * 1e3:.1f} ms, peak +{mb(m_ours)}", flush=True)
        est = k * args.dim * n * 4  # one (K, D, N) float32 tensor
        budget = args.explicit_mem_gb * 2**30
        chunk, t_exp, m_exp, same, note = None, None, None, None, ""
        if est > budget and not args.chunk:
            note = (
                f"explicit skipped: its (K, D, N) = ({k}, {args.dim}, {n}) float32 tensor needs "
                f"~{est / 2**30:.1f} GB (the official code holds ~5 such: "
                f"~{5 * est / 2**30:.0f} GB) > --explicit-mem-gb {args.explicit_mem_gb:g}; "
                "pass --chunk to run it over candidate chunks"
            )
            print("  " + note, flush=True)
        else:
            if est > budget:
                chunk = max(1, int(budget // (args.dim * n * 4)))
                note = f"chunked: {chunk} candidates per block"
            print(
                f"  explicit (K, D, N) version, ~{est / 2**30:.2f} GB per error tensor"
                + (f", {note}" if note else "")
                + " ...",
                flush=True,
            )
            t_exp, m_exp, picks_exp = timed(
                lambda fa=fa, fb=fb, chunk=chunk: reference.pgm_select_explicit(
                    fa, fb, args.prototypes, chunk_size=chunk
                ),
                device,
                repeats=1,
                warmup=False,
            )
            same = picks.tolist() == picks_exp.tolist()
            print(f"  explicit: {t_exp:.2f} s, peak +{mb(m_exp)}; same picks: {same}", flush=True)
            if not same:
                print(f"    kd2: {picks.tolist()}\n    explicit: {picks_exp.tolist()}")
        rows.append((n, k, t_ours, m_ours, t_exp, m_exp, est, same, note))
        if n == 2000 and t_exp is not None:
            speedup = t_exp / t_ours

    print(
        f"\n{'N':>6} {'K':>6} {'kd2 time':>11} {'kd2 peak':>10} {'explicit':>11} "
        f"{'expl. peak':>11} {'expl. est.':>11} {'speedup':>9} {'same':>5}"
    )
    for n, k, t_ours, m_ours, t_exp, m_exp, est, same, note in rows:
        t_e = f"{t_exp:.2f} s" if t_exp is not None else "skipped"
        m_e = mb(m_exp) if m_exp is not None else "-"
        sp = f"{t_exp / t_ours:.0f}x" if t_exp is not None else "-"
        print(
            f"{n:>6} {k:>6} {t_ours * 1e3:>8.1f} ms {mb(m_ours):>10} {t_e:>11} {m_e:>11} "
            f"{mb(est):>11} {sp:>9} {str(same) if same is not None else '-':>5}"
            + (f"  ({note})" if note and t_exp is not None else "")
        )
    return speedup


def bench_box_pool(args, device: torch.device) -> float:
    m = args.boxes
    print(f"\n== box_mean_pool: (2, 256, 100, 150) map, stride 8, {m} boxes, float32, {device} ==")
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 256, 100, 150, generator=gen)
    xy = torch.rand(m, 2, generator=gen) * torch.tensor([1200.0, 800.0])
    wh = 16 + torch.rand(m, 2, generator=gen) * 300
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], 1)  # some leave the image
    batch_index = torch.randint(0, 2, (m,), generator=gen)
    features, boxes, batch_index = features.to(device), boxes.to(device), batch_index.to(device)
    weights = torch.randn(m, 256, generator=gen).to(device)
    results = {}
    for name, fn in (
        ("kd2.ops.box_mean_pool", kd2.ops.box_mean_pool),
        ("per-box Python loop", reference.box_mean_pool_reference),
    ):
        print(f"{name} ...", flush=True)
        fwd = lambda fn=fn: fn(features, boxes, batch_index, 8)
        reps = args.repeats if fn is kd2.ops.box_mean_pool else max(1, min(args.repeats, 3))
        t_f, _, out = timed(fwd, device, reps)

        def fwd_bwd(fn=fn):
            x = features.detach().requires_grad_()
            (fn(x, boxes, batch_index, 8) * weights).sum().backward()
            return x.grad

        if fn is kd2.ops.box_mean_pool:
            t_fb, _, grad = timed(fwd_bwd, device, reps)
        else:  # autograd through M slices materialises M full-size gradients: one run
            t_fb, _, grad = timed(fwd_bwd, device, 1, warmup=False)
        results[name] = (t_f, t_fb, out, grad)
        print(f"  forward {t_f * 1e3:.1f} ms, forward + backward {t_fb * 1e3:.1f} ms", flush=True)
    (t1, tb1, o1, g1), (t2, tb2, o2, g2) = results.values()
    close = torch.allclose(o1, o2, rtol=1e-4, atol=1e-5) and torch.allclose(
        g1, g2, rtol=1e-4, atol=1e-6
    )
    print(f"\n{'':24} {'forward':>10} {'fwd + bwd':>10}")
    print(f"{'kd2.ops.box_mean_pool':24} {t1 * 1e3:>7.1f} ms {tb1 * 1e3:>7.1f} ms")
    print(f"{'per-box Python loop':24} {t2 * 1e3:>7.1f} ms {tb2 * 1e3:>7.1f} ms")
    print(f"{'speedup':24} {t2 / t1:>9.1f}x {tb2 / tb1:>9.1f}x   outputs and grads agree: {close}")
    return t2 / t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 4000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--prototypes", type=int, default=10)
    parser.add_argument("--boxes", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--explicit-mem-gb", type=float, default=8.0)
    parser.add_argument("--chunk", action="store_true", help="chunk the explicit PGM, never skip")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-box-pool", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU is visible")
    if not kd2.ops.extension_available():
        sys.exit("kd2._C is not built: run `pip install --no-build-isolation -e .` first")
    if device.type == "cuda" and not kd2.ops.extension_has_cuda():
        sys.exit("kd2._C was built without its CUDA kernels")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{os.cpu_count()} CPUs"
    print(
        f"torch {torch.__version__}, {name}, {torch.get_num_threads()} torch threads, "
        f"peak memory = {'allocator peak' if device.type == 'cuda' else 'measured RSS rise'}"
    )
    pgm_speedup = bench_pgm(args, device)
    box_speedup = None if args.skip_box_pool else bench_box_pool(args, device)
    print()
    if pgm_speedup is not None:
        print(f"pgm_speedup_{device.type}={pgm_speedup:.1f}")
    else:
        print(f"pgm_speedup_{device.type}: not measured (N = 2000 not run with the explicit PGM)")
    if box_speedup is not None:
        print(f"box_pool_speedup_{device.type}={box_speedup:.1f}")


if __name__ == "__main__":
    main()
