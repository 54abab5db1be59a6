"""A teacher's detections on unlabelled images as a COCO file: pseudo-labels
(``tools/cache_teacher.py --pseudo-labels <image folder>``).

:func:`pseudo_label_folder` runs a trained detector (:func:`kd2.engine.predictor.load_predictor`,
any backend, the teacher's own test-time resizing) on every image of a folder and keeps, per image,
the detections scoring at least ``score_threshold``, after a per-class NMS at ``nms_iou`` and at
most ``max_per_image`` of them (highest scores first). The result is a COCO instances file a
student trains on like any other (``DATASETS.TRAIN ("my_labels", "pseudo.json:images/")``):

- ``images``: one entry per readable image (``file_name`` relative to the folder), ids from
  ``first_image_id`` so that they do not collide with the labelled set's;
- ``annotations``: ``bbox`` XYWH in image pixels, ``category_id``, ``area`` (the box's),
  ``iscrowd`` 0 and the teacher's ``score``;
- ``categories``: the labelled set's (``labeled_json``) or the teacher's training set's, so the
  contiguous class ``i`` of the teacher is the ``i``-th category by id, kd2's convention;
- ``info.pseudo_labels``: the provenance: kd2's version, the date, the teacher's backend, config
  and weights (with sha256), the folder, the thresholds and the counts.

:func:`pseudo_label_quality` measures a pseudo-label file against ground truth of the same
images (precision and recall at one IoU, boxes matched greedily by score within each class).
"""

from __future__ import annotations

import datetime
import json
import os
import time
from typing import Dict, List, Sequence

import torch

import kd2
from kd2.data.catalog import MetadataCatalog
from kd2.losses.utils import box_iou
from kd2.utils.checkpoint import file_sha256
from kd2.utils.errors import ConfigError, DataError

from .predictor import Predictor, image_files, read_rgb

__all__ = ["filter_detections", "pseudo_label_folder", "pseudo_label_quality", "teacher_categories"]


def filter_detections(
    det: Dict[str, torch.Tensor],
    *,
    score_threshold: float,
    nms_iou: float,
    max_per_image: int,
    image_size: tuple,
) -> Dict[str, torch.Tensor]:
    """One image's detections (``boxes (N, 4)`` XYXY, ``scores (N,)``, ``labels (N,)``) kept as
    pseudo-labels: score ``>= score_threshold``, clipped to ``image_size`` ``(H, W)``, boxes
    under one pixel wide or high dropped, per-class NMS at ``nms_iou`` (``>= 1`` keeps all), the
    ``max_per_image`` highest scores, sorted by score."""
    from torchvision.ops import batched_nms

    h, w = image_size
    boxes = det["boxes"].float().clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    scores, labels = det["scores"].float(), det["labels"].long()
    keep = (
        (scores >= score_threshold)
        & (boxes[:, 2] - boxes[:, 0] >= 1)
        & (boxes[:, 3] - boxes[:, 1] >= 1)
    )
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if nms_iou < 1.0:
        order = batched_nms(boxes, scores, labels, nms_iou)
    else:
        order = torch.argsort(scores, descending=True)
    order = order[:max_per_image]
    return {"boxes": boxes[order], "scores": scores[order], "labels": labels[order]}


def teacher_categories(predictor: Predictor, labeled: Dict | None = None) -> List[Dict]:
    """The COCO ``categories`` of the teacher's contiguous classes, sorted by id: those of the
    labelled COCO dict ``labeled`` when given (they must be as many), else those of the teacher's
    first training set when its catalog knows them, else ids ``1..K`` with the teacher's class
    names.

    Raises:
        ConfigError: ``labeled`` has another number of categories than the teacher has classes.
    """
    k = len(predictor.class_names)
    if labeled is not None:
        cats = sorted(labeled["categories"], key=lambda c: c["id"])
        if len(cats) != k:
            raise ConfigError(
                f"--labeled has {len(cats)} categories, the teacher {k} classes",
                "give the labelled COCO file of the teacher's classes",
            )
        return [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in cats]
    for name in predictor.cfg.DATASETS.TRAIN:
        try:
            meta = MetadataCatalog.get(name)
            ids = meta.get("contiguous_id_to_dataset_id")
        except (KeyError, AttributeError):
            ids = None
        if ids and len(ids) == k:
            return [{"id": int(ids[i]), "name": predictor.class_names[i]} for i in range(k)]
    return [{"id": i + 1, "name": n} for i, n in enumerate(predictor.class_names)]


def _labeled_set(labeled_json: str) -> tuple:
    """The labelled COCO dict (``None`` without one, read once) and the first image id after
    its largest (1 without one)."""
    if not labeled_json:
        return None, 1
    with open(labeled_json, encoding="utf-8") as f:
        labeled = json.load(f)
    return labeled, max((int(im["id"]) for im in labeled["images"]), default=0) + 1


def _annotations(det, image_id: int, first_id: int, cat_ids: Sequence[int]) -> List[Dict]:
    anns = []
    for j, ((x1, y1, x2, y2), s, c) in enumerate(
        zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist())
    ):
        anns.append(
            {
                "id": first_id + j,
                "image_id": image_id,
                "category_id": int(cat_ids[c]),
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "area": round((x2 - x1) * (y2 - y1), 2),
                "iscrowd": 0,
                "score": round(s, 4),
            }
        )
    return anns


def _provenance(predictor: Predictor, folder: str, options: Dict, teacher: Dict) -> Dict:
    weights = predictor.cfg.MODEL.WEIGHTS
    return {
        "kd2_version": kd2.__version__,
        "torch": torch.__version__,
        "date_created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "teacher_backend": predictor.backend,
        "teacher_config": teacher.get("config", ""),
        "teacher_config_sha256": file_sha256(teacher["config"])
        if os.path.isfile(teacher.get("config", ""))
        else "",
        "teacher_weights": weights,
        "teacher_weights_sha256": file_sha256(weights) if os.path.isfile(weights) else "",
        "image_dir": os.path.abspath(folder),
        **options,
    }


def _check_options(score_threshold: float, nms_iou: float, max_per_image: int) -> None:
    if not 0.0 <= score_threshold <= 1.0:
        raise ConfigError(f"--score-threshold {score_threshold} is outside [0, 1]")
    if not 0.0 < nms_iou <= 1.0:
        raise ConfigError(f"--nms-iou {nms_iou} is outside (0, 1]", "1 keeps every box")
    if max_per_image < 1:
        raise ConfigError(f"--max-per-image {max_per_image} must be at least 1")


def pseudo_label_folder(
    predictor: Predictor,
    folder: str,
    *,
    score_threshold: float = 0.5,
    nms_iou: float = 0.6,
    max_per_image: int = 100,
    labeled_json: str = "",
    first_image_id: int = 0,
    batch_size: int = 8,
    teacher: Dict | None = None,
    progress: bool = True,
) -> Dict:
    """The COCO dict of ``predictor``'s pseudo-labels on the images of ``folder`` (see the
    module docstring). ``first_image_id`` 0 starts after ``labeled_json``'s largest image id
    (1 without it); ``teacher`` (``{"config": path}``) goes into the provenance.

    Raises:
        ConfigError: a threshold outside ``[0, 1]``, ``nms_iou`` outside ``(0, 1]`` or
            ``max_per_image < 1``.
        MissingFileError: ``folder`` holds no image.
        DataError: no image in it could be read.
    """
    from tqdm import tqdm

    _check_options(score_threshold, nms_iou, max_per_image)
    files = image_files(folder, "--pseudo-labels")
    labeled, free_id = _labeled_set(labeled_json)
    categories = teacher_categories(predictor, labeled)
    cat_ids = [c["id"] for c in categories]
    next_image = first_image_id or free_id
    images, annotations, skipped = [], [], []
    t0 = time.perf_counter()
    bar = tqdm(total=len(files), desc="pseudo-labels", unit="img", disable=not progress)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        batch = [(p, read_rgb(p)) for p in chunk]
        skipped += [p for p, im in batch if im is None]
        batch = [(p, im) for p, im in batch if im is not None]
        dets = predictor.predict([im for _, im in batch]) if batch else []
        for (path, im), det in zip(batch, dets):
            h, w = im.shape[:2]
            kept = filter_detections(
                det,
                score_threshold=score_threshold,
                nms_iou=nms_iou,
                max_per_image=max_per_image,
                image_size=(h, w),
            )
            rel = os.path.relpath(path, folder) if os.path.isdir(folder) else os.path.basename(path)
            images.append({"id": next_image, "file_name": rel, "width": w, "height": h})
            annotations += _annotations(kept, next_image, len(annotations) + 1, cat_ids)
            next_image += 1
        bar.update(len(chunk))
    bar.close()
    if not images:
        raise DataError(
            f"--pseudo-labels {folder}: none of its {len(files)} images could be read",
            "give a folder of images PIL can open (JPEG, PNG, ...)",
        )
    options = {
        "score_threshold": score_threshold,
        "nms_iou": nms_iou,
        "max_per_image": max_per_image,
        "images": len(images),
        "annotations": len(annotations),
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return {
        "info": {
            "description": "pseudo-labels: a kd2 teacher's detections",
            "pseudo_labels": _provenance(predictor, folder, options, teacher or {}),
        },
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _by_file(data: Dict) -> Dict[str, Dict[int, List]]:
    """``{file_name: {category_id: [(score, xyxy), ...]}}`` of a COCO dict (crowd boxes out)."""
    names = {im["id"]: im["file_name"] for im in data["images"]}
    out: Dict[str, Dict[int, List]] = {n: {} for n in names.values()}
    for a in data["annotations"]:
        if a.get("iscrowd", 0):
            continue
        x, y, w, h = a["bbox"]
        out[names[a["image_id"]]].setdefault(a["category_id"], []).append(
            (a.get("score", 1.0), [x, y, x + w, y + h])
        )
    return out


def pseudo_label_quality(pseudo: Dict, ground_truth: Dict, iou: float = 0.5) -> Dict:
    """Precision and recall of the pseudo-labels ``pseudo`` against ``ground_truth`` (COCO
    dicts; images matched by ``file_name``, only the images ``pseudo`` holds): within each
    image and class, pseudo boxes in descending score each take the unmatched ground-truth box
    of highest IoU, a match when that IoU is ``>= iou``.

    Raises:
        DataError: an image of ``pseudo`` that ``ground_truth`` lacks.
    """
    pred, gt = _by_file(pseudo), _by_file(ground_truth)
    tp = num_pred = num_gt = 0
    for name, classes in pred.items():
        if name not in gt:
            raise DataError(f"pseudo-labelled image {name!r} is not in the ground truth")
        num_gt += sum(len(v) for v in gt[name].values())
        for cat, dets in classes.items():
            num_pred += len(dets)
            truth = [b for _, b in gt[name].get(cat, [])]
            if not truth:
                continue
            ordered = [b for _, b in sorted(dets, key=lambda d: -d[0])]
            pairwise = box_iou(
                torch.tensor(ordered, dtype=torch.float64), torch.tensor(truth, dtype=torch.float64)
            )
            free = torch.ones(len(truth), dtype=torch.bool)
            for row in pairwise:
                ious = torch.where(free, row, torch.full_like(row, -1.0))
                j = int(ious.argmax())
                if ious[j] >= iou:
                    free[j] = False
                    tp += 1
    return {
        "iou": iou,
        "pseudo_boxes": num_pred,
        "true_boxes": num_gt,
        "precision": tp / num_pred if num_pred else float("nan"),
        "recall": tp / num_gt if num_gt else float("nan"),
    }
