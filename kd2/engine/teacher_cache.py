"""Build a teacher cache and attach one to a run (``tools/cache_teacher.py``, ``KD.TEACHER.CACHE``).

:func:`build_teacher_cache` runs the configured distillation model once over every finite
augmentation variant of the training set — each image, flipped and not when ``INPUT.RANDOM_FLIP``
is on — exactly as a training step prepares it (the student's own resizing, normalisation and
padding; the teacher's record made by the live code path), one image per step, and stores what
KD.TEACHER's methods read (:mod:`kd2.modeling.teacher_cache`). The resizing must be deterministic:
a multi-scale ``INPUT.MIN_SIZE_TRAIN`` draws the size at random each step, which no finite set of
entries covers, and is refused.

Training with ``KD.TEACHER.CACHE`` (:func:`attach_teacher_cache`) reads an entry only for a batch
whose geometry is the entry's — every image at its recorded size, the batch padded to it; any
other batch runs the live teacher, counted as a miss and reported at the end of the run.

The **fingerprint** (:func:`teacher_cache_fingerprint`) holds everything the entries depend on:
kd2's version, the teacher's backend, config, weights (sha256) and runtime options, the training
set (names, size, a hash of its records), the student's input pipeline, and the teacher parts and
levels; a cache built for anything else is refused with the fields that differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from functools import partial
from typing import Callable, Dict, List

import torch
from torch import nn

import kd2
from kd2.data import records_of
from kd2.data.loader import DetectionDataset, model_targets
from kd2.modeling.teacher_cache import (
    CacheWriter,
    TeacherCache,
    cache_key,
    head_tensors,
    require_cacheable,
)
from kd2.utils.checkpoint import file_sha256
from kd2.utils.errors import ConfigError

__all__ = [
    "attach_teacher_cache",
    "build_teacher_cache",
    "log_cache_use",
    "teacher_cache_fingerprint",
]

logger = logging.getLogger(__name__)


def _source_digest(path: str) -> str:
    """sha256 of a config file, of a model directory's ``config.json``, or of a name."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return file_sha256(os.path.join(path, "config.json"))
    if os.path.isfile(path):
        return file_sha256(path)
    return hashlib.sha256(path.encode()).hexdigest()


def _weights_digest(node) -> str:
    weights = str(node.WEIGHTS or "")
    if not weights and os.path.isdir(str(node.CONFIG)):
        weights = os.path.join(str(node.CONFIG), "model.safetensors")
    return file_sha256(weights) if weights and os.path.isfile(weights) else ""


def _records_digest(records: List[Dict]) -> str:
    rows = [
        (str(r["file_name"]), int(r["image_id"]), int(r["height"]), int(r["width"]))
        for r in records
    ]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def teacher_cache_fingerprint(cfg, model: nn.Module, records: List[Dict]) -> Dict:
    """What a cache's entries depend on (see the module docstring), JSON-serialisable."""
    node = cfg.KD.TEACHER
    backend = cfg.MODEL.get("BACKEND", "detectron2")  # a Detectron2 config has no such key
    student_input = {
        "backend": backend,
        "architecture": cfg.MODEL.META_ARCHITECTURE,
        "min_size_train": list(cfg.INPUT.MIN_SIZE_TRAIN),
        "max_size_train": int(cfg.INPUT.MAX_SIZE_TRAIN),
        "pixel_mean": [float(x) for x in cfg.MODEL.PIXEL_MEAN],
        "pixel_std": [float(x) for x in cfg.MODEL.PIXEL_STD],
        "random_flip": cfg.INPUT.RANDOM_FLIP,
    }
    if cfg.MODEL.META_ARCHITECTURE == "DETR":
        student_input["image_size"] = int(cfg.MODEL.HF.IMAGE_SIZE)
    for key in ("FORMAT", "MIN_SIZE_TRAIN_SAMPLING"):  # Detectron2's input keys
        if backend == "detectron2" and key in cfg.INPUT:
            student_input[key.lower()] = cfg.INPUT[key]
    foundation = node.get("FOUNDATION", None)
    return {
        "kd2": kd2.__version__,
        "teacher_backend": str(node.BACKEND or backend),
        "teacher_config": _source_digest(str(node.CONFIG)),
        "teacher_weights": _weights_digest(node),
        "teacher_dtype": str(node.DTYPE),
        "teacher_foundation": json.loads(json.dumps(dict(foundation))) if foundation else {},
        "train_datasets": list(cfg.DATASETS.TRAIN),
        "train_images": len(records),
        "train_records": _records_digest(records),
        "student_input": student_input,
        "parts": sorted(model.kd_teacher_parts.get("", frozenset())),
        "strides": sorted(int(s) for s in model.kd_teacher_infos[""].channels),
    }


def _check_deterministic_input(cfg) -> None:
    sizes = list(cfg.INPUT.MIN_SIZE_TRAIN)
    live = "or run the teacher live (no KD.TEACHER.CACHE)"
    if cfg.INPUT.get("MIN_SIZE_TRAIN_SAMPLING", "choice") == "range":
        raise ConfigError(
            f"INPUT.MIN_SIZE_TRAIN_SAMPLING range draws a size in {sizes} at random each step; a "
            "teacher cache holds one entry per image and flip, at one size",
            f"train with INPUT.MIN_SIZE_TRAIN_SAMPLING choice and one size {live}",
        )
    crop = cfg.INPUT.get("CROP", None)
    if crop is not None and crop.get("ENABLED", False):
        raise ConfigError(
            "INPUT.CROP.ENABLED: a random crop per step cannot be cached exactly",
            f"turn the crop off (INPUT.CROP.ENABLED False) {live}",
        )
    if cfg.INPUT.RANDOM_FLIP not in ("horizontal", "none"):
        raise ConfigError(
            f"INPUT.RANDOM_FLIP {cfg.INPUT.RANDOM_FLIP!r}: a teacher cache holds horizontal "
            "flips only",
            f"use INPUT.RANDOM_FLIP horizontal or none {live}",
        )
    if len(sizes) > 1:
        raise ConfigError(
            f"INPUT.MIN_SIZE_TRAIN {sizes} draws the training size at random each step; a "
            "teacher cache holds one entry per image and flip, at one size",
            "train with one size (INPUT.MIN_SIZE_TRAIN (s,)) to use a cache, or run the teacher "
            "live (no KD.TEACHER.CACHE)",
        )


def attach_teacher_cache(cfg, model: nn.Module, records: List[Dict]) -> TeacherCache | None:
    """Open ``KD.TEACHER.CACHE`` (refused when stale) and attach it to ``model``."""
    directory = str(cfg.KD.TEACHER.get("CACHE", "") or "")
    if not directory:
        return None
    _check_deterministic_input(cfg)
    cache = TeacherCache(directory, teacher_cache_fingerprint(cfg, model, records))
    model.kd_attach_cache(cache)
    logger.info(
        "KD.TEACHER.CACHE %s: %d cached (image, flip) entries, %s; the teacher runs live only "
        "for batches the cache does not hold exactly",
        directory,
        len(cache),
        cache.manifest.get("dtype"),
    )
    return cache


def log_cache_use(model: nn.Module) -> None:
    """Log how many batches the model's attached cache served and how many ran live."""
    cache = getattr(model, "kd_cache", None)
    if cache is not None:
        logger.info(
            "KD.TEACHER.CACHE: %d batches read from the cache, %d run live (not held exactly)",
            cache.hits,
            cache.misses,
        )


def _same_size_batches(variants, records, batch_size: int):
    """The variants in batches of images of one size (so that each batch is padded exactly as
    each of its images alone: the geometry an entry records), ``batch_size`` at most."""
    by_size: Dict[tuple, list] = {}
    for i, flip in variants:
        by_size.setdefault((records[i]["height"], records[i]["width"]), []).append((i, flip))
    for group in by_size.values():
        for k in range(0, len(group), batch_size):
            yield group[k : k + batch_size]


def _kd2_loop_batch(model: nn.Module, dataset, device, target_offset: int, variants):
    """A batch of ``(record index, flip)`` variants of one size through a kd2-loop student's
    training preprocessing and the live teacher: ``(student record, teacher record, keys)``."""
    samples = [dataset.load_variant(i, f) for i, f in variants]
    targets = model_targets([t for _, t in samples], target_offset, device)
    images = [im.to(device) for im, _ in samples]
    if len(images) == 1:  # some heads reject one image (GroupNorm on a 1x1 level)
        images, targets = images * 2, targets * 2
    with torch.no_grad():
        rec, _ = model.student_step(images, targets)
        teacher = model.teacher_records(rec, [""])[""]
    return rec, teacher, [cache_key(t["image_id"], t["flipped"]) for _, t in samples]


def _write_entries(writer: CacheWriter, rec, teacher, keys: List[str]) -> None:
    """Each image's teacher features and head outputs with the geometry it was recorded at."""
    hp, wp = rec.images.shape[-2:]
    for n, key in enumerate(keys):
        h, w = rec.image_sizes[n]
        features = {s: f[n] for s, f in teacher.features.items()}
        writer.add(key, features, (h, w, hp, wp), head_tensors(teacher, n))


def _finish(writer: CacheWriter, output: str, entries: int, seconds: float) -> Dict:
    """Mark the cache complete with its size and build time; log them."""
    writer.flush()
    size = sum(s["bytes"] for s in writer.manifest["shards"])
    manifest = writer.finish(
        entries=entries,
        bytes=size,
        bytes_per_entry=size / max(1, entries),
        build_seconds=round(seconds, 1),
        torch=torch.__version__,
    )
    logger.info(
        "teacher cache %s: %d entries, %.1f MB (%.1f kB per entry), built in %.0f s",
        output,
        entries,
        size / 1e6,
        size / max(1, entries) / 1e3,
        seconds,
    )
    return manifest


def build_teacher_cache(
    cfg,
    model: nn.Module,
    output: str,
    *,
    dtype: str = "float16",
    shard_size: int = 256,
    stop_after_shards: int | None = None,
    progress: bool = True,
    target_offset: int = 0,
    batch_size: int = 8,
    only: set | None = None,
    records: List[Dict] | None = None,
    run_batch: Callable | None = None,
) -> Dict:
    """Run ``model``'s teacher over every training variant and store its record in ``output``
    (resuming a build that stopped); returns the manifest. The teacher runs on batches of up
    to ``batch_size`` images of one size. ``stop_after_shards``: stop once that many new shards
    are written (tests of the resume). ``only``: the keys (:func:`cache_key`) to build, a subset
    of the variants (a benchmark's batches); default all. ``records`` (default: the records of
    ``DATASETS.TRAIN``) and ``run_batch(variants) -> (student record, teacher record, keys)``
    (default: kd2's loop) are a framework's own (:func:`kd2.d2.engine.build_d2_teacher_cache`)."""
    from tqdm import tqdm

    _check_deterministic_input(cfg)
    if model.teacher is None:
        raise ConfigError(
            f"KD.METHODS {list(cfg.KD.METHODS)} learn from no KD.TEACHER: there is nothing to cache"
        )
    records = records_of(cfg.DATASETS.TRAIN) if records is None else records
    require_cacheable(model.kd_teacher_parts.get("", frozenset()), model.kd_head_split)
    writer = CacheWriter(
        output, teacher_cache_fingerprint(cfg, model, records), dtype=dtype, shard_size=shard_size
    )
    flips = [False, True] if cfg.INPUT.RANDOM_FLIP == "horizontal" else [False]
    variants = [(i, f) for i in range(len(records)) for f in flips]
    if only is not None:
        variants = [(i, f) for i, f in variants if cache_key(records[i]["image_id"], f) in only]
    done = writer.done_keys
    todo = [(i, f) for i, f in variants if cache_key(records[i]["image_id"], f) not in done]
    if run_batch is None:
        device = next(model.parameters()).device
        dataset = DetectionDataset(
            records, train=True, corrupt_images=cfg.DATALOADER.CORRUPT_IMAGES
        )
        run_batch = partial(_kd2_loop_batch, model, dataset, device, target_offset)
    shards_before = len(writer.manifest["shards"])
    t0 = time.perf_counter()
    model.train()  # the student's training-time preprocessing; its outputs are discarded
    bar = tqdm(
        total=len(variants),
        initial=len(variants) - len(todo),
        desc="teacher cache",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for batch in _same_size_batches(todo, records, batch_size):
            _write_entries(writer, *run_batch(batch))
            bar.update(len(batch))
            if stop_after_shards is not None:
                if len(writer.manifest["shards"]) - shards_before >= stop_after_shards:
                    return writer.manifest
    finally:
        bar.close()
    return _finish(writer, output, len(variants), time.perf_counter() - t0)
