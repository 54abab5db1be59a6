#!/usr/bin/env python
"""kd2's demo (``make demo``): does distillation beat training alone?

On kd2's bundled synthetic detection data it trains, with one schedule:
  1. a teacher (Faster R-CNN R18-FPN),
  2. a baseline student (Faster R-CNN MobileNetV3-FPN, narrower FPN and box head), per seed,
  3. the same student distilled from the teacher (DeFeat's FPN imitation), for each seed,
evaluates each with COCO metrics, prints a table (per seed, then mean ± std), writes a bar
chart and loss/AP curves as PNG, and ends with one machine-readable line::

    demo: teacher_AP=<x> student_AP=<y> distilled_AP=<z> gap_closed=<fraction>

(means over the seeds; gap_closed = (distilled - student) / (teacher - student)).

The same protocol measures any method on any pair, e.g. Rank Mimicking on the one-stage pair::

    python tools/demo.py --output output/bench/fcos \
        --teacher configs/synthetic/fcos_R18_teacher.yaml \
        --student configs/synthetic/fcos_MNv3_student.yaml \
        --distilled configs/synthetic/fcos_MNv3_RM.yaml

When the distilled config uses ``ClassifierKD``, the demo first trains its classifier teacher
(``tools/train_crop_classifier.py`` settings ``--classifier-arch`` / ``--classifier-crop-size`` /
``--classifier-epochs``, on the student config's data) into ``OUTPUT/crop_classifier``.

Finished runs are reused when their full config is unchanged (``--fresh`` retrains).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))

import torch  # noqa: E402

from kd2.data import DatasetCatalog  # noqa: E402
from kd2.engine import setup_cfg, setup_logger  # noqa: E402
from kd2.modeling.backends import get_backend  # noqa: E402
from kd2.utils.errors import run_main  # noqa: E402

logger = logging.getLogger("kd2.demo")

TEACHER = "configs/synthetic/faster_rcnn_R18_teacher.yaml"
STUDENT = "configs/synthetic/faster_rcnn_MNv3_student.yaml"
DISTILLED = "configs/synthetic/faster_rcnn_MNv3_DeFeat.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output", default=os.path.join(ROOT, "output", "demo"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fresh", action="store_true", help="retrain even if a finished run exists")
    p.add_argument("--teacher", default=TEACHER, help=f"teacher config (default {TEACHER})")
    p.add_argument(
        "--student", default=STUDENT, help=f"baseline student config (default {STUDENT})"
    )
    p.add_argument(
        "--distilled",
        default=DISTILLED,
        help=f"config of the distilled student (default {DISTILLED}); its teacher weights are "
        "replaced by the demo's teacher",
    )
    p.add_argument("--classifier-arch", default="resnet18", help="ClassifierKD teacher network")
    p.add_argument("--classifier-crop-size", type=int, default=64)
    p.add_argument("--classifier-epochs", type=int, default=8)
    p.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="KEY VALUE overrides applied to all three configs (e.g. SOLVER.MAX_ITER 50)",
    )
    return p.parse_args(argv)


def config_digest(cfg) -> str:
    """Hash of the full config, without the option nodes of KD methods the run does not use
    (so a method added to kd2 later does not invalidate finished runs)."""
    from kd2.config import method_node_name

    cfg = cfg.clone()
    cfg.defrost()
    keep = {method_node_name(m) for m in cfg.KD.METHODS} | {"TEACHER"}
    if cfg.KD.get("BALANCE", {}).get("MODE", "none") != "none":
        keep.add("BALANCE")  # the controller changes the run; "none" keeps older digests valid
    if cfg.KD.get("TEACHERS"):
        keep.add("TEACHERS")
    for key in [k for k, v in cfg.KD.items() if isinstance(v, dict) and k not in keep]:
        del cfg.KD[key]
    # keys added in kd2 0.4 (several teachers, the teacher's framework, the COCO evaluation
    # backend) at their defaults
    if cfg.TEST.get("COCO_EVAL_BACKEND", "") == "auto":
        cfg.TEST.pop("COCO_EVAL_BACKEND")
    for key, default in (
        ("BACKEND", ""),
        ("DTYPE", "float32"),
        ("CHANNELS_LAST", False),
        ("COMPILE", False),
        ("CACHE", ""),
    ):
        if cfg.KD.TEACHER.get(key, default) == default:
            cfg.KD.TEACHER.pop(key, None)
    for name in keep - {"TEACHER", "TEACHERS", "BALANCE"}:
        node = cfg.KD.get(name)
        if isinstance(node, dict) and node.get("TEACHER", None) == "":
            node.pop("TEACHER")
    if cfg.KD.get("BALANCE", {}).get("TARGET", None) == "middle":  # kd2 0.4's only rule
        cfg.KD.BALANCE.pop("TARGET")
    for arch in ("SSD", "GFL"):  # the architectures' nodes, added in kd2 0.3 and later
        if cfg.MODEL.META_ARCHITECTURE != arch:
            cfg.MODEL.pop(arch, None)
    if cfg.MODEL.META_ARCHITECTURE != "DETR":  # the transformers backend's keys (kd2 0.5)
        cfg.MODEL.pop("HF", None)
        for key, default in (("OPTIMIZER", "SGD"), ("BACKBONE_LR_FACTOR", 1.0)):
            if cfg.SOLVER.get(key, default) == default:
                cfg.SOLVER.pop(key, None)
    # the foundation teachers' and the ViT backbone's keys (kd2 0.6), unused by other runs
    if cfg.KD.TEACHER.get("BACKEND", "") != "foundation":
        cfg.KD.TEACHER.pop("FOUNDATION", None)
    if cfg.MODEL.BACKBONE.get("NAME", "") != "dinov2_vit":
        cfg.MODEL.BACKBONE.pop("VIT", None)
    return hashlib.sha256(cfg.dump().encode()).hexdigest()[:16]


def legacy_digest(cfg) -> str:
    """The hash kd2 0.1 wrote (full config, before the GLOBALKD, CLASSIFIERKD and MODEL.SSD
    nodes existed)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.KD.pop("GLOBALKD", None)
    cfg.KD.pop("CLASSIFIERKD", None)
    cfg.MODEL.pop("SSD", None)
    cfg.MODEL.pop("GFL", None)
    return hashlib.sha256(cfg.dump().encode()).hexdigest()[:16]


def run(name: str, config_file: str, opts: list, output_dir: str, fresh: bool) -> dict:
    """Train one config to the end (or reuse an identical finished run); return its results."""
    cfg = setup_cfg(os.path.join(ROOT, config_file), list(opts) + ["OUTPUT_DIR", output_dir])
    digest = config_digest(cfg)
    done_file = os.path.join(output_dir, "demo_result.json")
    if not fresh and os.path.isfile(done_file):
        with open(done_file) as f:
            done = json.load(f)
        if done.get("config_sha") in (digest, legacy_digest(cfg)):
            logger.info("%s: reusing the finished run in %s (same config)", name, output_dir)
            return done
    os.makedirs(output_dir, exist_ok=True)
    for stale in ("metrics.json", "last_checkpoint"):
        if os.path.exists(os.path.join(output_dir, stale)):
            os.remove(os.path.join(output_dir, stale))
    with open(os.path.join(output_dir, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    t0 = time.time()
    results = get_backend(cfg.MODEL.BACKEND).trainer(cfg).train()
    bbox = next(iter(results.values()))["bbox"]
    done = {"name": name, "config_sha": digest, "bbox": bbox, "train_seconds": time.time() - t0}
    with open(done_file, "w") as f:
        json.dump(done, f, indent=1)
    return done


def classifier_teacher(args, out: str) -> str:
    """Train (or reuse) the ClassifierKD teacher on the student config's data; its weights."""
    from kd2.engine.crop_classifier import train_crop_classifier
    from kd2.tv.build import num_classes_of

    folder = os.path.join(out, "crop_classifier")
    settings = {
        "arch": args.classifier_arch,
        "crop_size": args.classifier_crop_size,
        "epochs": args.classifier_epochs,
        "student": args.student,
    }
    done_file = os.path.join(folder, "demo_settings.json")
    weights = os.path.join(folder, "model_final.pth")
    if not args.fresh and os.path.isfile(done_file) and os.path.isfile(weights):
        with open(done_file) as f:
            if json.load(f) == settings:
                logger.info("crop classifier: reusing %s (same settings)", weights)
                return weights
    cfg = setup_cfg(os.path.join(ROOT, args.student), list(args.opts))
    result = train_crop_classifier(
        DatasetCatalog.get(cfg.DATASETS.TRAIN[0]),
        DatasetCatalog.get(cfg.DATASETS.TEST[0]),
        output_dir=folder,
        num_classes=num_classes_of(cfg),
        arch=args.classifier_arch,
        crop_size=args.classifier_crop_size,
        pixel_mean=cfg.MODEL.PIXEL_MEAN,
        pixel_std=cfg.MODEL.PIXEL_STD,
        epochs=args.classifier_epochs,
    )
    logger.info("crop classifier: val top-1 %.2f%% (%s)", result["top1"], weights)
    with open(done_file, "w") as f:
        json.dump(settings, f)
    return weights


def mean_std(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def read_metrics(output_dir: str):
    losses, aps = [], []
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return losses, aps
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            if "total_loss" in d:
                det = sum(v for k, v in d.items() if k.startswith("loss_") and "_kd_" not in k)
                losses.append((d["iteration"], det))
            if "eval" in d:
                aps.append((d["iteration"], next(iter(d["eval"].values()))["bbox"]["AP"]))
    return losses, aps


def plot(out: str, teacher_ap: float, student: list, distilled: list, runs: dict, method: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(5, 4))
    names = ["teacher", "student", "distilled\n" + method.split("_")[-1]]
    means = [teacher_ap, mean_std(student)[0], mean_std(distilled)[0]]
    errs = [0.0, mean_std(student)[1], mean_std(distilled)[1]]
    bars = ax.bar(names, means, yerr=errs, capsize=6, color=["#555", "#c44", "#2a7"])
    for i, ys in ((1, student), (2, distilled)):
        ax.scatter([i] * len(ys), ys, color="k", s=12, zorder=3)
    top = max(m + e for m, e in zip(means, errs))
    for b, m, e in zip(bars, means, errs):
        x = b.get_x() + b.get_width() / 2
        ax.text(x, m + e + 0.02 * top, f"{m:.1f}", ha="center", va="bottom", fontweight="bold")
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel("COCO AP (synthetic val)")
    ax.set_title(f"kd2 demo: mean ± std over {len(student)} seeds")
    fig.tight_layout()
    paths.append(os.path.join(out, f"demo_ap_{method}.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"teacher": "#555", "student": "#c44", "distilled": "#2a7"}
    for name, run_dir in runs.items():
        kind = name.split("_")[0]
        losses, aps = read_metrics(run_dir)
        label = name if name.endswith("seed0") or kind == "teacher" else None
        if losses:
            ax1.plot(*zip(*losses), color=colors[kind], alpha=0.8, label=label)
        if aps:
            ax2.plot(*zip(*aps), marker="o", color=colors[kind], alpha=0.8, label=label)
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("detection loss (without KD terms)")
    ax1.set_yscale("log")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("AP")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    paths.append(os.path.join(out, f"demo_curves_{method}.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def main(argv=None) -> None:
    args = parse_args(argv)
    os.chdir(ROOT)  # configs name each other (KD.TEACHER.CONFIG) relative to the repository
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    setup_logger(out)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t_start = time.time()
    DatasetCatalog.get("synthetic_train")  # generates the bundled data on first use
    DatasetCatalog.get("synthetic_val")

    jobs = [("teacher", args.teacher, [], "teacher")]
    for s in args.seeds:
        jobs.append((f"student_seed{s}", args.student, ["SEED", str(s)], f"student_seed{s}"))
    teacher_weights = os.path.join(out, "teacher", "model_final.pth")
    method = os.path.splitext(os.path.basename(args.distilled))[0]
    extra = []
    if "ClassifierKD" in setup_cfg(os.path.join(ROOT, args.distilled), list(args.opts)).KD.METHODS:
        extra = ["KD.CLASSIFIERKD.TEACHER.WEIGHTS", classifier_teacher(args, out)]
    for s in args.seeds:
        opts = ["SEED", str(s), "KD.TEACHER.WEIGHTS", teacher_weights] + extra
        jobs.append((f"distilled_seed{s}", args.distilled, opts, f"{method}_seed{s}"))
    results, runs = {}, {}
    for i, (name, config_file, opts, folder) in enumerate(jobs, 1):
        elapsed = time.time() - t_start
        logger.info("[%d/%d] %s (%s) — %.0fs elapsed", i, len(jobs), name, config_file, elapsed)
        runs[name] = os.path.join(out, folder)
        results[name] = run(name, config_file, list(args.opts) + opts, runs[name], args.fresh)
        logger.info("%s: AP=%.2f", name, results[name]["bbox"]["AP"])

    teacher_ap = results["teacher"]["bbox"]["AP"]
    student = [results[f"student_seed{s}"]["bbox"]["AP"] for s in args.seeds]
    distilled = [results[f"distilled_seed{s}"]["bbox"]["AP"] for s in args.seeds]
    sm, ss = mean_std(student)
    dm, ds = mean_std(distilled)
    gains = [d - s for s, d in zip(student, distilled)]
    gap = teacher_ap - sm
    gap_closed = (dm - sm) / gap if gap > 0 else float("nan")

    lines = [
        "",
        f"{'seed':>6} | {'teacher AP':>10} | {'student AP':>10} | "
        f"{'distilled AP':>12} | {'gain':>6}",
        "-" * 58,
    ]
    for s, a, b in zip(args.seeds, student, distilled):
        lines.append(f"{s:>6} | {teacher_ap:>10.2f} | {a:>10.2f} | {b:>12.2f} | {b - a:>+6.2f}")
    lines.append("-" * 58)
    gm, gs = mean_std(gains)
    lines.append(
        f"{'mean':>6} | {teacher_ap:>10.2f} | {sm:>6.2f}±{ss:<4.2f}| {dm:>8.2f}±{ds:<4.2f}| "
        f"{gm:>+6.2f}±{gs:.2f}"
    )
    lines.append(
        f"gap closed: {gap_closed:.2f} of the teacher-student gap "
        f"({teacher_ap:.2f} - {sm:.2f} = {gap:.2f} AP); distilled student: {args.distilled}"
    )
    for p in plot(out, teacher_ap, student, distilled, runs, method):
        lines.append(f"wrote {p}")
    lines.append(f"total time {time.time() - t_start:.0f}s")
    summary = {
        "teacher_AP": teacher_ap,
        "student_AP": student,
        "distilled_AP": distilled,
        "gain_mean": gm,
        "gain_std": gs,
        "gap_closed": gap_closed,
        "seeds": args.seeds,
    }
    with open(os.path.join(out, f"demo_summary_{method}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("\n".join(lines))
    print(
        f"demo: teacher_AP={teacher_ap:.2f} student_AP={sm:.2f} distilled_AP={dm:.2f} "
        f"gap_closed={gap_closed:.3f}"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    run_main(main)
