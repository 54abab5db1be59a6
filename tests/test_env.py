"""kd2's import-time check of the torch/torchvision pair."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torchvision.ops

from kd2.utils.env import TorchvisionBrokenError, check_torchvision


def test_working_torchvision_passes():
    check_torchvision()


def test_missing_nms_operator_gives_one_clear_error(monkeypatch):
    def broken_nms(*args, **kwargs):  # what a CPU-only torch + CUDA torchvision wheel does
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(torchvision.ops, "nms", broken_nms)
    with pytest.raises(TorchvisionBrokenError) as info:
        check_torchvision()
    msg = str(info.value)
    assert "torchvision::nms does not exist" in msg
    assert "pip install torch torchvision" in msg and "make install" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no raw traceback


def test_import_kd2_reports_broken_torchvision_without_traceback():
    code = (
        "import torchvision.ops\n"
        "def nms(*a, **k):\n"
        "    raise RuntimeError('operator torchvision::nms does not exist')\n"
        "torchvision.ops.nms = nms\n"
        "try:\n"
        "    import kd2\n"
        "except ImportError as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("TorchvisionBrokenError torchvision.ops.nms does not work"), out
