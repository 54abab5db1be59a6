#!/usr/bin/env python
"""How much does distillation cost beyond running the two networks?

On the same batches of the demo's data and models (Faster R-CNN MobileNetV3-FPN student,
R18-FPN teacher, the demo's KD method) it times, interleaved per batch and after a warm-up:

* ``student step``   — plain torchvision student: forward, backward, SGD step;
* ``teacher forward`` — what KD runs of the teacher: its FPN and its ROI head on the student's
  sampled proposals, under ``no_grad`` (the student's record is prepared outside the timer);
* ``KD step``        — the KD meta-architecture: student forward, teacher forward, KD losses
  (adapters included), backward, SGD step, at an iteration without diagnostics;
* ``KD step + diagnostics`` — the same step at an iteration where it also measures every term's
  gradient at the trunk (``KD.DIAG.PERIOD``; under ``KD.BALANCE.MODE grad_share`` the
  controller's updates that fall on a ``KD.DIAG.PERIOD`` step), and ``KD step + controller
  diagnostics`` — at one of the controller's other updates, which measure the detection losses'
  and the KD terms' sum only (two trunk backward passes); the controller's state is restored
  after each timed step. Reported as the extra cost averaged over the config's own schedule
  (``diagnostics_every`` / ``controller_diagnostics_every``: steps per such step, counted with
  the model's ``kd_diagnostics_due`` and ``kd_diagnostics_per_term`` over 1000 iterations), per
  KD step (``diag_overhead``);

prints the median of each and, per config, ``KD step / student step`` and
``kd_overhead_ratio=<KD step / (student step + teacher forward)>``; then the first config's
``kd_step_vs_student_step=`` and, for each ``--teacher-options`` entry (``KD.TEACHER.DTYPE``
``bfloat16``, ``CHANNELS_LAST``, ``COMPILE``: kd2/modeling/teacher_runtime.py), the teacher forward
timed on the same batches with that option, ``teacher_forward_speedup_<option>=<float32 /
option>``. Several configs of one
student (``--configs a.yaml b.yaml ...``) are timed side by side on the same batches, so their
ratios compare within one run; ``--json`` writes them (``benchmarks/results/step_overhead.json``).

``--amp bfloat16 float16`` also times the student step and the first config's KD step under
``torch.autocast`` with that dtype (what ``SOLVER.AMP`` runs; float16 with a ``GradScaler`` on
CUDA), on copies of the models and the same batches, next to float32:
``amp_bf16_student_step_vs_fp32=<autocast time / float32 time>`` and
``amp_bf16_kd_step_vs_fp32=`` (below 1: faster), ``amp_fp16_...`` likewise;
``=unsupported`` where the device cannot run that autocast (the reason is in the JSON).
Last, ``diag_overhead_<config>=`` per config.

``--batch`` and ``--input`` override the configs' ``SOLVER.IMS_PER_BATCH`` and training input
size (a quick run: ``--batch 2 --input 64 --iters 1 --warmup 0``).

Weights do not change the cost, so both networks start from their random initialisation.
Usage: ``python benchmarks/step_overhead.py [--configs FILE ...] [--iters N] [--threads T]
[--amp bfloat16 float16] [--device cuda] [--json OUT]``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
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
from kd2.modeling.backends import get_backend  # noqa: E402
from kd2.utils.errors import ConfigError  # noqa: E402


def _trainer(cfg):
    """The kd2 trainer class of the config's backend (torchvision, transformers): its builders."""
    return get_backend(cfg.MODEL.BACKEND).trainer


def _override(cfg, batch: int = 0, size: int = 0) -> None:
    if batch:
        cfg.SOLVER.IMS_PER_BATCH = batch
    if size:
        cfg.INPUT.MIN_SIZE_TRAIN = (size,)
        cfg.INPUT.MAX_SIZE_TRAIN = size
        cfg.MODEL.HF.IMAGE_SIZE = size  # a DETR's square input (transformers backend)


def build_kd_model(
    config: str,
    teacher_dir: str,
    teacher_options=None,
    device: str = "cpu",
    batch: int = 0,
    size: int = 0,
):
    """The KD model of ``config`` with a randomly initialised teacher saved in ``teacher_dir``
    (weights do not change the cost); returns ``(cfg, model)``. ``batch`` / ``size`` (when
    non-zero) override ``SOLVER.IMS_PER_BATCH`` and the training input size."""
    cfg = get_cfg()
    cfg.merge_from_file(config)
    _override(cfg, batch, size)
    teacher_config = os.path.join(ROOT, cfg.KD.TEACHER.CONFIG)
    tcfg = get_cfg()
    tcfg.merge_from_file(teacher_config)
    weights = os.path.join(teacher_dir, os.path.basename(teacher_config) + ".pth")
    if not os.path.isfile(weights):
        torch.manual_seed(0)
        torch.save({"model": _trainer(tcfg).build_plain_model(tcfg).state_dict()}, weights)
    cfg.KD.TEACHER.CONFIG = teacher_config
    cfg.KD.TEACHER.WEIGHTS = weights
    for key, value in (teacher_options or {}).items():
        cfg.KD.TEACHER[key] = value
    cfg.MODEL.DEVICE = device
    return cfg, _trainer(cfg).build_model(cfg).train()


#: ``--teacher-options`` names -> KD.TEACHER keys
TEACHER_OPTIONS = {
    "bfloat16": {"DTYPE": "bfloat16"},
    "float16": {"DTYPE": "float16"},
    "channels_last": {"CHANNELS_LAST": True},
    "compile": {"COMPILE": True},
}
#: ``--amp`` names -> (autocast dtype, short name in the printed figures)
AMP_DTYPES = {"bfloat16": (torch.bfloat16, "bf16"), "float16": (torch.float16, "fp16")}


def _to(images, targets, device):
    return [im.to(device) for im in images], [
        {k: v.to(device) for k, v in t.items()} for t in targets
    ]


#: The two kinds of diagnostics steps (:meth:`kd2.modeling.distiller.DistillerMixin.
#: kd_diagnostics_per_term`): every term's trunk gradient, or the detection losses' and the KD
#: terms' sum only (the ``KD.BALANCE`` controller's steps in between).
DIAG_KINDS = ("diagnostics", "controller diagnostics")


def diag_schedule(model, start: int = 1000, horizon: int = 1000) -> tuple[int, dict]:
    """``(an iteration without diagnostics, {kind: (an iteration of that kind, its steps per
    step)})`` of a KD model, read from its own ``kd_diagnostics_due`` and
    ``kd_diagnostics_per_term`` over ``[start, start + horizon)`` (past every warm-up); a kind
    the schedule never runs is left out."""
    saved = model.kd_iteration
    kinds: dict[str, list[int]] = {kind: [] for kind in DIAG_KINDS}
    without = -1
    for it in range(start, start + horizon):
        model.kd_iteration = it
        if not model.kd_diagnostics_due():
            without = it if without < 0 else without
        else:
            kinds[DIAG_KINDS[0] if model.kd_diagnostics_per_term() else DIAG_KINDS[1]].append(it)
    model.kd_iteration = saved
    return without, {k: (its[0], len(its) / horizon) for k, its in kinds.items() if its}


class Stepper:
    """One training step (forward, backward, SGD step), optionally under ``torch.autocast``
    (float16 on CUDA with a ``GradScaler``, as ``SOLVER.AMP`` runs it)."""

    def __init__(self, device: str, amp: str | None = None):
        self.device_type = torch.device(device).type
        self.dtype = AMP_DTYPES[amp][0] if amp else None
        use_scaler = amp == "float16" and self.device_type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=use_scaler)

    def __call__(self, model, opt, images, targets) -> None:
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None):
            losses = model(images, copy.deepcopy(targets))
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(sum(losses.values())).backward()
        self.scaler.step(opt)
        self.scaler.update()


def amp_supported(device: str, amp: str) -> str:
    """``""`` when ``torch.autocast`` with ``amp`` can run on ``device``, else the reason."""
    device_type = torch.device(device).type
    dtype = AMP_DTYPES[amp][0]
    if not torch.amp.is_autocast_available(device_type):
        return f"no autocast on {device_type}"
    if device_type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return "this GPU has no bfloat16"
    try:
        with torch.autocast(device_type, dtype=dtype):
            x = torch.ones(1, 2, 8, 8, device=device)
            torch.nn.functional.conv2d(x, torch.ones(2, 2, 3, 3, device=device)).sum()
    except (RuntimeError, NotImplementedError, AssertionError) as e:
        return f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return ""


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
    p.add_argument(
        "--amp",
        nargs="*",
        default=[],
        choices=sorted(AMP_DTYPES),
        help="autocast dtypes: the student step and the first config's KD step under each",
    )
    p.add_argument("--no-diag", action="store_true", help="do not time the diagnostics step")
    p.add_argument("--batch", type=int, default=0, help="override SOLVER.IMS_PER_BATCH")
    p.add_argument("--input", type=int, default=0, help="override the training input size")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = args.device
    for config in args.configs:
        if not os.path.isfile(config):
            raise SystemExit(f"step_overhead: no such config: {config}")

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    tmp = tempfile.mkdtemp(prefix="kd2_bench_")
    sizes = {"batch": args.batch, "size": args.input}
    kd_models = {}
    for config in args.configs:
        cfg, model = build_kd_model(os.path.abspath(config), tmp, device=device, **sizes)
        name = os.path.splitext(os.path.basename(config))[0]
        kd_models[name] = (cfg, model)
    first = os.path.abspath(args.configs[0])
    first_name = next(iter(kd_models))
    variants = {}
    for option in args.teacher_options:
        try:
            variants[option] = build_kd_model(first, tmp, TEACHER_OPTIONS[option], device, **sizes)[
                1
            ]
        except ConfigError as e:  # e.g. a transformers teacher: no backbone option applies
            print(f"step_overhead: teacher option {option} skipped: {e.what}")
    cfg = next(iter(kd_models.values()))[0]
    plain_cfg = cfg.clone()
    plain_cfg.KD.METHODS = []
    torch.manual_seed(0)
    student = _trainer(plain_cfg).build_plain_model(plain_cfg).train()

    def sgd(model):
        return torch.optim.SGD(
            [q for q in model.parameters() if q.requires_grad], lr=1e-4, momentum=0.9
        )

    optimizers = {"student": sgd(student)}
    for name, (kcfg, model) in kd_models.items():
        if kcfg.MODEL.META_ARCHITECTURE != cfg.MODEL.META_ARCHITECTURE:
            raise SystemExit(f"{name}: every config must distil the same student")
        model.load_state_dict(student.state_dict(), strict=False)
        optimizers[name] = sgd(model)
    schedule = {name: diag_schedule(model) for name, (_, model) in kd_models.items()}
    # the autocast steps run on copies (a float16 step must not change the float32 models)
    amp_unsupported = {amp: amp_supported(device, amp) for amp in args.amp}
    amp_models = {}
    for amp in args.amp:
        if not amp_unsupported[amp]:
            s_copy = copy.deepcopy(student)
            kd_copy = copy.deepcopy(kd_models[first_name][1])
            amp_models[amp] = (Stepper(device, amp), s_copy, sgd(s_copy), kd_copy, sgd(kd_copy))

    records = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    loader = build_train_loader(
        DetectionDataset(records, train=True),
        batch_size_per_rank=cfg.SOLVER.IMS_PER_BATCH,
        seed=0,
    )
    off = _trainer(plain_cfg).label_offset(student)
    batches = []
    for _ in range(args.warmup + args.iters):
        images, targets = next(loader)
        batches.append(
            (images, [{"boxes": t["boxes"], "labels": t["labels"] + off} for t in targets])
        )
    batches = [_to(images, targets, device) for images, targets in batches]
    shutil.rmtree(tmp, ignore_errors=True)  # the models and batches are built: nothing reads it

    step = Stepper(device)

    def timed(fn, *a) -> float:
        sync()
        t0 = time.perf_counter()
        fn(*a)
        sync()
        return time.perf_counter() - t0

    times = {"student step": []}
    times.update({f"teacher forward, {option}": [] for option in variants})
    for amp in amp_models:
        times[f"student step, autocast {amp}"] = []
        times[f"{first_name}: KD step, autocast {amp}"] = []
    for name in kd_models:
        times[f"{name}: teacher forward"] = []
        times[f"{name}: KD step"] = []
        if not args.no_diag:
            for kind in schedule[name][1]:
                times[f"{name}: KD step + {kind}"] = []
    # a first step of each autocast kind outside the timers: an error there means unsupported
    images, targets = batches[0]
    for amp, (stepper, s_copy, s_opt, kd_copy, kd_opt) in list(amp_models.items()):
        try:
            kd_copy.kd_iteration = schedule[first_name][0]
            stepper(s_copy, s_opt, images, targets)
            stepper(kd_copy, kd_opt, images, targets)
        except (RuntimeError, NotImplementedError, TypeError) as e:
            amp_unsupported[amp] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            del amp_models[amp]
            del (
                times[f"student step, autocast {amp}"],
                times[f"{first_name}: KD step, autocast {amp}"],
            )
    for i, (images, targets) in enumerate(batches):
        measured = i >= args.warmup
        sample = {"student step": timed(step, student, optimizers["student"], images, targets)}
        for amp, (stepper, s_copy, s_opt, kd_copy, kd_opt) in amp_models.items():
            sample[f"student step, autocast {amp}"] = timed(stepper, s_copy, s_opt, images, targets)
            kd_copy.kd_iteration = schedule[first_name][0]
            sample[f"{first_name}: KD step, autocast {amp}"] = timed(
                stepper, kd_copy, kd_opt, images, targets
            )
        for name, (_, model) in kd_models.items():
            without, kinds = schedule[name]
            with torch.no_grad():
                rec, _ = model.student_step(images, copy.deepcopy(targets))
                sample[f"{name}: teacher forward"] = timed(model.teacher_step, rec)
                if name == first_name:  # the teacher options, on the same record
                    for option, variant in variants.items():
                        sample[f"teacher forward, {option}"] = timed(variant.teacher_step, rec)
            model.kd_iteration = without
            sample[f"{name}: KD step"] = timed(step, model, optimizers[name], images, targets)
            for kind, (with_diag, _) in kinds.items():
                if f"{name}: KD step + {kind}" not in times:
                    continue
                # the same step at an iteration that measures the trunk gradients (and updates
                # the KD.BALANCE controller, whose state is put back afterwards)
                balance = copy.deepcopy(model.kd_balance.__dict__) if model.kd_balance else None
                model.kd_iteration = with_diag
                sample[f"{name}: KD step + {kind}"] = timed(
                    step, model, optimizers[name], images, targets
                )
                if balance is not None:
                    model.kd_balance.__dict__.update(balance)
        if measured:
            for k, v in sample.items():
                times[k].append(v)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"student: {cfg.MODEL.META_ARCHITECTURE} {cfg.MODEL.BACKBONE.NAME}, batch "
        f"{cfg.SOLVER.IMS_PER_BATCH} x {cfg.INPUT.MIN_SIZE_TRAIN[0]} px, {args.iters} measured "
        f"batches, {args.threads} threads, torch {torch.__version__}, {device}"
    )
    for k, v in med.items():
        spread = statistics.pstdev(times[k])
        print(f"{k:>44}: {v * 1000:8.1f} ms  (std {spread * 1000:.1f} ms)")
    rows = {}
    for name, (kcfg, model) in kd_models.items():
        kd, tf = med[f"{name}: KD step"], med[f"{name}: teacher forward"]
        rows[name] = {
            "methods": list(kcfg.KD.METHODS),
            "balance": str(kcfg.KD.BALANCE.MODE),
            "teacher_parts": sorted(model.teacher_parts),
            "student_step_ms": round(med["student step"] * 1000, 1),
            "teacher_forward_ms": round(tf * 1000, 1),
            "kd_step_ms": round(kd * 1000, 1),
            "kd_over_student": round(kd / med["student step"], 3),
            "kd_overhead_ratio": round(kd / (med["student step"] + tf), 3),
        }
        line = ""
        timed_kinds = {
            kind: rate
            for kind, (_, rate) in schedule[name][1].items()
            if f"{name}: KD step + {kind}" in med
        }
        if timed_kinds:
            overhead = 0.0
            for kind, rate in timed_kinds.items():
                diag = med[f"{name}: KD step + {kind}"]
                key = kind.replace(" ", "_")
                rows[name][f"{key}_step_ms"] = round(diag * 1000, 1)
                rows[name][f"{key}_every"] = round(1 / rate, 2)
                overhead += (diag - kd) * rate / kd
            # the diagnostics' extra cost averaged over the schedule, per KD step
            rows[name]["diag_overhead"] = round(overhead, 4)
            every = ", ".join(f"{k} every {1 / r:.3g} steps" for k, r in timed_kinds.items())
            line = f", {every} cost {100 * overhead:.2f} % of a KD step"
        print(
            f"{name}: teacher parts {rows[name]['teacher_parts']}, KD step / student step "
            f"{rows[name]['kd_over_student']:.3f}, kd_overhead_ratio="
            f"{rows[name]['kd_overhead_ratio']:.3f}{line}"
        )
    t32 = med[f"{first_name}: teacher forward"]
    summary: dict[str, float | str] = {
        "kd_step_vs_student_step": med[f"{first_name}: KD step"] / med["student step"],
        "teacher_forward_share_of_kd_step": t32 / med[f"{first_name}: KD step"],
    }
    for option in variants:
        summary[f"teacher_forward_speedup_{option}"] = t32 / med[f"teacher forward, {option}"]
    for amp in args.amp:
        short = AMP_DTYPES[amp][1]
        if amp in amp_models:
            summary[f"amp_{short}_student_step_vs_fp32"] = (
                med[f"student step, autocast {amp}"] / med["student step"]
            )
            summary[f"amp_{short}_kd_step_vs_fp32"] = (
                med[f"{first_name}: KD step, autocast {amp}"] / med[f"{first_name}: KD step"]
            )
        else:
            summary[f"amp_{short}_student_step_vs_fp32"] = "unsupported"
            summary[f"amp_{short}_kd_step_vs_fp32"] = "unsupported"
            print(f"autocast {amp} on {device}: unsupported ({amp_unsupported[amp]})")
    for k, v in summary.items():
        print(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}")
    for name, row in rows.items():
        if "diag_overhead" in row:
            print(f"diag_overhead_{name}={row['diag_overhead']:.4f}")
    out = {
        "torch": torch.__version__,
        "machine": (
            torch.cuda.get_device_name(torch.device(device))
            if device.startswith("cuda")
            else f"{platform.machine()} CPU, {os.cpu_count()} cores"
        ),
        "threads": args.threads,
        "iters": args.iters,
        "batch": int(cfg.SOLVER.IMS_PER_BATCH),
        "input": int(cfg.INPUT.MIN_SIZE_TRAIN[0]),
        "device": device,
        "rows": rows,
        "summary": summary,
    }
    if args.amp:
        out["amp_unsupported"] = {k: v for k, v in amp_unsupported.items() if v}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
    sys.stdout.flush()
    return out


if __name__ == "__main__":
    main()
