"""CWD, PKD, MGD against hand-computed cases and the official formulas; teacher inheritance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd2.losses import (
    CWD,
    MGD,
    PKD,
    channel_wise_distillation_loss,
    masked_generation_loss,
    pearson_distillation_loss,
    random_pixel_mask,
)
from kd2.losses.pkd import channel_standardize
from kd2.modeling.inherit import inherit_teacher_weights, part_of
from kd2.tv.build import build_detector
from tests.helpers import batch, kd_cfg, save_teacher, tiny_cfg

# --------------------------------------------------------------------------------------- CWD


def test_cwd_hand_computed():
    # one (n, c) map of 2 positions: teacher softmax (3/4, 1/4), student (1/2, 1/2)
    s = torch.zeros(1, 1, 1, 2)
    t = torch.tensor([math.log(3.0), 0.0]).view(1, 1, 1, 2)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert channel_wise_distillation_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    # tau = 2: softmax of t / 2 = (sqrt3, 1) / (sqrt3 + 1), times tau^2
    p = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)
    expected2 = 4.0 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    assert channel_wise_distillation_loss(s, t, 2.0).item() == pytest.approx(expected2, rel=1e-6)


def test_cwd_matches_the_official_formula_and_normalises_by_n_c():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    tau = 1.7
    # mmrazor ChannelWiseDivergence, written out
    st, tt = s.view(-1, 20) / tau, t.view(-1, 20) / tau
    sm_t = F.softmax(tt, dim=1)
    ref = torch.sum(sm_t * F.log_softmax(tt, 1) - sm_t * F.log_softmax(st, 1)) * tau**2 / (3 * 2)
    torch.testing.assert_close(channel_wise_distillation_loss(s, t, tau), ref)
    # repeating the batch and the channels keeps the value (per-map mean)
    big = channel_wise_distillation_loss(s.repeat(2, 2, 1, 1), t.repeat(2, 2, 1, 1), tau)
    torch.testing.assert_close(big, ref)
    assert channel_wise_distillation_loss(t, t).abs().item() < 1e-6


def test_cwd_gradient_reaches_the_student_only():
    s = torch.randn(1, 2, 3, 3, requires_grad=True)
    t = torch.randn(1, 2, 3, 3, requires_grad=True)
    channel_wise_distillation_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_cwd_recipes_by_detector():
    ch = {8: 32, 16: 32, 32: 32, 64: 32, 128: 32}
    fcos = CWD(ch, ch, arch="one_stage")
    fcos.bind_detector("fcos")
    assert fcos.resolved_recipe == "logits" and fcos.weight == 5.0
    assert fcos.teacher_parts == {"dense"} and fcos.adapter is None
    retina = CWD(ch, ch, arch="one_stage")
    retina.bind_detector("retinanet")
    assert retina.resolved_recipe == "neck" and retina.weight == 10.0
    assert retina.teacher_parts == {"features"}
    two = {4: 32, 8: 32, 16: 32, 32: 32, 64: 32}
    faster = CWD(two, {k: 64 for k in two}, arch="two_stage")
    faster.bind_detector("faster_rcnn")
    assert faster.adapter.strides == [4, 8, 16, 32, 64]  # P2-P6, the max-pooled P6 included
    assert CWD(ch, ch, recipe="neck", weight=2.0).weight == 2.0
    with pytest.raises(ValueError, match="one-stage"):
        CWD(two, two, recipe="logits", arch="two_stage")


# --------------------------------------------------------------------------------------- PKD


def test_pkd_hand_computed():
    s = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 1, 3)
    t = torch.tensor([3.0, 2.0, 1.0]).view(1, 1, 1, 3)
    # unbiased std 1: standardised (-1, 0, 1) and (1, 0, -1); mse 8/3, / 2
    assert pearson_distillation_loss(s, t).item() == pytest.approx(4.0 / 3.0, rel=1e-5)
    # the standardisation is over (N, H, W) per channel
    x = torch.randn(3, 2, 4, 4)
    z = channel_standardize(x)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.transpose(0, 1).reshape(2, -1).std(dim=1), torch.ones(2))


def test_pkd_invariances_resize_and_degenerate_maps():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    base = pearson_distillation_loss(s, t)
    torch.testing.assert_close(pearson_distillation_loss(s, 5.0 * t + 2.0), base)
    assert pearson_distillation_loss(t, t).item() < 1e-10
    # a student map of another size is resized bilinearly (align_corners False) to the teacher's
    small = torch.randn(2, 3, 2, 3, generator=g)
    resized = F.interpolate(small, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(
        pearson_distillation_loss(small, t), pearson_distillation_loss(resized, t)
    )
    # a 1x1 map of one image has no spread: finite (0 after standardisation)
    one = pearson_distillation_loss(torch.randn(1, 3, 1, 1), torch.randn(1, 3, 1, 1))
    assert torch.isfinite(one) and one.item() == 0.0


def test_pkd_levels_and_weights_by_detector():
    one = {8: 64, 16: 64, 32: 64, 64: 64, 128: 64}
    pkd = PKD(one, one, arch="one_stage")
    assert pkd.weight == 10.0 and pkd.adapter.strides == [8, 16, 32, 64]  # P7 not distilled
    assert not list(pkd.parameters())  # equal channels: no adapter
    two = {4: 32, 8: 32, 16: 32, 32: 32, 64: 32}
    pkd2 = PKD(two, {k: 64 for k in two}, arch="two_stage")
    assert pkd2.weight == 6.0 and pkd2.adapter.strides == [4, 8, 16, 32]
    with pytest.raises(ValueError, match="STRIDES"):
        PKD(one, one, strides=[4])


# --------------------------------------------------------------------------------------- MGD


def test_random_pixel_mask_follows_the_official_rule():
    g = torch.Generator().manual_seed(3)
    mask = random_pixel_mask(2, 50, 60, 0.65, generator=g)
    u = torch.rand((2, 1, 50, 60), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(mask, torch.where(u > 1 - 0.65, 0.0, 1.0))
    assert mask.shape == (2, 1, 50, 60)
    assert abs(1.0 - mask.mean().item() - 0.65) < 0.03  # a fraction ratio is dropped
    assert random_pixel_mask(1, 4, 4, 0.0).min() == 1.0
    with pytest.raises(ValueError, match="ratio"):
        random_pixel_mask(1, 2, 2, 1.5)


def test_masked_generation_loss_hand_computed():
    gen = torch.ones(2, 1, 1, 2, requires_grad=True)
    t = torch.zeros(2, 1, 1, 2, requires_grad=True)
    loss = masked_generation_loss(gen, t)
    assert loss.item() == pytest.approx(2.0)  # sum 4 over the map / N = 2
    loss.backward()
    assert gen.grad is not None and t.grad is None


def test_mgd_defaults_and_mask_from_the_training_rng():
    two = {4: 32, 8: 32, 16: 32, 32: 32, 64: 32}
    faster = MGD(two, {k: 64 for k in two}, arch="two_stage")
    assert (faster.alpha, faster.mask_ratio) == (5e-7, 0.45)
    assert sorted(int(k) for k in faster.generators) == [4, 8, 16, 32]
    one = {8: 64, 16: 64, 32: 64, 64: 64, 128: 64}
    retina = MGD(one, one, arch="one_stage")
    assert (retina.alpha, retina.mask_ratio) == (2e-5, 0.65) and len(retina.generators) == 5


def test_mgd_resumes_with_the_same_masks(tmp_path):
    cfg = kd_cfg(tmp_path, "RetinaNet", ["MGD"])
    model = build_detector(cfg).train()
    images, targets = batch("RetinaNet")
    rec, _ = model.student_step(images, targets)
    with torch.no_grad():
        trec = model.teacher_step(rec)
    method = model.kd_methods["MGD"]
    torch.manual_seed(11)
    a = method(rec, trec)["loss_kd_mgd"]
    b = method(rec, trec)["loss_kd_mgd"]
    torch.manual_seed(11)
    c = method(rec, trec)["loss_kd_mgd"]
    assert a.item() != b.item()  # a new mask every step
    assert a.item() == c.item()  # drawn from the (checkpointed) training RNG


# --------------------------------------------------------------------------------------- inherit


def test_part_names_on_both_backends():
    assert part_of("backbone.body.conv1.weight", "backbone")
    assert part_of("backbone.bottom_up.stem.conv1.weight", "backbone")
    assert part_of("backbone.fpn.layer_blocks.0.0.weight", "neck")
    assert part_of("backbone.fpn_lateral3.weight", "neck")
    assert part_of("head.classification_head.cls_logits.weight", "head")
    assert part_of("roi_heads.box_head.fc6.weight", "head")
    assert not part_of("backbone.fpn.x", "head")
    assert part_of("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor")
    assert not part_of("roi_heads.box_predictor2.w", "roi_heads.box_predictor")


def test_inherit_teacher_copies_matching_tensors_and_logs(tmp_path, caplog):
    _, yaml_path, pth_path = save_teacher(tmp_path, "FCOS", "resnet34", channels=32)
    cfg = tiny_cfg("FCOS")
    cfg.KD.METHODS = ["MGD"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = yaml_path, pth_path
    cfg.KD.INHERIT_TEACHER = ["neck", "head"]
    with caplog.at_level("INFO", logger="kd2.modeling.inherit"):
        model = build_detector(cfg)
    t_state, s_state = model.teacher.state_dict(), model.student_state_dict()
    head = [k for k in s_state if k.startswith("head.")]
    assert head and all(torch.equal(s_state[k], t_state[k]) for k in head)
    # the FPN's output convs match (same width); the lateral 1x1 convs take the backbones'
    # different channel counts (resnet18 vs resnet34 layer widths are equal, so compare by shape)
    for k in s_state:
        if part_of(k, "neck") and s_state[k].shape == t_state[k].shape:
            assert torch.equal(s_state[k], t_state[k]), k
    body = [k for k in s_state if k.startswith("backbone.body.") and k.endswith("weight")]
    assert not all(torch.equal(s_state[k], t_state[k]) for k in body)  # backbone untouched
    copied = [r.message for r in caplog.records if "copied head." in r.message]
    assert len(copied) == len(head)
    assert any("KD.INHERIT_TEACHER ['neck', 'head']: copied" in r.message for r in caplog.records)
    images, targets = batch("FCOS")
    losses = model.train()(images, targets)
    assert torch.isfinite(sum(losses.values()))


def test_inherit_teacher_refuses_a_part_that_copies_nothing(tmp_path):
    cfg = kd_cfg(tmp_path, "FCOS", ["PKD"])  # teacher FPN 64 channels, student 32
    cfg.KD.INHERIT_TEACHER = ["neck"]
    with pytest.raises(ValueError, match="no student tensor matches the teacher's"):
        build_detector(cfg)
    cfg.KD.INHERIT_TEACHER = ["nonexistent_part"]
    with pytest.raises(ValueError, match="matches no tensor of the student"):
        build_detector(cfg)


def test_inherit_teacher_function_on_plain_dicts():
    student = {
        "head.w": torch.zeros(2),
        "head.v": torch.zeros(3),
        "backbone.body.x": torch.zeros(1),
    }
    teacher = {"head.w": torch.ones(2), "head.v": torch.ones(4), "backbone.body.x": torch.ones(1)}
    out = inherit_teacher_weights(student, teacher, ["head"])
    assert out["copied"] == ["head.w"] and out["skipped"][0][0] == "head.v"
    assert student["head.w"].tolist() == [1.0, 1.0] and student["backbone.body.x"].item() == 0.0
