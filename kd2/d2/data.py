"""COCO files by name on Detectron2: ``"instances.json:image_dir"`` names and
``DATASETS.REGISTER`` triples, registered into Detectron2's catalogs.

The same names as kd2's torchvision backend (:mod:`kd2.data.catalog`, whose parsing and checks
are shared): any ``"path/to/instances.json:path/to/image_dir"`` name of ``DATASETS.TRAIN`` /
``DATASETS.TEST`` that Detectron2 does not know, and every ``[name, json_file, image_root]`` of
``DATASETS.REGISTER``, is registered with Detectron2's ``register_coco_instances`` (relative
paths are relative to the current directory). Its metadata then holds ``json_file``, so
``COCOEvaluator`` evaluates against that file.
"""

from __future__ import annotations

import os
from typing import List

from kd2.data.catalog import UNREGISTERED, register_coco_datasets, unknown_dataset_error
from kd2.utils.errors import DataError

__all__ = ["register_config_datasets"]


def _load_coco_json(json_file: str, image_root: str, name: str) -> List[dict]:
    """Detectron2's ``load_coco_json``; a file that is not JSON is a :class:`DataError`."""
    import json

    from detectron2.data.datasets import load_coco_json

    try:
        return load_coco_json(json_file, image_root, name)
    except json.JSONDecodeError as e:
        raise DataError(
            f"Invalid COCO annotation file {json_file} (dataset {name!r}): not valid JSON ({e})",
            "re-export or re-download the file",
        ) from None


def register_config_datasets(cfg) -> List[str]:
    """Register the config's COCO datasets in Detectron2's ``DatasetCatalog`` /
    ``MetadataCatalog``; returns their names.

    Idempotent: a name already registered with the same files is left as is (this includes
    Detectron2's builtins, e.g. ``coco_2017_val`` given its own files), so calling it from both
    ``tools/train_net.py`` and :class:`kd2.d2.KDTrainer` is safe.

    Raises:
        ValueError: a name already registered with other files, or without files (a dataset
            registered with a function), or a malformed ``DATASETS.REGISTER`` entry.
        FileNotFoundError: a JSON file or image directory that does not exist (naming the key).
        KeyError: a name of ``DATASETS.TRAIN`` / ``TEST`` that is not registered (naming the
            closest one).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    def registered_files(name: str):
        if name not in DatasetCatalog.list():
            return UNREGISTERED
        meta = MetadataCatalog.get(name)
        have = meta.get("json_file"), meta.get("image_root")
        if None in have:
            return None
        return tuple(os.path.abspath(os.path.expanduser(p)) for p in have)

    def register(name: str, json_file: str, image_root: str) -> None:
        register_coco_instances(name, {}, json_file, image_root)
        DatasetCatalog.remove(name)  # the same loader, with kd2's message for a broken file
        DatasetCatalog.register(name, lambda: _load_coco_json(json_file, image_root, name))

    names = register_coco_datasets(
        cfg, registered_files, register, catalog=" in Detectron2's DatasetCatalog"
    )
    known = DatasetCatalog.list()
    for key in ("TRAIN", "TEST"):
        for name in cfg.DATASETS.get(key, ()):
            if name not in known:  # Detectron2 would fail only when its loader is built
                raise unknown_dataset_error(f"DATASETS.{key}: dataset", name, known)
    return names
