"""Trainer: exact resume, atomic checkpoints, NaN stop, AMP, DDP on gloo, CLI, config errors."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from kd2.config import get_cfg
from kd2.data import DatasetCatalog
from kd2.modeling.distiller import needs_detector_teacher
from kd2.tv import Trainer
from kd2.tv.build import build_plain_detector
from kd2.utils.checkpoint import last_checkpoint
from tests.helpers import engine_cfg, run_cli, save_teacher, write_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize(
    "arch,eval_period", [("RetinaNet", 4), ("FasterRCNN", 4), ("FasterRCNN", 2)]
)
def test_resume_after_kill_is_exact(tiny_data, tmp_path, arch, eval_period):
    # Faster R-CNN samples RPN / ROI examples from the global RNG: nothing between the
    # checkpoint at 2 and the next step may draw from it differently in the two runs — neither
    # the resumed run's new train loader (eval_period 4) nor the evaluation at 2 that only the
    # uninterrupted run performs before step 2 (eval_period 2).
    def make_cfg(out):
        cfg = engine_cfg(tiny_data, out, arch=arch)
        cfg.DATASETS.TEST = (tiny_data[1],)
        cfg.TEST.EVAL_PERIOD = eval_period
        return cfg

    full = Trainer(make_cfg(tmp_path / "full"))
    full.train()
    expected = _weights(full)

    cfg = make_cfg(tmp_path / "killed")
    killed = Trainer(cfg)

    def kill(trainer):  # simulates a kill right after the checkpoint at iteration 2
        if trainer.iter == 3:
            raise KeyboardInterrupt

    killed.after_step.append(kill)
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    assert last_checkpoint(cfg.OUTPUT_DIR).endswith("model_0000002.pth")

    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    resumed.train()
    got = _weights(resumed)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)
    lines = [json.loads(x) for x in open(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))]
    assert any("total_loss" in x for x in lines)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(cfg.OUTPUT_DIR))


def test_kd_resume_is_exact_and_checkpoint_holds_student_alone(tiny_data, tmp_path):
    _, tyaml, tpth = save_teacher(tmp_path, "RetinaNet", "resnet34", num_classes=6)

    def cfg_for(out):
        cfg = engine_cfg(tiny_data, out, max_iter=4)
        cfg.KD.METHODS = ["DeFeat", "Hinton"]
        cfg.KD.TEACHER.CONFIG = tyaml
        cfg.KD.TEACHER.WEIGHTS = tpth
        cfg.KD.WARMUP_ITERS = 2
        return cfg

    full = Trainer(cfg_for(tmp_path / "a"))
    full.train()
    part = Trainer(cfg_for(tmp_path / "b"))
    part.max_iter = 2  # stop early, as if killed after the checkpoint at 2
    part.train()
    resumed = Trainer(cfg_for(tmp_path / "b"))
    resumed.resume_or_load(resume=True)
    resumed.train()
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    ckpt = torch.load(tmp_path / "a" / "model_final.pth", weights_only=False)
    assert ckpt["kd"] and not any(k.startswith("kd_methods") for k in ckpt["model"])
    plain = build_plain_detector(engine_cfg(tiny_data, tmp_path))
    plain.load_state_dict(ckpt["model"], strict=True)


def test_methods_get_before_step_with_the_iteration(tiny_data, tmp_path):
    _, tyaml, tpth = save_teacher(tmp_path, "RetinaNet", "resnet34", num_classes=6)
    cfg = engine_cfg(tiny_data, tmp_path / "out", max_iter=3)
    cfg.KD.METHODS = ["FitNet"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = tyaml, tpth
    cfg.KD.WARMUP_ITERS = 2
    trainer = Trainer(cfg)
    seen = []
    method = trainer.model.kd_methods["FitNet"]
    method.before_step = lambda it: seen.append((it, trainer.model.kd_warmup_factor()))
    trainer.train()
    assert seen == [(0, 0.0), (1, 0.5), (2, 1.0)]


def test_teacher_is_evaluated_before_distilling(tiny_data, tmp_path):
    _, tyaml, tpth = save_teacher(tmp_path, "RetinaNet", "resnet34", num_classes=6)
    cfg = engine_cfg(tiny_data, tmp_path / "out", max_iter=1)
    cfg.DATASETS.TEST = (tiny_data[1],)
    cfg.KD.METHODS = ["FitNet"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = tyaml, tpth
    cfg.KD.EVAL_TEACHER = True
    trainer = Trainer(cfg)
    trainer.train()
    assert set(trainer.teacher_results[tiny_data[1]]["bbox"]) >= {"AP", "AP50", "AP75"}
    lines = [json.loads(x) for x in open(tmp_path / "out" / "metrics.json")]
    assert lines[0]["iteration"] == 0 and "teacher_eval" in lines[0]
    assert not trainer.model.teacher.training


def test_checkpoint_write_is_atomic(tiny_data, tmp_path, monkeypatch):
    cfg = engine_cfg(tiny_data, tmp_path, max_iter=4)
    trainer = Trainer(cfg)
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-way through writing
            f.write(b"partial garbage")
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.setattr(torch, "save", real_save)
    path = last_checkpoint(cfg.OUTPUT_DIR)
    assert path.endswith("model_0000002.pth")
    assert torch.load(path, weights_only=False)["iteration"] == 2
    assert not os.path.exists(os.path.join(cfg.OUTPUT_DIR, "model_0000004.pth"))
    assert not [f for f in os.listdir(cfg.OUTPUT_DIR) if f.startswith(".tmp_")]


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tiny_data, tmp_path):
    cfg = engine_cfg(tiny_data, tmp_path, max_iter=6)
    trainer = Trainer(cfg)
    head = trainer.model.head.classification_head.cls_logits

    def poison(t):
        if t.iter == 3:
            with torch.no_grad():
                head.weight.fill_(float("nan"))

    trainer.after_step.append(poison)
    # the advice is true: a new BASE_LR applies on resume (tests/engine/test_run_safety.py)
    advice = "non-finite at iteration 3.*model_0000002.pth.*--resume SOLVER.BASE_LR 0.005"
    with pytest.raises(FloatingPointError, match=advice):
        trainer.train()
    good = torch.load(last_checkpoint(cfg.OUTPUT_DIR), weights_only=False)
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())


def test_amp_and_grad_clipping_run(tiny_data, tmp_path):
    cfg = engine_cfg(tiny_data, tmp_path, max_iter=2)
    cfg.SOLVER.AMP.ENABLED = True  # CPU autocast (bfloat16)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    trainer = Trainer(cfg)
    losses = trainer.run_step(*next(iter(trainer.build_train_loader())))
    assert all(v == v for v in losses.values())


def test_unknown_config_key_and_method_name_closest(tmp_path):
    cfg = get_cfg()
    with pytest.raises(KeyError, match="did you mean 'SOLVER.BASE_LR'"):
        cfg.merge_from_list(["SOLVER.BASE_RL", "0.1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("KD:\n  METHODS: ['Defeat']\n")
    with pytest.raises(KeyError, match="did you mean 'DeFeat'"):
        get_cfg().merge_from_file(str(bad))
    bad.write_text("MODEL:\n  BACKBONE:\n    NAMES: resnet18\n")
    with pytest.raises(KeyError, match="MODEL.BACKBONE.NAME"):
        get_cfg().merge_from_file(str(bad))


def test_base_inheritance():
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs/synthetic/faster_rcnn_MNv3_DeFeat.yaml"))
    assert cfg.KD.METHODS == ["DeFeat"]  # own value
    assert cfg.MODEL.BACKBONE.NAME == "mobilenet_v3_large"  # from its _BASE_ (the student)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 6  # from the student's _BASE_


def _torchvision_configs():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    from train_net import config_backend

    paths = sorted(
        os.path.relpath(os.path.join(d, f), REPO)
        for d, _, files in os.walk(os.path.join(REPO, "configs"))
        for f in files
        if f.endswith(".yaml")
    )
    # Detectron2 configs use Detectron2's schema; tests/d2/test_detectron2.py loads them.
    return [p for p in paths if config_backend(os.path.join(REPO, p)) == "torchvision"]


@pytest.mark.parametrize("path", _torchvision_configs())
def test_every_shipped_config_loads(path):
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, path))
    if "ClassifierKD" in cfg.KD.METHODS:
        assert cfg.KD.CLASSIFIERKD.TEACHER.WEIGHTS
    if needs_detector_teacher(cfg.KD):
        teacher = get_cfg()
        teacher.merge_from_file(os.path.join(REPO, cfg.KD.TEACHER.CONFIG))
        assert not teacher.KD.METHODS


def test_train_net_cli_trains_resumes_and_evaluates(tiny_data, tmp_path):
    cfg = engine_cfg(tiny_data, tmp_path / "out", max_iter=2)
    cfg.DATASETS.TEST = (tiny_data[1],)
    yaml = write_cfg(cfg, tmp_path / "c.yaml")
    r = run_cli(["--config-file", yaml])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(["--config-file", yaml, "--resume", "SOLVER.MAX_ITER", "4"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    final = str(tmp_path / "out" / "model_final.pth")
    r = run_cli(["--config-file", yaml, "--eval-only", "MODEL.WEIGHTS", final])
    assert r.returncode == 0, r.stderr[-3000:]
    assert '"AP50"' in r.stdout


def test_distilled_student_evaluates_without_its_teacher(tiny_data, tmp_path):
    _, tyaml, tpth = save_teacher(tmp_path, "RetinaNet", "resnet34", num_classes=6)
    cfg = engine_cfg(tiny_data, tmp_path / "out", max_iter=2)
    cfg.DATASETS.TEST = (tiny_data[1],)
    cfg.KD.METHODS = ["FitNet"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = tyaml, tpth
    Trainer(cfg).train()
    os.remove(tpth)  # copied to another machine without the teacher
    cfg.OUTPUT_DIR = str(tmp_path / "eval")
    final = str(tmp_path / "out" / "model_final.pth")
    r = run_cli(["--config-file", write_cfg(cfg, tmp_path / "c.yaml"), "--eval-only"]
                + ["MODEL.WEIGHTS", final])  # fmt: skip
    assert r.returncode == 0 and '"AP50"' in r.stdout, r.stderr[-3000:]


def test_two_process_gloo_training_keeps_replicas_identical(tiny_data, tmp_path):
    cfg = engine_cfg(tiny_data, tmp_path / "ddp", max_iter=2)
    yaml = write_cfg(cfg, tmp_path / "ddp.yaml")
    r = run_cli(["--config-file", yaml, "--num-gpus", "2"])
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    ckpt = torch.load(tmp_path / "ddp" / "model_final.pth", weights_only=False)
    assert ckpt["iteration"] == 2
    logs = [open(tmp_path / "ddp" / n).read() for n in ("log.txt", "log.txt.rank1")]
    assert all("world size 2" in log for log in logs)
    sums = [log.split("final parameter checksum ")[1].split()[0] for log in logs]
    assert sums[0] == sums[1]  # DDP kept the two replicas bit-identical


def test_dataset_registry_in_trainer_error(tmp_path):
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = ("synthetic_trian",)
    with pytest.raises(KeyError, match="synthetic_train"):
        DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
