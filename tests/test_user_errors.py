"""Every mistake a user can make ends the same way: one ``kd2: error: <what> — <how to fix>``
block on stderr, exit status 2, no traceback (``--debug`` / ``KD2_DEBUG=1`` shows it).

One subprocess per case, through the entry points a user runs (``tools/train_net.py`` on both
backends, ``tools/lazyconfig_train_net.py``, ``tools/predict.py``). The messages are listed in
``docs/troubleshooting.md``.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from .helpers import REPO, engine_cfg, run_cli, save_teacher, shared_coco, write_cfg

HAS_D2 = importlib.util.find_spec("detectron2") is not None
needs_d2 = pytest.mark.skipif(not HAS_D2, reason="detectron2 is not installed (see README)")
QUICK = "configs/Detectron2-Quick"
LAZY = f"{QUICK}/lazy_faster_rcnn_R18_DeFeat_quick.py"


def assert_user_error(r, *needles: str) -> str:
    """Exit 2, no traceback, one ``kd2: error:`` line naming every ``needle``."""
    err = r.stderr
    assert r.returncode == 2, f"rc={r.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("kd2: error: ")]
    assert len(lines) == 1, err[-3000:]
    assert " — " in lines[0], lines[0]  # <what> — <how to fix>
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tv(tmp_path_factory, tiny_data):
    """Configs of the torchvision backend: a plain one, a KD one, a teacher of other classes."""
    root = tmp_path_factory.mktemp("tv_errors")
    plain = engine_cfg(tiny_data, root / "out", arch="FasterRCNN", max_iter=1)
    plain.MODEL.BACKEND = "torchvision"
    files = {"root": root, "plain": write_cfg(plain, root / "plain.yaml")}
    for sub, arch, classes in (
        ("t6", "FasterRCNN", 6),
        ("t3", "FasterRCNN", 3),
        ("fcos", "FCOS", 6),
    ):
        os.makedirs(root / sub)
        files[sub] = save_teacher(root / sub, arch=arch, num_classes=classes)[1:]
    kd = plain.clone()
    kd.KD.METHODS = ["FitNet"]
    kd.KD.TEACHER.CONFIG, kd.KD.TEACHER.WEIGHTS = files["t6"]
    files["kd"] = write_cfg(kd, root / "kd.yaml")
    kd.KD.TEACHER.CONFIG, kd.KD.TEACHER.WEIGHTS = files["t3"]
    files["kd_classes"] = write_cfg(kd, root / "kd_classes.yaml")
    kd.KD.METHODS = ["Hinton"]
    kd.KD.TEACHER.CONFIG, kd.KD.TEACHER.WEIGHTS = files["fcos"]
    files["kd_hinton_fcos"] = write_cfg(kd, root / "kd_hinton_fcos.yaml")
    (root / "flow.yaml").write_text(
        '_BASE_: "plain.yaml"\nINPUT: {MIN_SIZE_TRAIN: (64,), MAX_SIZE_TRAIN: 64}\n'
    )
    (root / "bad.json").write_text("{not json")
    (root / "a_file").write_text("")
    return files


TV_CASES = {
    "teacher_classes": (
        ["{kd_classes}"],
        ["disagree on the number of classes", "the teacher has 3, the student 6"],
    ),
    "logit_method_across_families": (
        ["{kd_hinton_fcos}"],
        ["'Hinton' cannot learn from the teacher", "fcos teacher does not have"],
    ),
    "yaml_flow_tuple": (["{root}/flow.yaml"], ["INPUT.MIN_SIZE_TRAIN", "YAML list"]),
    "unknown_key": (["{plain}", "SOLVER.MAX_ITR", "3"], ["did you mean 'SOLVER.MAX_ITER'"]),
    "unknown_method": (
        ["{kd}", "KD.METHODS", "['FitNte']"],
        ["unknown KD method 'FitNte'", "did you mean 'FitNet'"],
    ),
    "missing_teacher_config": (
        ["{kd}", "KD.TEACHER.CONFIG", "{root}/nope.yaml"],
        ["KD.TEACHER.CONFIG", "does not exist"],
    ),
    "missing_teacher_weights": (
        ["{kd}", "KD.TEACHER.WEIGHTS", "{root}/nope.pth"],
        ["KD.TEACHER.WEIGHTS", "does not exist", "never downloads"],
    ),
    "teacher_weights_do_not_fit": (
        ["{kd}", "KD.TEACHER.WEIGHTS", "{t3_weights}"],
        ["does not match the model", "shape mismatches", "roi_heads.box_predictor"],
    ),
    "unregistered_dataset": (
        ["{plain}", "DATASETS.TRAIN", "('synthetic_trian',)"],
        ["'synthetic_trian' is not registered", "Did you mean 'synthetic_train'"],
    ),
    "missing_image_dir": (
        ["{plain}", "DATASETS.TRAIN", "('{train_json}:{root}/no_images',)"],
        ["image directory", "does not exist"],
    ),
    "annotation_json_does_not_parse": (
        ["{plain}", "DATASETS.TRAIN", "('{root}/bad.json:{images}',)"],
        ["bad.json", "not valid JSON"],
    ),
    "cuda_without_gpu": (["{plain}", "MODEL.DEVICE", "cuda"], ["MODEL.DEVICE", "no usable CUDA"]),
    "output_dir_not_writable": (
        ["{plain}", "OUTPUT_DIR", "{root}/a_file/run"],
        ["OUTPUT_DIR", "cannot be created"],
    ),
}


@pytest.mark.parametrize("case", sorted(TV_CASES))
def test_torchvision_backend_user_errors(tv, tiny_data, case):
    train_json, images = tiny_data[0].rsplit(":", 1)
    paths = {k: v for k, v in tv.items() if isinstance(v, (str, os.PathLike))}
    paths.update(train_json=train_json, images=images, t3_weights=tv["t3"][1])
    args = [a.format(**paths) for a in TV_CASES[case][0]]
    out = str(tv["root"] / f"run_{case}")
    if "OUTPUT_DIR" not in args:
        args += ["OUTPUT_DIR", out]
    r = run_cli(["--config-file", *args], timeout=180)
    assert_user_error(r, *TV_CASES[case][1])
    assert not os.path.exists(os.path.join(out, "model_final.pth"))  # nothing was trained


def test_a_user_error_in_worker_processes_is_one_message(tv):
    """With ``--num-gpus 2`` the teacher is built in the worker processes: the launcher prints
    the first worker's message once and exits 2, with no worker traceback."""
    out = str(tv["root"] / "run_workers")
    args = ["--config-file", tv["kd"], "--num-gpus", "2", "KD.TEACHER.WEIGHTS"]
    r = run_cli([*args, str(tv["root"] / "nope.pth"), "OUTPUT_DIR", out], timeout=300)
    assert_user_error(r, "KD.TEACHER.WEIGHTS", "does not exist")
    assert "terminated with the following error" not in r.stderr


def test_debug_shows_the_traceback(tv):
    args = ["--config-file", tv["plain"], "SOLVER.MAX_ITR", "3"]
    r = run_cli(args, KD2_DEBUG="1")
    assert r.returncode != 0 and "Traceback" in r.stderr and "UnknownNameError" in r.stderr
    r = run_cli(["--debug", *args])
    assert r.returncode != 0 and "Traceback" in r.stderr


# -- Detectron2 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def d2(tmp_path_factory):
    """A random Detectron2 quick teacher (80 classes) and one of 3 classes, with configs."""
    from detectron2.modeling import build_model

    from kd2.d2 import load_config

    root = tmp_path_factory.mktemp("d2_errors")
    cfg = load_config(str(REPO / QUICK / "faster_rcnn_R34_FPN_teacher_quick.yaml"), freeze=False)
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, root / "teacher.pth")
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    (root / "teacher3.yaml").write_text(cfg.dump())
    torch.save({"model": build_model(cfg).state_dict()}, root / "teacher3.pth")
    (root / "flow.yaml").write_text(
        f'_BASE_: "{REPO / QUICK / "faster_rcnn_R18_FPN_DeFeat_quick.yaml"}"\n'
        "INPUT: {MIN_SIZE_TRAIN: (64,), MAX_SIZE_TRAIN: 64}\n"
    )
    (root / "bad.json").write_text("{not json")
    (root / "a_file").write_text("")
    from detectron2.config import LazyConfig, instantiate

    lazy_teacher = instantiate(LazyConfig.load(str(REPO / LAZY)).model.teacher.model)
    torch.save({"model": lazy_teacher.state_dict()}, root / "lazy_teacher.pth")
    return root


D2_CASES = {
    "yaml_flow_tuple": (["flow"], ["INPUT.MIN_SIZE_TRAIN", "YAML list"]),
    "unknown_key": (["SOLVER.MAX_ITR", "3"], ["did you mean 'SOLVER.MAX_ITER'"]),
    "unknown_method": (["KD.METHODS", "['DeFaet']"], ["did you mean 'DeFeat'"]),
    "missing_teacher_config": (
        ["KD.TEACHER.CONFIG", "{root}/nope.yaml"],
        ["neither a file nor a Detectron2 model-zoo config"],
    ),
    "missing_teacher_weights": (["KD.TEACHER.WEIGHTS", "{root}/nope.pth"], ["does not exist"]),
    "teacher_classes": (
        ["KD.TEACHER.CONFIG", "{root}/teacher3.yaml", "KD.TEACHER.WEIGHTS", "{root}/teacher3.pth"],
        ["disagree on the number of classes"],
    ),
    "teacher_weights_do_not_fit": (
        ["KD.TEACHER.WEIGHTS", "{root}/teacher3.pth"],
        ["does not match the teacher config", "roi_heads.box_predictor"],
    ),
    "unregistered_dataset": (
        ["DATASETS.TRAIN", "('coco_2017_trian',)"],
        ["'coco_2017_trian' is not registered", "Did you mean 'coco_2017_train'"],
    ),
    "annotation_json_does_not_parse": (
        ["DATASETS.TRAIN", "('{root}/bad.json:{root}',)"],
        ["bad.json", "not valid JSON"],
    ),
    "cuda_without_gpu": (["MODEL.DEVICE", "cuda"], ["no usable CUDA"]),
    "output_dir_not_writable": (["OUTPUT_DIR", "{root}/a_file/run"], ["cannot be created"]),
}


@needs_d2
@pytest.mark.parametrize("case", sorted(D2_CASES))
def test_detectron2_backend_user_errors(d2, case):
    opts, needles = D2_CASES[case]
    opts = [o.format(root=d2) for o in opts]
    config = str(REPO / QUICK / "faster_rcnn_R18_FPN_DeFeat_quick.yaml")
    if opts[0] == "flow":
        config, opts = str(d2 / "flow.yaml"), opts[1:]
    base = ["KD.TEACHER.WEIGHTS", str(d2 / "teacher.pth"), "SOLVER.MAX_ITER", "1"]
    if "OUTPUT_DIR" not in opts:
        base += ["OUTPUT_DIR", str(d2 / f"run_{case}")]
    r = run_cli(
        ["--config-file", config, *base, *opts],
        timeout=240,
        DETECTRON2_DATASETS=str(shared_coco().parent),
    )
    assert_user_error(r, *needles)


@needs_d2
def test_a_user_error_in_detectron2_worker_processes_is_one_message(d2):
    config = str(REPO / QUICK / "faster_rcnn_R18_FPN_DeFeat_quick.yaml")
    opts = ["KD.TEACHER.WEIGHTS", str(d2 / "nope.pth"), "OUTPUT_DIR", str(d2 / "run_workers")]
    r = run_cli(
        ["--config-file", config, "--num-gpus", "2", *opts],
        timeout=300,
        DETECTRON2_DATASETS=str(shared_coco().parent),
    )
    assert_user_error(r, "does not exist")
    assert "terminated with the following error" not in r.stderr


LAZY_CASES = {
    "missing_config_file": (["--config-file", "{root}/nope.py"], ["does not exist"]),
    "unknown_override_key": (["train.max_itr=3"], ["no key 'max_itr'", "'train.max_iter'"]),
    "unknown_kd_option": (
        ["model.teacher.weights={root}/lazy_teacher.pth", "model.kd_cfg.DEFEAT.NECK_FG_WEIHGT=2"],
        ["unknown KD option", "NECK_FG_WEIGHT"],
    ),
    "missing_teacher_weights": (["model.teacher.weights={root}/nope.pth"], ["do not exist"]),
    "teacher_weights_do_not_fit": (
        ["model.teacher.weights={root}/teacher.pth"],
        ["do not match the LazyConfig teacher"],
    ),
    "cuda_without_gpu": (["train.device=cuda"], ["train.device", "no usable CUDA"]),
    "output_dir_not_writable": (["train.output_dir={root}/a_file/run"], ["cannot be created"]),
}


@needs_d2
@pytest.mark.parametrize("case", sorted(LAZY_CASES))
def test_lazyconfig_user_errors(d2, case):
    opts, needles = LAZY_CASES[case]
    opts = [o.format(root=d2) for o in opts]
    args = opts if opts[0] == "--config-file" else ["--config-file", LAZY, *opts]
    if not any(o.startswith("train.output_dir") for o in opts):
        args.append(f"train.output_dir={d2}/lazy_{case}")
    r = run_cli(
        args,
        tool="lazyconfig_train_net.py",
        timeout=240,
        DETECTRON2_DATASETS=str(shared_coco().parent),
    )
    assert_user_error(r, *needles)


# -- prediction ---------------------------------------------------------------------------------


def test_predict_user_errors(tv, tiny_data):
    images = tiny_data[1].rsplit(":", 1)[1]
    out = str(tv["root"] / "pred")
    cases = [
        (["--config-file", str(tv["root"] / "nope.yaml"), "--input", images], ["does not exist"]),
        (["--config-file", tv["plain"], "--input", str(tv["root"] / "none_*.png")], ["no image"]),
        (
            ["--config-file", tv["plain"], "--input", images, "--confidence-threshold", "2"],
            ["outside [0, 1]"],
        ),
        (
            ["--config-file", tv["plain"], "--input", images, "MODEL.WEIGHTS", "/nope.pth"],
            ["does not exist"],
        ),
    ]
    for args, needles in cases:
        r = run_cli(["--output", out, *args], tool="predict.py", timeout=120)
        assert_user_error(r, *needles)
    assert not os.path.exists(os.path.join(out, "predictions.json"))
    json.dumps(cases)  # the cases are plain data


#: the helper tools: (tool, arguments, words of the message)
TOOL_CASES = {
    "plot_no_run": ("plot_kd_diagnostics.py", ["{root}/no_run"], ["metrics.json does not exist"]),
    "prototypes_no_file": ("show_prototypes.py", ["{root}/nope.json"], ["no prototype file"]),
    "crop_classifier_no_data": (
        "train_crop_classifier.py", ["--output", "{root}/cc"], ["no training data"]
    ),
    "analyze_unknown_dataset": (
        "analyze_dataset.py",
        ["--config-file", "{plain}", "DATASETS.TRAIN", "('nope_ds',)"],
        ["nope_ds"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(TOOL_CASES))
def test_helper_tools_user_errors(tv, case):
    tool, args, needles = TOOL_CASES[case]
    args = [a.format(root=tv["root"], plain=tv["plain"]) for a in args]
    assert_user_error(run_cli(args, tool=tool, timeout=120), *needles)


def test_troubleshooting_page_lists_every_case():
    page = (REPO / "docs" / "troubleshooting.md").read_text()
    for case in {*TV_CASES, *D2_CASES, *LAZY_CASES, *TOOL_CASES} - {"missing_config_file"}:
        assert f"`[{case}]`" in page, case
