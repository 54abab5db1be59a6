#!/usr/bin/env python
"""What a teacher cache saves: a KD step reading the cache, next to the live teacher in float32 and
in bfloat16, each against the plain student step, on the same batches in one run.

On the large bundled pair by default (``configs/synthetic/timing/faster_rcnn_MNv3_PKD_from_R50_320
.yaml``: Faster R-CNN R50-FPN, 256 channels → MobileNetV3-FPN, 320 px, PKD, batch 8) it builds the
cache of the measured batches' (image, flip) entries with ``kd2.engine.teacher_cache`` (float16;
the build's time and the disk per entry are reported), then times, interleaved per batch after a
warm-up: the plain student step, the KD step with the live float32 teacher, with the live bfloat16
teacher (``KD.TEACHER.DTYPE``) and with the cache, each KD step at an iteration without
diagnostics (``KD.DIAG``; their cost is ``step_overhead.py``'s). It prints the medians and
``kd_step_vs_student_step_{live_fp32,live_bf16,cached}=``; ``--json`` writes them
(``benchmarks/results/cache_speed_large.json``). Weights do not change the cost: both networks start
from their random initialisation (as ``benchmarks/step_overhead.py``).

Usage: ``python benchmarks/cache_speed.py [--config FILE] [--iters N] [--warmup N] [--threads T]
[--json OUT]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402
from step_overhead import Stepper, _to, _trainer, build_kd_model, diag_schedule  # noqa: E402

from kd2.data import DatasetCatalog, DetectionDataset, build_train_loader, records_of  # noqa: E402
from kd2.engine.teacher_cache import build_teacher_cache, teacher_cache_fingerprint  # noqa: E402
from kd2.modeling.teacher_cache import CACHE_KEY, TeacherCache, cache_key  # noqa: E402

DEFAULT = os.path.join(ROOT, "configs/synthetic/timing/faster_rcnn_MNv3_PKD_from_R50_320.yaml")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=DEFAULT)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input", type=int, default=320)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="kd2_cache_bench_")
    sizes = {"batch": args.batch, "size": args.input}
    cfg, live = build_kd_model(os.path.abspath(args.config), tmp, **sizes)
    _, bf16 = build_kd_model(os.path.abspath(args.config), tmp, {"DTYPE": "bfloat16"}, **sizes)
    _, cached = build_kd_model(os.path.abspath(args.config), tmp, **sizes)
    plain_cfg = cfg.clone()
    plain_cfg.KD.METHODS = []
    torch.manual_seed(0)
    student = _trainer(plain_cfg).build_plain_model(plain_cfg).train()
    for m in (live, bf16, cached):
        m.load_state_dict(student.state_dict(), strict=False)

    records = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    loader = build_train_loader(
        DetectionDataset(records, train=True), batch_size_per_rank=cfg.SOLVER.IMS_PER_BATCH, seed=0
    )
    off = _trainer(plain_cfg).label_offset(student)
    batches, keys = [], set()
    for _ in range(args.warmup + args.iters):
        images, targets = next(loader)
        batch_keys = [cache_key(t["image_id"], t["flipped"]) for t in targets]
        keys.update(batch_keys)
        images, model_targets = _to(
            images, [{"boxes": t["boxes"], "labels": t["labels"] + off} for t in targets], "cpu"
        )
        batches.append((images, model_targets, batch_keys))

    cache_dir = os.path.join(tmp, "cache")
    t0 = time.perf_counter()
    manifest = build_teacher_cache(
        cfg, cached, cache_dir, only=keys, progress=False, target_offset=off
    )
    build_seconds = time.perf_counter() - t0
    cached.kd_attach_cache(
        TeacherCache(
            cache_dir, teacher_cache_fingerprint(cfg, cached, records_of(cfg.DATASETS.TRAIN))
        )
    )
    cached.train()

    def sgd(model):
        return torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-4)

    opts = {n: sgd(m) for n, m in (("student", student), ("live", live), ("bf16", bf16))}
    opts["cached"] = sgd(cached)
    # every KD step at an iteration without diagnostics (iteration 0 measures the trunk gradients)
    for m in (live, bf16, cached):
        m.kd_iteration = diag_schedule(m)[0]
    step = Stepper("cpu")
    times = {n: [] for n in ("student", "live_fp32", "live_bf16", "cached")}
    for k, (images, targets, batch_keys) in enumerate(batches):
        with_keys = [{**t, CACHE_KEY: key} for t, key in zip(targets, batch_keys)]
        runs = (
            ("student", student, opts["student"], targets),
            ("live_fp32", live, opts["live"], targets),
            ("live_bf16", bf16, opts["bf16"], targets),
            ("cached", cached, opts["cached"], with_keys),
        )
        for name, model, opt, tgt in runs:
            t = time.perf_counter()
            step(model, opt, images, tgt)
            if k >= args.warmup:
                times[name].append(time.perf_counter() - t)
    shutil.rmtree(tmp, ignore_errors=True)
    med = {n: statistics.median(v) * 1000 for n, v in times.items()}
    stats = manifest["stats"]
    out = {
        "config": os.path.relpath(os.path.abspath(args.config), ROOT),
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu",
        "batch": args.batch,
        "input": args.input,
        "iters": args.iters,
        "median_ms": {n: round(v, 1) for n, v in med.items()},
        "kd_step_vs_student_step": {
            n: round(med[n] / med["student"], 3) for n in ("live_fp32", "live_bf16", "cached")
        },
        "cache_hits": cached.kd_cache.hits,
        "cache_misses": cached.kd_cache.misses,
        "cache_entries": stats["entries"],
        "cache_kb_per_entry": round(stats["bytes_per_entry"] / 1e3, 1),
        "cache_build_ms_per_entry": round(build_seconds * 1000 / max(1, stats["entries"]), 1),
        "cache_dtype": manifest["dtype"],
    }
    for n, v in med.items():
        print(f"{n:>10}: {v:8.1f} ms")
    for n, r in out["kd_step_vs_student_step"].items():
        print(f"kd_step_vs_student_step_{n}={r}")
    print(
        f"cache: {out['cache_kb_per_entry']} kB per entry, "
        f"{out['cache_build_ms_per_entry']} ms per entry to build, "
        f"{out['cache_hits']} hits / {out['cache_misses']} misses"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
    return out


if __name__ == "__main__":
    main()
