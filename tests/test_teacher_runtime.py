"""A cheaper teacher forward (KD.TEACHER.DTYPE / CHANNELS_LAST / COMPILE)."""

from __future__ import annotations

import pytest
import torch

from kd2.tv.build import build_detector

from .helpers import batch, kd_cfg


def _model(tmp_path, **teacher):
    cfg = kd_cfg(tmp_path, "FasterRCNN", ["PKD", "Hinton"])
    for k, v in teacher.items():
        cfg.KD.TEACHER[k] = v
    return build_detector(cfg).train()


def test_bfloat16_teacher_gives_float32_records_and_finite_losses(tmp_path):
    ref = _model(tmp_path)
    model = _model(tmp_path, DTYPE="bfloat16")
    assert next(model.teacher.backbone.parameters()).dtype == torch.bfloat16
    assert next(model.teacher.roi_heads.parameters()).dtype == torch.float32  # heads stay exact
    images, targets = batch("FasterRCNN", with_empty=False)
    rec, _ = model.student_step(images, targets)
    with torch.no_grad():
        t16 = model.teacher_step(rec)
        t32 = ref.teacher_step(rec)
    for s in t16.features:
        assert t16.features[s].dtype == torch.float32
        rel = (t16.features[s] - t32.features[s]).norm() / t32.features[s].norm()
        assert rel < 0.05, (s, rel)  # bfloat16 rounding, not another network
    assert t16.roi.cls_logits.dtype == torch.float32
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        assert model.teacher([images[0]])  # the teacher's own forward (pre-flight AP) works


def test_float16_teacher_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="KD.TEACHER.DTYPE float16 needs a CUDA device"):
        _model(tmp_path, DTYPE="float16")
    with pytest.raises(ValueError, match="KD.TEACHER.DTYPE must be one of"):
        _model(tmp_path, DTYPE="half")


def test_channels_last_teacher_gives_the_same_features(tmp_path):
    ref = _model(tmp_path)
    model = _model(tmp_path, CHANNELS_LAST=True)
    images, targets = batch("FasterRCNN", with_empty=False)
    rec, _ = model.student_step(images, targets)
    with torch.no_grad():
        a, b = model.teacher_step(rec), ref.teacher_step(rec)
    for s in a.features:
        torch.testing.assert_close(a.features[s], b.features[s], rtol=1e-3, atol=1e-3)


def test_gpu_check_script_dry_run(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: the GPU script's steps on the CPU, tiny."""
    import json
    import os
    import subprocess
    import sys

    from .helpers import REPO

    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    r = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] and result["tests_rc"] in (0, 5)
    assert "step_demo/kd_step_vs_student_step" in result["figures"]
    assert "step_demo/teacher_forward_speedup_bfloat16" in result["figures"]
