#!/usr/bin/env python
"""Draw a distillation run's diagnostics: is the teacher helping, and how hard does each term pull?

    python tools/plot_kd_diagnostics.py OUTPUT_DIR [--out FILE.png]

Reads ``OUTPUT_DIR/metrics.json`` (kd2's torchvision trainer or Detectron2's ``KDTrainer``: one
JSON object per line with ``iteration``) and draws, over the iterations:

1. the loss terms — the detection losses summed, and every ``loss_kd_*`` term;
2. each term's share of the gradient at the student's trunk (``grad_share/<term>``, measured
   every ``KD.DIAG.PERIOD`` iterations) and the KD terms' sum's (``grad_share/kd``, also at every
   ``KD.BALANCE`` update: the share the controller holds), with the band when the run used one;
3. each KD term's cosine with the detection gradient (``grad_cos/<term>``; > 0: it pulls the
   trunk the way the detection losses do), and the detection gradient's cosine with the KD terms'
   sum (``grad_cos/detection``);
4. the ``KD.BALANCE`` multipliers (``kd_multiplier/<term>``), when present.

Writes ``OUTPUT_DIR/kd_diagnostics.png`` (or ``--out``) and prints its path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from kd2.utils.errors import DataError, MissingFileError, run_main  # noqa: E402


def read_series(metrics_file: str) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(iteration, value), ...]}`` of every numeric top-level key of the file."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(metrics_file) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            it = d.get("iteration")
            if it is None:
                continue
            detection = [
                v
                for k, v in d.items()
                if k.startswith("loss_") and not k.startswith("loss_kd_") and _num(v)
            ]
            if detection:
                series["detection losses"].append((it, sum(detection)))
            for k, v in d.items():
                if _num(v) and (
                    k.startswith(("loss_kd_", "grad_share/", "grad_cos/", "kd_multiplier/"))
                ):
                    series[k].append((it, float(v)))
    return series


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def band_from_config(output_dir: str) -> tuple[float, float] | None:
    """``(LOW, HIGH)`` of ``KD.BALANCE`` in the run's ``config.yaml`` when its mode is on."""
    path = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    node = (cfg.get("KD") or {}).get("BALANCE") or {}
    if str(node.get("MODE", "none")).lower() == "none":
        return None
    return float(node.get("LOW", 0.0)), float(node.get("HIGH", 1.0))


def plot(output_dir: str, out: str) -> str:
    metrics = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(metrics):
        raise MissingFileError(
            f"{metrics} does not exist", "give the OUTPUT_DIR of a kd2 training run"
        )
    series = read_series(metrics)
    shares = {k: v for k, v in series.items() if k.startswith("grad_share/")}
    if not shares:
        raise DataError(
            f"{metrics} has no grad_share/ entries: the run measured no diagnostics (a run "
            "without distillation, or KD.DIAG.PERIOD 0)",
            "train with KD.METHODS set and KD.DIAG.PERIOD > 0",
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    multipliers = {k: v for k, v in series.items() if k.startswith("kd_multiplier/")}
    panels = 4 if multipliers else 3
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    losses = {k: v for k, v in series.items() if k == "detection losses" or k.startswith("loss_")}
    for k, v in sorted(losses.items()):
        axes[0].plot(*zip(*v), label=k, lw=1.2)
    axes[0].set_yscale("log")
    axes[0].set_title("loss terms")
    for k, v in sorted(shares.items()):
        label = "kd (the terms' sum)" if k == "grad_share/kd" else k.split("/", 1)[1]
        axes[1].plot(*zip(*v), marker=".", label=label)
    band = band_from_config(output_dir)
    if band:
        axes[1].axhspan(*band, color="#2a7", alpha=0.15, label="KD.BALANCE band")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("share of the trunk gradient")
    for k, v in sorted(series.items()):
        if k.startswith("grad_cos/") and k != "grad_cos/kd":  # kd's is detection's
            axes[2].plot(*zip(*v), marker=".", label=k.split("/", 1)[1])
    axes[2].axhline(0.0, color="k", lw=0.8)
    axes[2].set_ylim(-1, 1)
    axes[2].set_title("cosine with the detection gradient")
    if multipliers:
        for k, v in sorted(multipliers.items()):
            axes[3].plot(*zip(*v), marker=".", label=k.split("/", 1)[1])
        axes[3].set_yscale("log")
        axes[3].set_title("KD.BALANCE multipliers")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    fig.suptitle(os.path.basename(os.path.normpath(output_dir)))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("output_dir")
    p.add_argument("--out", default="", help="PNG path (default OUTPUT_DIR/kd_diagnostics.png)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.output_dir, "kd_diagnostics.png")
    print(plot(args.output_dir, out))
    return 0


if __name__ == "__main__":
    run_main(main)
