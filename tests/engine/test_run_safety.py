"""Never lose a run: finished and broken resumes, one run per directory, orphans, temporary
files and umask, full disks, learning rate on resume, the NaN advice, dataset classes, and
multi-process training that means what a single process means (2 gloo processes)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from kd2.engine.run_dir import LOCK_FILE, OutputDirBusyError, lock_output_dir, release_output_dir
from kd2.tv import Trainer
from kd2.utils import checkpoint as ckpt_mod
from kd2.utils.checkpoint import CheckpointWriteError, last_checkpoint
from tests.helpers import REPO, captured, cli_env, engine_cfg, run_cli, save_teacher, write_cfg


def _snapshot(directory) -> dict:
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and name not in ("log.txt", LOCK_FILE):
            with open(path, "rb") as f:
                out[name] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


# -- 1, 2: resume ---------------------------------------------------------------------------
def test_resuming_a_finished_run_trains_and_writes_nothing(tiny_data, tmp_path):
    cfg = engine_cfg(tiny_data, tmp_path / "out", max_iter=2)
    yaml = write_cfg(cfg, tmp_path / "c.yaml")
    assert run_cli(["--config-file", yaml]).returncode == 0
    before = _snapshot(cfg.OUTPUT_DIR)
    r = run_cli(["--config-file", yaml, "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "is finished" in r.stdout + r.stderr
    assert _snapshot(cfg.OUTPUT_DIR) == before
    final = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)
    assert final["iteration"] == 2
    # evaluating the finished run is still possible
    cfg.DATASETS.TEST = (tiny_data[1],)
    yaml = write_cfg(cfg, tmp_path / "c.yaml")
    r = run_cli(["--config-file", yaml, "--resume", "--eval-only"])
    assert r.returncode == 0 and '"AP50"' in r.stdout, r.stderr[-2000:]


def _train_with_checkpoints(tiny_data, out):
    cfg = engine_cfg(tiny_data, out, max_iter=4)  # checkpoints at 2, 4 and model_final
    Trainer(cfg).train()
    return cfg


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_resume_falls_back_to_newest_readable_checkpoint(tiny_data, tmp_path, damage):
    cfg = _train_with_checkpoints(tiny_data, tmp_path / "out")
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    assert last_checkpoint(cfg.OUTPUT_DIR) == final
    if damage == "missing":
        os.remove(final)
    else:
        data = open(final, "rb").read()
        open(final, "wb").write(data[: len(data) // 2])
    cfg.SOLVER.MAX_ITER = 6
    trainer = Trainer(cfg)
    with captured("kd2.utils.checkpoint") as logs:
        trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 4
    assert trainer.resumed_from.endswith("model_0000004.pth")
    assert any("model_final.pth" in m and "model_0000004.pth" in m for m in logs), logs


def test_resume_with_only_unreadable_checkpoints_refuses_to_start_over(tiny_data, tmp_path):
    cfg = _train_with_checkpoints(tiny_data, tmp_path / "out")
    for name in os.listdir(cfg.OUTPUT_DIR):
        if name.endswith(".pth"):
            open(os.path.join(cfg.OUTPUT_DIR, name), "wb").write(b"garbage")
    before = _snapshot(cfg.OUTPUT_DIR)
    with pytest.raises(RuntimeError, match="no checkpoint .* can be read.*model_final.pth"):
        Trainer(cfg).resume_or_load(resume=True)
    assert _snapshot(cfg.OUTPUT_DIR) == before


# -- 3, 4: one run per directory, no orphans ------------------------------------------------
def _hold_lock(directory):
    code = (
        "import sys, time; from kd2.engine.run_dir import lock_output_dir; "
        "lock_output_dir(sys.argv[1]); print('locked', flush=True); time.sleep(120)"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "locked"
    return p


def test_output_dir_lock_stops_a_second_run_and_dies_with_its_holder(tiny_data, tmp_path):
    out = tmp_path / "busy"
    holder = _hold_lock(out)
    try:
        with pytest.raises(OutputDirBusyError, match=rf"busy.*pid {holder.pid}"):
            lock_output_dir(str(out))
        cfg = engine_cfg(tiny_data, out, max_iter=2)
        r = run_cli(["--config-file", write_cfg(cfg, tmp_path / "c.yaml")], timeout=120)
        assert r.returncode != 0
        assert f"pid {holder.pid}" in r.stderr and str(out) in r.stderr
        assert not os.path.exists(out / "config.yaml")  # nothing was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_output_dir(str(out))  # kill -9 released it
    lock_output_dir(str(out))  # re-entrant in one process
    release_output_dir(str(out))
    release_output_dir(str(out))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_killing_the_launcher_kills_its_training_processes(tiny_data, tmp_path):
    cfg = engine_cfg(tiny_data, tmp_path / "ddp", max_iter=100000)
    cfg.SOLVER.CHECKPOINT_PERIOD = 0
    yaml = write_cfg(cfg, tmp_path / "c.yaml")
    launcher = subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", yaml]
        + ["--num-gpus", "2"],
        env=cli_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pids = {}
    try:
        deadline = time.time() + 180
        while len(pids) < 2 and time.time() < deadline:
            time.sleep(0.5)
            for name in ("log.txt", "log.txt.rank1"):
                path = tmp_path / "ddp" / name
                m = path.exists() and re.search(r"pid (\d+)", path.read_text())
                if m:
                    pids[name] = int(m.group(1))
        assert len(pids) == 2, "the two training processes did not start"
        assert all(_alive(p) for p in pids.values())
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
    deadline = time.time() + 30
    while any(_alive(p) for p in pids.values()) and time.time() < deadline:
        time.sleep(0.2)
    survivors = [p for p in pids.values() if _alive(p)]
    for p in survivors:
        os.kill(p, signal.SIGKILL)
    assert not survivors, "training processes outlived their launcher"


# -- 5, 16: temporary files, umask, full disk -----------------------------------------------
def test_stale_temp_files_are_removed_and_checkpoints_follow_the_umask(tiny_data, tmp_path):
    cfg = engine_cfg(tiny_data, tmp_path / "out", max_iter=2)
    os.makedirs(cfg.OUTPUT_DIR)
    stale = os.path.join(cfg.OUTPUT_DIR, ".tmp_abcdmodel_0000002.pth")
    open(stale, "wb").write(b"x" * 1000)
    old = os.umask(0o002)
    try:
        Trainer(cfg).train()
    finally:
        os.umask(old)
    assert not os.path.exists(stale)
    for name in ("model_final.pth", "model_0000002.pth", "last_checkpoint"):
        assert os.stat(os.path.join(cfg.OUTPUT_DIR, name)).st_mode & 0o777 == 0o664, name


def test_full_disk_names_the_file_and_keeps_earlier_checkpoints(tiny_data, tmp_path, monkeypatch):
    cfg = engine_cfg(tiny_data, tmp_path / "out", max_iter=4)
    calls = {"n": 0}

    def open_on_full_disk(path, mode="r", *args, **kwargs):
        if "b" in mode and "w" in mode:
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint finds the disk full
                return open("/dev/full", mode, *args, **kwargs)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "open", open_on_full_disk, raising=False)
    with pytest.raises(CheckpointWriteError) as err:
        Trainer(cfg).train()
    msg = str(err.value)
    assert "no space left on device while writing" in msg and "model_0000004.pth" in msg
    assert "model_0000002.pth" in msg and "intact" in msg
    monkeypatch.undo()
    good = torch.load(last_checkpoint(cfg.OUTPUT_DIR), weights_only=True)
    assert good["iteration"] == 2
    assert not [f for f in os.listdir(cfg.OUTPUT_DIR) if f.startswith(".tmp_")]


# -- 9, 13: dataset classes, learning rate on resume, NaN advice ----------------------------
def test_dataset_categories_must_match_num_classes(tiny_data, tmp_path):
    cfg = engine_cfg(tiny_data, tmp_path / "out", max_iter=2)
    cfg.MODEL.RETINANET.NUM_CLASSES = 5  # the data has 6
    with pytest.raises(ValueError, match=r"6 categories.*MODEL.RETINANET.NUM_CLASSES 6"):
        Trainer(cfg)


def test_a_new_base_lr_applies_on_resume(tiny_data, tmp_path):
    cfg = engine_cfg(tiny_data, tmp_path / "out", max_iter=2)
    cfg.SOLVER.WARMUP_ITERS = 0
    Trainer(cfg).train()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR, cfg.SOLVER.MOMENTUM = 4, 0.001, 0.8
    trainer = Trainer(cfg)
    with captured("kd2.engine.trainer") as logs:
        trainer.resume_or_load(resume=True)
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.001) and group["momentum"] == 0.8
    assert any("BASE_LR" in m and "0.001" in m for m in logs)
    trainer.train()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.001 * 0.1)  # STEPS (4,)


def test_nan_advice_blames_a_broken_teacher(tiny_data, tmp_path):
    _, tyaml, tpth = save_teacher(tmp_path, "RetinaNet", "resnet34", num_classes=6)
    cfg = engine_cfg(tiny_data, tmp_path / "out", max_iter=4)
    cfg.KD.METHODS = ["FitNet"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = tyaml, tpth
    trainer = Trainer(cfg)

    def break_teacher(t):
        if t.iter == 2:
            with torch.no_grad():
                next(t.model.teacher.parameters()).fill_(float("inf"))

    trainer.after_step.append(break_teacher)
    with pytest.raises(FloatingPointError, match="teacher's weights are broken.*non-finite") as err:
        trainer.train()
    assert "BASE_LR" not in str(err.value)


def test_non_finite_teacher_weights_are_refused_when_built(tiny_data, tmp_path):
    tcfg, tyaml, tpth = save_teacher(tmp_path, "RetinaNet", "resnet34", num_classes=6)
    state = torch.load(tpth, weights_only=True)
    first = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][first].fill_(float("nan"))
    torch.save(state, tpth)
    cfg = engine_cfg(tiny_data, tmp_path / "out", max_iter=2)
    cfg.KD.METHODS = ["FitNet"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = tyaml, tpth
    with pytest.raises(ValueError, match=rf"teacher.*non-finite.*{re.escape(first)}"):
        Trainer(cfg)


# -- 6, 7, 8: two processes -----------------------------------------------------------------
def _two_process(cfg, tmp_path, name, *extra):
    r = run_cli(
        ["--config-file", write_cfg(cfg, tmp_path / f"{name}.yaml"), "--num-gpus", "2"]
        + list(extra)
    )
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r


def test_two_process_evaluation_is_the_saved_models(tiny_data, tmp_path):
    cfg = engine_cfg(tiny_data, tmp_path / "ddp", arch="FasterRCNN", max_iter=4)
    cfg.DATASETS.TEST = (tiny_data[1],)
    _two_process(cfg, tmp_path, "ddp")
    cfg.OUTPUT_DIR = str(tmp_path / "eval")
    r = run_cli(
        ["--config-file", write_cfg(cfg, tmp_path / "eval.yaml"), "--eval-only"]
        + ["MODEL.WEIGHTS", str(tmp_path / "ddp" / "model_final.pth")]
    )
    assert r.returncode == 0, r.stderr[-2000:]

    def predictions(d):
        rows = json.load(open(d / "coco_instances_results.json"))
        return sorted(
            (
                p["image_id"],
                p["category_id"],
                [round(v, 3) for v in p["bbox"]],
                round(p["score"], 4),
            )
            for p in rows
        )

    during = predictions(tmp_path / "ddp")
    assert during and during == predictions(tmp_path / "eval")
    logs = [open(tmp_path / "ddp" / n).read() for n in ("log.txt", "log.txt.rank1")]
    sums = [re.search(r"buffer checksum (\S+)", log).group(1) for log in logs]
    assert sums[0] == sums[1]


def test_two_process_globalkd_prototypes_are_identical_on_both_ranks(tiny_data, tmp_path):
    _, tyaml, tpth = save_teacher(tmp_path, "FasterRCNN", "resnet34", num_classes=6)
    cfg = engine_cfg(tiny_data, tmp_path / "gk", arch="FasterRCNN", max_iter=4)
    cfg.KD.METHODS = ["GlobalKD"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = tyaml, tpth
    cfg.KD.GLOBALKD.MIN_BOX_SIZE = 4
    cfg.KD.GLOBALKD.REFRESH_PERIOD = 2
    cfg.SOLVER.CHECKPOINT_PERIOD = 0  # BatchNorm statistics differ by rank at the refresh at 2
    _two_process(cfg, tmp_path, "gk")
    logs = [open(tmp_path / "gk" / n).read() for n in ("log.txt", "log.txt.rank1")]
    sums = [
        re.findall(r"PGM refresh at iteration (\d+).*prototype checksum (\S+)", log) for log in logs
    ]
    assert [it for it, _ in sums[0]] == ["0", "2"]
    assert sums[0] == sums[1]


def test_two_process_resume_is_bit_identical(tiny_data, tmp_path):
    def cfg_for(out, max_iter):
        cfg = engine_cfg(tiny_data, tmp_path / out, arch="FasterRCNN", max_iter=max_iter)
        return cfg

    _two_process(cfg_for("full", 6), tmp_path, "full")
    _two_process(cfg_for("cut", 4), tmp_path, "cut")
    _two_process(cfg_for("cut", 6), tmp_path, "cut", "--resume")
    a = torch.load(tmp_path / "full" / "model_final.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "model_final.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 6
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0, msg=k)
    assert len(b["rng_per_rank"]) == 2


def test_eval_only_resume_falls_back_like_training_resume(tiny_data, tmp_path):
    """``--eval-only --resume`` evaluates the checkpoint a training resume would use: with
    ``last_checkpoint``'s file gone, the newest readable ``model_*.pth`` — not MODEL.WEIGHTS."""
    cfg = _train_with_checkpoints(tiny_data, tmp_path / "out")
    os.remove(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))  # last_checkpoint points to it
    cfg.DATASETS.TEST = (tiny_data[1],)
    yaml = write_cfg(cfg, tmp_path / "c.yaml")
    r = run_cli(["--config-file", yaml, "--resume", "--eval-only", "MODEL.WEIGHTS", ""])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "model_0000004.pth (iteration 4)" in r.stdout + r.stderr
    assert '"AP50"' in r.stdout
    empty = tmp_path / "empty"
    r = run_cli(["--config-file", yaml, "--resume", "--eval-only", "OUTPUT_DIR", str(empty)])
    assert r.returncode == 2 and "holds no checkpoint to evaluate" in r.stderr, r.stderr[-2000:]
