#!/usr/bin/env python
"""What distillation buys at inference: the teacher, the baseline student and the distilled
student side by side, in one run.

For each model: parameters, FLOPs of one test image (fvcore's counter, as Detectron2 uses: a
fused multiply-add counts as one), median latency at batch 1 and throughput at batch 8 on this
machine's CPU (and GPU when present), the peak resident memory of a process that loads the model
and runs batch 8, and the COCO AP on the config's validation split. Each model is measured in its
own subprocess (clean memory figures), one after the other, never concurrently.

    python benchmarks/inference.py \\
        --teacher configs/synthetic/faster_rcnn_R18_teacher.yaml output/bench/faster_rcnn/teacher/model_final.pth \\
        --student configs/synthetic/faster_rcnn_MNv3_student.yaml output/bench/faster_rcnn/student_seed0/model_final.pth \\
        --distilled configs/synthetic/faster_rcnn_MNv3_FGFI.yaml output/bench/faster_rcnn/faster_rcnn_MNv3_FGFI_seed0/model_final.pth

Prints one table and a last line ``student_speedup=<teacher latency / distilled latency>``;
writes ``benchmarks/results/inference.json`` and ``inference.png`` (AP against latency).
"""  # noqa: E501

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sample_images(cfg, count: int, backend: str):
    """``count`` RGB uint8 images of the validation split (repeated when it is smaller)."""
    import numpy as np
    from PIL import Image

    if backend == "torchvision":
        from kd2.data import DatasetCatalog
    else:
        from detectron2.data import DatasetCatalog

    records = DatasetCatalog.get(cfg.DATASETS.TEST[0])
    out = []
    for i in range(count):
        with Image.open(records[i % len(records)]["file_name"]) as im:
            out.append(np.array(im.convert("RGB")))
    return out


def _flops(predictor, image) -> float:
    import torch
    from fvcore.nn import FlopCountAnalysis

    if predictor.backend == "detectron2":
        from detectron2.utils.analysis import flop_count_operators

        inputs = predictor.model_inputs([image])
        return 1e9 * float(sum(flop_count_operators(predictor.model, inputs).values()))

    class Single(torch.nn.Module):  # one image in, tensors out: traceable by fvcore
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            out = self.model([x])[0]
            return out["boxes"], out["scores"], out["labels"]

    x = predictor.model_inputs([image])[0]
    analysis = FlopCountAnalysis(Single(predictor.model), (x,))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return float(analysis.total())


def measure(role: str, config: str, weights: str, repeats: int, threads: int) -> dict:
    """Everything about one model (runs in a subprocess)."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    sys.path.insert(0, ROOT)
    os.chdir(ROOT)
    os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))
    from kd2.engine.predictor import load_predictor
    from kd2.tv import evaluate

    predictor = load_predictor(config, weights=weights)
    model = predictor.model
    images = _sample_images(predictor.cfg, 8, predictor.backend)
    out = {
        "role": role,
        "config": os.path.relpath(config, ROOT),
        "weights": os.path.relpath(weights, ROOT),
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": _flops(predictor, images[0]) / 1e9,
    }
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        model.to(device)
        predictor.predict(images[:2])  # warm-up
        lat = []
        for i in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            predictor.predict([images[i % len(images)]])
            if device == "cuda":
                torch.cuda.synchronize()
            lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        n = max(1, repeats // 4)
        for _ in range(n):
            predictor.predict(images)
        if device == "cuda":
            torch.cuda.synchronize()
        out[f"{device}_latency_ms_b1"] = statistics.median(lat) * 1000
        out[f"{device}_images_per_s_b8"] = 8 * n / (time.perf_counter() - t0)
    model.to("cpu")
    out["peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    name = predictor.cfg.DATASETS.TEST[0]
    if predictor.backend == "torchvision":
        out["AP"] = float(evaluate(predictor.cfg, model)[name]["bbox"]["AP"])
    else:
        from kd2.d2 import KDTrainer

        res = KDTrainer.test(predictor.cfg, model)
        res = res.get(name, res) if isinstance(res, dict) else res
        out["AP"] = float(res["bbox"]["AP"])
    out["dataset"] = name
    return out


def _run(args_tuple, queue):
    queue.put(measure(*args_tuple))


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    colors = {"teacher": "tab:blue", "student": "tab:gray", "distilled": "tab:red"}
    for r in rows:
        ax.scatter(r["cpu_latency_ms_b1"], r["AP"], s=80, color=colors[r["role"]], zorder=3)
        ax.annotate(
            f"{r['role']}\n{r['AP']:.1f} AP, {r['cpu_latency_ms_b1']:.0f} ms",
            (r["cpu_latency_ms_b1"], r["AP"]),
            textcoords="offset points",
            xytext=(8, -4),
            fontsize=8,
        )
    student = [r for r in rows if r["role"] == "student"]
    distilled = [r for r in rows if r["role"] == "distilled"]
    if student and distilled:
        ax.annotate(
            "",
            xy=(distilled[0]["cpu_latency_ms_b1"], distilled[0]["AP"]),
            xytext=(student[0]["cpu_latency_ms_b1"], student[0]["AP"]),
            arrowprops={"arrowstyle": "->", "color": "tab:red"},
        )
    ax.set_xlabel("CPU latency, batch 1 (ms, median)")
    ax.set_ylabel("COCO AP (val)")
    ax.set_title("AP against latency")
    ax.grid(alpha=0.3)
    ax.set_xlim(0, 1.4 * max(r["cpu_latency_ms_b1"] for r in rows))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher", nargs=2, metavar=("CONFIG", "WEIGHTS"), required=True)
    p.add_argument("--student", nargs=2, metavar=("CONFIG", "WEIGHTS"), required=True)
    p.add_argument("--distilled", nargs=2, metavar=("CONFIG", "WEIGHTS"))
    p.add_argument("--repeats", type=int, default=40, help="batch-1 timings per model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    jobs = [("teacher", *args.teacher), ("student", *args.student)]
    if args.distilled:
        jobs.append(("distilled", *args.distilled))
    for role, config, weights in jobs:
        for path in (config, weights):
            if not os.path.isfile(path):
                raise SystemExit(f"error: --{role}: {path!r} does not exist")
    ctx = mp.get_context("spawn")
    rows = []
    for role, config, weights in jobs:
        queue = ctx.Queue()
        proc = ctx.Process(
            target=_run,
            args=((role, os.path.abspath(config), os.path.abspath(weights), args.repeats,
                   args.threads), queue),
        )  # fmt: skip
        proc.start()
        rows.append(queue.get())
        proc.join()
        print(f"[inference] {role}: {json.dumps(rows[-1])}", flush=True)
    import torch

    head = (
        f"{'model':<10} {'params (M)':>10} {'GFLOPs':>8} {'CPU ms (b1)':>12} {'img/s (b8)':>11} "
        f"{'peak RSS MB':>12} {'AP':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['role']:<10} {r['params_M']:>10.2f} {r['gflops']:>8.2f} "
            f"{r['cpu_latency_ms_b1']:>12.1f} {r['cpu_images_per_s_b8']:>11.1f} "
            f"{r['peak_rss_MB']:>12.0f} {r['AP']:>6.2f}"
        )
    last = rows[-1]
    speedup = rows[0]["cpu_latency_ms_b1"] / last["cpu_latency_ms_b1"]
    kept = 100.0 * last["AP"] / rows[0]["AP"] if rows[0]["AP"] > 0 else float("nan")
    result = {
        "rows": rows,
        "student_speedup": speedup,
        "ap_kept_percent": kept,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"),
    }
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "inference.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(rows, os.path.join(args.output, "inference.png"))
    print("\n".join(lines))
    print(f"the {last['role']} model keeps {kept:.0f} % of the teacher's AP at {speedup:.2f}x "
          "its speed (CPU, batch 1)")  # fmt: skip
    print(f"student_speedup={speedup:.3f}")


if __name__ == "__main__":
    main()
