"""The teacher cache (``KD.TEACHER.CACHE``, :mod:`kd2.engine.teacher_cache`) on Detectron2's
``KDTrainer``.

Detectron2 resizes and flips in its ``DatasetMapper``; the cache keys an entry by (image id,
flip), so:

* training reads the cache through :class:`FlipRecordingMapper`, Detectron2's training mapper
  that also writes ``"flipped"`` into each mapped dict (a dict without it, e.g. an image without
  an ``annotations`` list or a vertical flip, has no key and runs the live teacher);
* :func:`build_d2_teacher_cache` builds the entries with the same mapper, its ``RandomFlip`` fixed
  to "never" or "always", so each entry is exactly the input training gives that variant — the
  augmentations are Detectron2's own (``detection_utils.build_augmentation``), not a copy;
* :func:`kd2.d2.engine.teacher_cache_hook` attaches the cache before training (stale caches
  refused, as on kd2's loop) and logs the batches served and run live at the end.
"""

from __future__ import annotations

import copy
from typing import Dict, List

import torch
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data import transforms as T
from detectron2.utils.events import EventStorage
from torch import nn

from kd2.engine.teacher_cache import build_teacher_cache
from kd2.modeling.teacher_cache import CACHE_KEY, cache_key

__all__ = [
    "FlipRecordingMapper",
    "build_d2_teacher_cache",
    "cache_keys_of",
    "cache_records",
]


class FlipRecordingMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` that records in each dict whether it flipped the image
    horizontally (``"flipped"``): with ``image_id``, the key of its teacher-cache entry."""

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        kinds = [type(t) for t in transforms.transforms]
        if T.VFlipTransform not in kinds:  # a vertical flip has no entry: no key, run live
            dataset_dict["flipped"] = T.HFlipTransform in kinds
        super()._transform_annotations(dataset_dict, transforms, image_shape)


def fixed_flip_mapper(cfg, flip: bool) -> FlipRecordingMapper:
    """The training mapper of ``cfg`` with its ``RandomFlip`` always (``flip``) or never
    applied: the input one cache variant stands for."""
    mapper = FlipRecordingMapper(cfg, is_train=True)
    augs = [
        T.RandomFlip(prob=float(flip), horizontal=a.horizontal, vertical=a.vertical)
        if isinstance(a, T.RandomFlip)
        else a
        for a in mapper.augmentations.augs
    ]
    mapper.augmentations = T.AugmentationList(augs)
    return mapper


def cache_records(dataset_names) -> List[Dict]:
    """Detectron2's dataset dicts of ``dataset_names`` in order (``file_name``, ``image_id``,
    ``height``, ``width``, ``annotations``): the records a cache's entries are keyed by."""
    return [d for name in dataset_names for d in DatasetCatalog.get(name)]


def cache_keys_of(batched_inputs) -> List[str] | None:
    """The cache keys of a mapped batch, ``None`` when one of its dicts has no ``flipped``."""
    if not all("flipped" in x and "image_id" in x for x in batched_inputs):
        return None
    return [cache_key(x["image_id"], x["flipped"]) for x in batched_inputs]


def _d2_batch(model: nn.Module, records: List[Dict], mappers, variants):
    """``(student record, teacher record, keys)`` of a batch of same-size variants."""
    inputs = [mappers[f](copy.deepcopy(records[i])) for i, f in variants]
    keys = cache_keys_of(inputs)
    if len(inputs) == 1:  # some heads reject one image (GroupNorm on a 1x1 level)
        inputs = inputs * 2
    with torch.no_grad(), EventStorage():  # Detectron2's losses log into a storage
        rec, _ = model.student_step(inputs)
        teacher = model.teacher_records(inputs, rec, [""])[""]
    return rec, teacher, keys


def build_d2_teacher_cache(cfg, model: nn.Module, output: str, **kwargs) -> Dict:
    """:func:`kd2.engine.teacher_cache.build_teacher_cache` for a Detectron2 student: each
    variant mapped by :func:`fixed_flip_mapper`, then the student's ``preprocess_image`` and the
    live teacher record, as a ``KDTrainer`` step computes them."""
    records = cache_records(cfg.DATASETS.TRAIN)
    mappers = {f: fixed_flip_mapper(cfg, f) for f in (False, True)}
    run_batch = lambda variants: _d2_batch(model, records, mappers, variants)  # noqa: E731
    return build_teacher_cache(cfg, model, output, records=records, run_batch=run_batch, **kwargs)


def cache_forward_keys(model: nn.Module, batched_inputs, student) -> None:
    """Put the batch's cache keys into the student's record when a cache is attached."""
    if getattr(model, "kd_cache", None) is None:
        return
    keys = cache_keys_of(batched_inputs)
    if keys is not None:
        student.extras[CACHE_KEY] = keys
