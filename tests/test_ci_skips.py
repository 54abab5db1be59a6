"""Under CI=true a test that skips because Detectron2 (or transformers) is missing fails
(tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

CASES = """
import pytest


def test_skips_inside_for_detectron2():
    pytest.skip("detectron2 is not installed (see README)")


def test_skips_inside_for_transformers():
    pytest.importorskip("transformers_that_does_not_exist", reason="transformers is not installed")


def test_skips_for_another_reason():
    pytest.skip("needs CUDA")


def test_passes():
    pass
"""

MODULE_SKIP = """
import pytest

pytest.importorskip("detectron2_that_does_not_exist", reason="detectron2 is not installed")


def test_never_runs():
    pass
"""


def _run(tmp_path, ci: str | None, *files: str):
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_cases.py").write_text(CASES)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider", *files],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


def test_detectron2_skips_fail_under_ci(tmp_path):
    r = _run(tmp_path, "true", "test_cases.py")
    assert r.returncode == 1, r.stdout
    assert "2 failed, 1 passed, 1 skipped" in r.stdout, r.stdout
    assert "Detectron2 must be installed in CI" in r.stdout, r.stdout
    assert "transformers must be installed in CI" in r.stdout, r.stdout
    assert "needs CUDA" in r.stdout  # other skips stay skips
    # a module that skips at import (pytest.importorskip) is a collection error: the run stops
    r = _run(tmp_path, "true", "test_module_skip.py")
    assert r.returncode != 0, r.stdout
    assert "Detectron2 must be installed in CI" in r.stdout, r.stdout


def test_detectron2_skips_stay_skips_for_users(tmp_path):
    r = _run(tmp_path, None, "test_cases.py", "test_module_skip.py")
    assert r.returncode == 0, r.stdout
    assert "1 passed, 4 skipped" in r.stdout, r.stdout
