"""The teacher cache (``tools/cache_teacher.py``, ``KD.TEACHER.CACHE``): cached KD losses equal the
live ones within float16 precision on both kd2-loop backends, a training run reads every batch
from the cache, an interrupted build resumes, a stale cache or an uncacheable method is refused,
a batch of another geometry runs the live teacher."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kd2.data import records_of
from kd2.engine.teacher_cache import build_teacher_cache, teacher_cache_fingerprint
from kd2.modeling.teacher_cache import CACHE_KEY, TeacherCache, cache_key, require_cacheable
from kd2.tv import Trainer
from kd2.utils.errors import ConfigError
from tests.helpers import engine_cfg, run_cli, save_teacher, write_cfg


def _kd_cfg(tiny_data, tmp_path, methods=("PKD",), seed=123):
    cfg = engine_cfg(tiny_data, tmp_path / "run", "FCOS")
    torch.manual_seed(seed)
    _, yaml_path, pth_path = save_teacher(tmp_path, "FCOS", "resnet18", 32, num_classes=6)
    cfg.KD.METHODS = list(methods)
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = yaml_path, pth_path
    return cfg


def _batch(cfg, trainer_cls, model):
    """Two training samples as the loop gives them, in the model's target form with their cache
    keys."""
    from kd2.data.loader import DetectionDataset

    dataset = DetectionDataset(records_of(cfg.DATASETS.TRAIN), train=True)
    samples = [dataset.load_variant(0, True), dataset.load_variant(3, False)]
    offset = trainer_cls.label_offset(model)
    images = [s[0] for s in samples]
    targets = [
        {
            "boxes": t["boxes"],
            "labels": t["labels"] + offset,
            CACHE_KEY: cache_key(t["image_id"], t["flipped"]),
        }
        for _, t in samples
    ]
    return images, targets


def _cached_equals_live(cfg, trainer_cls, cache_dir, heads=False):
    model = trainer_cls.build_model(cfg).train()
    manifest = build_teacher_cache(cfg, model, cache_dir, progress=False)
    assert manifest["complete"] and manifest["stats"]["entries"] == 2 * 12  # flip and not
    cache = TeacherCache(
        cache_dir, teacher_cache_fingerprint(cfg, model, records_of(cfg.DATASETS.TRAIN))
    )
    images, targets = _batch(cfg, trainer_cls, model)
    live = model(images, targets)  # no cache attached: the key is ignored
    model.kd_attach_cache(cache)
    if heads:  # the first batch of a size runs live: it gives the head's anchors and coder
        model(images, targets)
        assert cache.hits == 0 and cache.misses == 1
    cached = model(images, targets)
    assert cache.hits == 1 and cache.misses == int(heads)
    kd = [k for k in live if k.startswith("loss_kd_")]
    assert kd
    for k in kd:
        torch.testing.assert_close(cached[k], live[k], rtol=1e-3, atol=0)
    return model, cache


def test_cached_losses_equal_live_ones_and_a_run_reads_the_cache(tiny_data, tmp_path):
    cfg = _kd_cfg(tiny_data, tmp_path)
    cache_dir = str(tmp_path / "cache")
    _cached_equals_live(cfg, Trainer, cache_dir)
    # a whole run: every batch of the uniform 64-px data comes from the cache
    cfg.KD.TEACHER.CACHE = cache_dir
    cfg.SOLVER.MAX_ITER = 3
    trainer = Trainer(cfg)
    trainer.train()
    cache = trainer.model.kd_cache
    assert cache.hits == 3 and cache.misses == 0
    # a batch of another geometry (padded larger) is not served: the teacher runs live
    assert cache.lookup(["0_0"], [(64, 64)], (96, 96), "cpu") is None and cache.misses == 1


@pytest.mark.parametrize(
    "arch,methods",
    [
        ("FCOS", ("RM", "PFI")),
        ("GFL", ("LD", "GID")),
        ("RetinaNet", ("CWD",)),
        ("FasterRCNN", ("FRS",)),  # the RPN's objectness
    ],
)
def test_cached_dense_heads_give_the_live_losses(tiny_data, tmp_path, arch, methods):
    """Methods that read the teacher's dense head (logits, deltas, FCOS centerness, GFL's
    distributions) from a cache: the live losses within float16 precision."""
    cfg = engine_cfg(tiny_data, tmp_path / "run", arch)
    torch.manual_seed(123)
    _, yaml_path, pth_path = save_teacher(tmp_path, arch, "resnet18", 32, num_classes=6)
    cfg.KD.METHODS = list(methods)
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = yaml_path, pth_path
    if "CWD" in methods:
        cfg.KD.CWD.RECIPE = "logits"
    model, _ = _cached_equals_live(cfg, Trainer, str(tmp_path / "cache"), heads=True)
    assert {"dense", "rpn"} & model.kd_teacher_parts[""]


def test_a_transformers_student_with_a_foundation_teacher_reads_the_cache(tiny_data, tmp_path):
    pytest.importorskip("transformers")
    from kd2.hf import Trainer as HFTrainer
    from tests.foundation.helpers import use_foundation_teacher
    from tests.hf.test_backend import hf_cfg

    cfg = hf_cfg(num_classes=6)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (tiny_data[0],), ()
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 64
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.OUTPUT_DIR = str(tmp_path / "run")
    cfg.KD.METHODS = ["PKD", "DSI"]
    use_foundation_teacher(cfg, tmp_path, "dinov2")
    _cached_equals_live(cfg, HFTrainer, str(tmp_path / "cache"))


def test_an_interrupted_build_resumes_and_stale_caches_are_refused(tiny_data, tmp_path):
    cfg = _kd_cfg(tiny_data, tmp_path)
    model = Trainer.build_model(cfg)
    out = str(tmp_path / "cache")
    part = build_teacher_cache(cfg, model, out, shard_size=5, stop_after_shards=2, progress=False)
    assert len(part["shards"]) >= 2 and not part["complete"]
    first = os.path.join(out, part["shards"][0]["file"])
    mtime = os.stat(first).st_mtime_ns
    fingerprint = teacher_cache_fingerprint(cfg, model, records_of(cfg.DATASETS.TRAIN))
    with pytest.raises(ConfigError, match="unfinished cache build"):
        TeacherCache(out, fingerprint)
    full = build_teacher_cache(cfg, model, out, shard_size=5, progress=False)
    assert full["complete"] and sum(len(s["keys"]) for s in full["shards"]) == 24
    assert os.stat(first).st_mtime_ns == mtime  # the finished shards were kept, not rewritten
    assert len({k for s in full["shards"] for k in s["keys"]}) == 24
    TeacherCache(out, fingerprint)
    # another teacher's weights: refused, naming what differs
    with torch.no_grad():
        model.teacher.backbone.body.conv1.weight.mul_(2)
    torch.save({"model": model.teacher.state_dict()}, str(tmp_path / "other_teacher.pth"))
    other = cfg.clone()
    other.KD.TEACHER.WEIGHTS = str(tmp_path / "other_teacher.pth")
    stale = teacher_cache_fingerprint(other, model, records_of(other.DATASETS.TRAIN))
    with pytest.raises(ConfigError, match="teacher_weights"):
        TeacherCache(out, stale)
    with pytest.raises(ConfigError, match="another teacher, config or dtype"):
        build_teacher_cache(other, Trainer.build_model(other), out, progress=False)


def test_uncacheable_methods_and_random_sizes_are_refused(tiny_data, tmp_path):
    cfg = _kd_cfg(tiny_data, tmp_path, methods=("PKD", "CrossKD"))
    model = Trainer.build_model(cfg)
    with pytest.raises(ConfigError, match="head on the student's features"):
        build_teacher_cache(cfg, model, str(tmp_path / "c"), progress=False)
    with pytest.raises(ConfigError, match="head on the student's features"):
        model.kd_attach_cache(object())
    with pytest.raises(ConfigError, match="read its roi too"):  # the student's proposals
        require_cacheable({"features", "roi"})
    cfg = _kd_cfg(tiny_data, tmp_path)
    cfg.INPUT.MIN_SIZE_TRAIN = (56, 64)
    with pytest.raises(ConfigError, match="draws the training size at random"):
        build_teacher_cache(cfg, Trainer.build_model(cfg), str(tmp_path / "c"), progress=False)


def test_the_tool_builds_a_cache_and_reports_its_size(tiny_data, tmp_path):
    cfg = _kd_cfg(tiny_data, tmp_path)
    config = write_cfg(cfg, tmp_path / "kd.yaml")
    out = str(tmp_path / "tool_cache")
    res = run_cli(["--config-file", config, "--output", out], tool="cache_teacher.py")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout[res.stdout.index("{") :])
    assert report["entries"] == 24 and report["use_with"] == f"KD.TEACHER.CACHE {out}"
    bad = run_cli(
        ["--config-file", config, "--output", out, "KD.METHODS", "[]"], tool="cache_teacher.py"
    )
    assert bad.returncode == 2 and "kd2: error:" in bad.stderr and "Traceback" not in bad.stderr
