"""Foundation-model teachers (``KD.TEACHER.BACKEND foundation``): random-init DINOv2, DINOv3 and
timm models saved as a user's download would be, teaching students of every backend; their
preprocessing against the models' own processors, their token layout, their resampling."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip(
    "transformers"
)  # the foundation extra; make install installs it (CI runs these)
pytest.importorskip("timm")

from kd2.foundation import FoundationTeacher, build_foundation_teacher, resample_to_grid  # noqa: E402
from kd2.foundation.teacher import default_strides, scale_input  # noqa: E402
from kd2.modeling.backends import input_convention  # noqa: E402
from kd2.modeling.cross_framework import to_teacher_input  # noqa: E402
from kd2.modeling.kd_diagnostics import term_gradients, trunk_parameters  # noqa: E402
from kd2.tv.build import build_detector, build_plain_detector  # noqa: E402
from kd2.utils.errors import ConfigError, MissingFileError, WeightsError  # noqa: E402
from tests import helpers as tvh  # noqa: E402
from tests.foundation.helpers import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    KINDS,
    save_foundation,
    use_foundation_teacher,
)

#: a feature method per kind besides DSI, so that each existing method meets a foundation teacher
PARTNER = {
    "dinov2": "PKD",
    "dinov2_with_registers": "CWD",
    "dinov3_vit": "MGD",
    "dinov3_convnext": "FitNet",
    "timm": "PKD",
}


def _node(config, weights="", **foundation):
    from kd2.config import get_cfg

    node = get_cfg().KD.TEACHER
    node.CONFIG, node.WEIGHTS, node.BACKEND = config, weights, "foundation"
    for k, v in foundation.items():
        node.FOUNDATION[k] = v
    return node


def _teacher(tmp_path, kind, **foundation) -> FoundationTeacher:
    return build_foundation_teacher(
        _node(*save_foundation(tmp_path, kind), **foundation), "KD.TEACHER", "cpu"
    )


def _kd_trains_the_trunk_only(model, losses):
    kd = {k: v for k, v in losses.items() if k.startswith("loss_kd_")}
    assert kd and all(torch.isfinite(v) and float(v.detach()) > 0 for v in kd.values()), losses
    grads = term_gradients(losses, trunk_parameters(model), per_term=False)
    norm = sum(float(g.norm()) for g in grads["kd"] if g is not None)
    assert norm > 0 and math.isfinite(norm)
    teacher = model.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    return kd


# --------------------------------------------------------------------------------- geometry


def test_resampling_puts_each_cell_centre_where_it_is():
    """A map that is a linear function of the position is resampled exactly away from the
    border: the value at a target cell centre is the function there."""
    r = 14.0
    ys = (torch.arange(9.0) + 0.5) * r
    xs = (torch.arange(11.0) + 0.5) * r
    feat = torch.stack([ys[:, None].expand(9, 11), xs[None, :].expand(9, 11)])[
        None
    ]  # (1, 2, 9, 11)
    out = resample_to_grid(feat, r, 16, (7, 9))
    cy, cx = (torch.arange(7.0) + 0.5) * 16, (torch.arange(9.0) + 0.5) * 16
    inner = (slice(None), slice(None), slice(0, 7), slice(0, 9))
    torch.testing.assert_close(out[0, 0][inner[2:]], cy[:, None].expand(7, 9))
    torch.testing.assert_close(out[0, 1][inner[2:]], cx[None, :].expand(7, 9))
    # the same grid: the map itself, cropped to the size asked
    torch.testing.assert_close(resample_to_grid(feat, 16.0, 16, (8, 10)), feat[..., :8, :10])
    # twice coarser: the 2 x 2 average, then sampled at its centres (= the average itself)
    coarse = resample_to_grid(feat, 8.0, 16, (4, 5))
    torch.testing.assert_close(
        coarse, torch.nn.functional.avg_pool2d(feat, 2, ceil_mode=True)[..., :4, :5]
    )
    assert default_strides([14.0]) == [16] and default_strides([4, 8, 16, 32]) == [4, 8, 16, 32]
    assert default_strides([16 / 0.5]) == [32]


def test_input_scale_is_rt_detrv4s_average_pool_at_one_half():
    x = torch.randn(1, 3, 9, 12)
    torch.testing.assert_close(
        scale_input(x, 0.5),
        torch.nn.functional.avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False),
    )
    assert scale_input(x, 0.75).shape[-2:] == (7, 9)


# ------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize("kind", ["dinov2", "dinov3_vit"])
def test_the_teacher_reads_what_the_models_own_processor_makes_of_the_image(tmp_path, kind):
    """The student's normalised batch converted to the teacher's input equals the output of the
    model's image processor (no resize, no crop) on the same image, for a torchvision student
    (RGB, [0, 1]) and a Detectron2-style one (BGR, 0-255)."""
    from transformers import BitImageProcessor, DINOv3ViTImageProcessorFast

    teacher = _teacher(tmp_path, kind)
    raw = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)
    if kind == "dinov2":
        processor = BitImageProcessor(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    else:
        processor = DINOv3ViTImageProcessorFast()  # ImageNet's mean/std, its defaults
    expected = processor(
        images=raw.permute(1, 2, 0).numpy(),
        do_resize=False,
        do_center_crop=False,
        return_tensors="pt",
    ).pixel_values
    rgb = raw.float() / 255
    student = build_plain_detector(tvh.tiny_cfg("FCOS"))
    tv_batch = student.transform.normalize(rgb)[None]
    got = to_teacher_input(tv_batch, input_convention(student), input_convention(teacher))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    d2_conv = ([103.53, 116.28, 123.675], [57.375, 57.12, 58.395], "BGR", 255.0)
    d2_batch = (
        (raw.flip(0).float() - torch.tensor(d2_conv[0])[:, None, None])
        / torch.tensor(d2_conv[1])[:, None, None]
    )[None]
    got = to_teacher_input(d2_batch, d2_conv, input_convention(teacher))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    # then padded to a multiple of the patch size
    patch = teacher.pad_multiple
    assert all(s % patch == 0 for s in teacher.prepare(got).shape[-2:])


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_with_registers", "dinov3_vit"])
def test_vit_maps_are_the_models_final_patch_tokens(tmp_path, kind):
    """The map is the model's ``last_hidden_state`` without the CLS and register tokens, laid out
    row-major on the patch grid; the embedding is the CLS token."""
    teacher = _teacher(tmp_path, kind)
    model, patch = teacher.backbone.model, teacher.pad_multiple
    x = torch.randn(2, 3, 3 * patch, 5 * patch)
    with torch.no_grad():
        out = teacher.backbone(x)
        ref = model(pixel_values=x).last_hidden_state
    prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
    assert prefix == (5 if kind != "dinov2" else 1)
    (key,) = [k for k in out if k != "cls"]
    torch.testing.assert_close(
        out[key].flatten(2).transpose(1, 2), ref[:, prefix:], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(out["cls"], ref[:, 0], rtol=1e-5, atol=1e-5)


def test_the_dinov3_teacher_stays_in_eval_mode_in_a_training_student(tmp_path):
    """DINOv3's RoPE is rescaled at random in training mode: the teacher must stay in eval."""
    cfg = tvh.tiny_cfg("FCOS")
    cfg.KD.METHODS = ["DSI"]
    use_foundation_teacher(cfg, tmp_path, "dinov3_vit")
    model = build_detector(cfg).train()
    assert not any(m.training for m in model.teacher.modules())
    images, targets = tvh.batch("FCOS", with_empty=False)
    a, b = model(images, targets), model(images, targets)
    torch.testing.assert_close(a["loss_kd_dsi"], b["loss_kd_dsi"], rtol=0, atol=0)


# ------------------------------------------------------------------------------ every backend


@pytest.mark.parametrize("kind", KINDS)
def test_every_foundation_teacher_teaches_a_torchvision_student(tmp_path, kind):
    cfg = tvh.tiny_cfg("FCOS")
    cfg.KD.METHODS = ["DSI", PARTNER[kind]]
    cfg.KD.CWD.RECIPE = "neck"  # the FPN maps (the one-stage default reads the dense head)
    use_foundation_teacher(cfg, tmp_path, kind)
    model = build_detector(cfg).train()
    assert "other framework" in model.kd_level_tables[""]
    images, targets = tvh.batch("FCOS", with_empty=True)
    kd = _kd_trains_the_trunk_only(model, model(images, targets))
    assert "loss_kd_dsi" in kd
    # the projector is not part of the student
    plain = build_plain_detector(tvh.tiny_cfg("FCOS"))
    plain.load_state_dict(model.student_state_dict(), strict=True)
    checks = model.kd_input_checks()
    assert "a backbone-only teacher" in checks[0][1]


@pytest.mark.parametrize("kind", ["dinov2", "dinov3_vit", "timm"])
def test_foundation_teachers_teach_a_detectron2_student(tmp_path, kind):
    pytest.importorskip("detectron2", reason="detectron2 is not installed (see README)")
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from tests.d2.test_detectron2 import batch, d2_cfg, plain_student

    cfg = d2_cfg("DistillRetinaNet")
    cfg.KD.METHODS = ["DSI", "CWD"]
    cfg.KD.CWD.RECIPE = "neck"
    use_foundation_teacher(cfg, tmp_path, kind)
    model = build_model(cfg).train()
    with EventStorage(0):
        kd = _kd_trains_the_trunk_only(model, model(batch()))
    assert {"loss_kd_dsi", "loss_kd_cwd"} <= set(kd)
    plain_student(model, "RetinaNet")


@pytest.mark.parametrize("kind", ["dinov2", "dinov3_vit", "timm"])
def test_foundation_teachers_teach_a_transformers_student(tmp_path, kind):
    from kd2.hf import build_detector as build_hf
    from kd2.hf import build_plain_detector as build_hf_plain
    from tests.hf.test_backend import hf_cfg

    cfg = hf_cfg()
    cfg.KD.METHODS = ["DSI", "MGD"]
    use_foundation_teacher(cfg, tmp_path, kind)
    model = build_hf(cfg).train()
    images, targets = tvh.batch(with_empty=False)
    kd = _kd_trains_the_trunk_only(model, model(images, targets))
    assert {"loss_kd_dsi", "loss_kd_mgd"} <= set(kd)
    build_hf_plain(hf_cfg()).load_state_dict(model.student_state_dict(), strict=True)


# ----------------------------------------------------------------------------------- options


def test_layers_strides_scale_and_precision(tmp_path):
    config, weights = save_foundation(tmp_path, "dinov2_with_registers")
    # two layers of one ViT go to two strides, in order
    t = build_foundation_teacher(_node(config, LAYERS=[1, -1], STRIDES=[8, 16]), "K", "cpu")
    assert t.channels == {8: 32, 16: 32} and t.source == {8: 0, 16: 1}
    feats, cls = t(torch.randn(1, 3, 64, 96))
    assert (
        feats[8].shape == (1, 32, 8, 12)
        and feats[16].shape == (1, 32, 4, 6)
        and cls.shape == (1, 32)
    )
    # RT-DETRv4's input: half resolution, a ViT/16 at stride 32 of the student's input
    t = build_foundation_teacher(_node(config, INPUT_SCALE=0.5), "K", "cpu")
    assert t.strides == [32]
    assert t(torch.randn(1, 3, 128, 192))[0][32].shape == (1, 32, 4, 6)
    # a bfloat16 teacher hands its maps on in float32, close to the float32 teacher's
    from kd2.modeling.teacher_runtime import configure_teacher

    node = _node(config, weights)
    t32 = build_foundation_teacher(node, "K", "cpu")
    node.DTYPE = "bfloat16"
    t16 = configure_teacher(build_foundation_teacher(node, "K", "cpu"), node, "K", "cpu")
    x = torch.randn(1, 3, 64, 64)
    a, b = t32(x)[0][16], t16(x)[0][16]
    assert b.dtype == torch.float32
    torch.testing.assert_close(b, a, rtol=0.1, atol=0.1)


def test_mistakes_are_clear_errors(tmp_path):
    config, _ = save_foundation(tmp_path, "dinov2")
    with pytest.raises(ConfigError, match="safetensors only"):
        p = tmp_path / "model.pth"
        p.write_bytes(b"")
        build_foundation_teacher(_node(config, str(p)), "KD.TEACHER", "cpu")
    with pytest.raises(ConfigError, match="one student stride per layer"):
        build_foundation_teacher(_node(config, LAYERS=[1, 2]), "KD.TEACHER", "cpu")
    with pytest.raises(ConfigError, match="KD.TEACHER.FOUNDATION.LAYERS \\[9\\]: layers"):
        build_foundation_teacher(_node(config, LAYERS=[9]), "KD.TEACHER", "cpu")
    with pytest.raises(MissingFileError, match="neither a directory"):
        build_foundation_teacher(_node(str(tmp_path / "nowhere")), "KD.TEACHER", "cpu")
    with pytest.raises(ConfigError, match="needs KD.TEACHER.WEIGHTS"):
        build_foundation_teacher(_node("timm:resnet18"), "KD.TEACHER", "cpu")
    with pytest.raises(ConfigError, match="timm has no architecture"):
        build_foundation_teacher(
            _node("timm:resnet_nope", str(tmp_path / "x.safetensors")), "KD.TEACHER", "cpu"
        )
    other, _ = save_foundation(tmp_path, "dinov3_vit")
    with pytest.raises(WeightsError, match="cannot load|does not fit"):
        build_foundation_teacher(_node(config, f"{other}/model.safetensors"), "KD.TEACHER", "cpu")
    import json

    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="a foundation teacher from transformers is one of"):
        build_foundation_teacher(_node(str(tmp_path / "bert")), "KD.TEACHER", "cpu")
    # a method reading a detector's head is refused with the ones that apply
    cfg = tvh.tiny_cfg("FCOS")
    cfg.KD.METHODS = ["Hinton"]
    use_foundation_teacher(cfg, tmp_path, "dinov2")
    with pytest.raises(ConfigError, match="these methods apply: .*DSI"):
        build_detector(cfg)


def test_a_vit_detector_kd2_trained_teaches_as_a_backbone_only_teacher(tmp_path):
    """``MODEL.BACKBONE.NAME dinov2_vit``: a torchvision FCOS on a DINOv2 trunk; its kd2 config and
    checkpoint as a foundation teacher give its trunk's final patch tokens (the map its own
    pyramid reads), in its own normalisation."""
    tcfg = tvh.tiny_cfg("FCOS")
    tcfg.MODEL.BACKBONE.NAME = "dinov2_vit"
    tcfg.MODEL.BACKBONE.VIT.HIDDEN_SIZE, tcfg.MODEL.BACKBONE.VIT.NUM_HEADS = 32, 2
    tcfg.MODEL.BACKBONE.VIT.DEPTH = 1
    torch.manual_seed(0)
    detector = build_plain_detector(tcfg)
    yaml_path = tvh.write_cfg(tcfg, tmp_path / "vit_teacher.yaml")
    pth_path = str(tmp_path / "vit_teacher.pth")
    torch.save({"model": detector.state_dict()}, pth_path)
    images, targets = tvh.batch("FCOS", with_empty=False)
    detector.train()
    assert all(torch.isfinite(v) for v in detector(images, targets).values())

    teacher = build_foundation_teacher(_node(yaml_path, pth_path), "KD.TEACHER", "cpu")
    assert teacher.channels == {8: 32} and teacher.pixel_mean == list(tcfg.MODEL.PIXEL_MEAN)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = detector.eval().backbone.body.vit(pixel_values=x).last_hidden_state[:, 1:]
        got = teacher(x)[0][8]
    torch.testing.assert_close(got.flatten(2).transpose(1, 2), expected, rtol=1e-5, atol=1e-5)

    cfg = tvh.tiny_cfg("FCOS")
    cfg.KD.METHODS = ["DSI"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = yaml_path, pth_path
    cfg.KD.TEACHER.BACKEND = "foundation"
    model = build_detector(cfg).train()
    _kd_trains_the_trunk_only(model, model(images, targets))
    # a detector without a DINO trunk is refused
    _, r_yaml, r_pth = tvh.save_teacher(tmp_path, "FCOS", "resnet18", 32)
    with pytest.raises(ConfigError, match="without a DINOv2 / DINOv3 trunk"):
        build_foundation_teacher(_node(r_yaml, r_pth), "KD.TEACHER", "cpu")


def test_a_vit_backbone_whose_heads_do_not_divide_its_width_is_a_config_error():
    cfg = tvh.tiny_cfg("FCOS")
    cfg.MODEL.BACKBONE.NAME = "dinov2_vit"
    cfg.MODEL.BACKBONE.VIT.HIDDEN_SIZE, cfg.MODEL.BACKBONE.VIT.NUM_HEADS = 32, 3
    with pytest.raises(ConfigError, match="HIDDEN_SIZE 32 is not a multiple of NUM_HEADS 3"):
        build_plain_detector(cfg)
