"""COCO box AP evaluation with pycocotools, and the inference loop that feeds it.

Predictions are torchvision-style dicts per image::

    {"boxes": (D, 4) XYXY in ORIGINAL image pixels, "scores": (D,), "labels": (D,) contiguous}

They are converted to COCO results (``[x, y, w, h]`` in float64, dataset category ids) and
scored with ``COCOeval(iouType="bbox")``. The reported numbers are COCO's first six summary
statistics times 100: ``AP`` (IoU .50:.95), ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``.
A metric COCO cannot define (no ground truth in that size range: COCO's ``-1``) is ``nan``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from tqdm import tqdm

from kd2.data.catalog import MetadataCatalog

__all__ = ["COCOEvaluator", "inference_on_dataset", "BBOX_METRICS"]

logger = logging.getLogger(__name__)

#: Names of the returned metrics, in COCOeval ``stats`` order.
BBOX_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _dist_ready() else 0


def _to_numpy(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        x = x.to(torch.float64) if dtype == np.float64 else x.to(torch.int64)
        return x.numpy()
    return np.asarray(x, dtype=dtype)


#: ``TEST.COCO_EVAL_BACKEND`` values: the reference implementation and a maintained drop-in with
#: a C++ core (the same metrics; ``tests/evaluation/test_coco_evaluation.py`` checks them against
#: each other; ``benchmarks/coco_eval_speed.py`` measures the speed-up). ``"auto"`` (the default) is
#: faster_coco_eval where it is installed, else pycocotools.
COCO_EVAL_BACKENDS = ("pycocotools", "faster_coco_eval")


def coco_api(backend: str = "auto"):
    """``(COCO, COCOeval)`` classes of an evaluation backend (see :data:`COCO_EVAL_BACKENDS`)."""
    if backend == "auto":
        try:
            return coco_api("faster_coco_eval")
        except ImportError:
            return coco_api("pycocotools")
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError:
            raise ImportError(
                "TEST.COCO_EVAL_BACKEND faster_coco_eval needs the package: pip install "
                "faster-coco-eval (or set TEST.COCO_EVAL_BACKEND pycocotools)"
            ) from None
        return COCO, COCOeval_faster
    raise ValueError(f"TEST.COCO_EVAL_BACKEND must be one of {COCO_EVAL_BACKENDS}, got {backend!r}")


class COCOEvaluator:
    """Box AP of detections on a COCO-format dataset registered in the catalog.

    Args:
        dataset_name: a name known to :data:`kd2.data.MetadataCatalog` whose metadata has a
            ``json_file`` (every COCO-format dataset: builtins, ``register_coco_instances``,
            ``"path/to/instances.json:path/to/images"`` names).
        output_dir: if given, ``evaluate()`` writes ``coco_instances_results.json`` there.
        backend: ``"auto"``, ``"pycocotools"`` or ``"faster_coco_eval"``
            (``TEST.COCO_EVAL_BACKEND``).

    Usage: ``reset()``, then ``process(targets, outputs)`` per batch, then ``evaluate()``.
    Only images passed to ``process`` are evaluated (all images of the dataset after a full
    pass), with or without detections.
    """

    def __init__(self, dataset_name: str, *, output_dir: str | None = None, backend: str = "auto"):
        COCO, _ = coco_api(backend)
        self.backend = backend
        self.dataset_name = dataset_name
        self.output_dir = output_dir
        meta = MetadataCatalog.get(dataset_name)
        json_file = meta.get("json_file")
        if not json_file:
            raise ValueError(
                f"COCOEvaluator needs a COCO json file, but dataset '{dataset_name}' has no "
                "'json_file' in its metadata. Register the dataset with register_coco_instances "
                "or set MetadataCatalog.get(name).json_file."
            )
        self._json_file = json_file
        with contextlib.redirect_stdout(io.StringIO()):
            self._coco_gt = COCO(json_file)
        mapping = meta.get("contiguous_id_to_dataset_id")
        if mapping is None:  # follow the loader's convention: sorted category ids
            mapping = {i: c for i, c in enumerate(sorted(self._coco_gt.getCatIds()))}
        self._contiguous_to_id = np.array(
            [int(mapping[i]) for i in range(len(mapping))], dtype=np.int64
        )
        self._gt_image_ids = set(self._coco_gt.getImgIds())
        self.reset()

    def reset(self) -> None:
        """Forget processed predictions."""
        self._results: List[Dict[str, Any]] = []
        self._image_ids: List[int] = []

    def process(self, targets: Sequence[Dict[str, Any]], outputs: Sequence[Dict[str, Any]]) -> None:
        """Record one batch: ``targets[i]["image_id"]`` and model ``outputs[i]`` (see module)."""
        if len(targets) != len(outputs):
            raise ValueError(f"process(): {len(targets)} targets but {len(outputs)} outputs")
        num_classes = len(self._contiguous_to_id)
        for target, out in zip(targets, outputs):
            image_id = int(target["image_id"])
            if image_id not in self._gt_image_ids:
                raise ValueError(
                    f"image_id {image_id} is not an image of {self._json_file} (dataset "
                    f"'{self.dataset_name}'); evaluate on the dataset the evaluator was built for."
                )
            self._image_ids.append(image_id)
            boxes = _to_numpy(out["boxes"], np.float64).reshape(-1, 4)
            scores = _to_numpy(out["scores"], np.float64).reshape(-1)
            labels = _to_numpy(out["labels"], np.int64).reshape(-1)
            if not len(boxes) == len(scores) == len(labels):
                raise ValueError(
                    f"image_id {image_id}: outputs have {len(boxes)} boxes, {len(scores)} scores, "
                    f"{len(labels)} labels"
                )
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(
                    f"image_id {image_id}: predicted labels must be contiguous ids in "
                    f"[0, {num_classes}), got range [{labels.min()}, {labels.max()}]"
                )
            cat_ids = self._contiguous_to_id[labels]
            for (x1, y1, x2, y2), s, c in zip(boxes.tolist(), scores.tolist(), cat_ids.tolist()):
                self._results.append(
                    {
                        "image_id": image_id,
                        "category_id": c,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": s,
                    }
                )

    def _gather(self) -> bool:
        """Collect every rank's predictions on rank 0; return whether this rank evaluates."""
        if not _dist_ready() or torch.distributed.get_world_size() == 1:
            return True
        payload = (self._image_ids, self._results)
        gathered: List[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, payload)
        if _rank() != 0:
            return False
        self._image_ids = [i for ids, _ in gathered for i in ids]
        self._results = [r for _, res in gathered for r in res]
        return True

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Run COCOeval; ``{"bbox": {metric: percent}}`` on rank 0, ``{}`` on other ranks."""
        COCO, COCOeval = coco_api(self.backend)

        if not self._gather():
            return {}
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            path = os.path.join(self.output_dir, "coco_instances_results.json")
            with open(path, "w") as f:
                json.dump(self._results, f)
            logger.info("Saved %d COCO results to %s", len(self._results), path)
        if not self._image_ids:
            logger.warning("COCOEvaluator: no image was processed; returning nan metrics.")
            return {"bbox": {k: float("nan") for k in BBOX_METRICS}}
        if not self._results:
            logger.warning(
                "COCOEvaluator: no detections on %d images of '%s'; AP is 0 wherever ground "
                "truth exists.",
                len(set(self._image_ids)),
                self.dataset_name,
            )

        # loadRes mutates its input and crashes on an empty list: give it copies, or an empty
        # result set built by hand.
        with contextlib.redirect_stdout(io.StringIO()):
            if self._results:
                coco_dt = self._coco_gt.loadRes(copy.deepcopy(self._results))
            else:
                coco_dt = COCO()
                coco_dt.dataset = {
                    "images": list(self._coco_gt.dataset["images"]),
                    "categories": copy.deepcopy(self._coco_gt.dataset["categories"]),
                    "annotations": [],
                }
                coco_dt.createIndex()
        summary = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(summary):
            coco_eval = COCOeval(self._coco_gt, coco_dt, iouType="bbox")
            coco_eval.params.imgIds = sorted(set(self._image_ids))
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        stats = coco_eval.stats
        metrics = {
            k: (float(stats[i] * 100) if stats[i] >= 0 else float("nan"))
            for i, k in enumerate(BBOX_METRICS)
        }
        logger.info(
            "COCO bbox evaluation of '%s' (%d images, %d detections, %.1fs):\n%s\n%s",
            self.dataset_name,
            len(coco_eval.params.imgIds),
            len(self._results),
            time.perf_counter() - t0,
            summary.getvalue().rstrip(),
            " | ".join(
                f"{k} {v:.3f}" if not math.isnan(v) else f"{k} nan" for k, v in metrics.items()
            ),
        )
        return {"bbox": metrics}


def inference_on_dataset(
    model: torch.nn.Module,
    data_loader: Any,
    evaluator: COCOEvaluator,
    *,
    device: torch.device | None = None,
) -> Dict[str, Dict[str, float]]:
    """Run ``model`` over ``data_loader`` and evaluate its outputs.

    The model is put in eval mode under ``torch.no_grad()`` and restored to its previous mode
    afterwards (also on error). Each batch ``(images, targets)`` is evaluated as
    ``evaluator.process(targets, model(images))``; ``model(images)`` must return one output
    dict per image, in original image pixels.

    Args:
        model: the detector.
        data_loader: iterable of ``(list of (3, H, W) tensors, list of targets)``.
        evaluator: e.g. a :class:`COCOEvaluator`; it is ``reset()`` first.
        device: where images are moved; default the device of the model's first parameter
            (images stay where they are for a model without parameters).

    Returns:
        ``evaluator.evaluate()`` (``{}`` on non-zero ranks when distributed).
    """
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else None
    try:
        total: int | None = len(data_loader)
    except TypeError:
        total = None
    evaluator.reset()
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    num_images = 0
    try:
        with torch.no_grad():
            for images, targets in tqdm(
                data_loader,
                total=total,
                desc="inference",
                disable=_rank() != 0 or os.environ.get("KD2_NO_PROGRESS") == "1",
                leave=False,
            ):
                if device is not None:
                    images = [im.to(device, non_blocking=True) for im in images]
                outputs = model(images)
                evaluator.process(targets, outputs)
                num_images += len(images)
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - t0
    logger.info(
        "Inference on %d images took %.2fs (%.4fs / image)",
        num_images,
        elapsed,
        elapsed / max(num_images, 1),
    )
    return evaluator.evaluate()
