"""A user's own data, first contact: the divergence guard, a learning rate that fits the batch,
progress in logs when the progress bar is off."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kd2.config import get_cfg
from kd2.engine import setup_cfg
from kd2.engine.batch_scaling import auto_scale_workers, fit_lr_to_batch, lr_batch_mismatch
from kd2.engine.divergence import DivergenceGuard
from kd2.tv import Trainer
from tests.helpers import REPO, captured, engine_cfg

DEMO_TEACHER = str(REPO / "configs" / "synthetic" / "faster_rcnn_R18_teacher.yaml")


# -- the divergence guard ---------------------------------------------------------------------
def test_guard_absolute_and_relative_rules():
    guard = DivergenceGuard(max_loss=1e4, factor=50, window=5, min_iters=3)
    assert guard.check({"a": 1.0, "b": 2.0}, 3.0) is None
    assert "loss_cls = 5e+22 exceeds" in guard.check({"loss_cls": 5e22}, 5e22)
    guard = DivergenceGuard(max_loss=1e4, factor=50, window=5, min_iters=3)
    for total in (3.0, 2.0, 2.5):
        assert guard.check({}, total) is None
    assert guard.check({}, 100.0) is None  # 40x the median 2.5: a spike, not divergence
    msg = guard.check({}, 200.0)
    assert "73x its median 2.75" in msg  # the spike of 100 joined the history


def test_guard_needs_min_iters_before_the_relative_rule():
    guard = DivergenceGuard(max_loss=1e4, factor=2, window=5, min_iters=3)
    assert guard.check({}, 1.0) is None
    assert guard.check({}, 100.0) is None  # only 1 iteration seen: early losses swing widely


def test_guard_tells_a_term_out_of_scale_from_the_start_from_a_divergence():
    """Over MAX_LOSS at its first value (or within FACTOR of it): out of scale — a weight
    problem; grown more than FACTOR from a normal start: diverged. Non-finite: always a stop."""
    from kd2.engine.divergence import DIVERGED, NON_FINITE, OUT_OF_SCALE, judge_step

    guard = DivergenceGuard(max_loss=1e4, factor=50, window=5, min_iters=3)
    stop = judge_step(guard, {"loss_cls": 1.2, "loss_kd_fitnet": 3e5}, 3e5 + 1.2, 0)
    assert stop.kind == OUT_OF_SCALE and stop.terms == ["loss_kd_fitnet"]
    assert "loss_kd_fitnet = 3e+05 exceeds" in stop.reason
    # the KD warm-up: zero at iteration 0, its first value 5e3 at 1, 2e4 at 4 (4x): out of scale
    guard = DivergenceGuard(max_loss=1e4, factor=50, window=5, min_iters=3)
    for it, kd in enumerate((0.0, 5e3, 1e4 - 1)):
        assert judge_step(guard, {"loss_cls": 1.0, "loss_kd_x": kd}, 1.0 + kd, it) is None
    assert judge_step(guard, {"loss_cls": 1.0, "loss_kd_x": 2e4}, 2e4 + 1, 3).kind == OUT_OF_SCALE
    # a detection loss that grew from 1.5 to 1e8 in a few steps: diverged
    guard = DivergenceGuard(max_loss=1e4, factor=50, window=5, min_iters=3)
    assert judge_step(guard, {"loss_cls": 1.5}, 1.5, 0) is None
    stop = judge_step(guard, {"loss_cls": 1e8}, 1e8, 1)
    assert stop.kind == DIVERGED and stop.terms == ["loss_cls"] and "1.5" in stop.reason
    # only the total over the bound: its largest term is named
    guard = DivergenceGuard(max_loss=10, factor=50, window=5, min_iters=3)
    stop = judge_step(guard, {"loss_a": 6.0, "loss_kd_b": 7.0}, 13.0, 0)
    assert stop.kind == OUT_OF_SCALE and stop.terms == ["loss_kd_b"]
    assert "total_loss = 13 exceeds" in stop.reason
    stop = judge_step(None, {"loss_a": float("nan"), "loss_b": 1.0}, float("nan"), 7)
    assert stop.kind == NON_FINITE and stop.terms == ["loss_a"] and stop.iteration == 7
    assert judge_step(None, {"loss_a": 1e30}, 1e30, 0) is None  # no guard: finite goes on


def test_guard_stops_an_exploding_run_with_the_last_good_checkpoint(tiny_data, tmp_path):
    cfg = engine_cfg(tiny_data, tmp_path / "out", max_iter=6, guard=True)
    trainer = Trainer(cfg)
    head = trainer.model.head.classification_head.cls_logits

    def explode(t):  # the weights blow up after the checkpoint at 2, as at too high a rate
        if t.iter == 3:
            with torch.no_grad():
                head.weight.mul_(1e4)
                head.bias.fill_(1e4)

    trainer.after_step.append(explode)
    with pytest.raises(FloatingPointError) as err:
        trainer.train()
    msg = str(err.value)
    assert "training diverged at iteration 3" in msg and "exceeds SOLVER.DIVERGENCE.MAX_LOSS" in msg
    assert "grown from its first value" in msg and "out of scale" not in msg
    assert "model_0000002.pth" in msg and "--resume SOLVER.BASE_LR 0.005" in msg
    assert not os.path.exists(os.path.join(cfg.OUTPUT_DIR, "model_0000004.pth"))


def test_guard_can_be_switched_off(tiny_data, tmp_path):
    cfg = engine_cfg(tiny_data, tmp_path / "out", max_iter=2, guard=True)
    assert get_cfg().SOLVER.DIVERGENCE.ENABLED  # on by default
    cfg.SOLVER.DIVERGENCE.ENABLED = False
    assert Trainer(cfg).divergence_guard is None


def test_student_with_absurd_weights_is_named(tiny_data, tmp_path):
    cfg = engine_cfg(tiny_data, tmp_path / "out", max_iter=4, guard=True)
    trainer = Trainer(cfg)
    conv = trainer.model.head.classification_head.cls_logits  # no normalisation after it

    def explode(t):
        if t.iter == 1:
            with torch.no_grad():
                conv.weight.fill_(1e12)

    trainer.after_step.append(explode)
    with pytest.raises(
        FloatingPointError,
        match=r"student's weights have diverged.*cls_logits.weight reaches 1e\+12",
    ):
        trainer.train()


# -- the learning rate fits the batch ----------------------------------------------------------
def _write(path, text):
    path.write_text(text)
    return str(path)


def test_base_lr_batch_size_follows_where_base_lr_is_set(tmp_path):
    base = _write(tmp_path / "base.yaml", "SOLVER:\n  IMS_PER_BATCH: 8\n  BASE_LR: 0.02\n")
    only_batch = _write(tmp_path / "a.yaml", "_BASE_: base.yaml\nSOLVER:\n  IMS_PER_BATCH: 2\n")
    both = _write(
        tmp_path / "b.yaml", "_BASE_: base.yaml\nSOLVER:\n  IMS_PER_BATCH: 2\n  BASE_LR: 0.005\n"
    )
    cfg = get_cfg()
    cfg.merge_from_file(only_batch)
    assert cfg.SOLVER.BASE_LR_BATCH_SIZE == 8
    assert "SOLVER.BASE_LR 0.005" in lr_batch_mismatch(cfg)
    cfg = get_cfg()
    cfg.merge_from_file(both)
    assert cfg.SOLVER.BASE_LR_BATCH_SIZE == 2 and lr_batch_mismatch(cfg) is None
    cfg = get_cfg()
    cfg.merge_from_file(base)
    cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", "2"])
    assert lr_batch_mismatch(cfg) is not None
    cfg.merge_from_list(["SOLVER.BASE_LR", "0.005"])
    assert cfg.SOLVER.BASE_LR_BATCH_SIZE == 2 and lr_batch_mismatch(cfg) is None
    # a dumped config keeps its reference: editing only the batch of a copy is still caught
    dumped = _write(tmp_path / "dump.yaml", get_cfg().dump())
    cfg = get_cfg()
    cfg.merge_from_file(dumped)
    cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", "2"])
    assert cfg.SOLVER.BASE_LR_BATCH_SIZE == 16 and lr_batch_mismatch(cfg)


def test_demo_config_at_batch_2_is_warned_or_scaled(tiny_data, tmp_path):
    cfg = setup_cfg(DEMO_TEACHER, ["SOLVER.IMS_PER_BATCH", "2"])
    assert cfg.SOLVER.BASE_LR == 0.02  # not applied without SCALE_LR_WITH_BATCH ...
    with captured("kd2.engine.batch_scaling") as logs:
        fit_lr_to_batch(cfg)
    assert any("SOLVER.BASE_LR 0.005" in m and "SCALE_LR_WITH_BATCH" in m for m in logs)
    # ... and applied with it, so config.yaml records the rate the run uses
    cfg = setup_cfg(
        DEMO_TEACHER, ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.SCALE_LR_WITH_BATCH", "True"]
    )
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.005) and cfg.SOLVER.BASE_LR_BATCH_SIZE == 2
    assert cfg.is_frozen()


def test_reference_world_size_scales_like_detectron2():
    cfg = get_cfg()
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 1
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.BASE_LR_BATCH_SIZE = 4, 0.01, 4
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS = 1000, (800,), 100
    cfg.SOLVER.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD = 200, 100
    out = auto_scale_workers(cfg, 2)
    s = out.SOLVER
    assert (s.IMS_PER_BATCH, s.BASE_LR, s.BASE_LR_BATCH_SIZE) == (8, 0.02, 8)
    assert (s.MAX_ITER, s.STEPS, s.WARMUP_ITERS, s.CHECKPOINT_PERIOD) == (500, (400,), 50, 100)
    assert out.TEST.EVAL_PERIOD == 50 and s.REFERENCE_WORLD_SIZE == 2
    assert cfg.SOLVER.IMS_PER_BATCH == 4  # the input is not modified
    assert auto_scale_workers(out, 2) is out


# -- progress in logs ---------------------------------------------------------------------------
def test_losses_are_logged_from_iteration_1_without_a_progress_bar(
    tiny_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("KD2_NO_PROGRESS", "1")
    cfg = engine_cfg(tiny_data, tmp_path / "out", max_iter=8)
    cfg.SOLVER.LOG_PERIOD = 4
    with captured("kd2.engine.trainer") as logs:
        Trainer(cfg).train()
    lines = [m for m in logs if m.startswith("iter ")]
    assert [m.split()[1] for m in lines] == ["1/8", "2/8", "3/8", "4/8", "5/8", "8/8"]
    assert all("total_loss=" in m and "ETA" in m for m in lines)


# -- a crowded small-object dataset, end to end ---------------------------------------------------
@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    from kd2.data import generate_crowded_dataset

    root = tmp_path_factory.mktemp("crowded")
    paths = generate_crowded_dataset(
        str(root), num_train=3, num_val=1, min_side=200, max_side=420,
        objects_per_image=(60, 150), seed=1,
    )  # fmt: skip
    return (
        f"{paths['train_json']}:{paths['train_image_root']}",
        f"{paths['val_json']}:{paths['val_image_root']}",
    )


def _crowded_opts(crowded, out, *extra):
    return [
        "DATASETS.TRAIN", f"('{crowded[0]}',)", "DATASETS.TEST", f"('{crowded[1]}',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", "3", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.WARMUP_ITERS", "2",
        "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(out), *extra,
    ]  # fmt: skip


def test_crowded_dataset_flow_teacher_student_distilled(crowded, tmp_path):
    # the user's mistake: the demo teacher at 2 images per batch is warned about, with the fix
    cfg = setup_cfg(DEMO_TEACHER, _crowded_opts(crowded, tmp_path / "t_warned"))
    with captured("kd2.engine.batch_scaling") as logs:
        Trainer(cfg)
    assert any("SOLVER.BASE_LR 0.005" in m for m in logs)
    # ... and corrected when asked; the dataset report is written at the start of training
    teacher_out = tmp_path / "teacher"
    cfg = setup_cfg(
        DEMO_TEACHER, _crowded_opts(crowded, teacher_out, "SOLVER.SCALE_LR_WITH_BATCH", "True")
    )
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.005)
    with captured("kd2.data.report") as logs:
        Trainer(cfg).train()
    report = json.load(open(teacher_out / "dataset_report.json"))
    assert report["boxes_per_image"]["max"] >= 60
    assert open(teacher_out / "dataset_report.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert any(m.startswith("Dataset report:") for m in logs)  # crowded images are flagged
    teacher_pth = str(teacher_out / "model_final.pth")
    teacher_yaml = str(tmp_path / "my_teacher.yaml")  # the user's teacher config: 3 classes
    with open(teacher_yaml, "w") as f:
        f.write(cfg.dump())
    # student and distilled student at the scaled rate
    student = REPO / "configs" / "synthetic" / "faster_rcnn_MNv3_student.yaml"
    distilled = REPO / "configs" / "synthetic" / "faster_rcnn_MNv3_DeFeat.yaml"
    scale = ["SOLVER.SCALE_LR_WITH_BATCH", "True", "KD.TEACHER.WEIGHTS", teacher_pth]
    scale += ["KD.TEACHER.CONFIG", teacher_yaml]
    scale += ["KD.PREFLIGHT.MIN_TEACHER_AP", "0.0"]  # a teacher of a few iterations: AP ~ 0
    for cfg_file, out in ((student, "student"), (distilled, "distilled")):
        cfg = setup_cfg(str(cfg_file), _crowded_opts(crowded, tmp_path / out, *scale))
        results = Trainer(cfg).train()
        assert results[crowded[1]]["bbox"]  # evaluated
    # a broken (diverged) teacher stops the distilled run with a message about the teacher
    state = torch.load(teacher_pth, weights_only=True)
    key = next(k for k, v in state["model"].items() if k.endswith("conv1.weight"))
    state["model"][key] = state["model"][key] * 1e22
    broken = str(tmp_path / "broken_teacher.pth")
    torch.save(state, broken)
    opts = _crowded_opts(crowded, tmp_path / "d2", "KD.TEACHER.WEIGHTS", broken)
    opts += ["KD.TEACHER.CONFIG", teacher_yaml]
    with pytest.raises(ValueError, match=r"teacher's weights are absurdly large.*conv1.weight"):
        Trainer(setup_cfg(str(distilled), opts))


def test_crowded_dataset_at_a_far_too_high_rate_is_stopped_not_silent(crowded, tmp_path):
    opts = _crowded_opts(crowded, tmp_path / "t", "SOLVER.BASE_LR", "2.0")
    opts += ["SOLVER.WARMUP_ITERS", "0", "SOLVER.MAX_ITER", "30", "SOLVER.BASE_LR_BATCH_SIZE", "8"]
    with pytest.raises(FloatingPointError) as err:
        Trainer(setup_cfg(DEMO_TEACHER, opts)).train()
    msg = str(err.value)
    assert "diverged" in msg or "non-finite" in msg
    assert "SOLVER.BASE_LR 0.5" in msg  # the learning rate that fits the batch
    assert not os.path.exists(tmp_path / "t" / "model_final.pth")
