#!/usr/bin/env python
"""How much does distillation cost beyond running the two networks?

On the same batches of the demo's data and models (Faster R-CNN MobileNetV3-FPN student,
R18-FPN teacher, the demo's KD method) it times, interleaved per batch and after a warm-up:

* ``student step``   — plain torchvision student: forward, backward, SGD step;
* ``teacher forward`` — what KD runs of the teacher: its FPN and its ROI head on the student's
  sampled proposals, under ``no_grad`` (the student's record is prepared outside the timer);
* ``KD step``        — the KD meta-architecture: student forward, teacher forward, KD losses
  (adapters included), backward, SGD step;
* ``KD step + diagnostics`` — the same step when it also measures every term's gradient at the
  trunk (``KD.DIAG``, every ``KD.DIAG.PERIOD`` steps), reported as its extra cost averaged over
  the period (``diag_overhead``);

prints the median of each and, per config, ``KD step / student step`` and
``kd_overhead_ratio=<KD step / (student step + teacher forward)>``; then the first config's
``kd_step_vs_student_step=`` and, for each ``--teacher-options`` entry (``KD.TEACHER.DTYPE``
``bfloat16``, ``CHANNELS_LAST``, ``COMPILE``: kd2/modeling/teacher_runtime.py), the teacher forward
timed on the same batches with that option, ``teacher_forward_speedup_<option>=<float32 /
option>``. Several configs of one
student (``--configs a.yaml b.yaml ...``) are timed side by side on the same batches, so their
ratios compare within one run; ``--json`` writes them (``benchmarks/results/step_overhead.json``).

Weights do not change the cost, so both networks start from their random initialisation.
Usage: ``python benchmarks/step_overhead.py [--configs FILE ...] [--iters N] [--threads T]
[--json OUT]``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
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


def build_kd_model(config: str, teacher_dir: str, teacher_options=None, device: str = "cpu"):
    """The KD model of ``config`` with a randomly initialised teacher saved in ``teacher_dir``
    (weights do not change the cost); returns ``(cfg, model)``."""
    cfg = get_cfg()
    cfg.merge_from_file(config)
    teacher_config = os.path.join(ROOT, cfg.KD.TEACHER.CONFIG)
    tcfg = get_cfg()
    tcfg.merge_from_file(teacher_config)
    weights = os.path.join(teacher_dir, os.path.basename(teacher_config) + ".pth")
    if not os.path.isfile(weights):
        torch.manual_seed(0)
        torch.save({"model": build_plain_detector(tcfg).state_dict()}, weights)
    cfg.KD.TEACHER.CONFIG = teacher_config
    cfg.KD.TEACHER.WEIGHTS = weights
    for key, value in (teacher_options or {}).items():
        cfg.KD.TEACHER[key] = value
    cfg.MODEL.DEVICE = device
    return cfg, build_detector(cfg).train()


#: ``--teacher-options`` names -> KD.TEACHER keys
TEACHER_OPTIONS = {
    "bfloat16": {"DTYPE": "bfloat16"},
    "float16": {"DTYPE": "float16"},
    "channels_last": {"CHANNELS_LAST": True},
    "compile": {"COMPILE": True},
}


def _to(images, targets, device):
    return [im.to(device) for im in images], [
        {k: v.to(device) for k, v in t.items()} for t in targets
    ]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--configs",
        "--config",
        nargs="+",
        default=[os.path.join(ROOT, "configs/synthetic/faster_rcnn_MNv3_DeFeat.yaml")],
        help="KD configs of one student (timed side by side on the same batches)",
    )
    p.add_argument("--iters", type=int, default=15, help="measured batches")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", default="", help="also write the medians and ratios here")
    p.add_argument(
        "--teacher-options",
        nargs="*",
        default=["bfloat16", "channels_last"],
        choices=sorted(TEACHER_OPTIONS),
        help="teacher options timed against the float32 teacher (the first config's)",
    )
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    tmp = tempfile.mkdtemp(prefix="kd2_bench_")
    kd_models = {}
    for config in args.configs:
        cfg, model = build_kd_model(os.path.abspath(config), tmp, device=args.device)
        name = os.path.splitext(os.path.basename(config))[0]
        kd_models[name] = (cfg, model)
    first = os.path.abspath(args.configs[0])
    variants = {
        option: build_kd_model(first, tmp, TEACHER_OPTIONS[option], args.device)[1]
        for option in args.teacher_options
    }
    cfg = next(iter(kd_models.values()))[0]
    plain_cfg = cfg.clone()
    plain_cfg.KD.METHODS = []
    torch.manual_seed(0)
    student = build_plain_detector(plain_cfg).train()
    optimizers = {"student": torch.optim.SGD(student.parameters(), lr=1e-4, momentum=0.9)}
    for name, (kcfg, model) in kd_models.items():
        if kcfg.MODEL.META_ARCHITECTURE != cfg.MODEL.META_ARCHITECTURE:
            raise SystemExit(f"{name}: every config must distil the same student")
        model.load_state_dict(student.state_dict(), strict=False)
        optimizers[name] = torch.optim.SGD(
            [q for q in model.parameters() if q.requires_grad], lr=1e-4, momentum=0.9
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

    batches = [_to(images, targets, args.device) for images, targets in batches]
    shutil.rmtree(tmp, ignore_errors=True)  # the models and batches are built: nothing reads it
    times = {"student step": []}
    times.update({f"teacher forward, {option}": [] for option in variants})
    for name in kd_models:
        times[f"{name}: teacher forward"] = []
        times[f"{name}: KD step"] = []
        times[f"{name}: KD step + diagnostics"] = []
    for i, (images, targets) in enumerate(batches):
        t0 = time.perf_counter()
        step(student, optimizers["student"], images, targets)
        if i >= args.warmup:
            times["student step"].append(time.perf_counter() - t0)
        for name, (_, model) in kd_models.items():
            with torch.no_grad():
                rec, _ = model.student_step(images, copy.deepcopy(targets))
                t2 = time.perf_counter()
                model.teacher_step(rec)
                t3 = time.perf_counter()
            model.kd_iteration = 1  # not a diagnostics step (KD.DIAG.PERIOD does not divide 1)
            step(model, optimizers[name], images, targets)
            t4 = time.perf_counter()
            # the same step measuring the per-term trunk gradients (KD.DIAG), as every
            # KD.DIAG.PERIOD-th step does; the optimizer is stepped on zero gradients
            period, model.kd_diag_period = model.kd_diag_period, 1
            model.kd_iteration = 0
            losses = model(images, copy.deepcopy(targets))
            optimizers[name].zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizers[name].zero_grad(set_to_none=True)
            t5 = time.perf_counter()
            model.kd_diag_period = period
            if i >= args.warmup:
                times[f"{name}: teacher forward"].append(t3 - t2)
            if name == next(iter(kd_models)):  # the teacher options, on the same record
                for option, variant in variants.items():
                    with torch.no_grad():
                        t6 = time.perf_counter()
                        variant.teacher_step(rec)
                        if args.device.startswith("cuda"):
                            torch.cuda.synchronize()
                        if i >= args.warmup:
                            times[f"teacher forward, {option}"].append(time.perf_counter() - t6)
                times[f"{name}: KD step"].append(t4 - t3)
                times[f"{name}: KD step + diagnostics"].append(t5 - t4)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"student: {cfg.MODEL.META_ARCHITECTURE} {cfg.MODEL.BACKBONE.NAME}, batch "
        f"{cfg.SOLVER.IMS_PER_BATCH} x {cfg.INPUT.MIN_SIZE_TRAIN[0]} px, {args.iters} measured "
        f"batches, {args.threads} threads, torch {torch.__version__}"
    )
    for k, v in med.items():
        spread = statistics.pstdev(times[k])
        print(f"{k:>36}: {v * 1000:8.1f} ms  (std {spread * 1000:.1f} ms)")
    rows = {}
    for name, (kcfg, model) in kd_models.items():
        kd, tf = med[f"{name}: KD step"], med[f"{name}: teacher forward"]
        diag = med[f"{name}: KD step + diagnostics"]
        diag_period = int(kcfg.KD.DIAG.PERIOD) or 50
        rows[name] = {
            "methods": list(kcfg.KD.METHODS),
            "teacher_parts": sorted(model.teacher_parts),
            "student_step_ms": round(med["student step"] * 1000, 1),
            "teacher_forward_ms": round(tf * 1000, 1),
            "kd_step_ms": round(kd * 1000, 1),
            "kd_over_student": round(kd / med["student step"], 3),
            "kd_overhead_ratio": round(kd / (med["student step"] + tf), 3),
            "diag_step_ms": round(diag * 1000, 1),
            # the diagnostics' extra cost averaged over KD.DIAG.PERIOD steps, per KD step
            "diag_overhead": round((diag - kd) / diag_period / kd, 4),
        }
        print(
            f"{name}: teacher parts {rows[name]['teacher_parts']}, KD step / student step "
            f"{rows[name]['kd_over_student']:.3f}, kd_overhead_ratio="
            f"{rows[name]['kd_overhead_ratio']:.3f}, diagnostics every {diag_period} steps "
            f"cost {100 * rows[name]['diag_overhead']:.2f} % of a KD step"
        )
    first_name = next(iter(kd_models))
    t32 = med[f"{first_name}: teacher forward"]
    summary = {
        "kd_step_vs_student_step": med[f"{first_name}: KD step"] / med["student step"],
        "teacher_forward_share_of_kd_step": t32 / med[f"{first_name}: KD step"],
    }
    for option in variants:
        summary[f"teacher_forward_speedup_{option}"] = t32 / med[f"teacher forward, {option}"]
    for k, v in summary.items():
        print(f"{k}={v:.3f}")
    out = {
        "torch": torch.__version__,
        "threads": args.threads,
        "iters": args.iters,
        "batch": int(cfg.SOLVER.IMS_PER_BATCH),
        "input": int(cfg.INPUT.MIN_SIZE_TRAIN[0]),
        "device": args.device,
        "rows": rows,
        "summary": summary,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
    sys.stdout.flush()
    return out


if __name__ == "__main__":
    main()
