"""The teacher cache on Detectron2's ``KDTrainer`` (``kd2/d2/teacher_cache.py``): the losses from
a float16 cache equal the live teacher's on the same mapped batch, a ``KDTrainer`` run reads
every batch from the cache, the tool builds one from a Detectron2 config, and Detectron2's random
crop is refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch

detectron2 = pytest.importorskip("detectron2", reason="detectron2 is not installed (see README)")

from detectron2.utils.events import EventStorage  # noqa: E402

from kd2.engine.teacher_cache import teacher_cache_fingerprint  # noqa: E402
from kd2.modeling.teacher_cache import TeacherCache  # noqa: E402
from kd2.utils.errors import ConfigError  # noqa: E402
from tests.d2.test_detectron2 import _six_class_retinanet_teacher, kd_cfg  # noqa: E402
from tests.helpers import run_cli  # noqa: E402


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    from kd2.data import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("syn_d2_cache")
    return generate_synthetic_dataset(str(root), num_train=4, num_val=2, image_size=64, seed=1)


def _cfg(tmp_path, syn, methods=("PKD",)):
    from kd2.d2.data import register_config_datasets

    cfg = kd_cfg(tmp_path, "RetinaNet", list(methods))
    cfg.DATASETS.TRAIN = (f"{syn['train_json']}:{syn['train_image_root']}",)
    cfg.DATASETS.TEST = ()
    cfg.MODEL.RETINANET.NUM_CLASSES = 6
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 64
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR = 2, 3, 0.01
    cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.CHECKPOINT_PERIOD = (), 1, 100
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    _six_class_retinanet_teacher(tmp_path, cfg)
    register_config_datasets(cfg)
    return cfg


@pytest.mark.parametrize("methods", [("PKD",), ("RM",)])
def test_cached_losses_equal_live_ones_and_kdtrainer_reads_the_cache(tmp_path, syn, methods):
    """Features (PKD) and the dense head (RM: its logits) from the cache."""
    from kd2.d2 import KDTrainer
    from kd2.d2.teacher_cache import build_d2_teacher_cache, cache_records, fixed_flip_mapper

    heads = "RM" in methods  # the first batch of a size runs live: the head's anchors, coder
    cfg = _cfg(tmp_path, syn, methods)
    cache_dir = str(tmp_path / "cache")
    model = KDTrainer.build_model(cfg).train()
    manifest = build_d2_teacher_cache(cfg, model, cache_dir, progress=False)
    assert manifest["complete"] and manifest["stats"]["entries"] == 2 * 4  # flip and not
    records = cache_records(cfg.DATASETS.TRAIN)
    inputs = [
        fixed_flip_mapper(cfg, True)(copy.deepcopy(records[0])),
        fixed_flip_mapper(cfg, False)(copy.deepcopy(records[2])),
    ]
    assert [x["flipped"] for x in inputs] == [True, False]
    with EventStorage():
        live = model(inputs)
        cache = TeacherCache(cache_dir, teacher_cache_fingerprint(cfg, model, records))
        model.kd_attach_cache(cache)
        if heads:
            model(inputs)
        cached = model(inputs)
    assert cache.hits == 1 and cache.misses == int(heads)
    kd = [k for k in live if k.startswith("loss_kd_")]
    assert kd
    for k in kd:
        torch.testing.assert_close(cached[k], live[k], rtol=1e-3, atol=0)
    # a whole KDTrainer run: every batch of the uniform 64-px data comes from the cache
    cfg.KD.TEACHER.CACHE = cache_dir
    trainer = KDTrainer(cfg)
    trainer.train()
    cache = trainer.model.kd_cache
    assert cache.hits == 3 - int(heads) and cache.misses == int(heads)
    # Detectron2's random crop cannot be cached exactly: refused before training
    cfg.INPUT.CROP.ENABLED = True
    with pytest.raises(ConfigError, match="INPUT.CROP.ENABLED"):
        KDTrainer(cfg).train()


def test_the_tool_builds_a_detectron2_students_cache(tmp_path, syn):
    cfg = _cfg(tmp_path, syn)
    config = tmp_path / "kd_d2.yaml"
    config.write_text(cfg.dump())
    out = str(tmp_path / "tool_cache")
    res = run_cli(["--config-file", str(config), "--output", out], tool="cache_teacher.py")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout[res.stdout.index("{") :])
    assert report["entries"] == 8 and report["use_with"] == f"KD.TEACHER.CACHE {out}"
