"""Load COCO-format instance annotations into kd2's per-image records.

A record (one per image, sorted by image id) is::

    {
        "file_name": str,          # absolute path of the image (not checked here)
        "image_id": int,
        "height": int, "width": int,
        "boxes": np.ndarray,       # float32 (G, 4), XYXY, absolute pixels, clipped to the image
        "labels": np.ndarray,      # int64 (G,), contiguous class ids 0..K-1
        "json_file": str,          # the annotation file the record came from (for messages)
    }

Contiguous ids follow Detectron2: categories sorted by their dataset ``id``; the i-th is ``i``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, List, Tuple

import numpy as np

from kd2.utils.errors import DataError, MissingFileError

__all__ = ["load_coco_json"]

logger = logging.getLogger(__name__)

_REQUIRED_KEYS = ("images", "annotations", "categories")


def _fail(json_file: str, msg: str) -> DataError:
    return DataError(f"Invalid COCO annotation file {json_file}: {msg}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def load_coco_json(
    json_file: str, image_root: str, dataset_name: str | None = None
) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Read a COCO instances JSON file.

    Crowd annotations (``iscrowd=1``) are dropped. Boxes (COCO ``[x, y, w, h]``) are converted
    to XYXY and clipped to ``[0, width] x [0, height]``; boxes with zero or negative area after
    clipping (which includes boxes lying fully outside their image) are removed and their number
    is logged once with a warning naming the dataset. Images without boxes are kept, with
    ``boxes`` of shape ``(0, 4)`` and ``labels`` of shape ``(0,)``. Image files are *not*
    checked here; :func:`kd2.data.loader.read_image` reports missing ones.

    Args:
        json_file: path of the ``instances_*.json`` file.
        image_root: directory the images' ``file_name`` entries are relative to.
        dataset_name: name used in log and error messages (defaults to the JSON path).

    Returns:
        ``(records, metadata)``: the per-image records described in the module docstring and
        ``{"thing_classes": [name, ...], "thing_dataset_id_to_contiguous_id": {id: i},
        "contiguous_id_to_dataset_id": {i: id}, "json_file": abs path, "image_root": abs path}``.

    Raises:
        FileNotFoundError: ``json_file`` does not exist.
        ValueError: the file is not valid JSON or not a valid COCO instances file; the message
            names the file and the offending entry.
    """
    json_file = os.path.abspath(os.path.expanduser(json_file))
    image_root = os.path.abspath(os.path.expanduser(image_root))
    name = dataset_name or json_file
    data = _read_instances_file(json_file, dataset_name)
    cat_names, id_map = _categories(json_file, data["categories"])
    sorted_ids = sorted(cat_names)
    images = _images(json_file, data["images"])
    per_image, num_filtered = _annotations(json_file, data["annotations"], images, id_map)
    if num_filtered:
        logger.warning(
            "Dataset '%s': removed %d box(es) with zero/negative area or lying fully outside "
            "their image (after clipping to the image) from %s.",
            name,
            num_filtered,
            json_file,
        )

    records: List[Dict[str, Any]] = []
    for iid in sorted(images):
        img = images[iid]
        boxes, labels = per_image[iid]
        records.append(
            {
                "file_name": os.path.join(image_root, img["file_name"]),
                "image_id": iid,
                "height": img["height"],
                "width": img["width"],
                "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                "labels": np.asarray(labels, dtype=np.int64).reshape(-1),
                "json_file": json_file,
            }
        )
    metadata = {
        "thing_classes": [cat_names[c] for c in sorted_ids],
        "thing_dataset_id_to_contiguous_id": dict(id_map),
        "contiguous_id_to_dataset_id": {i: c for c, i in id_map.items()},
        "json_file": json_file,
        "image_root": image_root,
    }
    logger.info(
        "Loaded %d images and %d boxes in %d classes from %s",
        len(records),
        sum(len(r["labels"]) for r in records),
        len(sorted_ids),
        json_file,
    )
    return records, metadata


def _read_instances_file(json_file: str, dataset_name: str | None) -> Dict[str, Any]:
    """The parsed file, checked to be an object with the required lists."""
    if not os.path.isfile(json_file):
        raise MissingFileError(
            f"COCO annotation file not found: {json_file}"
            + (f" (dataset '{dataset_name}')" if dataset_name else "")
            + ". Check the path, or the DETECTRON2_DATASETS environment variable for builtin "
            "datasets."
        )
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"Invalid COCO annotation file {json_file}: not valid JSON ({e})",
            "re-export or re-download the file",
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(
            f"Invalid COCO annotation file {json_file}: not UTF-8 text ({e})."
        ) from None

    if not isinstance(data, dict):
        raise _fail(json_file, f"the top level must be an object, got {type(data).__name__}.")
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise _fail(
            json_file,
            f"missing required key(s) {missing}; a COCO instances file needs "
            f"{list(_REQUIRED_KEYS)} (an image set without labels still needs "
            '"annotations": [] and its "categories").',
        )
    for k in _REQUIRED_KEYS:
        if not isinstance(data[k], list):
            raise _fail(json_file, f'"{k}" must be a list, got {type(data[k]).__name__}.')
    return data


def _categories(json_file: str, categories: list) -> Tuple[Dict[int, str], Dict[int, int]]:
    """``({category id: name}, {category id: contiguous id})``, ids sorted."""
    cat_names: Dict[int, str] = {}
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise _fail(json_file, f"categories[{i}] needs an integer 'id', got {cat!r}.")
        if cat["id"] in cat_names:
            raise _fail(json_file, f"category id {cat['id']} appears more than once.")
        cat_names[cat["id"]] = str(cat.get("name", cat["id"]))
    return cat_names, {cid: i for i, cid in enumerate(sorted(cat_names))}


def _images(json_file: str, entries: list) -> Dict[int, Dict[str, Any]]:
    """``{image id: entry}``, each with a ``file_name`` and positive integer sides."""
    images: Dict[int, Dict[str, Any]] = {}
    for i, img in enumerate(entries):
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            raise _fail(json_file, f"images[{i}] needs an integer 'id', got {img!r}.")
        iid = img["id"]
        if iid in images:
            raise _fail(json_file, f"image id {iid} appears more than once.")
        if not isinstance(img.get("file_name"), str):
            raise _fail(json_file, f"image id {iid} has no string 'file_name'.")
        h, w = img.get("height"), img.get("width")
        if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
            raise _fail(
                json_file,
                f"image id {iid} ({img['file_name']}) needs positive integer 'height' and "
                f"'width', got height={h!r}, width={w!r}.",
            )
        images[iid] = img
    return images


def _annotations(
    json_file: str, entries: list, images: Dict[int, Dict[str, Any]], id_map: Dict[int, int]
) -> Tuple[Dict[int, Tuple[List[List[float]], List[int]]], int]:
    """Per image id its XYXY boxes (clipped to the image) and contiguous labels, crowd boxes
    dropped; and how many boxes were dropped for having no area inside their image."""
    per_image: Dict[int, Tuple[List[List[float]], List[int]]] = {iid: ([], []) for iid in images}
    num_filtered = 0
    for i, ann in enumerate(entries):
        if not isinstance(ann, dict):
            raise _fail(json_file, f"annotations[{i}] must be an object, got {ann!r}.")
        aid = ann.get("id", f"<no id, index {i}>")
        iid = ann.get("image_id")
        if iid not in images:
            raise _fail(
                json_file,
                f'annotation id {aid} refers to image_id {iid!r}, which is not in "images". '
                "Remove the annotation or add the image.",
            )
        cid = ann.get("category_id")
        if cid not in id_map:
            raise _fail(
                json_file,
                f'annotation id {aid} has category_id {cid!r}, which is not in "categories" '
                f"(known ids: {sorted(id_map)}).",
            )
        bbox = ann.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(map(_is_number, bbox))):
            raise _fail(
                json_file,
                f"annotation id {aid} has bbox {bbox!r}; expected 4 finite numbers "
                "[x, y, width, height].",
            )
        if ann.get("iscrowd", 0):
            continue
        img = images[iid]
        x, y, w, h = (float(v) for v in bbox)
        x1 = min(max(x, 0.0), img["width"])
        y1 = min(max(y, 0.0), img["height"])
        x2 = min(max(x + w, 0.0), img["width"])
        y2 = min(max(y + h, 0.0), img["height"])
        if x2 <= x1 or y2 <= y1:
            num_filtered += 1
            continue
        boxes, labels = per_image[iid]
        boxes.append([x1, y1, x2, y2])
        labels.append(id_map[cid])
    return per_image, num_filtered
