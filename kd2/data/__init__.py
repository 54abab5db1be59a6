"""Datasets, the dataset catalog and data loaders.

* :mod:`kd2.data.coco` - COCO JSON -> per-image records (XYXY boxes, contiguous labels);
* :mod:`kd2.data.catalog` - ``DatasetCatalog`` / ``MetadataCatalog`` and builtin datasets;
* :mod:`kd2.data.loader` - image reading, ``DetectionDataset`` and deterministic loaders;
* :mod:`kd2.data.synthetic` - the deterministic synthetic "ambiguous shapes" dataset.
"""

from kd2.data.catalog import (
    DatasetCatalog,
    Metadata,
    MetadataCatalog,
    datasets_root,
    records_of,
    register_coco_instances,
    register_config_datasets,
)
from kd2.data.coco import load_coco_json
from kd2.data.loader import (
    CorruptImageError,
    DetectionDataset,
    TrainingSampler,
    build_test_loader,
    build_train_loader,
    read_image,
    trivial_batch_collator,
)

__all__ = [
    "DatasetCatalog",
    "Metadata",
    "MetadataCatalog",
    "datasets_root",
    "records_of",
    "register_coco_instances",
    "register_config_datasets",
    "load_coco_json",
    "CorruptImageError",
    "DetectionDataset",
    "TrainingSampler",
    "build_test_loader",
    "build_train_loader",
    "read_image",
    "trivial_batch_collator",
    "SYNTHETIC_CLASSES",
    "generate_synthetic_dataset",
    "generate_crowded_dataset",
]


def __getattr__(name: str):
    # kd2.data.synthetic is imported lazily so that ``python -m kd2.data.synthetic`` does not
    # find it already imported by this package (runpy warns about that).
    if name in ("SYNTHETIC_CLASSES", "generate_synthetic_dataset", "generate_crowded_dataset"):
        from kd2.data import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module 'kd2.data' has no attribute '{name}'")
