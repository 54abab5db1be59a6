"""Tests of kd2.data.catalog: registration, builtins, explicit json:dir names, errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

import kd2.data.catalog as catalog
from kd2.data import (
    DatasetCatalog,
    MetadataCatalog,
    generate_synthetic_dataset,
    register_coco_instances,
)
from kd2.data.catalog import register_config_datasets


def shared_coco() -> Path:
    """The mini COCO 2017 copy beside the repository (override: ``$KD2_SHARED_COCO``)."""
    env = os.environ.get("KD2_SHARED_COCO")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared/datasets/coco"


@pytest.fixture(autouse=True)
def _fresh_cache():
    DatasetCatalog.clear_cache()
    yield
    DatasetCatalog.clear_cache()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("syn")
    return generate_synthetic_dataset(str(root), num_train=3, num_val=2, image_size=64)


def test_builtins_registered_and_unknown_name() -> None:
    for name in ("coco_2017_train", "coco_2017_val", "synthetic_train", "synthetic_val"):
        assert name in DatasetCatalog.list()
    with pytest.raises(KeyError) as e:
        DatasetCatalog.get("coco_2017_vall")
    msg = str(e.value)
    assert "Did you mean 'coco_2017_val'" in msg and "synthetic_train" in msg
    with pytest.raises(KeyError, match="not registered"):
        MetadataCatalog.get("no_such_dataset")


def test_register_and_cache(tiny: dict) -> None:
    calls = []

    def load() -> list:
        calls.append(1)
        return [{"image_id": 1}]

    DatasetCatalog.register("kd2_test_custom", load)
    try:
        with pytest.raises(ValueError, match="already registered"):
            DatasetCatalog.register("kd2_test_custom", load)
        assert DatasetCatalog.get("kd2_test_custom") == [{"image_id": 1}]
        DatasetCatalog.get("kd2_test_custom")[0]["image_id"] = 5  # callers get copies
        assert DatasetCatalog.get("kd2_test_custom") == [{"image_id": 1}]
        assert len(calls) == 1
        MetadataCatalog.get("kd2_test_custom").thing_classes = ["a"]
        assert MetadataCatalog.get("kd2_test_custom")["thing_classes"] == ["a"]
    finally:
        DatasetCatalog.remove("kd2_test_custom")

    register_coco_instances("kd2_test_coco", tiny["val_json"], tiny["val_image_root"])
    try:
        meta = MetadataCatalog.get("kd2_test_coco")  # loads the file to fill the classes
        assert meta.json_file == tiny["val_json"] and meta.evaluator_type == "coco"
        assert meta.contiguous_id_to_dataset_id == {0: 1, 1: 2, 2: 3, 3: 5, 4: 7, 5: 9}
        assert len(DatasetCatalog.get("kd2_test_coco")) == 2
    finally:
        DatasetCatalog.remove("kd2_test_coco")


def test_explicit_json_dir_name(tiny: dict) -> None:
    name = f"{tiny['train_json']}:{tiny['train_image_root']}"
    records = DatasetCatalog.get(name)
    assert len(records) == 3 and name in DatasetCatalog.list()
    assert records[0]["file_name"].startswith(tiny["train_image_root"])
    assert MetadataCatalog.get(name).thing_classes[0] == "red_circle"
    DatasetCatalog.remove(name)


def test_builtin_coco_resolved_lazily(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="DETECTRON2_DATASETS"):
        DatasetCatalog.get("coco_2017_val")
    coco = shared_coco()
    if not (coco / "annotations/instances_val2017.json").is_file():
        pytest.skip(f"mini COCO not found at {coco}")
    link = tmp_path / "d2" / "coco"
    link.parent.mkdir()
    link.symlink_to(coco)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "d2"))
    DatasetCatalog.clear_cache()
    assert len(DatasetCatalog.get("coco_2017_val")) == 188
    meta = MetadataCatalog.get("coco_2017_val")
    assert len(meta.thing_classes) == 80 and meta.json_file.endswith("instances_val2017.json")


def test_builtin_synthetic_generated_on_first_use(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    monkeypatch.setattr(
        catalog, "SYNTHETIC_GENERATOR_KWARGS", {"num_train": 3, "num_val": 2, "image_size": 64}
    )
    with caplog.at_level(logging.WARNING, logger="kd2.data.catalog"):
        assert len(DatasetCatalog.get("synthetic_val")) == 2
    assert "generating" in caplog.text
    assert (tmp_path / "kd2_synthetic" / "annotations" / "instances_train.json").is_file()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kd2.data.catalog"):
        assert len(DatasetCatalog.get("synthetic_train")) == 3  # reused, not regenerated
    assert "generating" not in caplog.text
    assert MetadataCatalog.get("synthetic_train").thing_dataset_id_to_contiguous_id[9] == 5


def _register_cfg(*entries):
    from kd2.config import get_cfg

    cfg = get_cfg()
    cfg.DATASETS.REGISTER = [list(e) for e in entries]
    return cfg


def test_datasets_register_idempotent_and_clashes(
    tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train, root = tiny["train_json"], tiny["train_image_root"]
    cfg = _register_cfg(("kd2_reg_a", train, root))
    try:
        assert register_config_datasets(cfg) == ["kd2_reg_a"]
        assert len(DatasetCatalog.get("kd2_reg_a")) == 3
        assert MetadataCatalog.get("kd2_reg_a").json_file == train
        # the same name and files again (relative paths too): a no-op
        monkeypatch.chdir(os.path.dirname(root))
        rel = (os.path.relpath(train), os.path.basename(root))
        assert register_config_datasets(_register_cfg(("kd2_reg_a", *rel))) == ["kd2_reg_a"]
        with pytest.raises(ValueError, match=r"REGISTER\[0\].*'kd2_reg_a'.*other files"):
            register_config_datasets(_register_cfg(("kd2_reg_a", tiny["val_json"], root)))
    finally:
        DatasetCatalog.remove("kd2_reg_a")
    with pytest.raises(ValueError, match="'coco_2017_train' is already taken by a builtin"):
        register_config_datasets(_register_cfg(("coco_2017_train", train, root)))
    with pytest.raises(FileNotFoundError, match=r"DATASETS.REGISTER\[1\] \('b'\).*nope.json"):
        register_config_datasets(_register_cfg(("a", train, root), ("b", "nope.json", root)))
    explicit = _register_cfg()
    explicit.DATASETS.TEST = ("x.json:y",)
    with pytest.raises(FileNotFoundError, match=r"DATASETS.TEST \('x.json:y'\).*x.json"):
        register_config_datasets(explicit)
    with pytest.raises(ValueError, match=r"REGISTER\[0\] must be \[name, json_file, image_root"):
        register_config_datasets(_register_cfg(("a", train)))
    with pytest.raises(ValueError, match="given twice with different files"):
        register_config_datasets(_register_cfg(("a", train, root), ("a", tiny["val_json"], root)))
    assert "a" not in DatasetCatalog and "b" not in DatasetCatalog  # checked before registering


def test_trainer_trains_from_a_datasets_register_name(tiny: dict, tmp_path: Path) -> None:
    from kd2.engine import setup_cfg
    from kd2.tv import Trainer
    from tests.helpers import engine_cfg, write_cfg

    cfg = engine_cfg(("unused",), tmp_path / "out", max_iter=2)
    cfg.DATASETS.TRAIN = ("kd2_reg_train",)
    cfg.DATASETS.REGISTER = [["kd2_reg_train", tiny["train_json"], tiny["train_image_root"]]]
    yaml = write_cfg(cfg, tmp_path / "cfg.yaml")
    try:
        cfg = setup_cfg(yaml)  # registers DATASETS.REGISTER, as tools/train_net.py does
        assert "kd2_reg_train" in DatasetCatalog
        Trainer(cfg).train()
        assert (tmp_path / "out" / "model_final.pth").is_file()
        assert setup_cfg(yaml).DATASETS.TRAIN == ("kd2_reg_train",)  # again: a no-op
    finally:
        DatasetCatalog.remove("kd2_reg_train")
