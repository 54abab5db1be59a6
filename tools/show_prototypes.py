#!/usr/bin/env python
"""Show Global-Knowledge prototypes: which instances the PGM treats as typical, which as noisy.

For a prototype file written by the PGM (``OUTPUT_DIR/pgm/prototypes_<iteration>.json``) it
saves, per FPN level, a PNG grid of each class's prototypes drawn as the image crops of the
instances they came from (rows = classes, columns = prototypes in pick order, a repeated pick is
marked), and one PNG with the distribution of the robustness η over the PGM instances per level,
with the least robust instances' crops::

    python tools/show_prototypes.py \\
        output/synthetic/faster_rcnn_MNv3_GlobalKD/pgm/prototypes_0000225.json \\
        --output prototypes/ [--class-names a b c ...] [--levels 4 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kd2.utils.errors import ConfigError, DataError, MissingFileError, run_main  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("prototype_file", help="a prototypes_<iteration>.json written by the PGM")
    p.add_argument("--output", default=None, help="folder for the PNGs (default: beside the file)")
    p.add_argument("--class-names", nargs="*", default=None, help="names of classes 0..K-1")
    p.add_argument("--levels", nargs="*", type=int, default=None, help="strides to draw")
    p.add_argument("--noisy", type=int, default=8, help="least-robust instances to show")
    p.add_argument("--crop-size", type=int, default=64, help="pixels per crop in the grid")
    return p.parse_args(argv)


def load_report(path: str) -> dict:
    if not os.path.isfile(path):
        raise MissingFileError(
            f"no prototype file {path!r}",
            "give a OUTPUT_DIR/pgm/prototypes_<iteration>.json, which the PGM writes when a "
            "GlobalKD run refreshes its prototypes",
        )
    with open(path) as f:
        report = json.load(f)
    for key in ("levels", "instances", "iteration"):
        if key not in report:
            raise DataError(
                f"{path!r} is not a PGM prototype file (no {key!r} entry)",
                "give a prototypes_<iteration>.json from OUTPUT_DIR/pgm/",
            )
    return report


class CropReader:
    """Instance crops (resized to a square), images read once."""

    def __init__(self, size: int):
        self.size = size
        self.cache: dict[str, np.ndarray] = {}

    def crop(self, instance: dict) -> np.ndarray:
        import cv2

        path = instance["file_name"]
        if path not in self.cache:
            img = cv2.imread(path, cv2.IMREAD_COLOR)
            if img is None:
                img = np.zeros((self.size, self.size, 3), np.uint8)  # image moved: grey tile
                img[:] = 127
            self.cache[path] = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        img = self.cache[path]
        h, w = img.shape[:2]
        x1, y1, x2, y2 = instance["box"]
        x1, y1 = int(max(0, np.floor(x1))), int(max(0, np.floor(y1)))
        x2, y2 = int(min(w, np.ceil(x2))), int(min(h, np.ceil(y2)))
        patch = img[y1 : max(y2, y1 + 1), x1 : max(x2, x1 + 1)]
        return cv2.resize(patch, (self.size, self.size), interpolation=cv2.INTER_LINEAR)


def draw_level(report, stride, names, reader, out_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    level = report["levels"][str(stride)]
    protos = {int(c): v for c, v in level["prototypes"].items()}
    eta = level["eta"]
    if not protos:
        return
    classes = sorted(protos)
    cols = max(len(v) for v in protos.values())
    fig, axes = plt.subplots(
        len(classes), cols, figsize=(1.3 * cols, 1.45 * len(classes)), squeeze=False
    )
    for r, c in enumerate(classes):
        seen = set()
        for k in range(cols):
            ax = axes[r][k]
            ax.set_xticks([])
            ax.set_yticks([])
            if k >= len(protos[c]):
                ax.axis("off")
                continue
            i = protos[c][k]
            ax.imshow(reader.crop(report["instances"][i]))
            repeat = i in seen
            seen.add(i)
            ax.set_title(f"#{i} η={eta[i]:.2f}" + (" (again)" if repeat else ""), fontsize=6)
            if k == 0:
                ax.set_ylabel(names[c] if c < len(names) else f"class {c}", fontsize=8)
    fig.suptitle(f"prototypes, stride {stride}, iteration {report['iteration']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=130)
    plt.close(fig)


def draw_eta(report, strides, reader, noisy: int, out_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(10, 3.2 + 1.3 * len(strides)))
    grid = fig.add_gridspec(1 + len(strides), noisy)
    ax = fig.add_subplot(grid[0, :])
    for s in strides:
        ax.hist(
            report["levels"][str(s)]["eta"], bins=40, range=(0, 1), alpha=0.5, label=f"stride {s}"
        )
    ax.set_xlabel("robustness η (1 = teacher and student see the instance alike)")
    ax.set_ylabel("instances")
    ax.legend(fontsize=7)
    for r, s in enumerate(strides, start=1):
        eta = np.asarray(report["levels"][str(s)]["eta"])
        for k, i in enumerate(np.argsort(eta, kind="stable")[:noisy]):
            a = fig.add_subplot(grid[r, k])
            a.imshow(reader.crop(report["instances"][int(i)]))
            a.set_xticks([])
            a.set_yticks([])
            a.set_title(f"η={eta[i]:.2f}", fontsize=6)
            if k == 0:
                a.set_ylabel(f"least robust\nstride {s}", fontsize=7)
    fig.suptitle(
        f"η over {len(report['instances'])} PGM instances, iteration {report['iteration']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    report = load_report(args.prototype_file)
    out = args.output or os.path.dirname(os.path.abspath(args.prototype_file))
    os.makedirs(out, exist_ok=True)
    strides = sorted(int(s) for s in report["levels"])
    if args.levels:
        missing = sorted(set(args.levels) - set(strides))
        if missing:
            raise ConfigError(
                f"--levels: strides {missing} are not in the file", f"use some of {strides}"
            )
        strides = sorted(args.levels)
    if not report["instances"]:
        raise DataError(
            "the file has no PGM instances (no training box passed MIN_BOX_SIZE)",
            "lower KD.GLOBALKD's MIN_BOX_SIZE or check the training boxes",
        )
    num_classes = 1 + max(d["label"] for d in report["instances"])
    names = args.class_names or [f"class {c}" for c in range(num_classes)]
    reader = CropReader(args.crop_size)
    stem = os.path.splitext(os.path.basename(args.prototype_file))[0]
    written = []
    for s in strides:
        path = os.path.join(out, f"{stem}_stride{s}.png")
        draw_level(report, s, names, reader, path)
        written.append(path)
    path = os.path.join(out, f"{stem}_eta.png")
    draw_eta(report, strides, reader, args.noisy, path)
    written.append(path)
    for p in written:
        print(f"wrote {p}")
    return written


if __name__ == "__main__":
    run_main(main)
