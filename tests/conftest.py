"""Fixtures shared by the test modules, and CI's rule that Detectron2 (and transformers) tests
never skip."""

from __future__ import annotations

import os

import pytest

from kd2.data import generate_synthetic_dataset

# A skip whose reason names Detectron2 means "Detectron2 is missing" (likewise transformers, the
# hf extra). Under CI (CI=true) that is a broken install, not a choice: such a skip is reported as
# a failure, so the core's tests can never turn into silent skips. A user without them still gets
# skips.
DETECTRON2_SKIP_WORD = "detectron2"
#: the word in a skip's reason -> how `make install` provides the package
REQUIRED_IN_CI = {
    DETECTRON2_SKIP_WORD: ("Detectron2", "`make install` builds it from ../shared/third_party"),
    "transformers": ("transformers", '`make install` installs the hf extra (pip install ".[hf]")'),
}


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail_detectron2_skip(report) -> None:
    if report.skipped and running_in_ci():
        reason = _skip_reason(report)
        for word, (name, how) in REQUIRED_IN_CI.items():
            if word in reason.lower():
                report.outcome = "failed"
                report.longrepr = (
                    f"CI=true and a test skipped ({reason}): {name} must be installed in CI — {how}"
                )
                return


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_detectron2_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_detectron2_skip(outcome.get_result())


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """``(train, val)`` dataset names of a 12 / 4-image, 64-px synthetic set (6 classes)."""
    root = tmp_path_factory.mktemp("syn")
    paths = generate_synthetic_dataset(str(root), num_train=12, num_val=4, image_size=64, seed=3)
    train = f"{paths['train_json']}:{paths['train_image_root']}"
    val = f"{paths['val_json']}:{paths['val_image_root']}"
    return train, val
