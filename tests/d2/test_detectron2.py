"""kd2.d2 against the real Detectron2 (skipped where detectron2 is not installed)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

detectron2 = pytest.importorskip("detectron2", reason="detectron2 is not installed (see README)")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import kd2.losses  # noqa: E402
from kd2.d2 import add_kd_config  # noqa: E402
from kd2.tv.meta_arch import KDRetinaNet  # noqa: E402

K = 3


def d2_cfg(arch="GeneralizedRCNN", depth=18, fpn=32):
    cfg = get_cfg()
    add_kd_config(cfg)
    from detectron2 import model_zoo

    base = "Base-RCNN-FPN.yaml" if arch.endswith("GeneralizedRCNN") else "Base-RetinaNet.yaml"
    cfg.merge_from_file(model_zoo.get_config_file(base))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.META_ARCHITECTURE = arch
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.OUT_CHANNELS = fpn
    cfg.KD.PREFLIGHT.ENABLED = False  # random teachers (the check has tests of its own)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = K
    cfg.MODEL.RETINANET.NUM_CLASSES = K
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 200
    return cfg


def save_teacher(tmp_path, arch="GeneralizedRCNN", depth=34, fpn=64, name="teacher"):
    tcfg = d2_cfg(arch, depth, fpn)
    torch.manual_seed(5)
    teacher = build_model(tcfg)
    DetectionCheckpointer(teacher, save_dir=str(tmp_path)).save(name)
    path = os.path.join(tmp_path, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(tcfg.dump())
    return path, os.path.join(tmp_path, f"{name}.pth")


def kd_cfg(tmp_path, arch="GeneralizedRCNN", methods=("DeFeat", "Hinton")):
    tyaml, tpth = save_teacher(tmp_path, arch)
    cfg = d2_cfg("Distill" + arch)
    cfg.KD.METHODS = list(methods)
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = tyaml, tpth
    return cfg


def batch():
    g = torch.Generator().manual_seed(0)
    out = []
    for (h, w), boxes, classes in [
        ((96, 128), [[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 90.0, 60.0]], [0, 2]),
        ((80, 112), [[5.0, 5.0, 30.0, 40.0]], [1]),
    ]:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(boxes))
        inst.gt_classes = torch.tensor(classes)
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        out.append({"image": image, "instances": inst, "height": h, "width": w})
    return out


def plain_student(kd_model, arch):
    cfg = d2_cfg(arch)
    model = build_model(cfg).train()
    model.load_state_dict(kd_model.student_state_dict(), strict=True)  # no missing/unexpected
    return model


@pytest.mark.parametrize("arch", ["GeneralizedRCNN", "RetinaNet"])
def test_student_losses_equal_native_with_kd_weights_zero(tmp_path, arch):
    cfg = kd_cfg(tmp_path, arch, ["FitNet"])
    cfg.KD.FITNET.WEIGHT = 0.0
    kd = build_model(cfg).train()
    native = plain_student(kd, arch)
    data = batch()
    with EventStorage(0):
        torch.manual_seed(3)
        expected = native(copy.deepcopy(data))
        torch.manual_seed(3)
        got = kd(copy.deepcopy(data))
    assert got["loss_kd_fitnet"] == 0
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize(
    "arch,methods",
    [
        ("GeneralizedRCNN", ["DeFeat", "Hinton", "FGFI"]),
        ("RetinaNet", ["DeFeat", "Hinton", "FGFI"]),
        ("GeneralizedRCNN", ["FRS"]),
        ("RetinaNet", ["FRS", "RM", "PFI"]),
        ("GeneralizedRCNN", ["CWD", "PKD", "MGD"]),
        ("GeneralizedRCNN", ["FGD", "FBKD"]),
        ("RetinaNet", ["CWD", "PKD", "MGD"]),
        ("RetinaNet", ["FGD", "FBKD"]),
        ("RetinaNet", ["CrossKD", "GID"]),
    ],
)
def test_kd_losses_train_student_only(tmp_path, arch, methods):
    cfg = kd_cfg(tmp_path, arch, methods)
    cfg.KD.PFI.ADAPTER_KERNEL = 1  # the teacher's FPN is wider than the student's
    model = build_model(cfg).train()
    teacher = model.teacher
    assert not teacher.training
    assert not any(k.startswith(("teacher", "_teacher")) for k in model.state_dict())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    with EventStorage(0):
        losses = model(batch())
    kd_keys = [k for k in losses if k.startswith("loss_kd_")]
    assert kd_keys and all(torch.isfinite(losses[k]) for k in kd_keys)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for n, p in model.named_parameters() if n.startswith("kd_"))
    opt.step()
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    model.eval()
    with torch.no_grad():
        out = model(batch())
    assert "instances" in out[0]


def test_inherit_teacher_on_detectron2(tmp_path):
    tyaml, tpth = save_teacher(tmp_path, "RetinaNet", depth=34, fpn=32)
    cfg = d2_cfg("DistillRetinaNet")
    cfg.KD.METHODS = ["MGD"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = tyaml, tpth
    cfg.KD.INHERIT_TEACHER = ["neck", "head"]
    model = build_model(cfg)
    s, t = model.student_state_dict(), model.teacher.state_dict()
    head = [k for k in s if k.startswith("head.")]
    neck = [k for k in s if k.startswith("backbone.fpn_output")]
    assert head and neck and all(torch.equal(s[k], t[k]) for k in head + neck)
    assert model.kd_methods["MGD"].mask_ratio == 0.65  # one-stage defaults
    with EventStorage(0):
        losses = model.train()(batch())
    assert torch.isfinite(losses["loss_kd_mgd"])


def test_both_backends_call_the_same_loss_modules(tmp_path):
    model = build_model(kd_cfg(tmp_path, "RetinaNet", ["DeFeat", "Hinton"]))
    for name, method in model.kd_methods.items():
        assert type(method) is kd2.losses.KD_METHOD_REGISTRY.get(name)
    import kd2.modeling.distiller as distiller
    import kd2.tv.meta_arch as tv_meta

    assert distiller.KD_METHOD_REGISTRY is kd2.losses.KD_METHOD_REGISTRY
    assert issubclass(KDRetinaNet, distiller.DistillerMixin) and tv_meta.DistillerMixin is (
        distiller.DistillerMixin
    )
    assert isinstance(model, distiller.DistillerMixin)


D2_BRANCHES = {
    "GeneralizedRCNN": ("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"),
    "RetinaNet": ("head.cls_score", "head.bbox_pred"),
}


@pytest.mark.parametrize("arch", ["GeneralizedRCNN", "RetinaNet"])
def test_classifier_kd_on_detectron2(tmp_path, arch):
    """ClassifierKD on Detectron2's softmax ROI head and sigmoid RetinaNet head: no detector
    teacher, the classifier reads Detectron2's BGR 0-255 input, KD-loc reaches only the box
    regression and KD-cls only the classification, and the student trains end to end."""
    from kd2.losses.classifier_kd import record_positives
    from kd2.modeling.classifier_teacher import CropClassifier, save_crop_classifier

    torch.manual_seed(0)
    save_crop_classifier(str(tmp_path / "clf.pth"), CropClassifier("resnet18", K, 32))
    cfg = d2_cfg("Distill" + arch)
    cfg.KD.METHODS = ["ClassifierKD"]
    cfg.KD.CLASSIFIERKD.TEACHER.WEIGHTS = str(tmp_path / "clf.pth")
    model = build_model(cfg).train()
    assert model.teacher is None
    method = model.kd_methods["ClassifierKD"]
    assert type(method) is kd2.losses.KD_METHOD_REGISTRY.get("ClassifierKD")
    assert method.classifier.perm == [2, 1, 0]  # BGR input -> the classifier's RGB
    with EventStorage(0):
        student, _ = model.student_step(batch())
    assert record_positives(student).head == ("softmax" if arch == "GeneralizedRCNN" else "sigmoid")
    losses = method(student, student.teacher_view())
    cls_branch, box_branch = D2_BRANCHES[arch]

    def grad(name):
        ps = model.get_submodule(name).parameters()
        return sum(float(p.grad.abs().sum()) for p in ps if p.grad is not None)

    losses["loss_kd_classifier_loc"].backward(retain_graph=True)
    assert grad(box_branch) > 0 and grad(cls_branch) == 0
    model.zero_grad(set_to_none=True)
    losses["loss_kd_classifier_cls"].backward()
    assert grad(cls_branch) > 0 and grad(box_branch) == 0
    with EventStorage(0):
        all_losses = model(batch())
    assert torch.isfinite(sum(all_losses.values()))
    assert all_losses["loss_kd_classifier_loc"].item() > 0


def test_misspelled_zoo_name_lists_close_names(tmp_path):
    cfg = kd_cfg(tmp_path)
    cfg.KD.TEACHER.CONFIG = "COCO-Detection/faster_rcnn_R_101_FPN_3X.yml"
    with pytest.raises(FileNotFoundError, match="faster_rcnn_R_101_FPN_3x.yaml"):
        build_model(cfg)


def test_teacher_config_not_found(tmp_path):
    cfg = kd_cfg(tmp_path)
    cfg.KD.TEACHER.CONFIG = str(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        build_model(cfg)


def test_class_count_mismatch(tmp_path):
    cfg = kd_cfg(tmp_path)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = K + 1
    with pytest.raises(ValueError, match="number of classes"):
        build_model(cfg)


def test_teacher_checkpoint_with_missing_keys_is_an_error(tmp_path):
    cfg = kd_cfg(tmp_path)
    state = torch.load(cfg.KD.TEACHER.WEIGHTS, weights_only=False)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("roi_heads")}
    torch.save(state, cfg.KD.TEACHER.WEIGHTS)
    with pytest.raises(ValueError, match="missing keys"):
        build_model(cfg)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = os.path.join(REPO, "configs", "Detectron2-Quick")


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(QUICK) if f.endswith(".yaml")))
def test_quick_configs_load(name):
    cfg = get_cfg()
    add_kd_config(cfg)
    cfg.merge_from_file(os.path.join(QUICK, name))


def coco_env_with_quick_teacher(tmp_path) -> dict:
    """Save a random R34 quick teacher as ``tmp_path/teacher.pth``; return the environment that
    points Detectron2's builtin coco_2017_* at the real subset (skip when it is absent)."""
    from tests.helpers import shared_coco

    coco = shared_coco()
    if not coco.is_dir():
        pytest.skip(f"real COCO subset not found at {coco}")
    tcfg = get_cfg()
    add_kd_config(tcfg)
    tcfg.merge_from_file(os.path.join(QUICK, "faster_rcnn_R34_FPN_teacher_quick.yaml"))
    DetectionCheckpointer(build_model(tcfg), save_dir=str(tmp_path)).save("teacher")
    return dict(os.environ, DETECTRON2_DATASETS=str(coco.parent), OMP_NUM_THREADS="2")


def test_train_net_trains_resumes_and_evaluates_on_real_coco(tmp_path):
    import subprocess
    import sys

    env = coco_env_with_quick_teacher(tmp_path)
    out = tmp_path / "out"
    base = [
        sys.executable,
        os.path.join(REPO, "tools", "train_net.py"),
        "--config-file",
        os.path.join(QUICK, "faster_rcnn_R18_FPN_DeFeat_quick.yaml"),
    ]
    common = [
        "KD.TEACHER.WEIGHTS",
        str(tmp_path / "teacher.pth"),
        "OUTPUT_DIR",
        str(out),
        "SOLVER.CHECKPOINT_PERIOD",
        "4",
        "DATASETS.TEST",
        "()",
    ]

    def run(*extra):
        r = subprocess.run(
            base + list(extra), capture_output=True, text=True, timeout=900, env=env, cwd=REPO
        )
        assert r.returncode == 0, r.stderr[-4000:]
        return r

    run(*common, "SOLVER.MAX_ITER", "4")
    r = run("--resume", *common, "SOLVER.MAX_ITER", "6")
    assert "Loading from" in r.stdout + r.stderr or "resum" in (r.stdout + r.stderr).lower()
    ckpt = torch.load(out / "model_final.pth", weights_only=False)
    assert ckpt["iteration"] == 5 and "kd" in ckpt
    student = build_model(d2_cfg_quick())
    result = student.load_state_dict(ckpt["model"], strict=True)  # the student alone
    assert not result.missing_keys and not result.unexpected_keys
    os.remove(tmp_path / "teacher.pth")  # the student evaluates without its teacher's file
    r = run("--eval-only", *common[:-2], "MODEL.WEIGHTS", str(out / "model_final.pth"))
    assert '"AP50"' in r.stdout


def d2_cfg_quick():
    cfg = get_cfg()
    add_kd_config(cfg)
    cfg.merge_from_file(os.path.join(QUICK, "faster_rcnn_R18_FPN_student_quick.yaml"))
    return cfg


def test_lazyconfig_experiment_instantiates_and_trains(tmp_path):
    import subprocess
    import sys

    from detectron2.config import LazyConfig, instantiate

    from tests.helpers import shared_coco

    lazy = os.path.join(QUICK, "lazy_faster_rcnn_R18_DeFeat_quick.py")
    cfg = LazyConfig.load(lazy)
    teacher = instantiate(cfg.model.teacher.model)
    DetectionCheckpointer(teacher, save_dir=str(tmp_path)).save("teacher")
    coco = shared_coco()
    if not coco.is_dir():
        pytest.skip(f"real COCO subset not found at {coco}")
    env = dict(os.environ, DETECTRON2_DATASETS=str(coco.parent), OMP_NUM_THREADS="2")
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "lazyconfig_train_net.py"),
        "--config-file",
        lazy,
        f"model.teacher.weights={tmp_path / 'teacher.pth'}",
        f"train.output_dir={tmp_path / 'out'}",
        "train.max_iter=3",
        "train.checkpointer.period=2",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    ckpt = torch.load(tmp_path / "out" / "model_final.pth", weights_only=False)
    assert "kd" in ckpt and not any(k.startswith("kd_methods") for k in ckpt["model"])
    assert "loss_kd_defeat_fg" in open(tmp_path / "out" / "metrics.json").read()
    # the pre-flight check ran before the first step (the quick config accepts its AP≈0 teacher)
    report = json.load(open(tmp_path / "out" / "preflight.json"))
    assert report["val_images"] > 0 and "loss_kd_defeat_fg" in report["terms"]
    # ... and stops the same random teacher at the default threshold, before any step
    cmd[cmd.index(f"train.output_dir={tmp_path / 'out'}")] = f"train.output_dir={tmp_path / 'x'}"
    r = subprocess.run(
        cmd + ["model.kd_cfg.PREFLIGHT.MIN_TEACHER_AP=1.0"],
        capture_output=True, text=True, timeout=900, env=env, cwd=REPO,
    )  # fmt: skip
    assert r.returncode != 0 and "PreflightError" in r.stderr and "MIN_TEACHER_AP" in r.stderr
    assert not (tmp_path / "x" / "model_final.pth").exists()


def test_lazyconfig_teacher_recipe_experiment_and_student_eval_without_teacher(tmp_path):
    """The LazyConfig commands (README.md's LazyConfig quick start, docs/detectron2.md's
    "LazyConfig"): train the teacher recipe, distil with it, evaluate the student with the
    teacher's file gone."""
    import subprocess
    import sys

    from tests.helpers import shared_coco

    coco = shared_coco()
    if not coco.is_dir():
        pytest.skip(f"real COCO subset not found at {coco}")
    env = dict(os.environ, DETECTRON2_DATASETS=str(coco.parent), OMP_NUM_THREADS="2")

    def run(config, *opts):
        cmd = [sys.executable, os.path.join(REPO, "tools", "lazyconfig_train_net.py")]
        cmd += ["--config-file", os.path.join(QUICK, config), *opts]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
        assert r.returncode == 0, r.stderr[-4000:]
        return r

    teacher = tmp_path / "teacher" / "model_final.pth"
    run("lazy_faster_rcnn_R34_teacher_quick.py", f"train.output_dir={teacher.parent}",
        "train.max_iter=2")  # fmt: skip
    experiment = "lazy_faster_rcnn_R18_DeFeat_quick.py"
    run(experiment, f"model.teacher.weights={teacher}", f"train.output_dir={tmp_path / 's'}",
        "train.max_iter=2")  # fmt: skip
    os.remove(teacher)
    student = tmp_path / "s" / "model_final.pth"
    r = run(experiment, "--eval-only", f"train.init_checkpoint={student}",
            f"train.output_dir={tmp_path / 'eval'}")  # fmt: skip
    assert "AP50" in r.stdout + r.stderr


def test_student_config_drops_the_teacher():
    from detectron2.config import LazyConfig

    from kd2.d2 import student_config, student_model_config

    cfg = get_cfg()
    add_kd_config(cfg)
    cfg.merge_from_file(os.path.join(QUICK, "faster_rcnn_R18_FPN_DeFeat_quick.yaml"))
    plain = student_config(cfg)
    assert plain.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and not plain.KD.METHODS
    assert cfg.MODEL.META_ARCHITECTURE == "DistillGeneralizedRCNN"  # not modified
    lazy = LazyConfig.load(os.path.join(QUICK, "lazy_faster_rcnn_R18_DeFeat_quick.py"))
    node = student_model_config(lazy.model)
    assert "teacher" not in node and "kd_cfg" not in node
    assert node._target_.__name__ == "GeneralizedRCNN"


ZOO_PROTOCOLS = os.path.join(REPO, "configs", "COCO-Distillation")


@pytest.mark.parametrize(
    "name", sorted(f for f in os.listdir(ZOO_PROTOCOLS) if "R101_" in f and f.endswith(".yaml"))
)
def test_model_zoo_protocol_configs_resolve(name):
    from kd2.d2.teacher import resolve_config_file

    cfg = get_cfg()
    add_kd_config(cfg)
    cfg.merge_from_file(os.path.join(ZOO_PROTOCOLS, name))
    assert cfg.MODEL.META_ARCHITECTURE.startswith("Distill") and cfg.KD.METHODS
    teacher = get_cfg()
    teacher.merge_from_file(resolve_config_file(cfg.KD.TEACHER.CONFIG))  # a model-zoo name
    assert teacher.MODEL.RESNETS.DEPTH == 101 and cfg.MODEL.RESNETS.DEPTH == 50
    schedule = 90000 if "_1x_" in name else 180000  # FBKD's protocol: 1x on a trained R50
    assert cfg.KD.TEACHER.WEIGHTS.startswith("detectron2://") and cfg.SOLVER.MAX_ITER == schedule


def test_classifier_kd_protocol_config_needs_no_detector_teacher():
    from kd2.modeling.distiller import needs_detector_teacher

    cfg = get_cfg()
    add_kd_config(cfg)
    cfg.merge_from_file(os.path.join(ZOO_PROTOCOLS, "faster_rcnn_R50_FPN_2x_ClassifierKD.yaml"))
    assert cfg.KD.METHODS == ["ClassifierKD"] and not needs_detector_teacher(cfg.KD)
    assert cfg.KD.CLASSIFIERKD.TEACHER.WEIGHTS.endswith("model_final.pth")
    assert cfg.SOLVER.MAX_ITER == 180000


def _lazy_fcos(depth):
    from detectron2.model_zoo import get_config

    m = copy.deepcopy(get_config("common/models/fcos.py").model)
    m.backbone.bottom_up.stages.depth = depth
    m.backbone.bottom_up.stages.pop("stride_in_1x1")
    m.backbone.bottom_up.stages.norm = "BN"
    m.backbone.bottom_up.stem.norm = "BN"
    m.num_classes = K
    return m


def test_fcos_through_lazyconfig(tmp_path):
    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate

    from kd2.d2 import DistillFCOS
    from kd2.d2.lazy import kd_config, load_teacher

    torch.manual_seed(1)
    DetectionCheckpointer(instantiate(_lazy_fcos(34)), save_dir=str(tmp_path)).save("t")
    lazy = _lazy_fcos(18)
    lazy._target_ = DistillFCOS
    lazy.teacher = L(load_teacher)(model=_lazy_fcos(34), weights=str(tmp_path / "t.pth"))
    lazy.kd_cfg = L(kd_config)(
        METHODS=["FitNet", "Hinton"], FITNET={"WEIGHT": 0.0}, HINTON={"WEIGHT": 0.0}
    )
    model = instantiate(lazy).train()
    native = instantiate(_lazy_fcos(18)).train()
    native.load_state_dict(model.student_state_dict(), strict=True)
    with EventStorage(0):
        expected = native(batch())
        got = model(batch())
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    assert got["loss_kd_fitnet"] == 0 and got["loss_kd_hinton_dense"] == 0

    for methods in (
        ["DeFeat", "Hinton"],
        ["FRS", "RM", "PFI"],
        ["CWD", "PKD", "MGD", "FGD", "FBKD"],
        ["CrossKD", "GID"],
    ):
        lazy.kd_cfg = L(kd_config)(METHODS=methods, PFI={"ADAPTER_KERNEL": 1})
        model = instantiate(lazy).train()
        with EventStorage(0):
            rec, _ = model.student_step(batch())
            losses = model(batch())
        assert rec.dense.centerness is not None and rec.dense.num_anchors_per_loc == 1
        assert set(rec.dense.labels.unique().tolist()) <= set(range(K + 1))
        kd = [k for k in losses if k.startswith("loss_kd_")]
        assert len(kd) >= len(methods) and all(torch.isfinite(losses[k]) for k in kd)
        sum(losses.values()).backward()
        assert all(p.grad is None for p in model.teacher.parameters())
        assert any(p.grad is not None for n, p in model.named_parameters() if n.startswith("kd_"))


def test_lazy_fcos_protocol_config_builds_and_needs_teacher_weights():
    from detectron2.config import LazyConfig, instantiate

    from kd2.d2 import DistillFCOS

    cfg = LazyConfig.load(os.path.join(ZOO_PROTOCOLS, "lazy_fcos_R50_FPN_2x_R101.py"))
    assert cfg.model._target_ is DistillFCOS and cfg.train.max_iter == 180000
    assert cfg.model.backbone.bottom_up.stages.depth == 50
    assert cfg.model.teacher.model.backbone.bottom_up.stages.depth == 101
    cfg.model.kd_cfg.METHODS = ["RM", "PFI"]
    assert list(instantiate(cfg.model.kd_cfg).METHODS) == ["RM", "PFI"]
    with pytest.raises(FileNotFoundError, match="model.teacher.weights"):
        instantiate(cfg.model.teacher)


def test_globalkd_trains_with_prototype_refresh_on_real_coco(tmp_path):
    import subprocess
    import sys

    env = coco_env_with_quick_teacher(tmp_path)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "train_net.py"),
        "--config-file",
        os.path.join(QUICK, "faster_rcnn_R18_FPN_GlobalKD_quick.yaml"),
        "KD.TEACHER.WEIGHTS",
        str(tmp_path / "teacher.pth"),
        "KD.GLOBALKD.MAX_IMAGES_PER_CLASS",
        "2",
        "KD.GLOBALKD.REFRESH_PERIOD",
        "2",
        "OUTPUT_DIR",
        str(out),
        "SOLVER.MAX_ITER",
        "3",
        "DATASETS.TEST",
        "()",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    pgm = out / "pgm"
    assert (pgm / "prototypes_0000000.json").is_file()
    assert (pgm / "prototypes_0000002.json").is_file()
    ckpt = torch.load(out / "model_final.pth", weights_only=False)
    kd = ckpt["kd"]
    assert int(kd["GlobalKD.refreshed_at"]) == 2
    valid = [v for k, v in kd.items() if k.startswith("GlobalKD.valid_")]
    assert valid and any(bool(v.any()) for v in valid)


class _RunsCodeWhenUnpickled:
    """Unpickling this creates ``marker``: what a hostile teacher file could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _load_teacher_lazy(cfg):
    from kd2.d2.lazy import load_teacher

    return load_teacher(build_model(d2_cfg(depth=34, fpn=64)), cfg.KD.TEACHER.WEIGHTS)


def _load_student_weights(cfg):
    from kd2.d2 import student_checkpointer

    return student_checkpointer(build_model(d2_cfg())).load(cfg.KD.TEACHER.WEIGHTS)


@pytest.mark.parametrize("load", [build_model, _load_teacher_lazy, _load_student_weights])
def test_pth_that_would_run_code_is_refused_and_never_run(tmp_path, monkeypatch, load):
    cfg = kd_cfg(tmp_path)
    state = torch.load(cfg.KD.TEACHER.WEIGHTS, weights_only=True)
    marker = tmp_path / "pwned"
    state["extra"] = _RunsCodeWhenUnpickled(marker)
    torch.save(state, cfg.KD.TEACHER.WEIGHTS)
    # torch's own default (weights_only=True since torch 2.6) is not what protects kd2: older
    # torch and this variable make a plain DetectionCheckpointer run the file's code.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ValueError, match="refuses to unpickle arbitrary objects") as e:
        load(cfg)
    assert cfg.KD.TEACHER.WEIGHTS in str(e.value) and "weights_only=True" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"model": sd}])
def test_teacher_pth_state_dict_or_model_dict_loads(tmp_path, wrap):
    cfg = kd_cfg(tmp_path)
    sd = torch.load(cfg.KD.TEACHER.WEIGHTS, weights_only=True)["model"]
    torch.save(wrap(sd), cfg.KD.TEACHER.WEIGHTS)
    teacher = build_model(cfg).teacher
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)


def test_student_checkpoint_with_optimizer_and_scheduler_resumes_weights_only(tmp_path):
    from detectron2.solver import build_lr_scheduler, build_optimizer

    from kd2.d2 import student_checkpointer

    cfg = kd_cfg(tmp_path)

    def checkpointer():
        model = build_model(cfg)
        optimizer = build_optimizer(cfg, model)
        scheduler = build_lr_scheduler(cfg, optimizer)
        return student_checkpointer(model, str(tmp_path), optimizer=optimizer, scheduler=scheduler)

    saved = checkpointer()
    saved.checkpointables["optimizer"].step()
    saved.checkpointables["scheduler"].step()
    saved.save("model_0000001", iteration=1)
    resumed = checkpointer()
    assert resumed.resume_or_load("", resume=True) == {"iteration": 1}
    assert resumed.checkpointables["scheduler"].last_epoch == 1


def test_teacher_with_non_finite_weights_is_refused(tmp_path):
    cfg = kd_cfg(tmp_path)
    state = torch.load(cfg.KD.TEACHER.WEIGHTS, weights_only=True)
    name = next(k for k, v in state["model"].items() if k.startswith("roi_heads"))
    state["model"][name].fill_(float("nan"))
    torch.save(state, cfg.KD.TEACHER.WEIGHTS)
    with pytest.raises(ValueError, match=f"teacher's weights are non-finite.*{name}"):
        build_model(cfg)


def test_dataset_categories_must_match_num_classes(tmp_path):
    from detectron2.data import MetadataCatalog

    from kd2.d2 import KDTrainer

    MetadataCatalog.get("kd2_test_four_classes").thing_classes = ["a", "b", "c", "d"]
    cfg = d2_cfg()
    cfg.DATASETS.TRAIN = ("kd2_test_four_classes",)
    with pytest.raises(ValueError, match=r"4 categories.*MODEL.ROI_HEADS.NUM_CLASSES 4"):
        KDTrainer.build_model(cfg)


def test_train_net_refuses_a_busy_output_dir(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "busy"
    code = (
        "import sys, time; from kd2.engine.run_dir import lock_output_dir; "
        "lock_output_dir(sys.argv[1]); print('locked', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        r = subprocess.run(
            [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file"]
            + [
                os.path.join(QUICK, "faster_rcnn_R18_FPN_student_quick.yaml"),
                "OUTPUT_DIR",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode != 0 and f"pid {holder.pid}" in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(out / "config.yaml")


def synthetic_d2_run(tmp_path, test_name, config, *opts):
    """``tools/train_net.py --config-file config`` (a Detectron2 quick config), shrunk to 64 px
    and 2 iterations for the 6-class synthetic set, + ``opts``; checks that it trained and
    COCO-evaluated ``test_name``."""
    import math
    import subprocess
    import sys

    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", config]
    cmd += [*opts, "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.ROI_HEADS.NUM_CLASSES", "6"]
    cmd += ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64"]
    cmd += ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]
    cmd += ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1"]
    cmd += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]  # detections to evaluate, even untrained
    env = dict(os.environ, OMP_NUM_THREADS="2", DETECTRON2_DATASETS=str(tmp_path / "none"))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    log = r.stdout + r.stderr
    assert f"Evaluation results for {test_name} in csv format" in log, log[-3000:]
    ap = log.split("copypaste: AP,AP50,AP75,APs,APm,APl")[1].split("copypaste: ")[1].split(",")[0]
    assert math.isfinite(float(ap)), log[-3000:]  # COCOeval ran against the dataset's json
    assert (tmp_path / "out" / "model_final.pth").is_file()
    assert (tmp_path / "out" / "inference" / "coco_instances_results.json").is_file()


@pytest.fixture(scope="module")
def syn_coco(tmp_path_factory):
    from kd2.data import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("syn_d2")
    return generate_synthetic_dataset(str(root), num_train=4, num_val=2, image_size=64, seed=1)


def test_train_net_detectron2_trains_and_evaluates_a_json_images_name(tmp_path, syn_coco):
    train = f"{syn_coco['train_json']}:{syn_coco['train_image_root']}"
    val = f"{syn_coco['val_json']}:{syn_coco['val_image_root']}"
    config = os.path.join(QUICK, "faster_rcnn_R18_FPN_student_quick.yaml")
    datasets = ["DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{val}',)"]
    synthetic_d2_run(tmp_path, val, config, *datasets)


def test_train_net_detectron2_trains_and_evaluates_datasets_register(tmp_path, syn_coco):
    register = [
        ["syn_train", syn_coco["train_json"], syn_coco["train_image_root"]],
        ["syn_val", syn_coco["val_json"], syn_coco["val_image_root"]],
    ]
    config = tmp_path / "custom.yaml"  # a user's config: a shipped one + their own datasets
    config.write_text(
        f"_BASE_: {os.path.join(QUICK, 'faster_rcnn_R18_FPN_student_quick.yaml')}\n"
        f"DATASETS:\n  REGISTER: {register}\n  TRAIN: ('syn_train',)\n  TEST: ('syn_val',)\n"
    )
    synthetic_d2_run(tmp_path, "syn_val", str(config))


def test_register_config_datasets_detectron2_idempotent_and_clashes(syn_coco):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from kd2.d2 import register_config_datasets

    train, root = syn_coco["train_json"], syn_coco["train_image_root"]
    cfg = get_cfg()
    add_kd_config(cfg)
    cfg.merge_from_list(["DATASETS.REGISTER", str([["kd2_d2_reg", train, root]])])
    cfg.DATASETS.TEST = (f"{syn_coco['val_json']}:{syn_coco['val_image_root']}",)
    try:
        names = register_config_datasets(cfg)
        assert names == ["kd2_d2_reg", cfg.DATASETS.TEST[0]]
        assert register_config_datasets(cfg) == names  # idempotent
        assert MetadataCatalog.get(names[1]).json_file == syn_coco["val_json"]
        assert len(DatasetCatalog.get("kd2_d2_reg")) == 4
        cfg.DATASETS.REGISTER = [["kd2_d2_reg", syn_coco["val_json"], root]]
        with pytest.raises(ValueError, match=r"REGISTER\[0\].*'kd2_d2_reg'.*other files"):
            register_config_datasets(cfg)
        cfg.DATASETS.REGISTER = [["coco_2017_train", train, root]]
        with pytest.raises(ValueError, match="'coco_2017_train'.*other files"):
            register_config_datasets(cfg)
        cfg.DATASETS.REGISTER = [["kd2_d2_missing", "nope/ann.json", root]]
        with pytest.raises(FileNotFoundError, match=r"DATASETS.REGISTER\[0\].*nope/ann.json"):
            register_config_datasets(cfg)
    finally:
        for name in ("kd2_d2_reg", cfg.DATASETS.TEST[0]):
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)


def _six_class_retinanet_teacher(tmp_path, cfg) -> None:
    """Save a random 6-class RetinaNet R34 teacher in ``tmp_path`` and point ``cfg.KD.TEACHER``
    at it."""
    tcfg = d2_cfg("RetinaNet", 34, 64)
    tcfg.MODEL.RETINANET.NUM_CLASSES = 6
    torch.manual_seed(5)
    DetectionCheckpointer(build_model(tcfg), save_dir=str(tmp_path)).save("teacher6")
    with open(tmp_path / "teacher6.yaml", "w") as f:
        f.write(tcfg.dump())
    cfg.KD.TEACHER.CONFIG = str(tmp_path / "teacher6.yaml")
    cfg.KD.TEACHER.WEIGHTS = str(tmp_path / "teacher6.pth")


def test_diagnostics_and_balance_on_detectron2(tmp_path):
    from kd2.d2.engine import student_checkpointer

    cfg = kd_cfg(tmp_path, "RetinaNet", ["FitNet", "DeFeat"])
    cfg.KD.BALANCE.MODE = "grad_share"
    cfg.KD.BALANCE.PERIOD = 1
    cfg.KD.BALANCE.WARMUP = 0
    model = build_model(cfg).train()
    with EventStorage(0) as storage:
        model.kd_before_step(0)
        losses = model(batch())
        scalars = storage.latest()
    for name in ("detection", "loss_kd_fitnet", "loss_kd_defeat_fg"):
        assert f"grad_share/{name}" in scalars and f"grad_cos/{name}" in scalars
    assert "kd_multiplier/loss_kd_fitnet" in scalars
    assert model.kd_diag_last["iteration"] == 0 and model.kd_balance.updates == 1
    diag = model.kd_diag_last
    shares = [diag[k] for k in diag if k.startswith("grad_share/") and k != "grad_share/kd"]
    assert sum(shares) == pytest.approx(1.0)  # the groups' shares
    kd, det = diag["grad_norm/kd"], diag["grad_norm/detection"]
    assert diag["grad_share/kd"] == pytest.approx(kd / (kd + det))  # what the controller reads
    sum(losses.values()).backward()
    model.kd_balance.multipliers["loss_kd_fitnet"] = 0.125  # as if adapted
    student_checkpointer(model, str(tmp_path)).save("ckpt")
    fresh = build_model(cfg)
    student_checkpointer(fresh, str(tmp_path)).load(str(tmp_path / "ckpt.pth"))
    assert fresh.kd_balance.multipliers == model.kd_balance.multipliers
    plain = d2_cfg("RetinaNet")
    build_model(plain).load_state_dict(  # the student checkpoint stays a plain model's
        torch.load(tmp_path / "ckpt.pth", weights_only=False)["model"], strict=True
    )


def test_preflight_on_detectron2_stops_a_random_teacher(tmp_path, syn_coco):
    from kd2.d2 import KDTrainer
    from kd2.engine.preflight import PreflightError

    cfg = kd_cfg(tmp_path, "RetinaNet", ["FitNet"])
    cfg.DATASETS.TRAIN = (f"{syn_coco['train_json']}:{syn_coco['train_image_root']}",)
    cfg.DATASETS.TEST = (f"{syn_coco['val_json']}:{syn_coco['val_image_root']}",)
    cfg.MODEL.RETINANET.NUM_CLASSES = 6
    cfg.KD.PREFLIGHT.ENABLED = True
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 64
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 64
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER = 2, 2
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    _six_class_retinanet_teacher(tmp_path, cfg)
    trainer = KDTrainer(cfg)
    with pytest.raises(PreflightError, match="MIN_TEACHER_AP"):
        trainer.train()
    report = json.loads((tmp_path / "out" / "preflight.json").read_text())
    assert report["val_images"] == 2 and report["teacher_ap"] < 1.0
    assert (
        "loss_kd_fitnet" in report["terms"] and report["terms"]["loss_kd_fitnet"]["grad_norm"] > 0
    )
    assert not (tmp_path / "out" / "model_final.pth").exists()


@pytest.mark.parametrize("arch", ["RetinaNet", "FCOS"])
def test_detectron2_heads_resume_from_every_cut(tmp_path, arch):
    """The cut-open Detectron2 heads (CrossKD): the hooks change nothing, and resuming from the
    taps reproduces the head's outputs."""
    from detectron2.config import instantiate

    from kd2.d2.meta_arch import _dense_outputs, _tower_head
    from kd2.modeling.head_split import capture_tower_taps, resume_head

    torch.manual_seed(0)
    if arch == "FCOS":
        model = instantiate(_lazy_fcos(18)).eval()
    else:
        model = build_model(d2_cfg("RetinaNet")).eval()
    width = model.head.cls_score.in_channels
    feats = [torch.randn(2, width, s, s) for s in (12, 6, 3, 2, 1)]
    strides = [8, 16, 32, 64, 128]
    with torch.no_grad():
        plain = _dense_outputs(model, feats, strides)[0]
        head = _tower_head(model)
        for k in range(5):
            with capture_tower_taps(head, k) as (cls_taps, reg_taps):
                rec = _dense_outputs(model, feats, strides)[0]
            for a, b in zip(rec.cls_logits, plain.cls_logits):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            resumed = resume_head(head, k, cls_taps, reg_taps)
            for a, b in zip(
                resumed["cls_logits"] + resumed["box_deltas"], plain.cls_logits + plain.box_deltas
            ):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("method", ["CrossKD", "GID", "LD", "BCKD"])
def test_head_methods_refuse_faster_rcnn_on_detectron2(tmp_path, method):
    with pytest.raises(ValueError, match=f"KD method '{method}'.*does not apply"):
        build_model(kd_cfg(tmp_path, "GeneralizedRCNN", [method]))


def _kdtrainer_cfg(tmp_path, syn_coco, fitnet_weight=1.0, balance="none", max_iter=4):
    """A 6-class RetinaNet FitNet run of ``KDTrainer`` on the synthetic set, the divergence
    guard on (its defaults)."""
    cfg = kd_cfg(tmp_path, "RetinaNet", ["FitNet"])
    cfg.DATASETS.TRAIN = (f"{syn_coco['train_json']}:{syn_coco['train_image_root']}",)
    cfg.DATASETS.TEST = ()
    cfg.MODEL.RETINANET.NUM_CLASSES = 6
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 64
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR = 2, max_iter, 0.01
    cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.CHECKPOINT_PERIOD = (), 1, 2
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.DIVERGENCE.ENABLED = True
    cfg.KD.FITNET.WEIGHT = fitnet_weight
    cfg.KD.BALANCE.MODE = balance
    cfg.OUTPUT_DIR = str(tmp_path / f"out_{balance}_{fitnet_weight:g}")
    _six_class_retinanet_teacher(tmp_path, cfg)
    return cfg


def test_kdtrainer_guard_stops_a_diverging_run_before_the_step(tmp_path, syn_coco):
    """The torchvision trainer's guard on Detectron2's ``KDTrainer``: the same message, raised
    between the forward and the optimizer step, no checkpoint after the last good one."""
    from detectron2.engine import hooks

    from kd2.d2 import KDTrainer

    cfg = _kdtrainer_cfg(tmp_path, syn_coco, fitnet_weight=1e-6)  # the random teacher's: 3e5
    trainer = KDTrainer(cfg)
    cls_score = trainer.model.head.cls_score

    def explode(t):  # the weights blow up after the checkpoint at 2, as at too high a rate
        if t.iter == 2:
            with torch.no_grad():
                cls_score.weight.mul_(1e4)
                cls_score.bias.fill_(1e4)

    trainer.register_hooks([hooks.CallbackHook(after_step=explode)])
    with pytest.raises(FloatingPointError) as err:
        trainer.train()
    msg = str(err.value)
    assert "training diverged at iteration 3" in msg and "exceeds SOLVER.DIVERGENCE.MAX_LOSS" in msg
    assert "model_0000001.pth" in msg and "--resume SOLVER.BASE_LR 0.005" in msg
    assert not os.path.exists(os.path.join(cfg.OUTPUT_DIR, "model_0000003.pth"))


def test_kdtrainer_out_of_scale_term_stops_without_balance_and_trains_with_it(tmp_path, syn_coco):
    """FitNet at its own weight with the random teacher (loss 3e5 at iteration 0 on Detectron2's
    0-255 inputs): with KD.BALANCE none, ``KDTrainer`` stops at iteration 0 with the
    out-of-scale message; with grad_share, the calibration on the first batch lets the run
    train, the share in the band from iteration 0."""
    from detectron2.engine import hooks

    from kd2.d2 import KDTrainer

    cfg = _kdtrainer_cfg(tmp_path, syn_coco, max_iter=2)
    with pytest.raises(FloatingPointError) as err:
        KDTrainer(cfg).train()
    msg = str(err.value)
    assert "loss term out of scale at iteration 0" in msg and "loss_kd_fitnet" in msg
    assert "KD.BALANCE.MODE grad_share" in msg and "KD.FITNET.WEIGHT (now 1;" in msg
    cfg = _kdtrainer_cfg(tmp_path, syn_coco, balance="grad_share", max_iter=2)
    trainer = KDTrainer(cfg)
    shares = []
    trainer.register_hooks(
        [hooks.CallbackHook(after_step=lambda t: shares.append(dict(t.model.kd_diag_last)))]
    )
    trainer.train()
    assert shares[0]["iteration"] == 0 and shares[0]["kd_calibration/share"] > 0.99
    assert shares[0]["grad_share/loss_kd_fitnet"] == pytest.approx(0.7, abs=1e-6)
    assert trainer.model.kd_balance.calibrated
    assert os.path.exists(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))


def test_bckd_on_a_detectron2_retinanet(tmp_path):
    model = build_model(kd_cfg(tmp_path, "RetinaNet", ["BCKD"])).train()
    with EventStorage(0):
        losses = model(batch())
    for key in ("loss_kd_bckd_cls", "loss_kd_bckd_loc"):
        assert torch.isfinite(losses[key]) and losses[key].item() > 0, key
    sum(losses.values()).backward()
    assert model.head.bbox_pred.weight.grad.abs().sum() > 0
