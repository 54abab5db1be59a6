"""Hide part of a COCO training set's labels: the labelled / unlabelled split of a
semi-supervised (pseudo-label) experiment.

:func:`hide_labels` draws a fixed fraction of a COCO file's images (seeded, by image id) to keep
their labels and writes, under ``output_dir``::

    labeled.json     the kept images and their annotations (file names relative to image_root)
    hidden.json      the other images and their annotations: the ground truth the student never
                     sees, kept only to measure pseudo-labels against
    unlabeled/       the hidden images as files (hard links where possible, else copies): an
                     image folder with no labels, what ``tools/cache_teacher.py --pseudo-labels``
                     reads
    split.json       the arguments and counts (written last: a split without it is unfinished)

The builtin dataset ``synthetic_train_labeled`` is this split of ``synthetic_train`` with
:data:`SYNTHETIC_LABELED_FRACTION` (``$DETECTRON2_DATASETS/kd2_synthetic_semi``).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict

import numpy as np

from kd2.utils.checkpoint import write_text_atomic
from kd2.utils.errors import ConfigError

__all__ = ["hide_labels", "labels_hidden", "SPLIT_FILES"]

#: the files of a split, by role
SPLIT_FILES = {
    "labeled": "labeled.json",
    "hidden": "hidden.json",
    "unlabeled": "unlabeled",
    "done": "split.json",
}


def labels_hidden(output_dir: str) -> bool:
    """Whether ``output_dir`` holds a finished split."""
    return os.path.isfile(os.path.join(output_dir, SPLIT_FILES["done"]))


def _write_json(path: str, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, separators=(",", ":")))


def _link_or_copy(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.exists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _subset(data: dict, image_ids: set) -> dict:
    return {
        **{k: v for k, v in data.items() if k not in ("images", "annotations")},
        "images": [im for im in data["images"] if im["id"] in image_ids],
        "annotations": [a for a in data["annotations"] if a["image_id"] in image_ids],
    }


def hide_labels(
    json_file: str, image_root: str, output_dir: str, *, keep: float, seed: int = 0
) -> Dict[str, str]:
    """Split ``json_file``'s images into a labelled ``keep`` fraction and an unlabelled rest
    (see the module docstring); returns the paths by role. The draw is a permutation of the
    sorted image ids by ``numpy.random.default_rng(seed)``, so the same file, ``keep`` and
    ``seed`` give the same split. A finished split in ``output_dir`` is returned as is.

    Raises:
        ConfigError: ``keep`` outside ``(0, 1)``, or one that keeps no image or every image.
    """
    paths = {role: os.path.join(output_dir, name) for role, name in SPLIT_FILES.items()}
    if labels_hidden(output_dir):
        return paths
    if not 0.0 < keep < 1.0:
        raise ConfigError(f"keep={keep}: the labelled fraction must lie in (0, 1)")
    with open(json_file, encoding="utf-8") as f:
        data = json.load(f)
    ids = sorted(im["id"] for im in data["images"])
    n_keep = int(round(keep * len(ids)))
    if not 0 < n_keep < len(ids):
        raise ConfigError(
            f"keep={keep} of {len(ids)} images keeps {n_keep}",
            "choose a fraction that keeps some images and hides some",
        )
    order = np.random.default_rng(seed).permutation(len(ids))
    kept = {ids[i] for i in order[:n_keep]}
    hidden = set(ids) - kept
    os.makedirs(paths["unlabeled"], exist_ok=True)
    for im in data["images"]:
        if im["id"] in hidden:
            name = im["file_name"]
            _link_or_copy(os.path.join(image_root, name), os.path.join(paths["unlabeled"], name))
    _write_json(paths["labeled"], _subset(data, kept))
    _write_json(paths["hidden"], _subset(data, hidden))
    _write_json(
        paths["done"],
        {
            "source": os.path.abspath(json_file),
            "image_root": os.path.abspath(image_root),
            "keep": keep,
            "seed": seed,
            "labeled_images": len(kept),
            "hidden_images": len(hidden),
        },
    )
    return paths
