"""The backend seam (kd2.modeling.backends): the registry the core reaches every framework
through, and the contracts that keep the backends apart."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kd2.modeling.backends import BACKEND_MODULES, backend_of, get_backend, input_convention
from kd2.tv.build import build_plain_detector
from kd2.utils.errors import ConfigError
from tests.helpers import REPO, tiny_cfg


def test_every_backend_module_registers_its_name():
    for name in BACKEND_MODULES:
        try:
            backend = get_backend(name)
        except ConfigError as e:  # an optional framework that is not installed says so
            assert "is not installed" in str(e) and " — " in str(e)
            continue
        assert backend.name == name


def test_an_unknown_backend_is_one_user_error():
    with pytest.raises(ConfigError, match="KD.TEACHER.BACKEND must be one of torchvision"):
        get_backend("tensorflow", "KD.TEACHER.BACKEND")


def test_a_torchvision_detector_is_owned_by_the_torchvision_backend():
    model = build_plain_detector(tiny_cfg("RetinaNet"))
    backend = backend_of(model)
    assert backend.name == "torchvision"
    mean, std, channels, scale = input_convention(model)
    assert channels == "RGB" and scale == 1.0 and len(mean) == len(std) == 3
    info = backend.model_info(model)
    assert info.family == "retinanet" and sorted(info.channels) == [8, 16, 32, 64, 128]


def test_a_model_of_no_backend_is_refused_by_name():
    with pytest.raises(ConfigError, match="Linear is a detector of no kd2 backend"):
        backend_of(torch.nn.Linear(2, 2))


def test_importing_the_core_loads_no_backend():
    """The distiller, the cross-framework teachers and the predictor reach a backend only
    through the registry: importing them imports neither torchvision's nor Detectron2's glue."""
    code = (
        "import sys\n"
        "import kd2.modeling.distiller, kd2.modeling.cross_framework, kd2.engine.predictor\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('kd2.tv', 'kd2.d2')))\n"
        "print(loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
