"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from kd2.data import generate_synthetic_dataset


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """``(train, val)`` dataset names of a 12 / 4-image, 64-px synthetic set (6 classes)."""
    root = tmp_path_factory.mktemp("syn")
    paths = generate_synthetic_dataset(str(root), num_train=12, num_val=4, image_size=64, seed=3)
    train = f"{paths['train_json']}:{paths['train_image_root']}"
    val = f"{paths['val_json']}:{paths['val_image_root']}"
    return train, val
