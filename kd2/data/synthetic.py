"""Deterministic synthetic detection dataset ("ambiguous shapes") in COCO format.

The generator draws small RGB scenes of coloured, textured shapes on cluttered backgrounds. It is
meant to be learnable on a CPU within minutes by a small detector at 128 px, yet to contain the
"ambiguous instances" that knowledge-distillation papers care about, so that a weak detector
clearly lags a stronger one:

* **confusable classes** - classes differ by shape *and* colour/texture, but some pairs share one
  of the two (red circle / red-orange ellipse / red rounded square; blue striped triangle / blue
  striped diamond; green ring / green dotted hexagon);
* **strong scale variation** - object size is log-uniform between ~6 px and 60 % of the image;
* **occlusion** - later objects are drawn over earlier ones (every annotated object keeps at
  least 40 % of its in-image pixels visible);
* **truncation** - objects may be cut by the image border (at least ~40 % stays inside);
* **blur** on some objects and some whole images, and Gaussian pixel noise everywhere;
* **clutter** - low-frequency coloured backgrounds, lines, stripes and *distractor* blobs
  (irregular blobs, bars, crosses, arcs, half discs) that are not objects;
* 1-8 objects per image, and a few images without any object (empty annotation list).

Annotation conventions (COCO): ``bbox`` is ``[x, y, w, h]`` in absolute pixels (pixel-edge
coordinates, so a one-pixel object at column 3 spans ``x=3, w=1``). As in COCO, the box is the
tight box around the full extent of the instance's *visible* pixels (all visible fragments of an
occluded instance; only the in-image part of a truncated one), and ``area`` is the number of
visible pixels (what COCO's segmentation area measures); ``iscrowd`` is always 0. Occlusion is
kept moderate: every visible box stays at least 3 px wide and high.
Category ids are deliberately non-contiguous (1, 2, 3, 5, 7, 9, 11, 13).

Determinism: image ``i`` of a split is drawn from ``numpy.random.default_rng((seed, split, i))``
only, so the same arguments give byte-identical JSON and pixel-identical images, and val images
do not depend on ``num_train``. Exactly one in every 30 images (indices ``1, 31, 61, ...``) is
empty, so even a tiny split of 2 images has one empty image.

:func:`generate_crowded_dataset` writes a second kind of data in the same layout: few large,
non-square images, each with hundreds of small non-overlapping objects (10-60 px by default), like
aerial imagery - the case where default anchors and input sizes fail (see
:mod:`kd2.data.report`).

The second benchmark's data, :func:`generate_crowded_benchmark` (``--profile crowded``), uses
that generator for many small objects on mid-sized images: 256-512 px sides, 20-200 objects of
4-30 px per image, clusters of nearly touching objects, object-like distractors.

Command line::

    python -m kd2.data.synthetic --out datasets/kd2_synthetic [--num-train 600] [--num-val 200]
        [--image-size 128] [--num-classes 6] [--seed 0] [--format png] [--overwrite]
    python -m kd2.data.synthetic --profile crowded --out datasets/kd2_synthetic_crowded
        [--num-train 300] [--num-val 100] [--num-classes 6] [--seed 0] [--format png]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

__all__ = [
    "SYNTHETIC_CLASSES",
    "generate_synthetic_dataset",
    "generate_crowded_dataset",
    "generate_crowded_benchmark",
    "CROWDED_BENCHMARK",
    "synthetic_dataset_exists",
    "render_synthetic_image",
    "render_crowded_image",
]

logger = logging.getLogger(__name__)

_FORMAT_VERSION = "1"
_EMPTY_EVERY = 30  # image i is empty iff i % _EMPTY_EVERY == 1
_SPLIT_CODES = {"train": 0, "val": 1}
_SUBPIXEL_BITS = 4  # cv2 drawing precision: coordinates are multiplied by 2**4
_MIN_VISIBLE_FRACTION = 0.4  # of an object's in-image pixels, after occlusion
_MIN_INSIDE_FRACTION = 0.4  # of an object's full area, after truncation


@dataclass(frozen=True)
class _ClassSpec:
    """One object class: a shape, a hue range (OpenCV HSV, 0..179) and a surface texture."""

    dataset_id: int
    name: str
    shape: str
    hue: Tuple[int, int]
    texture: str


#: The class table, in the order classes are taken for ``num_classes < 8``.
SYNTHETIC_CLASSES: Tuple[_ClassSpec, ...] = (
    _ClassSpec(1, "red_circle", "circle", (0, 9), "solid"),
    _ClassSpec(2, "orange_ellipse", "ellipse", (6, 18), "solid"),
    _ClassSpec(3, "red_rounded_square", "rounded_square", (0, 9), "gradient"),
    _ClassSpec(5, "blue_triangle", "triangle", (100, 114), "stripes"),
    _ClassSpec(7, "blue_diamond", "diamond", (106, 122), "stripes"),
    _ClassSpec(9, "green_ring", "ring", (52, 70), "solid"),
    _ClassSpec(11, "yellow_star", "star", (22, 32), "solid"),
    _ClassSpec(13, "green_hexagon", "hexagon", (58, 78), "dots"),
)


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    """Rotate ``(P, 2)`` points around the origin by ``angle`` radians."""
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]], dtype=np.float64)


def _regular_polygon(n: int, radius: float, phase: float = 0.0) -> np.ndarray:
    """``(n, 2)`` vertices of a regular polygon centred at the origin."""
    t = phase + np.arange(n, dtype=np.float64) * (2.0 * math.pi / n)
    return np.stack([np.cos(t), np.sin(t)], axis=1) * radius


def _ellipse(rx: float, ry: float, n: int = 48) -> np.ndarray:
    t = np.arange(n, dtype=np.float64) * (2.0 * math.pi / n)
    return np.stack([np.cos(t) * rx, np.sin(t) * ry], axis=1)


def _rounded_square(half: float, corner: float, n_per_corner: int = 8) -> np.ndarray:
    """Square of half side ``half`` whose corners are quarter circles of radius ``corner``."""
    pts = []
    centres = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
    for k, (sx, sy) in enumerate(centres):
        cx, cy = sx * (half - corner), sy * (half - corner)
        t = np.linspace(k * math.pi / 2, (k + 1) * math.pi / 2, n_per_corner)
        pts.append(np.stack([cx + corner * np.cos(t), cy + corner * np.sin(t)], axis=1))
    return np.concatenate(pts, axis=0)


def _star(r_outer: float, r_inner: float, phase: float) -> np.ndarray:
    t = phase + np.arange(10, dtype=np.float64) * (math.pi / 5)
    r = np.where(np.arange(10) % 2 == 0, r_outer, r_inner)
    return np.stack([np.cos(t) * r, np.sin(t) * r], axis=1)


def _shape_polygons(
    shape: str, size: float, rng: np.random.Generator
) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Polygons (origin-centred, pixels) to fill and to cut out for a shape of extent ``size``.

    Returns ``(fill, holes)``: lists of ``(P, 2)`` float arrays. ``size`` is the approximate
    diameter of the shape.
    """
    r = size / 2.0
    holes: List[np.ndarray] = []
    if shape == "circle":
        fill = [_ellipse(r, r)]
    elif shape == "ellipse":
        aspect = rng.uniform(0.55, 0.8)
        fill = [_rotate(_ellipse(r, r * aspect), rng.uniform(0, math.pi))]
    elif shape == "rounded_square":
        half = r * 0.9
        poly = _rounded_square(half, half * rng.uniform(0.2, 0.45))
        fill = [_rotate(poly, rng.uniform(-0.5, 0.5))]
    elif shape == "triangle":
        fill = [_regular_polygon(3, r, -math.pi / 2 + rng.uniform(-0.35, 0.35))]
    elif shape == "diamond":
        poly = _regular_polygon(4, r, rng.uniform(-0.3, 0.3)) * np.array([1.0, rng.uniform(0.8, 1)])
        fill = [poly]
    elif shape == "ring":
        fill = [_ellipse(r, r)]
        inner = r * rng.uniform(0.45, 0.6)
        holes = [_ellipse(inner, inner)]
    elif shape == "star":
        fill = [_star(r, r * rng.uniform(0.4, 0.55), rng.uniform(0, 2 * math.pi))]
    elif shape == "hexagon":
        fill = [_regular_polygon(6, r, rng.uniform(0, math.pi / 3))]
    else:  # pragma: no cover - guarded by the class table
        raise ValueError(f"unknown shape {shape!r}")
    return fill, holes


def _draw_mask(
    canvas_size: int, fill: Sequence[np.ndarray], holes: Sequence[np.ndarray], centre: np.ndarray
) -> np.ndarray:
    """Anti-aliased uint8 mask (0/255) of ``fill - holes`` translated to ``centre``.

    ``centre`` is in canvas pixel coordinates where pixel ``(i, j)`` covers ``[j, j+1)`` in x;
    cv2 draws pixel centres at integer coordinates, hence the ``- 0.5`` shift.
    """
    mask = np.zeros((canvas_size, canvas_size), dtype=np.uint8)
    scale = float(1 << _SUBPIXEL_BITS)

    def to_cv(p: np.ndarray) -> np.ndarray:
        return np.round((p + centre - 0.5) * scale).astype(np.int32).reshape(-1, 1, 2)

    cv2.fillPoly(mask, [to_cv(p) for p in fill], 255, cv2.LINE_AA, _SUBPIXEL_BITS)
    if holes:
        cv2.fillPoly(mask, [to_cv(p) for p in holes], 0, cv2.LINE_AA, _SUBPIXEL_BITS)
    return mask


# --------------------------------------------------------------------------------------------
# colours and textures
# --------------------------------------------------------------------------------------------


def _hsv_to_bgr(h: float, s: float, v: float) -> np.ndarray:
    """One OpenCV-HSV colour (h in 0..179, s/v in 0..255) as a float32 BGR triple."""
    hsv = np.array([[[h % 180, s, v]]], dtype=np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _texture_layer(
    spec: _ClassSpec, size: float, centre: np.ndarray, s: int, rng: np.random.Generator
) -> np.ndarray:
    """``(s, s, 3)`` float32 BGR colour layer of one object (only read where its mask is)."""
    lo, hi = spec.hue
    base = _hsv_to_bgr(rng.uniform(lo, hi), rng.uniform(150, 255), rng.uniform(150, 255))
    ys, xs = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    layer = np.empty((s, s, 3), dtype=np.float32)
    layer[:] = base
    if spec.texture == "stripes":
        period = rng.uniform(3.0, 6.0)
        theta = rng.uniform(0, math.pi)
        phase = (xs * math.cos(theta) + ys * math.sin(theta)) / period
        dark = (np.floor(phase) % 2 == 0)[..., None]
        layer = np.where(dark, layer * 0.5, layer)
    elif spec.texture == "dots":
        period = rng.uniform(3.5, 6.0)
        fx = (xs - centre[0]) / period
        fy = (ys - centre[1]) / period
        d = np.hypot(fx - np.round(fx), fy - np.round(fy))
        layer = np.where((d < 0.28)[..., None], layer * 0.45, layer)
    elif spec.texture == "gradient":
        d = np.hypot(xs - centre[0], ys - centre[1]) / max(size / 2.0, 1.0)
        layer = layer * np.clip(1.15 - 0.55 * d, 0.45, 1.15)[..., None]
    # per-object illumination
    return np.clip(layer * rng.uniform(0.85, 1.1), 0, 255)


def _background(s: int, rng: np.random.Generator) -> np.ndarray:
    """Cluttered, mostly desaturated ``(s, s, 3)`` float32 background."""
    g = int(rng.integers(3, 8))
    low = rng.uniform(40, 220, size=(g, g, 3)).astype(np.float32)
    img = cv2.resize(low, (s, s), interpolation=cv2.INTER_CUBIC)
    gray = img.mean(axis=2, keepdims=True)
    img = gray + (img - gray) * rng.uniform(0.2, 0.6)
    if rng.random() < 0.5:  # faint periodic pattern
        ys, xs = np.mgrid[0:s, 0:s].astype(np.float32)
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(4, 16)
        wave = np.sin((xs * math.cos(theta) + ys * math.sin(theta)) * (2 * math.pi / period))
        img = img + (wave * rng.uniform(4, 14))[..., None]
    for _ in range(int(rng.integers(3, 12))):  # lines
        p1 = tuple(int(v) for v in rng.integers(-s // 4, s + s // 4, size=2))
        p2 = tuple(int(v) for v in rng.integers(-s // 4, s + s // 4, size=2))
        col = tuple(float(v) for v in rng.uniform(30, 230, size=3))
        cv2.line(img, p1, p2, col, int(rng.integers(1, 3)), cv2.LINE_AA)
    return img


def _draw_distractors(img: np.ndarray, rng: np.random.Generator) -> None:
    """Paint 0-6 non-object blobs (irregular blobs, bars, crosses, arcs, half discs) in place."""
    s = img.shape[0]
    for _ in range(int(rng.integers(0, 7))):
        kind = int(rng.integers(0, 5))
        size = math.exp(rng.uniform(math.log(5), math.log(0.35 * s)))
        centre = rng.uniform(0, s, size=2)
        r = size / 2
        holes: List[np.ndarray] = []
        if kind == 0:  # irregular blob
            n = int(rng.integers(5, 10))
            t = np.sort(rng.uniform(0, 2 * math.pi, size=n))
            rad = r * rng.uniform(0.35, 1.0, size=n)
            fill = [np.stack([np.cos(t) * rad, np.sin(t) * rad], axis=1)]
        elif kind == 1:  # elongated bar
            w = r * rng.uniform(0.12, 0.3)
            fill = [_rotate(np.array([[-r, -w], [r, -w], [r, w], [-r, w]]), rng.uniform(0, 3.2))]
        elif kind == 2:  # cross
            w = r * rng.uniform(0.15, 0.3)
            a = rng.uniform(0, math.pi)
            bar = np.array([[-r, -w], [r, -w], [r, w], [-r, w]])
            fill = [_rotate(bar, a), _rotate(bar, a + math.pi / 2)]
        elif kind == 3:  # open arc (partial ring): confusable with the ring class
            t0 = rng.uniform(0, 2 * math.pi)
            t = t0 + np.linspace(0, rng.uniform(0.8, 1.4) * math.pi, 24)
            ri = r * rng.uniform(0.5, 0.7)
            outer = np.stack([np.cos(t) * r, np.sin(t) * r], axis=1)
            inner = np.stack([np.cos(t[::-1]) * ri, np.sin(t[::-1]) * ri], axis=1)
            fill = [np.concatenate([outer, inner], axis=0)]
        else:  # half disc: confusable with the circle class
            t = rng.uniform(0, 2 * math.pi) + np.linspace(0, math.pi, 24)
            fill = [np.stack([np.cos(t) * r, np.sin(t) * r], axis=1)]
        mask = _draw_mask(s, fill, holes, centre).astype(np.float32)[..., None] / 255.0
        if rng.random() < 0.5:  # saturated, possibly object-like hue
            col = _hsv_to_bgr(rng.uniform(0, 180), rng.uniform(120, 255), rng.uniform(120, 255))
        else:
            col = rng.uniform(20, 235, size=3).astype(np.float32)
        img *= 1.0 - mask
        img += mask * col


# --------------------------------------------------------------------------------------------
# one image
# --------------------------------------------------------------------------------------------


def _tight_box(binary: np.ndarray) -> Tuple[int, int, int, int]:
    """Pixel-edge XYXY box ``(x0, y0, x1, y1)`` of a boolean ``(H, W)`` mask (zeros if empty)."""
    rows = np.flatnonzero(binary.any(axis=1))
    cols = np.flatnonzero(binary.any(axis=0))
    if len(rows) == 0:
        return 0, 0, 0, 0
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _box_ok(box: Tuple[int, int, int, int]) -> bool:
    return box[2] - box[0] >= 3 and box[3] - box[1] >= 3


def render_synthetic_image(
    rng: np.random.Generator, image_size: int, classes: Sequence[_ClassSpec], empty: bool
) -> Tuple[np.ndarray, List[Dict[str, object]]]:
    """Render one scene.

    Args:
        rng: the image's own random generator (all randomness comes from it).
        image_size: side ``S`` of the square image.
        classes: the class specs objects are drawn from.
        empty: draw no object (background and distractors only).

    Returns:
        ``(image, objects)``: ``image`` is ``(S, S, 3)`` uint8 **BGR**; ``objects`` is a list of
        ``{"category_id": int, "bbox": [x, y, w, h], "area": float}`` in drawing order.
    """
    s = int(image_size)
    img = _background(s, rng)
    _draw_distractors(img, rng)

    num_objects = 0 if empty else int(rng.integers(1, 9))
    placed: List[Dict[str, object]] = []  # each: spec, visible mask, in-image pixel count
    min_size, max_size = 6.0, 0.6 * s
    for _ in range(num_objects):
        spec = classes[int(rng.integers(0, len(classes)))]
        size = math.exp(rng.uniform(math.log(min_size), math.log(max_size)))
        fill, holes = _shape_polygons(spec.shape, size, rng)
        accepted = _place_object(rng, s, size, fill, holes, placed)
        if accepted is None:
            continue
        centre, alpha_u8, binary, inside = accepted
        layer = _texture_layer(spec, size, centre, s, rng)
        alpha = alpha_u8.astype(np.float32) / 255.0
        if rng.random() < 0.15:  # per-object blur (motion/defocus stand-in)
            sigma = rng.uniform(0.7, 1.8)
            alpha = cv2.GaussianBlur(alpha, (0, 0), sigma)
            layer = cv2.GaussianBlur(layer, (0, 0), sigma)
        img *= 1.0 - alpha[..., None]
        img += alpha[..., None] * layer
        for p in placed:
            p["visible"] = p["visible"] & ~binary
        placed.append({"spec": spec, "visible": binary.copy(), "inside": inside})

    if rng.random() < 0.12:  # whole-image blur
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.2))
    img += rng.normal(0.0, rng.uniform(2.0, 10.0), size=img.shape).astype(np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return image, [_visible_object(p) for p in placed]


def _place_object(rng: np.random.Generator, s: int, size: float, fill, holes, placed: list):
    """Up to 12 random centres for a shape of extent ``size`` in an ``s``-pixel image: the first
    where enough of it lies inside the image and every placed object stays visible enough;
    ``(centre, alpha_u8, binary, inside)`` or ``None``."""
    pad = s // 2 + 2
    canvas = s + 2 * pad
    for _attempt in range(12):
        margin = 0.25 * size
        centre = rng.uniform(-margin, s + margin, size=2)
        full = _draw_mask(canvas, fill, holes, centre + pad)
        full_area = int(np.count_nonzero(full >= 128))
        alpha_u8 = full[pad : pad + s, pad : pad + s]
        binary = alpha_u8 >= 128
        inside = int(np.count_nonzero(binary))
        if full_area == 0 or inside < _MIN_INSIDE_FRACTION * full_area or inside < 4:
            continue
        if not _box_ok(_tight_box(binary)):
            continue
        ok = True
        for p in placed:
            vis = p["visible"] & ~binary
            if np.count_nonzero(vis) < _MIN_VISIBLE_FRACTION * p["inside"] or not _box_ok(
                _tight_box(vis)
            ):
                ok = False
                break
        if ok:
            return centre, alpha_u8, binary, inside
    return None


def _visible_object(p: Dict[str, object]) -> Dict[str, object]:
    """A placed object's annotation: the tight box and area of what is still visible."""
    x0, y0, x1, y1 = _tight_box(p["visible"])
    return {
        "category_id": p["spec"].dataset_id,
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        "area": float(max(int(np.count_nonzero(p["visible"])), 1)),
    }


# --------------------------------------------------------------------------------------------
# crowded scenes (few large images, hundreds of small objects)
# --------------------------------------------------------------------------------------------

_CROWDED_STREAM = 1  # crowded image i of a split draws from default_rng((seed, split, i, 1))


def _crowded_background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Cluttered, mostly desaturated ``(h, w, 3)`` float32 background with "road" lines."""
    g = int(rng.integers(3, 8))
    low = rng.uniform(40, 220, size=(g, g, 3)).astype(np.float32)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    gray = img.mean(axis=2, keepdims=True)
    img = gray + (img - gray) * rng.uniform(0.2, 0.6)
    for _ in range(int(rng.integers(3, 12))):
        p1 = (int(rng.integers(-w // 4, w + w // 4)), int(rng.integers(-h // 4, h + h // 4)))
        p2 = (int(rng.integers(-w // 4, w + w // 4)), int(rng.integers(-h // 4, h + h // 4)))
        col = tuple(float(v) for v in rng.uniform(30, 230, size=3))
        cv2.line(img, p1, p2, col, int(rng.integers(1, 6)), cv2.LINE_AA)
    return img


def _paste(img: np.ndarray, x0: int, y0: int, alpha: np.ndarray, layer: np.ndarray) -> None:
    """Alpha-blend a ``(p, p)`` patch into ``img`` at ``(x0, y0)`` (fully inside), in place."""
    p = alpha.shape[0]
    region = img[y0 : y0 + p, x0 : x0 + p]
    region *= 1.0 - alpha[..., None]
    region += alpha[..., None] * layer


def _crowded_distractor(rng: np.random.Generator, r: float, object_like: bool) -> List[np.ndarray]:
    """Polygons (origin-centred) of one distractor of radius ``r``: an irregular blob or a bar;
    with ``object_like`` also an open arc (confusable with rings) or a half disc (confusable
    with circles)."""
    kind = int(rng.integers(0, 4)) if object_like else int(rng.random() >= 0.5)
    if kind == 0:  # irregular blob
        n = int(rng.integers(5, 10))
        t = np.sort(rng.uniform(0, 2 * math.pi, size=n))
        rad = r * rng.uniform(0.35, 1.0, size=n)
        fill = [np.stack([np.cos(t) * rad, np.sin(t) * rad], axis=1)]
    elif kind == 1:  # bar
        bw = r * rng.uniform(0.12, 0.3)
        bar = np.array([[-r, -bw], [r, -bw], [r, bw], [-r, bw]])
        fill = [_rotate(bar, rng.uniform(0, 3.2))]
    elif kind == 2:  # open arc
        t = rng.uniform(0, 2 * math.pi) + np.linspace(0, rng.uniform(0.8, 1.4) * math.pi, 24)
        ri = r * rng.uniform(0.5, 0.7)
        outer = np.stack([np.cos(t) * r, np.sin(t) * r], axis=1)
        inner = np.stack([np.cos(t[::-1]) * ri, np.sin(t[::-1]) * ri], axis=1)
        fill = [np.concatenate([outer, inner], axis=0)]
    else:  # half disc
        t = rng.uniform(0, 2 * math.pi) + np.linspace(0, math.pi, 24)
        fill = [np.stack([np.cos(t) * r, np.sin(t) * r], axis=1)]
    return fill


def _draw_crowded_distractor(
    img: np.ndarray, rng: np.random.Generator, lo: float, hi: float, object_like: bool
) -> None:
    """One unannotated distractor of object size (log-uniform in ``[lo, hi]``) on ``img``."""
    h, w = img.shape[:2]
    size = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    half = int(math.ceil(size / 2)) + 2
    fill = _crowded_distractor(rng, size / 2, object_like)
    alpha = _draw_mask(2 * half, fill, [], np.array([half, half], dtype=np.float64))
    x0 = int(rng.integers(0, max(w - 2 * half, 0) + 1))
    y0 = int(rng.integers(0, max(h - 2 * half, 0) + 1))
    if object_like and rng.random() < 0.5:  # saturated, possibly object-like
        col = _hsv_to_bgr(rng.uniform(0, 180), rng.uniform(120, 255), rng.uniform(120, 255))
    else:
        col = rng.uniform(20, 235, size=3).astype(np.float32)
    if 2 * half <= min(h, w):
        _paste(img, x0, y0, alpha.astype(np.float32) / 255.0, np.broadcast_to(col, (1, 1, 3)))


def _draw_crowded_shape(spec, size: float, rng: np.random.Generator, p: int, h: int, w: int):
    """The shape's mask on a ``p``-pixel patch, redrawn (up to 5 times) while its box is under
    3 px; ``(alpha_u8, binary, tight box)``."""
    centre = np.array([p // 2, p // 2], dtype=np.float64)
    for _shape_try in range(5):  # a tiny, thin shape may round to a box under 3 px
        fill, holes = _shape_polygons(spec.shape, size, rng)
        alpha_u8 = _draw_mask(p, fill, holes, centre)
        binary = alpha_u8 >= 128
        box = _tight_box(binary)
        if p > min(h, w) or _box_ok(box):
            break
    return alpha_u8, binary, box


def _paste_blurred(img, x0: int, y0: int, alpha, layer, rng: np.random.Generator) -> None:
    """Paste an object's layer at ``(x0, y0)``, blurred (mask and layer) 15 % of the time."""
    if rng.random() < 0.15:  # per-object blur
        sigma = rng.uniform(0.5, 1.2)
        alpha = cv2.GaussianBlur(alpha, (0, 0), sigma)
        layer = cv2.GaussianBlur(layer, (0, 0), sigma)
    _paste(img, x0, y0, alpha, layer)


def _free_spot(
    rng: np.random.Generator,
    occupied: np.ndarray,
    p: int,
    half: int,
    box: Tuple[int, int, int, int],
    cluster: Tuple[np.ndarray, float] | None,
) -> Tuple[int, int] | None:
    """The top-left corner of a free ``p``-pixel patch whose shape's ``box`` (patch pixels),
    one pixel around it, touches no placed object: 50 tries, the first 25 near ``cluster``'s
    centre (a Gaussian of its sigma) when given; ``None`` when none is free."""
    h, w = occupied.shape
    bx0, by0, bx1, by1 = box
    for attempt in range(50):
        if attempt < 25 and cluster is not None:
            cx, cy = cluster[0] + rng.normal(0.0, cluster[1], size=2) - half
            x0 = int(min(max(round(cx), 0), w - p))
            y0 = int(min(max(round(cy), 0), h - p))
        else:
            x0 = int(rng.integers(0, w - p + 1))
            y0 = int(rng.integers(0, h - p + 1))
        ys = slice(max(y0 + by0 - 1, 0), y0 + by1 + 1)
        xs = slice(max(x0 + bx0 - 1, 0), x0 + bx1 + 1)
        if not occupied[ys, xs].any():
            return x0, y0
    return None


def render_crowded_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    classes: Sequence[_ClassSpec],
    num_objects: int,
    object_size: Tuple[float, float],
    *,
    distractor_ratio: float = 0.125,
    object_like_distractors: bool = False,
    clustered: float = 0.0,
) -> Tuple[np.ndarray, List[Dict[str, object]]]:
    """Render one crowded scene: up to ``num_objects`` small, non-overlapping objects.

    Each object's extent (diameter) is log-uniform in ``object_size``; objects lie fully inside
    the image, at least one pixel apart (their boxes never touch), over a cluttered background
    with lines and ``int(num_objects * distractor_ratio)`` unannotated distractors of object size
    (blobs and bars; with ``object_like_distractors`` also arcs and half discs, half of them in
    saturated, possibly object-like hues). Objects are placed largest first; a shape
    whose visible box is under 3 px is redrawn (up to 5 times, same size), and one that finds no
    free place in 50 tries is skipped, so a too-small image gets fewer objects than asked for.

    ``clustered`` is the share of objects that look for a place near one of
    ``max(1, round(num_objects * clustered / 12))`` cluster centres first (a Gaussian of 6-20 px
    around a centre drawn uniformly in the image, 25 tries, then anywhere): dense groups of
    nearly touching objects (retail shelves, cell clumps, parking lots) among scattered ones.
    With the defaults (1/8 plain distractors, no clusters) the images are those this function
    drew before these options existed, as long as no shape needs a redraw (none does from
    ~6 px up).

    Returns:
        ``(image, objects)`` as :func:`render_synthetic_image`: ``(height, width, 3)`` uint8 BGR
        and ``{"category_id", "bbox": [x, y, w, h], "area"}`` per object.
    """
    h, w = int(height), int(width)
    lo, hi = float(object_size[0]), float(object_size[1])
    img = _crowded_background(h, w, rng)
    # distractors, drawn first (objects may cover them)
    for _ in range(int(int(num_objects) * float(distractor_ratio))):
        _draw_crowded_distractor(img, rng, lo, hi, object_like_distractors)
    centres = np.zeros((0, 2))
    sigmas = np.zeros(0)
    if clustered > 0 and num_objects > 0:
        k = max(1, int(round(num_objects * clustered / 12)))
        centres = rng.uniform(0, 1, size=(k, 2)) * np.array([w, h], dtype=np.float64)
        sigmas = rng.uniform(6.0, 20.0, size=k)

    occupied = np.zeros((h, w), dtype=bool)
    objects: List[Dict[str, object]] = []
    # the largest objects are placed first: random sequential packing then fits far more
    sizes = np.sort(np.exp(rng.uniform(math.log(lo), math.log(hi), size=int(num_objects))))[::-1]
    for size in sizes.tolist():
        spec = classes[int(rng.integers(0, len(classes)))]
        half = int(math.ceil(size / 2)) + 2
        p = 2 * half
        centre = np.array([half, half], dtype=np.float64)
        alpha_u8, binary, (bx0, by0, bx1, by1) = _draw_crowded_shape(spec, size, rng, p, h, w)
        if p > min(h, w) or not _box_ok((bx0, by0, bx1, by1)):
            continue
        cluster = None
        if len(centres) and rng.random() < clustered:
            k = int(rng.integers(0, len(centres)))
            cluster = (centres[k], sigmas[k])
        spot = _free_spot(rng, occupied, p, half, (bx0, by0, bx1, by1), cluster)
        if spot is None:
            continue
        x0, y0 = spot
        occupied[y0 + by0 : y0 + by1, x0 + bx0 : x0 + bx1] = True
        layer = _texture_layer(spec, size, centre, p, rng)
        _paste_blurred(img, x0, y0, alpha_u8.astype(np.float32) / 255.0, layer, rng)
        objects.append(
            {
                "category_id": spec.dataset_id,
                "bbox": [float(x0 + bx0), float(y0 + by0), float(bx1 - bx0), float(by1 - by0)],
                "area": float(max(int(np.count_nonzero(binary)), 1)),
            }
        )
    noise = rng.standard_normal(size=img.shape, dtype=np.float32)
    img += noise * np.float32(rng.uniform(2.0, 8.0))
    return np.clip(np.round(img), 0, 255).astype(np.uint8), objects


# --------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------


def _split_paths(root: str) -> Dict[str, str]:
    ann = os.path.join(root, "annotations")
    return {
        "root": root,
        "train_json": os.path.join(ann, "instances_train.json"),
        "val_json": os.path.join(ann, "instances_val.json"),
        "train_image_root": os.path.join(root, "train"),
        "val_image_root": os.path.join(root, "val"),
    }


def synthetic_dataset_exists(root: str) -> bool:
    """Whether ``root`` holds a complete generated dataset (both JSON files are written last)."""
    paths = _split_paths(os.path.abspath(root))
    return os.path.isfile(paths["train_json"]) and os.path.isfile(paths["val_json"])


def _remove_previous(paths: Dict[str, str]) -> None:
    """Delete files a previous generation wrote (only those: images and the two JSONs)."""
    for key in ("train_json", "val_json"):
        if os.path.isfile(paths[key]):
            os.remove(paths[key])
    for key in ("train_image_root", "val_image_root"):
        d = paths[key]
        if os.path.isdir(d):
            for f in os.listdir(d):
                if f.endswith((".png", ".jpg")):
                    os.remove(os.path.join(d, f))


def _generate_split(
    split: str,
    num_images: int,
    image_dir: str,
    *,
    image_size: int,
    classes: Sequence[_ClassSpec],
    seed: int,
    image_format: str,
) -> Tuple[List[dict], List[dict]]:
    os.makedirs(image_dir, exist_ok=True)
    images: List[dict] = []
    annotations: List[dict] = []
    for i in range(num_images):
        rng = np.random.default_rng([int(seed), _SPLIT_CODES[split], i])
        image, objects = render_synthetic_image(
            rng, image_size, classes, empty=(i % _EMPTY_EVERY == 1)
        )
        params = _write_params(image_format)
        images.append(_write_image(image_dir, i + 1, image, image_format, params))
        _append_annotations(annotations, i + 1, objects)
    return images, annotations


def _write_json(path: str, data: dict) -> None:
    """Write ``data`` compactly and deterministically; atomic via a temporary file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(tmp, path)


def _prepare_root(root: str, overwrite: bool) -> Dict[str, str]:
    """The dataset's absolute paths; an existing dataset there is removed or refused."""
    paths = _split_paths(os.path.abspath(root))
    existing = [p for p in (paths["train_json"], paths["val_json"]) if os.path.exists(p)] + [
        d
        for d in (paths["train_image_root"], paths["val_image_root"])
        if os.path.isdir(d) and os.listdir(d)
    ]
    if existing:
        if not overwrite:
            raise FileExistsError(
                f"A synthetic dataset already exists at {paths['root']} (found {existing[0]}). "
                "Pass overwrite=True (--overwrite) to regenerate it, or choose another root."
            )
        _remove_previous(paths)
    os.makedirs(os.path.dirname(paths["train_json"]), exist_ok=True)
    return paths


def _coco_data(
    description: str,
    split: str,
    generator_args: Dict[str, object],
    images: List[dict],
    annotations: List[dict],
    classes: Sequence[_ClassSpec],
) -> dict:
    """The COCO instances dict of one split (key order fixed: the JSON is byte-stable)."""
    return {
        "info": {
            "description": description,
            "version": _FORMAT_VERSION,
            "year": 2024,
            "contributor": "kd2.data.synthetic",
            "date_created": "",
            "split": split,
            "generator_args": generator_args,
        },
        "licenses": [{"id": 1, "name": "CC0 1.0 (synthetic data)", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": c.dataset_id, "name": c.name, "supercategory": "shape"} for c in classes
        ],
    }


def _append_annotations(annotations: List[Dict], image_id: int, objects: List[Dict]) -> None:
    """Append one image's objects to the COCO ``annotations`` list (ids continue from it)."""
    for obj in objects:
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": obj["category_id"],
                "bbox": obj["bbox"],
                "area": obj["area"],
                "iscrowd": 0,
            }
        )


def _check_synthetic_args(
    num_train: int, num_val: int, image_size: int, num_classes: int, image_format: str
) -> None:
    if not 1 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise ValueError(f"num_classes must be in 1..{len(SYNTHETIC_CLASSES)}, got {num_classes}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train/num_val must be >= 0, got {num_train}/{num_val}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")


def generate_synthetic_dataset(
    root: str,
    *,
    num_train: int = 600,
    num_val: int = 200,
    image_size: int = 128,
    num_classes: int = 6,
    seed: int = 0,
    overwrite: bool = False,
    image_format: str = "png",
) -> Dict[str, str]:
    """Generate the synthetic dataset under ``root``.

    Layout::

        root/train/000001.png ...          root/val/000001.png ...
        root/annotations/instances_train.json
        root/annotations/instances_val.json

    Args:
        root: output directory (created if needed).
        num_train, num_val: number of images per split (``>= 0``).
        image_size: side of the square images in pixels (``>= 32``).
        num_classes: number of classes, 1..8 (the first ``num_classes`` rows of
            :data:`SYNTHETIC_CLASSES`; their ids are non-contiguous).
        seed: base random seed; same arguments give byte-identical outputs.
        overwrite: regenerate when a dataset already exists at ``root`` (only the files this
            generator writes are deleted). Without it an existing dataset raises.
        image_format: ``"png"`` (lossless, default) or ``"jpg"``.

    Returns:
        ``{"root", "train_json", "val_json", "train_image_root", "val_image_root"}`` (absolute).

    Raises:
        FileExistsError: a dataset (or a partial one) is already at ``root`` and not
            ``overwrite``.
        ValueError: an argument is out of range.
    """
    _check_synthetic_args(num_train, num_val, image_size, num_classes, image_format)
    paths = _prepare_root(root, overwrite)
    classes = SYNTHETIC_CLASSES[:num_classes]
    t0 = time.perf_counter()
    for split, n in (("train", num_train), ("val", num_val)):
        images, annotations = _generate_split(
            split,
            n,
            paths[f"{split}_image_root"],
            image_size=image_size,
            classes=classes,
            seed=seed,
            image_format=image_format,
        )
        generator_args = {
            "num_images": n,
            "image_size": image_size,
            "num_classes": num_classes,
            "seed": seed,
            "image_format": image_format,
        }
        data = _coco_data(
            "kd2 synthetic ambiguous-shapes detection dataset",
            split,
            generator_args,
            images,
            annotations,
            classes,
        )
        _write_json(paths[f"{split}_json"], data)
    logger.info(
        "Generated synthetic dataset at %s (%d train / %d val images) in %.1fs",
        paths["root"],
        num_train,
        num_val,
        time.perf_counter() - t0,
    )
    return paths


def _write_params(image_format: str) -> list:
    """``cv2.imwrite`` options: PNG compression 3, or JPEG quality 95."""
    if image_format == "jpg":
        return [cv2.IMWRITE_JPEG_QUALITY, 95]
    return [cv2.IMWRITE_PNG_COMPRESSION, 3] if image_format == "png" else []


def _write_image(image_dir: str, image_id: int, image: np.ndarray, image_format: str, params):
    """Write image ``image_id`` as ``<id:06d>.<format>``; its COCO ``images`` entry."""
    h, w = image.shape[:2]
    file_name = f"{image_id:06d}.{image_format}"
    if not cv2.imwrite(os.path.join(image_dir, file_name), image, params):
        raise OSError(f"cv2 could not write {os.path.join(image_dir, file_name)}")
    return {"id": image_id, "file_name": file_name, "width": w, "height": h, "license": 1}


def _check_crowded_args(
    num_train, num_val, min_side, max_side, counts, min_object, max_object, num_classes,
    image_format, distractor_ratio, clustered,
) -> None:  # fmt: skip
    lo_n, hi_n = counts
    if not 1 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise ValueError(f"num_classes must be in 1..{len(SYNTHETIC_CLASSES)}, got {num_classes}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train/num_val must be >= 0, got {num_train}/{num_val}")
    if not 4 <= min_object <= max_object:
        raise ValueError(f"need 4 <= min_object <= max_object, got {min_object}, {max_object}")
    if not max_object + 6 <= min_side <= max_side:
        raise ValueError(
            f"need max_object + 6 <= min_side <= max_side, got {min_side}, {max_side} "
            f"(max_object {max_object})"
        )
    if not 0 <= lo_n <= hi_n:
        raise ValueError(f"objects_per_image must be (lo, hi) with 0 <= lo <= hi, got {lo_n, hi_n}")
    if not (0 <= distractor_ratio and 0 <= clustered <= 1):
        raise ValueError(
            f"need distractor_ratio >= 0 and 0 <= clustered <= 1, got {distractor_ratio}, "
            f"{clustered}"
        )
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")


def _crowded_split_image(
    rng: np.random.Generator,
    label: str,
    sides: Tuple[int, int],
    counts: Tuple[int, int],
    count_scales_with_area: bool,
    classes,
    object_size: Tuple[float, float],
    **render_options,
):
    """One image of a crowded split: its sides and object count drawn from ``rng``, then
    :func:`render_crowded_image`; a warning when fewer objects fit than were drawn."""
    min_side, max_side = sides
    lo_n, hi_n = counts
    h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    top = hi_n
    if count_scales_with_area:
        top = max(lo_n, min(hi_n, int(hi_n * h * w / max_side**2)))
    wanted = int(rng.integers(lo_n, top + 1))
    image, objects = render_crowded_image(rng, h, w, classes, wanted, object_size, **render_options)
    if len(objects) < wanted:
        logger.warning(
            "%s (%dx%d): placed %d of %d objects (no free space left, or shapes too small)",
            label,
            w,
            h,
            len(objects),
            wanted,
        )
    return image, objects


def _write_crowded_split(
    paths: Dict[str, str], split: str, n: int, seed: int, image_format: str, image_args: dict
) -> None:
    """The ``n`` images of a crowded split and its COCO file (``generator_args`` recorded)."""
    image_dir = paths[f"{split}_image_root"]
    os.makedirs(image_dir, exist_ok=True)
    params = _write_params(image_format)
    images: List[dict] = []
    annotations: List[dict] = []
    for i in range(n):
        rng = np.random.default_rng([int(seed), _SPLIT_CODES[split], i, _CROWDED_STREAM])
        image, objects = _crowded_split_image(rng, f"crowded {split} image {i}", **image_args)
        images.append(_write_image(image_dir, i + 1, image, image_format, params))
        _append_annotations(annotations, i + 1, objects)
    (min_side, max_side), (lo_n, hi_n) = image_args["sides"], image_args["counts"]
    min_object, max_object = image_args["object_size"]
    classes = image_args["classes"]
    generator_args = {
        "generator": "crowded",
        "num_images": n,
        "min_side": min_side,
        "max_side": max_side,
        "objects_per_image": [lo_n, hi_n],
        "min_object": min_object,
        "max_object": max_object,
        "num_classes": len(classes),
        "seed": seed,
        "image_format": image_format,
        "count_scales_with_area": image_args["count_scales_with_area"],
        "distractor_ratio": image_args["distractor_ratio"],
        "object_like_distractors": image_args["object_like_distractors"],
        "clustered": image_args["clustered"],
    }
    _write_json(
        paths[f"{split}_json"],
        _coco_data(
            "kd2 synthetic crowded small-object detection dataset",
            split,
            generator_args,
            images,
            annotations,
            classes,
        ),
    )


def generate_crowded_dataset(
    root: str,
    *,
    num_train: int = 4,
    num_val: int = 2,
    min_side: int = 400,
    max_side: int = 2500,
    objects_per_image: Tuple[int, int] = (50, 600),
    min_object: float = 10.0,
    max_object: float = 60.0,
    num_classes: int = 3,
    seed: int = 0,
    overwrite: bool = False,
    image_format: str = "png",
    count_scales_with_area: bool = False,
    distractor_ratio: float = 0.125,
    object_like_distractors: bool = False,
    clustered: float = 0.0,
) -> Dict[str, str]:
    """Generate a crowded small-object dataset (aerial-imagery-like) under ``root``.

    Few large, non-square images with hundreds of small objects each: image ``i`` of a split
    has a height and a width drawn independently and uniformly in ``[min_side, max_side]``,
    a number of objects uniform in ``objects_per_image`` (inclusive; fewer only when the image
    is too full to place them without overlap) and object extents log-uniform in
    ``[min_object, max_object]`` pixels (a box's longer side is about 0.75-1.2x the extent).
    Objects never overlap and are never truncated; there are no empty images. The classes,
    the shapes and the COCO layout and conventions are those of
    :func:`generate_synthetic_dataset` (same directory layout, same JSON structure, with
    ``generator_args`` naming this generator's arguments); image ``i`` of a split is drawn from
    ``numpy.random.default_rng((seed, split, i, 1))`` only, so outputs are byte-identical per
    seed. The defaults resemble a real aerial set (4 images of 400-2500 px, 10-60 px objects,
    up to ~600 per image, 3 classes).

    With ``count_scales_with_area`` the upper end of ``objects_per_image`` is for an image of
    ``max_side x max_side`` and shrinks with the image's area (``hi * h * w / max_side**2``, never
    below the lower end), so small images are not packed denser than large ones.
    ``distractor_ratio``, ``object_like_distractors`` and ``clustered`` are passed to
    :func:`render_crowded_image`. :func:`generate_crowded_benchmark` is the benchmark profile
    built from these options.

    Returns:
        the paths dict of :func:`generate_synthetic_dataset`.

    Raises:
        FileExistsError: as :func:`generate_synthetic_dataset`.
        ValueError: an argument is out of range.
    """
    lo_n, hi_n = (int(v) for v in objects_per_image)
    _check_crowded_args(
        num_train, num_val, min_side, max_side, (lo_n, hi_n), min_object, max_object,
        num_classes, image_format, distractor_ratio, clustered,
    )  # fmt: skip
    paths = _prepare_root(root, overwrite)
    classes = SYNTHETIC_CLASSES[:num_classes]
    t0 = time.perf_counter()
    image_args = {
        "sides": (min_side, max_side),
        "counts": (lo_n, hi_n),
        "count_scales_with_area": count_scales_with_area,
        "classes": classes,
        "object_size": (min_object, max_object),
        "distractor_ratio": distractor_ratio,
        "object_like_distractors": object_like_distractors,
        "clustered": clustered,
    }
    for split, n in (("train", num_train), ("val", num_val)):
        _write_crowded_split(paths, split, n, seed, image_format, image_args)
    logger.info(
        "Generated crowded synthetic dataset at %s (%d train / %d val images) in %.1fs",
        paths["root"],
        num_train,
        num_val,
        time.perf_counter() - t0,
    )
    return paths


#: The "crowded" benchmark profile (:func:`generate_crowded_benchmark`): the second benchmark's
#: data, unlike the first profile in every way its papers' settings assume.
CROWDED_BENCHMARK: Dict[str, object] = {
    "min_side": 256,
    "max_side": 512,
    "objects_per_image": (20, 200),
    "count_scales_with_area": True,
    "min_object": 4.0,
    "max_object": 30.0,
    "num_classes": 6,
    "distractor_ratio": 0.35,
    "object_like_distractors": True,
    "clustered": 0.5,
}


def generate_crowded_benchmark(
    root: str,
    *,
    num_train: int = 300,
    num_val: int = 100,
    seed: int = 0,
    overwrite: bool = False,
    image_format: str = "png",
    **overrides: object,
) -> Dict[str, str]:
    """Generate the "crowded" benchmark profile under ``root`` (builtin datasets
    ``synthetic_crowded_train`` / ``synthetic_crowded_val``).

    Many small objects on larger images: sides drawn independently in 256-512 px (non-square),
    20-200 objects per image with the upper end scaled by the image area (20-50 on a 256 x 256
    image, 20-200 on a 512 x 512 one), extents log-uniform in 4-30 px, half of the objects
    packed in clusters of nearly touching objects, and 0.35 unannotated distractors per object
    (blobs, bars, arcs, half discs, half of them in object-like hues) over the cluttered
    background. The 6 classes of :func:`generate_synthetic_dataset` (ids 1, 2, 3, 5, 7, 9), whose
    confusable pairs become very hard below ~8 px. Objects never overlap and are never truncated.
    :data:`CROWDED_BENCHMARK` holds the profile; ``overrides`` replace its entries (arguments of
    :func:`generate_crowded_dataset`). Same arguments, byte-identical files.
    """
    kwargs = {**CROWDED_BENCHMARK, **overrides}
    return generate_crowded_dataset(
        root,
        num_train=num_train,
        num_val=num_val,
        seed=seed,
        overwrite=overwrite,
        image_format=image_format,
        **kwargs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    p = argparse.ArgumentParser(
        prog="python -m kd2.data.synthetic",
        description="Generate kd2's deterministic synthetic detection dataset (COCO format).",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--profile",
        choices=("default", "crowded"),
        default="default",
        help="default: the ambiguous-shapes data (128 px, 1-8 objects); crowded: the second "
        "benchmark's data (256-512 px, 20-200 objects of 4-30 px, generate_crowded_benchmark)",
    )
    p.add_argument("--num-train", type=int, default=None, help="default 600 (crowded: 300)")
    p.add_argument("--num-val", type=int, default=None, help="default 200 (crowded: 100)")
    p.add_argument("--image-size", type=int, default=None, help="default 128 (default profile)")
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("png", "jpg"), default="png", dest="image_format")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    args = p.parse_args(argv)
    crowded = args.profile == "crowded"
    if crowded and args.image_size is not None:
        p.error("--image-size applies to the default profile (crowded images are 256-512 px)")
    if args.num_train is None:
        args.num_train = 300 if crowded else 600
    if args.num_val is None:
        args.num_val = 100 if crowded else 200
    common = dict(
        num_train=args.num_train,
        num_val=args.num_val,
        seed=args.seed,
        overwrite=args.overwrite,
        image_format=args.image_format,
    )
    t0 = time.perf_counter()
    try:
        if crowded:
            paths = generate_crowded_benchmark(args.out, num_classes=args.num_classes, **common)
        else:
            paths = generate_synthetic_dataset(
                args.out,
                image_size=128 if args.image_size is None else args.image_size,
                num_classes=args.num_classes,
                **common,
            )
    except (FileExistsError, ValueError) as e:
        p.error(str(e))
    print(
        f"Wrote {args.num_train} train / {args.num_val} val images in "
        f"{time.perf_counter() - t0:.1f}s:"
    )
    for k, v in paths.items():
        print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
