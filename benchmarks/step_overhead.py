#!/usr/bin/env python
"""How much does distillation cost beyond running the two networks?

On the same batches of the demo's data and models (Faster R-CNN MobileNetV3-FPN student,
R18-FPN teacher, the demo's KD method) it times, interleaved per batch and after a warm-up:

* ``student step``   — plain torchvision student: forward, backward, SGD step;
* ``teacher forward`` — what KD runs of the teacher: its FPN and its ROI head on the student's
  sampled proposals, under ``no_grad`` (the student's record is prepared outside the timer);
* ``KD step``        — the KD meta-architecture: student forward, teacher forward, KD losses
  (adapters included), backward, SGD step;

prints the median of each and ends with
``kd_overhead_ratio=<KD step / (student step + teacher forward)>``.

Weights do not change the cost, so both networks start from their random initialisation.
Usage: ``python benchmarks/step_overhead.py [--config FILE] [--iters N] [--threads T]``
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))

import torch  # noqa: E402

from kd2.config import get_cfg  # noqa: E402
from kd2.data import DatasetCatalog, DetectionDataset, build_train_loader  # noqa: E402
from kd2.tv.build import build_detector, build_plain_detector, label_offset  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--config", default=os.path.join(ROOT, "configs/synthetic/faster_rcnn_MNv3_DeFeat.yaml")
    )
    p.add_argument("--iters", type=int, default=15, help="measured batches")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = get_cfg()
    cfg.merge_from_file(args.config)
    tmp = tempfile.mkdtemp(prefix="kd2_bench_")
    tcfg = get_cfg()
    tcfg.merge_from_file(os.path.join(ROOT, cfg.KD.TEACHER.CONFIG))
    torch.manual_seed(0)
    teacher = build_plain_detector(tcfg)
    torch.save({"model": teacher.state_dict()}, os.path.join(tmp, "teacher.pth"))
    cfg.KD.TEACHER.CONFIG = os.path.join(ROOT, cfg.KD.TEACHER.CONFIG)
    cfg.KD.TEACHER.WEIGHTS = os.path.join(tmp, "teacher.pth")

    plain_cfg = cfg.clone()
    plain_cfg.KD.METHODS = []
    student = build_plain_detector(plain_cfg).train()
    kd_model = build_detector(cfg).train()
    kd_model.load_state_dict(student.state_dict(), strict=False)
    opt_s = torch.optim.SGD(student.parameters(), lr=1e-4, momentum=0.9)
    opt_k = torch.optim.SGD(
        [q for q in kd_model.parameters() if q.requires_grad], lr=1e-4, momentum=0.9
    )

    records = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    loader = build_train_loader(
        DetectionDataset(records, train=True),
        batch_size_per_rank=cfg.SOLVER.IMS_PER_BATCH,
        seed=0,
    )
    off = label_offset(student)
    batches = []
    for _ in range(args.warmup + args.iters):
        images, targets = next(loader)
        batches.append(
            (images, [{"boxes": t["boxes"], "labels": t["labels"] + off} for t in targets])
        )

    def step(model, opt, images, targets):
        losses = model(images, copy.deepcopy(targets))
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    times = {"student step": [], "teacher forward": [], "KD step": []}
    for i, (images, targets) in enumerate(batches):
        t0 = time.perf_counter()
        step(student, opt_s, images, targets)
        t1 = time.perf_counter()
        with torch.no_grad():
            rec, _ = kd_model.student_step(images, copy.deepcopy(targets))
            t2 = time.perf_counter()
            kd_model.teacher_step(rec)
            t3 = time.perf_counter()
        step(kd_model, opt_k, images, targets)
        t4 = time.perf_counter()
        if i >= args.warmup:
            times["student step"].append(t1 - t0)
            times["teacher forward"].append(t3 - t2)
            times["KD step"].append(t4 - t3)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"config: {os.path.relpath(args.config, ROOT)}  KD.METHODS={list(cfg.KD.METHODS)}")
    print(
        f"batch {cfg.SOLVER.IMS_PER_BATCH} x {cfg.INPUT.MIN_SIZE_TRAIN[0]} px, "
        f"{args.iters} measured batches, {args.threads} threads, torch {torch.__version__}"
    )
    for k, v in med.items():
        spread = statistics.pstdev(times[k])
        print(f"{k:>16}: {v * 1000:8.1f} ms  (std {spread * 1000:.1f} ms)")
    ratio = med["KD step"] / (med["student step"] + med["teacher forward"])
    print(f"kd_overhead_ratio={ratio:.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
