"""A cheaper teacher forward (KD.TEACHER.DTYPE / CHANNELS_LAST / COMPILE)."""

from __future__ import annotations

import pytest
import torch

from kd2.tv.build import build_detector
from tests.helpers import batch, kd_cfg


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


def test_gpu_check_script_runs_without_a_package_index(tmp_path):
    """benchmarks/gpu_check.sh --size small: the GPU script's whole path (tests, pgm, both step
    benchmarks with the teacher options and autocast) with no package index reachable, on the
    CPU here; and a failing step makes it exit non-zero."""
    import json
    import os
    import re
    import subprocess
    import sys

    from tests.helpers import REPO

    script = REPO / "benchmarks" / "gpu_check.sh"
    code = [ln for ln in script.read_text().splitlines() if not ln.lstrip().startswith("#")]
    assert not [ln for ln in code if re.search(r"\bpip\b.*\binstall\b", ln)], "installs packages"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        THREADS="1",
        PIP_NO_INDEX="1",
        PIP_INDEX_URL="http://127.0.0.1:9/",  # any index access fails
        PIP_FIND_LINKS="",
    )

    def run(out, *args):
        r = subprocess.run(
            ["bash", str(script), "--size", "small", *args],
            capture_output=True,
            text=True,
            timeout=600,
            env=dict(env, OUT=str(out)),
            cwd=REPO,
        )
        return r, json.loads((out / "gpu_check.json").read_text())

    r, result = run(tmp_path / "ok")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert result["size"] == "small" and not result["failed"]
    assert set(result["steps"]) == {"tests", "pgm", "step_demo", "step_large"}
    assert all(s["rc"] == 0 for s in result["steps"].values()), result["steps"]
    assert result["tests"]["passed"] > 0 and result["tests"]["failed"] == 0, result["tests"]
    figures = result["figures"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert any(k.startswith("pgm/box_pool_speedup_") for k in figures), figures
    for step in ("step_demo", "step_large"):
        for name in ("kd_step_vs_student_step", "teacher_forward_speedup_bfloat16"):
            assert isinstance(figures[f"{step}/{name}"], float), (step, name)
        for amp in ("bf16", "fp16"):
            for what in ("student_step", "kd_step"):
                value = figures[f"{step}/amp_{amp}_{what}_vs_fp32"]
                assert value == "unsupported" or value > 0, (step, amp, what, value)
    assert isinstance(figures["step_demo/amp_bf16_kd_step_vs_fp32"], float)  # CPUs run bf16
    detail = json.loads((tmp_path / "ok" / "step_overhead_demo.json").read_text())
    assert detail["device"] == device and "diag_overhead" in next(iter(detail["rows"].values()))

    # a failing step (a config that does not exist): recorded, and the script exits non-zero
    r, result = run(tmp_path / "bad", "--only", "step_demo", "--config", "configs/missing.yaml")
    assert r.returncode != 0
    assert result["steps"]["step_demo"]["rc"] != 0 and result["failed"] == ["step_demo"]
    assert "no such config" in (tmp_path / "bad" / "step_demo.log").read_text()
