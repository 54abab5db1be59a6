"""A first-contact report on a detection dataset: does it suit the configured detector?

:func:`dataset_report` reads kd2 records (see :mod:`kd2.data.coco`) and a kd2 config and measures
what decides whether a detector can learn the data at all: images and boxes per image, image
sides, the training resize of torchvision's ``GeneralizedRCNNTransform``, box sizes *after* that
resize (``sqrt(w * h)`` in network-input pixels) against the anchor sizes, class counts and the
detector's per-image output limits. It returns a JSON-serialisable dict whose ``"warnings"`` say,
in plain words, what to change. :func:`format_report` renders it for a log,
:func:`plot_box_sizes` draws the box-size histogram with the anchors, and
:func:`write_dataset_report` writes ``dataset_report.json`` and ``dataset_report.png``.

The resize (training, as torchvision does it): ``scale = min(min_size / short_side, max_size /
long_side)`` with ``min_size = INPUT.MIN_SIZE_TRAIN[-1]`` (torchvision draws one of the values at
random per image; kd2 configs list the largest last) and ``max_size = INPUT.MAX_SIZE_TRAIN``, up to
rounding of the resized image. SSD resizes every image to the fixed ``MODEL.SSD.SIZE`` square: its
per-axis scales differ, and the report uses their geometric mean ``sqrt(sx * sy)`` (what
``sqrt(w * h)`` of a box is multiplied by).

Anchor sizes: ``MODEL.ANCHOR_GENERATOR.SIZES``, or when empty the architecture's torchvision
default (Faster R-CNN 32..512, one per level; RetinaNet three per octave from 32; FCOS one per
level equal to the strides 8..128). SSD's default boxes are computed exactly as torchvision's
builders make them (``sqrt(w * h)`` of each default box is ``s_k * SIZE`` or
``sqrt(s_k * s_k+1) * SIZE``; SSD300-VGG16 for ``BACKBONE.NAME`` ``vgg16``, else SSDLite), ignoring
their clipping at the image border.

Warnings and their thresholds:

1. **small boxes** - more than :data:`SMALL_BOX_MAX_FRACTION` (10 %) of the boxes are smaller
   than half the smallest anchor after the resize. A square box of half an anchor's side, even
   perfectly centred, has IoU 0.25 with it: below every matcher's positive threshold (RPN 0.7,
   RetinaNet and SSD 0.5), and below RetinaNet's 0.4 negative threshold, so the box is left to
   the matchers' low-quality fallback (its single best anchor) and is mostly learned as
   background. (FCOS: its "anchor" is the level stride; a box under half the finest stride holds
   no feature location more often than not.) 10 % leaves room for the tail of tiny boxes every
   real dataset has: a 294-image COCO 2017 subset has 3 % at 800/1333 with the default 32-px
   anchors (the crowded aerial case: about half).
2. **downscaled images** - images shrunk by more than 2x (scale < :data:`DOWNSCALE_MIN`) for
   training, where a 10-px object becomes under 5 px: warned when they are at least
   :data:`DOWNSCALE_MIN_IMAGE_FRACTION` (10 %) of the images, or any is shrunk more than 4x
   (scale < :data:`DOWNSCALE_SEVERE`), so that a few large photos among many (COCO with SSD300:
   3 % of the images at scale 0.47) stay quiet.
3. **rare classes** - a class with fewer than :data:`RARE_CLASS_MIN_BOXES` (10) boxes, or fewer
   than :data:`RARE_CLASS_MEAN_FRACTION` (a tenth) of the mean boxes per class (or none at
   all). Relative to the mean rather than to all boxes, so that it scales with the number of
   classes (with 80 COCO classes, 1 % of all boxes would flag half of them).
4. **crowded images** - an image with more boxes than ``TEST.DETECTIONS_PER_IMAGE`` (the
   detector's output cap, so recall there is capped whatever the model learns), or, for Faster
   R-CNN, than ``MODEL.RPN.POST_NMS_TOPK_TRAIN`` / ``_TEST`` proposals.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np

from kd2.config import NUM_CLASSES_KEYS
from kd2.utils.checkpoint import write_text_atomic  # kd2.engine imports kd2.data

__all__ = [
    "dataset_report",
    "format_report",
    "plot_box_sizes",
    "write_dataset_report",
    "anchor_sizes_of",
    "SMALL_BOX_MAX_FRACTION",
    "DOWNSCALE_MIN",
    "DOWNSCALE_MIN_IMAGE_FRACTION",
    "DOWNSCALE_SEVERE",
    "RARE_CLASS_MIN_BOXES",
    "RARE_CLASS_MEAN_FRACTION",
]

logger = logging.getLogger(__name__)

#: Warn when more than this share of boxes is smaller than half the smallest anchor.
SMALL_BOX_MAX_FRACTION = 0.10
#: Images whose training resize scale is below this are "downscaled"; warned when they are at
#: least DOWNSCALE_MIN_IMAGE_FRACTION of the images or one is below DOWNSCALE_SEVERE.
DOWNSCALE_MIN = 0.5
DOWNSCALE_MIN_IMAGE_FRACTION = 0.10
DOWNSCALE_SEVERE = 0.25
#: A class with fewer boxes than this count, or than this share of the mean per class, is rare.
RARE_CLASS_MIN_BOXES = 10
RARE_CLASS_MEAN_FRACTION = 0.1

# log2-spaced histogram bins of box sizes: 1 px .. 4096 px, four bins per octave
_HIST_EDGES = 2.0 ** np.arange(0.0, 12.0 + 1e-9, 0.25)
# the finest feature stride of each architecture's torchvision FPN (anchors below it leave gaps)
_FINEST_STRIDE = {"FasterRCNN": 4, "RetinaNet": 8, "FCOS": 8}


# --------------------------------------------------------------------------------------------
# config look-ups
# --------------------------------------------------------------------------------------------


def _arch(cfg) -> str:
    arch = str(cfg.MODEL.META_ARCHITECTURE)
    # Detectron2's two-stage detector reads like Faster R-CNN here (same keys, same resize rule)
    return "FasterRCNN" if arch == "GeneralizedRCNN" else arch


def _num_classes(cfg, arch: str) -> int | None:
    key = NUM_CLASSES_KEYS.get(arch)
    if key is None:
        return None
    node = cfg
    for part in key.split(".")[:-1]:
        node = getattr(node, part, None)
        if node is None:
            return None
    value = getattr(node, key.split(".")[-1], None)
    return int(value) if value is not None else None


def _ssd_default_box_sizes(cfg) -> List[List[float]]:
    """``sqrt(w * h)`` of torchvision's SSD default boxes per level, in input pixels."""
    size = float(cfg.MODEL.SSD.SIZE)
    if str(cfg.MODEL.BACKBONE.NAME) == "vgg16":  # ssd300_vgg16
        scales = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]
    else:  # ssdlite320_mobilenet_v3_large: DefaultBoxGenerator(min_ratio=0.2, max_ratio=0.95)
        scales = [0.2 + 0.75 * k / 5.0 for k in range(6)] + [1.0]
    return [
        [round(scales[k] * size, 2), round(math.sqrt(scales[k] * scales[k + 1]) * size, 2)]
        for k in range(len(scales) - 1)
    ]


def anchor_sizes_of(cfg) -> Tuple[List[List[float]], str]:
    """``(sizes per level, source)`` of the configured detector's anchors (input pixels).

    ``source`` is ``"MODEL.ANCHOR_GENERATOR.SIZES"``, ``"torchvision default"`` or ``"SSD default
    boxes"``; ``([], "unknown architecture")`` when the architecture is not one kd2 knows.
    """
    arch = _arch(cfg)
    if arch == "SSD":
        return _ssd_default_box_sizes(cfg), "SSD default boxes"
    sizes = [list(level) for level in cfg.MODEL.ANCHOR_GENERATOR.SIZES]
    if sizes:
        return [[float(s) for s in level] for level in sizes], "MODEL.ANCHOR_GENERATOR.SIZES"
    if arch == "FasterRCNN":
        return [[32.0], [64.0], [128.0], [256.0], [512.0]], "torchvision default"
    if arch == "RetinaNet":
        return [
            [float(x), float(int(x * 2 ** (1.0 / 3))), float(int(x * 2 ** (2.0 / 3)))]
            for x in (32, 64, 128, 256, 512)
        ], "torchvision default"
    if arch == "FCOS":
        return [[8.0], [16.0], [32.0], [64.0], [128.0]], "torchvision default"
    return [], "unknown architecture"


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------


def _stats(values: np.ndarray, percentiles: Sequence[int] = (5, 50, 95)) -> Dict[str, Any]:
    keys = ["min"] + [f"p{p}" for p in percentiles] + ["max"]
    if values.size == 0:
        return {k: None for k in keys}
    pct = np.percentile(values, list(percentiles))
    out = {"min": float(values.min())}
    out.update({f"p{p}": float(v) for p, v in zip(percentiles, pct)})
    out["max"] = float(values.max())
    return out


def _round_up(x: float, multiple: int = 32) -> int:
    return int(math.ceil(x / multiple) * multiple)


def _fmt_sizes(levels: Sequence[Sequence[float]]) -> str:
    def num(v: float) -> str:
        return str(int(v)) if float(v).is_integer() else f"{v:g}"

    return "[" + ", ".join("[" + ", ".join(num(v) for v in lv) + "]" for lv in levels) + "]"


def _suggest_anchors(smallest: float, levels: Sequence[Sequence[float]]) -> List[List[float]]:
    """The anchor layout of ``levels`` (levels, sizes per level) restarted at ``smallest``."""
    per_level = max(len(lv) for lv in levels) if levels else 1
    out = []
    for k in range(max(len(levels), 1)):
        x = smallest * 2**k
        if per_level == 3:  # RetinaNet-style: three sizes per octave
            out.append([float(x), float(int(x * 2 ** (1.0 / 3))), float(int(x * 2 ** (2.0 / 3)))])
        else:
            out.append([float(x)])
    return out


def _resize_scales(
    heights: np.ndarray, widths: np.ndarray, cfg, arch: str
) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Per-image training resize scale and a description of the rule."""
    h = heights.astype(np.float64)
    w = widths.astype(np.float64)
    if arch == "SSD":
        size = float(cfg.MODEL.SSD.SIZE)
        with np.errstate(divide="ignore"):
            scale = np.sqrt((size / w) * (size / h))
        return scale, {"rule": "fixed", "fixed_size": [int(size), int(size)]}
    min_size = float(tuple(cfg.INPUT.MIN_SIZE_TRAIN)[-1])
    max_size = float(cfg.INPUT.MAX_SIZE_TRAIN)
    with np.errstate(divide="ignore"):
        scale = np.minimum(min_size / np.minimum(h, w), max_size / np.maximum(h, w))
    return scale, {
        "rule": "min(min_size / short_side, max_size / long_side)",
        "min_size": int(min_size),
        "min_size_choices": [int(v) for v in tuple(cfg.INPUT.MIN_SIZE_TRAIN)],
        "max_size": int(max_size),
    }


def dataset_report(
    records: Sequence[Mapping[str, Any]],
    cfg,
    class_names: Sequence[str] | None = None,
) -> Dict[str, Any]:
    """Measure ``records`` against the detector ``cfg`` describes; see the module docstring.

    Args:
        records: kd2 records (``height``, ``width``, ``boxes`` ``(G, 4)`` XYXY original pixels,
            ``labels`` ``(G,)`` contiguous ids; ``file_name`` is used in messages when present).
        cfg: a kd2 config (``MODEL.META_ARCHITECTURE`` FasterRCNN | RetinaNet | FCOS | SSD).
        class_names: the contiguous classes' names (e.g. ``MetadataCatalog.get(name)
            .thing_classes``); ids are used when absent.

    Returns:
        A JSON-serialisable dict: ``architecture``, ``num_images``, ``num_boxes``,
        ``boxes_per_image`` (min/median/max/mean), ``images_without_boxes``, ``image_sides``,
        ``resize`` (the rule and min/median/max scale), ``box_size_original`` /
        ``box_size_input`` (min, p5, p50, p95, max of ``sqrt(w * h)``), ``box_size_histogram``
        (``edges``, ``counts``; input pixels), ``anchor_sizes`` / ``anchor_source`` /
        ``smallest_anchor`` / ``small_box_threshold`` / ``small_boxes`` (count, fraction),
        ``class_counts`` (``[{"id", "name", "count"}]``), ``limits`` and ``warnings`` (a list of
        plain-English strings, each saying what to change).
    """
    arch = _arch(cfg)
    m = _measure(records, cfg, arch)
    report = _summary(m, cfg, arch, class_names)
    warnings: List[str] = report["warnings"]
    n, num_boxes, threshold = m["n"], m["num_boxes"], report["small_box_threshold"]
    n_small = report["small_boxes"]["count"]
    # (1) boxes too small for the anchors
    if threshold is not None and num_boxes and n_small / num_boxes > SMALL_BOX_MAX_FRACTION:
        warnings.append(
            _small_box_warning(
                report,
                m["size_input"],
                report["anchor_sizes"],
                report["smallest_anchor"],
                threshold,
                m["resize"],
                arch,
            )
        )
    # (2) strongly downscaled images
    scale = m["scale"]
    if n and (
        np.count_nonzero(scale < DOWNSCALE_MIN) >= DOWNSCALE_MIN_IMAGE_FRACTION * n
        or scale.min() < DOWNSCALE_SEVERE
    ):
        warnings.append(_downscale_warning(records, m, arch))
    # (3) classes with (almost) no boxes
    classes = report["class_counts"]
    rare = _rare_class_warning(
        [c["count"] for c in classes], num_boxes, lambda i: classes[i]["name"], arch
    )
    if rare:
        warnings.append(rare)
    # (4) more objects per image than the detector may output / propose
    if n:
        warnings.extend(_per_image_limit_warnings(records, m["counts"], report["limits"]))
    return report


def _measure(records: Sequence[Mapping[str, Any]], cfg, arch: str) -> Dict[str, Any]:
    """The arrays the report is made of: image sides, boxes per image, box sizes before and
    after the training resize, the scale per image, the class counts."""
    n = len(records)
    heights = np.fromiter((int(r["height"]) for r in records), dtype=np.int64, count=n)
    widths = np.fromiter((int(r["width"]) for r in records), dtype=np.int64, count=n)
    box_list = [np.asarray(r["boxes"], dtype=np.float64).reshape(-1, 4) for r in records]
    counts = np.fromiter((len(b) for b in box_list), dtype=np.int64, count=n)
    boxes = np.concatenate(box_list, axis=0) if n else np.zeros((0, 4))
    labels = (
        np.concatenate([np.asarray(r["labels"], dtype=np.int64).reshape(-1) for r in records])
        if n
        else np.zeros((0,), dtype=np.int64)
    )
    scale, resize = _resize_scales(heights, widths, cfg, arch)
    bw = np.clip(boxes[:, 2] - boxes[:, 0], 0.0, None)
    bh = np.clip(boxes[:, 3] - boxes[:, 1], 0.0, None)
    size_orig = np.sqrt(bw * bh)
    return {
        "n": n,
        "heights": heights,
        "widths": widths,
        "counts": counts,
        "labels": labels,
        "num_boxes": int(len(boxes)),
        "scale": scale,
        "resize": resize,
        "size_orig": size_orig,
        "size_input": size_orig * np.repeat(scale, counts),
        "short": np.minimum(heights, widths),
        "long": np.maximum(heights, widths),
    }


def _summary(m: Dict[str, Any], cfg, arch: str, class_names) -> Dict[str, Any]:
    """The report's figures (everything but the warnings) from the measured arrays ``m``."""
    n, counts, scale, num_boxes = m["n"], m["counts"], m["scale"], m["num_boxes"]
    short, long_, labels, size_input = m["short"], m["long"], m["labels"], m["size_input"]
    anchors, anchor_source = anchor_sizes_of(cfg)
    flat_anchors = [a for lv in anchors for a in lv]
    smallest = min(flat_anchors) if flat_anchors else None
    threshold = smallest / 2.0 if smallest is not None else None
    n_small = int(np.count_nonzero(size_input < threshold)) if threshold is not None else 0

    num_classes = _num_classes(cfg, arch)
    k = max(
        num_classes or 0,
        len(class_names) if class_names is not None else 0,
        int(labels.max()) + 1 if labels.size else 0,
    )
    class_counts = np.bincount(labels[labels >= 0], minlength=k) if k else np.zeros(0, np.int64)

    def name_of(i: int) -> str:
        if class_names is not None and 0 <= i < len(class_names):
            return str(class_names[i])
        return f"class {i}"

    hist, _ = np.histogram(np.clip(size_input, _HIST_EDGES[0], _HIST_EDGES[-1]), _HIST_EDGES)

    limits: Dict[str, int] = {"TEST.DETECTIONS_PER_IMAGE": int(cfg.TEST.DETECTIONS_PER_IMAGE)}
    if arch == "FasterRCNN":
        limits["MODEL.RPN.POST_NMS_TOPK_TRAIN"] = int(cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN)
        limits["MODEL.RPN.POST_NMS_TOPK_TEST"] = int(cfg.MODEL.RPN.POST_NMS_TOPK_TEST)

    return {
        "architecture": arch,
        "num_classes": num_classes,
        "num_images": n,
        "num_boxes": num_boxes,
        "boxes_per_image": {
            "min": int(counts.min()) if n else None,
            "median": float(np.median(counts)) if n else None,
            "max": int(counts.max()) if n else None,
            "mean": float(counts.mean()) if n else None,
        },
        "images_without_boxes": int(np.count_nonzero(counts == 0)),
        "image_sides": {
            "short_min": int(short.min()) if n else None,
            "short_max": int(short.max()) if n else None,
            "long_min": int(long_.min()) if n else None,
            "long_max": int(long_.max()) if n else None,
        },
        "resize": {
            **m["resize"],
            "scale_min": float(scale.min()) if n else None,
            "scale_median": float(np.median(scale)) if n else None,
            "scale_max": float(scale.max()) if n else None,
            "images_downscaled_below": DOWNSCALE_MIN,
            "num_images_downscaled": int(np.count_nonzero(scale < DOWNSCALE_MIN)),
        },
        "box_size_original": _stats(m["size_orig"]),
        "box_size_input": _stats(size_input),
        "box_size_histogram": {
            "edges": [float(e) for e in _HIST_EDGES],
            "counts": [int(c) for c in hist],
        },
        "anchor_sizes": anchors,
        "anchor_source": anchor_source,
        "smallest_anchor": smallest,
        "small_box_threshold": threshold,
        "small_boxes": {
            "count": n_small,
            "fraction": (n_small / num_boxes) if num_boxes else 0.0,
        },
        "class_counts": [
            {"id": i, "name": name_of(i), "count": int(c)} for i, c in enumerate(class_counts)
        ],
        "limits": limits,
        "warnings": [],
    }


def _downscale_warning(records, m: Dict[str, Any], arch: str) -> str:
    """Images shrunk more than ``1 / DOWNSCALE_MIN`` for training, and what to change."""
    scale, resize, n = m["scale"], m["resize"], m["n"]
    down = scale < DOWNSCALE_MIN
    i = int(np.argmin(scale))
    s_min = float(scale[i])
    where = f"{int(m['widths'][i])}x{int(m['heights'][i])} px"
    if "file_name" in records[i]:
        where += f" ({os.path.basename(str(records[i]['file_name']))})"
    if arch == "SSD":
        fix = (
            f"SSD squeezes every image to MODEL.SSD.SIZE {resize['fixed_size'][0]} px; a larger"
            " SIZE does not help (its default boxes grow with it): tile the images into "
            f"crops of about {resize['fixed_size'][0]} px, or use FasterRCNN/RetinaNet/FCOS"
        )
    else:
        fix = (
            f"INPUT.MIN_SIZE_TRAIN ({resize['min_size']},) / MAX_SIZE_TRAIN "
            f"{resize['max_size']} cap the image sides; to train at native resolution set "
            f"INPUT.MIN_SIZE_TRAIN ({int(m['short'].max())},) INPUT.MAX_SIZE_TRAIN "
            f"{int(m['long'].max())} (and the same MIN_SIZE_TEST/MAX_SIZE_TEST) if memory allows, "
            f"or tile the large images into crops of about {resize['max_size']} px"
        )
    return (
        f"{int(np.count_nonzero(down))} of {n} images are shrunk more than "
        f"{1 / DOWNSCALE_MIN:g}x for training (smallest scale {s_min:.2f}, image {where}): "
        f"a 10-px object there becomes {10 * s_min:.1f} px. {fix}."
    )


def _rare_class_warning(class_counts, num_boxes: int, name_of, arch: str) -> str | None:
    """Classes with (almost) no boxes, or ``None``."""
    mean_per_class = num_boxes / len(class_counts) if len(class_counts) else 0.0
    rare_below = max(float(RARE_CLASS_MIN_BOXES), RARE_CLASS_MEAN_FRACTION * mean_per_class)
    rare = [(i, int(c)) for i, c in enumerate(class_counts) if c < rare_below]
    if not rare:
        return None
    shown = sorted(rare, key=lambda ic: (ic[1], ic[0]))[:10]  # the rarest ten, rarest first
    listed = ", ".join(
        f"'{name_of(i)}' ({c} box{'es' if c != 1 else ''}, "
        f"{(100.0 * c / num_boxes) if num_boxes else 0:.1f}%)"
        for i, c in shown
    ) + (f" and {len(rare) - len(shown)} more" if len(rare) > len(shown) else "")
    return (
        f"Rare classes (fewer than {math.ceil(rare_below)} boxes: the larger of "
        f"{RARE_CLASS_MIN_BOXES} and {RARE_CLASS_MEAN_FRACTION:g}x the mean "
        f"{mean_per_class:.0f} per class): {listed}. The detector will hardly learn them and "
        "their AP (part of the mean AP) will be near 0 or noise: annotate more examples, or "
        "merge/drop the class (the dataset's categories and "
        f"{NUM_CLASSES_KEYS.get(arch, 'NUM_CLASSES')})."
    )


def _per_image_limit_warnings(records, counts, limits: Dict[str, int]) -> List[str]:
    """More objects in an image than the detector may output or propose."""
    out = []
    n = len(records)
    most = int(counts.max())
    i = int(np.argmax(counts))
    where = (
        f" ({os.path.basename(str(records[i]['file_name']))})" if "file_name" in records[i] else ""
    )
    lim = limits["TEST.DETECTIONS_PER_IMAGE"]
    if most > lim:
        over = int(np.count_nonzero(counts > lim))
        msg = (
            f"{over} of {n} images have more boxes than TEST.DETECTIONS_PER_IMAGE {lim} "
            f"(most: {most}{where}): the detector outputs at most {lim} detections per image, "
            f"so recall there is capped at {100.0 * lim / most:.0f}% whatever it learns. Set "
            f"TEST.DETECTIONS_PER_IMAGE {_round_up(most, 100)}."
        )
        if most > 100:
            msg += (
                " Note that COCO AP (pycocotools' default maxDets=100) also scores at most "
                "100 detections per image."
            )
        out.append(msg)
    rpn = [(key, v) for key, v in limits.items() if key.startswith("MODEL.RPN.") and most > v]
    if rpn:
        keys = " / ".join(f"{key} {v}" for key, v in rpn)
        out.append(
            f"An image has {most} boxes{where}, more than the Faster R-CNN proposals kept per "
            f"image ({keys}): objects are lost before the box head sees them. Raise "
            + " and ".join(f"{key} to {_round_up(2 * most, 100)}" for key, _ in rpn)
            + " (about 2x the most boxes in an image)."
        )
    return out


def _small_box_warning(
    report: Dict[str, Any],
    size_input: np.ndarray,
    anchors: List[List[float]],
    smallest: float,
    threshold: float,
    resize: Dict[str, Any],
    arch: str,
) -> str:
    small = report["small_boxes"]
    q10 = float(np.percentile(size_input, 10))
    head = (
        f"{100 * small['fraction']:.0f}% of the boxes ({small['count']} of {report['num_boxes']})"
        f" are smaller than {threshold:g} px after the training resize, half the smallest "
        f"anchor ({smallest:g} px, {report['anchor_source']}); median box "
        f"{report['box_size_input']['p50']:.1f} px, 10th percentile {q10:.1f} px. "
    )
    if arch == "FCOS":
        why = (
            "Such a box holds no feature location of the finest level (stride "
            f"{smallest:g}) more often than not, so it is mostly learned as background. "
        )
    else:
        why = (
            "Such a box overlaps every anchor with IoU < 0.25, below the matcher's positive "
            "threshold, so it gets at most a low-quality match and is mostly learned as "
            "background. "
        )
    if arch == "SSD":
        f_needed = threshold / max(q10, 1e-6)
        return (
            head
            + why
            + (
                "SSD's default boxes are relative to its input (the smallest is "
                f"{smallest:g} px at MODEL.SSD.SIZE {resize['fixed_size'][0]}), so a larger SIZE "
                f"does not help: tile the images into crops about {f_needed:.1f}x smaller, or use "
                "FasterRCNN/RetinaNet with smaller MODEL.ANCHOR_GENERATOR.SIZES."
            )
        )

    def enlarge(factor: float) -> str:
        m = _round_up(resize["min_size"] * factor)
        mx = _round_up(resize["max_size"] * factor)
        return (
            f"INPUT.MIN_SIZE_TRAIN ({m},) INPUT.MAX_SIZE_TRAIN {mx} (and MIN_SIZE_TEST {m} "
            f"MAX_SIZE_TEST {mx}): every image {factor:.1f}x larger than now (memory grows with "
            "the square; tiling the large images is the alternative)"
        )

    f_keep = threshold / max(q10, 1e-6)
    if arch == "FCOS":  # FCOS's sizes are its strides: only a larger input helps
        return head + why + f"Enlarge the input: {enlarge(f_keep)}."
    floor = _FINEST_STRIDE.get(arch, 4)
    new_smallest = float(max(floor, 2 ** math.floor(math.log2(max(2 * q10, 1.0)))))
    if new_smallest >= smallest:
        return head + why + f"Enlarge the input: {enlarge(f_keep)}."
    suggestion = _suggest_anchors(new_smallest, anchors)
    left = float(np.mean(size_input < new_smallest / 2)) if size_input.size else 0.0
    fix = f'Set MODEL.ANCHOR_GENERATOR.SIZES "{_fmt_sizes(suggestion)}"'
    if left > SMALL_BOX_MAX_FRACTION:
        f_more = (new_smallest / 2) / max(q10, 1e-6)
        fix += (
            f" (leaves {100 * left:.0f}% of the boxes under {new_smallest / 2:g} px; the finest "
            f"level's stride is {floor}) and enlarge the input: {enlarge(f_more)}."
        )
    else:
        fix += (
            f" (its largest anchor, {max(max(lv) for lv in suggestion):g} px, vs your 95th "
            f"percentile box, {report['box_size_input']['p95']:.0f} px), or keep the anchors and "
            f"enlarge the input: {enlarge(f_keep)}."
        )
    return head + why + fix


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


def _num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_report(report: Mapping[str, Any]) -> str:
    """A compact multi-line text of ``report`` (for logs and the command line)."""
    bpi, sides, rs = report["boxes_per_image"], report["image_sides"], report["resize"]
    bi, bo = report["box_size_input"], report["box_size_original"]
    lines = [
        f"Dataset report ({report['architecture']}): {report['num_images']} images, "
        f"{report['num_boxes']} boxes, {len(report['class_counts'])} classes",
        f"  boxes per image: min {bpi['min']} / median {_num(bpi['median'])} / max {bpi['max']}; "
        f"images without boxes: {report['images_without_boxes']}",
        f"  image sides: short {sides['short_min']}-{sides['short_max']} px, long "
        f"{sides['long_min']}-{sides['long_max']} px",
    ]
    if rs["rule"] == "fixed":
        rule = f"fixed {rs['fixed_size'][0]}x{rs['fixed_size'][1]}"
    else:
        rule = f"MIN_SIZE {rs['min_size']}, MAX_SIZE {rs['max_size']}"
    lines.append(
        f"  training resize ({rule}): scale {_num(rs['scale_min'], 2)}-{_num(rs['scale_max'], 2)}"
        f" (median {_num(rs['scale_median'], 2)}); {rs['num_images_downscaled']} images shrunk "
        f"below {rs['images_downscaled_below']:g}"
    )
    lines.append(
        f"  box size sqrt(w*h) after resize: min {_num(bi['min'])}, p5 {_num(bi['p5'])}, "
        f"p50 {_num(bi['p50'])}, p95 {_num(bi['p95'])}, max {_num(bi['max'])} px "
        f"(original p5/p50/p95 {_num(bo['p5'])}/{_num(bo['p50'])}/{_num(bo['p95'])} px)"
    )
    if report["anchor_sizes"]:
        sb = report["small_boxes"]
        lines.append(
            f"  anchors ({report['anchor_source']}): {_fmt_sizes(report['anchor_sizes'])}; "
            f"{100 * sb['fraction']:.1f}% of boxes < {report['small_box_threshold']:g} px (half "
            "the smallest)"
        )
    lines.append(
        "  classes: " + ", ".join(f"{c['name']} {c['count']}" for c in report["class_counts"])
    )
    lines.append(
        "  per-image limits: " + ", ".join(f"{k} {v}" for k, v in report["limits"].items())
    )
    if report["warnings"]:
        lines += [f"  WARNING: {w}" for w in report["warnings"]]
    else:
        lines.append("  no warnings")
    return "\n".join(lines)


def _flat_sizes(anchor_sizes: Sequence[Any] | None) -> List[float]:
    """Anchor sizes, flat or per level, as one flat list."""
    flat: List[float] = []
    for a in anchor_sizes or []:
        if isinstance(a, (list, tuple, np.ndarray)):
            flat.extend(float(v) for v in a)
        else:
            flat.append(float(a))
    return flat


def plot_box_sizes(
    report_or_sizes: Union[Mapping[str, Any], Sequence[float], np.ndarray],
    anchor_sizes: Sequence[Any] | None,
    path: str,
) -> str:
    """Write a PNG histogram of box sizes (input pixels, log-x) with the anchors marked.

    Args:
        report_or_sizes: a :func:`dataset_report` dict (its ``box_size_histogram`` is drawn) or
            the box sizes themselves (``sqrt(w * h)`` in input pixels).
        anchor_sizes: anchor sizes, flat or per level (``None``: the report's); each is drawn as
            a vertical line, and half the smallest as a dashed one (the small-box threshold).
        path: the PNG file to write.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(report_or_sizes, Mapping):
        hist = report_or_sizes["box_size_histogram"]
        edges = np.asarray(hist["edges"], dtype=np.float64)
        counts = np.asarray(hist["counts"], dtype=np.float64)
        if anchor_sizes is None:
            anchor_sizes = report_or_sizes.get("anchor_sizes") or []
        title_extra = f"{report_or_sizes.get('architecture', '')}, "
        small = report_or_sizes.get("small_boxes")
        if small and report_or_sizes.get("small_box_threshold"):
            title_extra += (
                f"{100 * small['fraction']:.0f}% < {report_or_sizes['small_box_threshold']:g} px, "
            )
    else:
        sizes = np.asarray(report_or_sizes, dtype=np.float64).reshape(-1)
        edges = _HIST_EDGES
        counts, _ = np.histogram(np.clip(sizes, edges[0], edges[-1]), edges)
        counts = counts.astype(np.float64)
        title_extra = ""
    flat = _flat_sizes(anchor_sizes)
    total = int(counts.sum())

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        ax.stairs(counts, edges, fill=True, color="#4c72b0", alpha=0.85, label="boxes")
        ax.set_xscale("log", base=2)
        nz = np.flatnonzero(counts)
        lo = edges[nz[0]] if nz.size else 1.0
        hi = edges[nz[-1] + 1] if nz.size else edges[-1]
        if flat:
            lo, hi = min(lo, min(flat) / 2), max(hi, max(flat))
        ax.set_xlim(max(lo / 1.5, edges[0]), min(hi * 1.5, edges[-1]))
        for j, a in enumerate(sorted(set(flat))):
            ax.axvline(a, color="#dd8452", lw=1.5, label="anchor sizes" if j == 0 else None)
        if flat:
            ax.axvline(
                min(flat) / 2,
                color="#c44e52",
                lw=1.5,
                ls="--",
                label=f"half the smallest anchor ({min(flat) / 2:g} px)",
            )
        ticks = [t for t in 2.0 ** np.arange(0, 13) if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.set_xlabel("box size sqrt(w·h) after the training resize (input pixels, log scale)")
        ax.set_ylabel("number of boxes")
        ax.set_title(f"Box sizes vs anchors ({title_extra}{total} boxes)")
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(True, which="major", axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


def write_dataset_report(
    records: Sequence[Mapping[str, Any]],
    cfg,
    output_dir: str,
    class_names: Sequence[str] | None = None,
    log: bool = True,
) -> Dict[str, Any]:
    """Compute the report, write ``dataset_report.json`` and ``dataset_report.png`` into
    ``output_dir`` (created if needed) and return the report.

    With ``log`` the text of :func:`format_report` is logged at INFO and each warning at WARNING
    on the ``kd2.data.report`` logger (under ``kd2``, so a trainer's log shows them).
    """
    report = _jsonable(dataset_report(records, cfg, class_names=class_names))
    os.makedirs(output_dir, exist_ok=True)

    json_path = os.path.join(output_dir, "dataset_report.json")
    write_text_atomic(json_path, json.dumps(report, indent=1))
    plot_box_sizes(report, None, os.path.join(output_dir, "dataset_report.png"))
    if log:
        logger.info("%s", format_report({**report, "warnings": []}).rsplit("\n", 1)[0])
        for w in report["warnings"]:
            logger.warning("Dataset report: %s", w)
        logger.info("Dataset report written to %s (.json, .png)", json_path[: -len(".json")])
    return report
