"""Wrong input gets a clear, early error: cyclic ``_BASE_`` chains, a missing or misspelled
``--config-file`` or ``MODEL.BACKEND``, values that cannot train, and KD methods that cannot
apply to the detector (refused when the model is built, before any data pass)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from kd2.config import get_cfg
from kd2.engine import setup_cfg
from kd2.tv.build import build_detector, build_plain_detector
from tests.helpers import NUM_CLASSES, batch, engine_cfg, run_cli, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_cli(args, env_extra=None, timeout=120):
    return run_cli(args, timeout=timeout, **(env_extra or {}))


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


@pytest.fixture()
def no_detectron2(tmp_path):
    """``PYTHONPATH`` that hides an installed detectron2, as on a machine without it."""
    pkg = tmp_path / "fake_site" / "detectron2"
    pkg.mkdir(parents=True)
    _write(
        pkg / "__init__.py",
        "raise ModuleNotFoundError(\"No module named 'detectron2'\", name='detectron2')\n",
    )
    return {"PYTHONPATH": str(tmp_path / "fake_site")}


# -- item 10: a cyclic _BASE_ chain ---------------------------------------------------------


def _cycle(tmp_path, backend=True):
    model = 'MODEL:\n  BACKEND: "torchvision"\n' if backend else ""
    a = _write(tmp_path / "a.yaml", f'_BASE_: "b.yaml"\n{model}')
    b = _write(tmp_path / "b.yaml", '_BASE_: "a.yaml"\nSOLVER:\n  MAX_ITER: 5\n')
    return a, b


def test_cyclic_base_chain_names_its_files(tmp_path):
    a, b = _cycle(tmp_path)
    with pytest.raises(ValueError, match="cyclic _BASE_ chain") as e:
        get_cfg().merge_from_file(a)
    assert f"{a} -> {b} -> {a}" in str(e.value)
    self_ref = _write(tmp_path / "self.yaml", '_BASE_: "self.yaml"\n')
    with pytest.raises(ValueError, match="self.yaml -> .*self.yaml"):
        get_cfg().merge_from_file(self_ref)


def test_shared_bases_are_not_a_cycle_and_a_missing_base_is_named(tmp_path):
    _write(tmp_path / "base.yaml", "SOLVER:\n  MAX_ITER: 7\n")
    _write(tmp_path / "left.yaml", '_BASE_: "base.yaml"\nSOLVER:\n  BASE_LR: 0.5\n')
    _write(tmp_path / "right.yaml", '_BASE_: "base.yaml"\n')
    top = _write(tmp_path / "top.yaml", '_BASE_: ["left.yaml", "right.yaml"]\n')
    cfg = get_cfg()
    cfg.merge_from_file(top)
    assert cfg.SOLVER.MAX_ITER == 7 and cfg.SOLVER.BASE_LR == 0.5
    bad = _write(tmp_path / "bad.yaml", '_BASE_: "bsae.yaml"\n')
    with pytest.raises(FileNotFoundError, match="_BASE_ 'bsae.yaml' of config file .*bad.yaml"):
        get_cfg().merge_from_file(bad)


def test_cyclic_teacher_config_is_a_clear_error(tmp_path):
    a, b = _cycle(tmp_path)
    cfg = tiny_cfg()
    cfg.KD.METHODS = ["FitNet"]
    cfg.KD.TEACHER.CONFIG = a
    cfg.KD.TEACHER.WEIGHTS = str(tmp_path / "t.pth")
    with pytest.raises(ValueError, match="cyclic _BASE_ chain: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        build_detector(cfg)


@pytest.mark.parametrize("backend", [True, False], ids=["torchvision", "no_backend"])
def test_cli_cyclic_base_chain_stops_at_once(tmp_path, backend):
    a, b = _cycle(tmp_path, backend=backend)
    r = _run_cli(["--config-file", a], timeout=60)  # the old code looped forever
    assert r.returncode != 0
    assert f"cyclic _BASE_ chain: {a} -> {b} -> {a}" in r.stderr, r.stderr[-2000:]
    assert "RecursionError" not in r.stderr


# -- item 11: --config-file and MODEL.BACKEND -------------------------------------------------


def test_cli_misspelled_config_file_lists_close_names(no_detectron2):
    r = _run_cli(["--config-file", "configs/synthetic/retinanet_R18_GlobalKd.yml"], no_detectron2)
    assert r.returncode != 0
    assert "No module named 'detectron2'" not in r.stderr
    assert "'configs/synthetic/retinanet_R18_GlobalKd.yml' does not exist" in r.stderr, r.stderr
    assert "closest existing config files: configs/synthetic/retinanet_R18_GlobalKD.yaml" in (
        r.stderr
    )


def test_cli_misspelled_config_file_looks_in_its_own_folder(tmp_path, no_detectron2):
    _write(tmp_path / "my_student.yaml", "SOLVER:\n  MAX_ITER: 5\n")
    r = _run_cli(["--config-file", str(tmp_path / "my_studnet.yaml")], no_detectron2)
    assert r.returncode != 0
    assert "does not exist" in r.stderr and str(tmp_path / "my_student.yaml") in r.stderr


def test_cli_without_config_file_gives_an_example(no_detectron2):
    r = _run_cli([], no_detectron2)
    assert r.returncode != 0
    assert "No module named 'detectron2'" not in r.stderr
    assert "no --config-file given" in r.stderr, r.stderr
    example = r.stderr.split("--config-file ")[-1].split()[0]
    assert os.path.isfile(os.path.join(REPO, example)), example


def test_cli_misspelled_backend_names_the_valid_ones(tmp_path, no_detectron2):
    yaml = _write(tmp_path / "c.yaml", 'MODEL:\n  BACKEND: "torchvison"\n')
    r = _run_cli(["--config-file", yaml], no_detectron2)
    assert r.returncode != 0
    assert "No module named 'detectron2'" not in r.stderr
    assert f"unknown MODEL.BACKEND 'torchvison' (in {yaml})" in r.stderr, r.stderr
    assert (
        "valid backends: torchvision, detectron2, transformers; did you mean 'torchvision'?"
        in r.stderr
    )
    good = os.path.join(REPO, "configs", "synthetic", "retinanet_R34_teacher.yaml")
    r = _run_cli(["--config-file", good, "MODEL.BACKEND", "tochvision"], no_detectron2)
    assert r.returncode != 0
    assert "unknown MODEL.BACKEND 'tochvision' (in the command-line overrides)" in r.stderr


def test_cli_detectron2_config_without_detectron2_says_so(tmp_path, no_detectron2):
    yaml = _write(tmp_path / "d2.yaml", 'MODEL:\n  META_ARCHITECTURE: "GeneralizedRCNN"\n')
    r = _run_cli(["--config-file", yaml], no_detectron2)
    assert r.returncode != 0
    assert "No module named 'detectron2'" not in r.stderr
    assert "is a Detectron2 config" in r.stderr and "detectron2 is not installed" in r.stderr


# -- item 12: values that cannot train; MODEL.BACKBONE.WIDTH ---------------------------------


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("SOLVER.MAX_ITER", 0, "SOLVER.MAX_ITER must be > 0, got 0"),
        ("SOLVER.MAX_ITER", -3, "SOLVER.MAX_ITER must be > 0, got -3"),
        ("SOLVER.IMS_PER_BATCH", 0, "SOLVER.IMS_PER_BATCH must be > 0, got 0"),
        ("SOLVER.BASE_LR", 0.0, "SOLVER.BASE_LR must be a finite number > 0, got 0.0"),
        ("SOLVER.BASE_LR", math.nan, "SOLVER.BASE_LR must be a finite number > 0, got nan"),
        ("SOLVER.GAMMA", math.inf, "SOLVER.GAMMA must be a finite number > 0, got inf"),
        ("SOLVER.MOMENTUM", -0.9, "SOLVER.MOMENTUM must be a finite number >= 0, got -0.9"),
        ("SOLVER.WEIGHT_DECAY", math.nan, "SOLVER.WEIGHT_DECAY must be a finite number >= 0"),
        ("SOLVER.CHECKPOINT_PERIOD", -1, "SOLVER.CHECKPOINT_PERIOD must be >= 0, got -1"),
        ("SOLVER.WARMUP_ITERS", -1, "SOLVER.WARMUP_ITERS must be >= 0, got -1"),
        ("TEST.EVAL_PERIOD", -5, "TEST.EVAL_PERIOD must be >= 0, got -5"),
        ("KD.WARMUP_ITERS", -1, "KD.WARMUP_ITERS must be >= 0, got -1"),
        ("KD.RM.WEIGHT", -4.0, "KD.RM.WEIGHT must be a finite number >= 0, got -4.0"),
        ("KD.HINTON.WEIGHT", math.inf, "KD.HINTON.WEIGHT must be a finite number >= 0, got inf"),
        ("KD.DEFEAT.NECK_BG_WEIGHT", math.nan, "KD.DEFEAT.NECK_BG_WEIGHT must be a finite"),
        ("KD.GLOBALKD.SOFT_WEIGHT", -1.0, "KD.GLOBALKD.SOFT_WEIGHT must be a finite number >= 0"),
        ("KD.CLASSIFIERKD.LOC_WEIGHT", -0.1, "KD.CLASSIFIERKD.LOC_WEIGHT must be a finite"),
        ("KD.FRS.WEIGHT_FEAT", math.inf, "KD.FRS.WEIGHT_FEAT must be finite (< 0 = the paper's"),
        ("KD.FRS.WEIGHT_CLS", math.nan, "KD.FRS.WEIGHT_CLS must be finite"),
        ("KD.HINTON.TEMPERATURE", 0.0, "KD.HINTON.TEMPERATURE must be a finite number > 0"),
        ("KD.RM.TEMPERATURE", math.nan, "KD.RM.TEMPERATURE must be a finite number > 0, got nan"),
        ("KD.CLASSIFIERKD.TEMPERATURE", -2.0, "KD.CLASSIFIERKD.TEMPERATURE must be a finite"),
        ("KD.DEFEAT.T_NEG", 0.0, "KD.DEFEAT.T_NEG must be a finite number > 0, got 0.0"),
    ],
)
def test_validate_values_names_the_key_and_the_valid_range(key, value, message):
    from kd2.config import validate_values

    cfg = get_cfg()
    validate_values(cfg)  # the defaults are valid
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError) as e:
        validate_values(cfg)
    assert message in str(e.value)


def test_validate_values_accepts_the_documented_frs_sentinel_and_zero_weights():
    from kd2.config import validate_values

    cfg = get_cfg()
    cfg.KD.FRS.WEIGHT_FEAT, cfg.KD.FRS.WEIGHT_CLS = -1.0, -3.0  # = the paper's value
    cfg.KD.RM.WEIGHT = 0.0
    cfg.SOLVER.CHECKPOINT_PERIOD = cfg.TEST.EVAL_PERIOD = cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.MOMENTUM = cfg.SOLVER.WEIGHT_DECAY = 0.0
    cfg.KD.TEACHER.WEIGHTS = "teacher.pth"  # a path, not a weight
    validate_values(cfg)


def test_setup_cfg_refuses_values_that_cannot_train(tmp_path):
    yaml = _write(tmp_path / "c.yaml", "SOLVER:\n  MAX_ITER: 10\n")
    assert setup_cfg(yaml).SOLVER.MAX_ITER == 10
    with pytest.raises(ValueError, match="SOLVER.MAX_ITER must be > 0, got 0"):
        setup_cfg(yaml, ["SOLVER.MAX_ITER", "0"])
    with pytest.raises(ValueError, match="KD.HINTON.WEIGHT must be a finite number >= 0, got inf"):
        setup_cfg(yaml, ["KD.HINTON.WEIGHT", "1e999"])
    nan = _write(tmp_path / "nan.yaml", "KD:\n  PFI:\n    WEIGHT: .nan\n")
    with pytest.raises(ValueError, match="KD.PFI.WEIGHT must be a finite number >= 0, got nan"):
        setup_cfg(nan)
    assert setup_cfg(yaml, ["KD.FRS.WEIGHT_FEAT", "-1.0"]).KD.FRS.WEIGHT_FEAT == -1.0


def test_cli_max_iter_zero_writes_no_model(tiny_data, tmp_path):
    cfg = engine_cfg(tiny_data, tmp_path / "out", max_iter=2)
    yaml = _write(tmp_path / "c.yaml", cfg.dump())
    r = _run_cli(["--config-file", yaml, "SOLVER.MAX_ITER", "0"])
    assert r.returncode != 0
    assert "SOLVER.MAX_ITER must be > 0, got 0" in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "out" / "model_final.pth")


def test_backbone_width_is_no_longer_a_key(tmp_path):
    with pytest.raises(KeyError, match="unknown config key 'MODEL.BACKBONE.WIDTH'"):
        get_cfg().merge_from_list(["MODEL.BACKBONE.WIDTH", "0.5"])
    yaml = _write(tmp_path / "w.yaml", "MODEL:\n  BACKBONE:\n    WIDTH: 0.5\n")
    with pytest.raises(KeyError, match=r"unknown config key 'MODEL.BACKBONE.WIDTH' in .*w.yaml"):
        setup_cfg(yaml)


# -- item 14: methods that cannot apply to the detector --------------------------------------


def _ssd_cfg():
    cfg = tiny_cfg("RetinaNet")
    cfg.MODEL.META_ARCHITECTURE = "SSD"
    cfg.MODEL.BACKBONE.NAME = "mobilenet_v3_large"
    cfg.MODEL.SSD.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.SSD.SIZE = 320
    return cfg


@pytest.fixture(scope="module")
def ssd_teacher(tmp_path_factory):
    """An SSDLite teacher (config, weights) for SSDLite students."""
    root = tmp_path_factory.mktemp("ssd_teacher")
    tcfg = _ssd_cfg()
    torch.manual_seed(0)
    teacher = build_plain_detector(tcfg)
    torch.save({"model": teacher.state_dict()}, root / "t.pth")
    return _write(root / "t.yaml", tcfg.dump()), str(root / "t.pth")


def _ssd_kd_cfg(ssd_teacher, methods):
    cfg = _ssd_cfg()
    cfg.KD.METHODS = list(methods)
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = ssd_teacher
    return cfg


@pytest.mark.parametrize("method", ["GlobalKD", "Hinton", "FRS", "RM", "PFI"])
def test_sigmoid_only_methods_are_refused_when_an_ssd_is_built(ssd_teacher, method):
    # build_detector reads no data: the refusal comes before any prototype or training pass
    with pytest.raises(ValueError) as e:
        build_detector(_ssd_kd_cfg(ssd_teacher, ["FitNet", method]))
    msg = str(e.value)
    assert f"KD method {method!r} (KD.METHODS) does not apply to the SSD student" in msg, msg
    assert "softmax classifier with a background class" in msg
    assert "Use a method that supports softmax dense heads (ClassifierKD, DeFeat" in msg


@pytest.mark.parametrize(
    "methods,opts",
    [
        (["FitNet"], {}),
        (["FGFI"], {}),
        (["DeFeat"], {}),
        (["GlobalKD"], {"SOFT_WEIGHT": 0.0}),  # its feature terms alone apply to SSD
    ],
)
def test_methods_that_support_ssd_still_build_and_train(ssd_teacher, methods, opts):
    cfg = _ssd_kd_cfg(ssd_teacher, methods)
    for k, v in opts.items():
        cfg.KD.GLOBALKD[k] = v
    model = build_detector(cfg).train()
    losses = model(*batch("FasterRCNN", with_empty=False))  # SSD's labels are also c + 1
    kd = {k: v for k, v in losses.items() if k.startswith("loss_kd_")}
    assert kd and all(torch.isfinite(v) for v in kd.values())


def test_sigmoid_heads_still_build_the_dense_methods(tmp_path):
    from tests.helpers import kd_cfg

    cfg = kd_cfg(tmp_path, "RetinaNet", methods=("Hinton", "FRS", "RM", "PFI", "GlobalKD"))
    cfg.MODEL.FPN.OUT_CHANNELS = 64  # PFI without an adapter needs equal channels
    model = build_detector(cfg)
    assert set(model.kd_methods) == {"Hinton", "FRS", "RM", "PFI", "GlobalKD"}
