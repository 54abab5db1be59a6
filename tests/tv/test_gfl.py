"""GFL on the torchvision backend: ATSS, QFL/DFL/GIoU on hand-computed cases, the integral, the
plain model (train/eval, checkpoints), the KD record and dense-head methods."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from kd2.config import get_cfg
from kd2.tv.build import build_detector, build_plain_detector
from kd2.tv.gfl import (
    GFL,
    GFLBoxCoder,
    GFLHead,
    atss_assign,
    distribution_focal_loss,
    integral,
    quality_focal_loss,
)
from kd2.tv.meta_arch import KDGFL
from tests.helpers import NUM_CLASSES, REPO, batch, kd_cfg, save_teacher, tiny_cfg

LN2 = math.log(2.0)

# One level of four 10 px anchors in a row, centres (5, 5), (15, 5), (25, 5), (35, 5).
ROW = torch.tensor([[0.0, 0, 10, 10], [10.0, 0, 20, 10], [20.0, 0, 30, 10], [30.0, 0, 40, 10]])


# -- ATSS ---------------------------------------------------------------------------------


def test_atss_single_gt_mean_plus_std_threshold():
    # GT [2, 0, 14, 10], centre (8, 5): the 3 nearest anchors are 0, 1, 2 with IoUs
    # 80/140 = 0.5714, 40/180 = 0.2222, 0; mean 0.2646 + unbiased std 0.2880 = 0.5526:
    # only anchor 0 passes, and its centre (5, 5) lies inside the GT.
    gt = torch.tensor([[2.0, 0, 14, 10]])
    assert atss_assign(ROW, [4], gt, topk=3).tolist() == [0, -1, -1, -1]
    # no GT: all background
    assert atss_assign(ROW, [4], torch.zeros(0, 4), topk=3).tolist() == [-1] * 4


def test_atss_anchor_claimed_by_two_gts_takes_the_higher_iou():
    # GT 1 [0, 0, 12, 10]: IoUs 100/120 = 0.8333, 20/200 = 0.1, 0; threshold 0.3111 + 0.4550
    # = 0.7661: anchor 0 is positive for both GTs (0.5714 vs 0.8333) and goes to GT 1.
    gts = torch.tensor([[2.0, 0, 14, 10], [0.0, 0, 12, 10]])
    assert atss_assign(ROW, [4], gts, topk=3).tolist() == [1, -1, -1, -1]


def test_atss_candidate_centre_must_lie_inside_the_gt():
    # GT [8, 2, 10, 8]: IoUs 12/100 = 0.12, 0, 0 pass for anchor 0 (threshold 0.1093), but its
    # centre x = 5 is left of the GT: no positive. Widened to x1 = 4 it contains the centre.
    assert atss_assign(ROW, [4], torch.tensor([[8.0, 2, 10, 8]]), topk=3).tolist() == [-1] * 4
    assert atss_assign(ROW, [4], torch.tensor([[4.0, 2, 10, 8]]), topk=3).tolist() == [
        0,
        -1,
        -1,
        -1,
    ]


def test_atss_takes_topk_per_level():
    # The same anchors as two levels of two: with topk 1 the candidates are anchor 0 (level 0)
    # and anchor 2 (level 1, IoU 0); two candidates never pass mean + std unless equal.
    gt = torch.tensor([[2.0, 0, 14, 10]])
    assert atss_assign(ROW, [2, 2], gt, topk=1).tolist() == [-1] * 4
    # topk 2 per level = all four: IoUs 0.5714, 0.2222, 0, 0 -> threshold 0.1984 + 0.2698
    assert atss_assign(ROW, [2, 2], gt, topk=2).tolist() == [0, -1, -1, -1]


# -- QFL, DFL, integral ---------------------------------------------------------------------


def test_quality_focal_loss_hand_values():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])  # sigmoids .5 .5 / .5 .75
    labels = torch.tensor([0, 2])  # a positive of class 0, a negative (K = 2)
    scores = torch.tensor([0.8, 0.0])
    got = quality_focal_loss(logits, labels, scores, beta=2.0)
    # positive: |.8 - .5|² BCE(.5, .8) + .5² BCE(.5, 0); negative: .5² ln 2 + .75² ln 4
    want = torch.tensor([0.09 * LN2 + 0.25 * LN2, 0.25 * LN2 + 0.5625 * math.log(4.0)])
    torch.testing.assert_close(got, want)


def test_distribution_focal_loss_hand_values():
    logits = torch.tensor([[0.0, math.log(3.0), 0.0], [0.0, 0.0, 0.0]])  # softmax .2 .6 .2
    got = distribution_focal_loss(logits, torch.tensor([0.25, 1.5]))
    want = torch.tensor(
        [0.75 * -math.log(0.2) + 0.25 * -math.log(0.6), math.log(3.0)]  # uniform: ln 3
    )
    torch.testing.assert_close(got, want)


def test_integral_and_box_decode():
    side = {
        1.0: [0.0, math.log(3.0), 0.0],  # (0·1 + 1·3 + 2·1) / 5
        0.5: [math.log(4.0), 0.0, 0.0],  # (1 + 2) / 6
        2.0: [-1e4, -1e4, 0.0],  # all mass on bin 2
        0.0: [0.0, -1e4, -1e4],
    }
    logits = torch.tensor([side[1.0] + side[0.5] + side[2.0] + side[0.0]])
    d = integral(logits, reg_max=2)
    torch.testing.assert_close(d, torch.tensor([[1.0, 0.5, 2.0, 0.0]]))
    # an ATSS anchor of stride 8 (a 64 px square) centred at (0, 0)
    anchor = torch.tensor([[-32.0, -32.0, 32.0, 32.0]])
    coder = GFLBoxCoder(8)
    box = coder.decode(d, anchor)
    torch.testing.assert_close(box, torch.tensor([[-8.0, -4.0, 16.0, 0.0]]))
    torch.testing.assert_close(coder.encode(box, anchor), d)
    with pytest.raises(ValueError, match="4 \\* \\(reg_max \\+ 1\\)"):
        integral(logits, reg_max=16)


def test_head_losses_hand_computed():
    """One positive with uniform distributions, a negative and an ignored anchor.

    Stride 8, anchors 64 px; GT [-8, -8, 8, 8] = [-1, -1, 1, 1] in stride units. Uniform bins
    integrate to 8 per side: the predicted box [-8, -8, 8, 8] contains the GT, IoU = GIoU =
    4/256. All logits 0: the positive's weight w = σ(0) = .5, W = max(Σ w, 1) = 1.
    """
    head = GFLHead(32, num_classes=1, num_levels=1, reg_max=16)
    anchors = [torch.tensor([[-32.0, -32, 32, 32], [-24.0, -32, 40, 32], [0.0, 0, 64, 64]])]
    outputs = {"cls_logits": torch.zeros(1, 3, 1), "bbox_regression": torch.zeros(1, 3, 68)}
    targets = [{"boxes": torch.tensor([[-8.0, -8, 8, 8]]), "labels": torch.tensor([0])}]
    matched = [torch.tensor([0, -1, -2])]
    losses = head.compute_loss(targets, outputs, anchors, matched, [8])
    iou = 4.0 / 256.0
    qfl = (0.5 - iou) ** 2 * LN2 + 0.25 * LN2  # the ignored anchor adds nothing; num_pos = 1
    torch.testing.assert_close(losses["loss_qfl"], torch.tensor(qfl))
    torch.testing.assert_close(losses["loss_giou"], torch.tensor(2.0 * 0.5 * (1 - iou)))
    # DFL targets are 1 on every side (uniform: ln 17 each), Σ over 4 sides / (4 W)
    torch.testing.assert_close(losses["loss_dfl"], torch.tensor(0.25 * 0.5 * math.log(17.0)))
    # no positive: box losses are zeros with a graph, QFL is normalised by 1 per image
    outputs = {k: v.clone().requires_grad_() for k, v in outputs.items()}
    none = head.compute_loss(targets, outputs, anchors, [torch.tensor([-1, -1, -1])], [8])
    torch.testing.assert_close(none["loss_qfl"], torch.tensor(3 * 0.25 * LN2))
    assert none["loss_dfl"].item() == 0 and none["loss_dfl"].requires_grad


# -- the plain model -----------------------------------------------------------------------


def test_plain_gfl_trains_and_detects():
    torch.manual_seed(0)
    model = build_plain_detector(tiny_cfg("GFL"))
    assert type(model) is GFL and model.head.classification_head.num_classes == NUM_CLASSES
    model.train()
    images, targets = batch("GFL", with_empty=True)
    losses = model(images, copy.deepcopy(targets))
    assert set(losses) == {"loss_qfl", "loss_dfl", "loss_giou"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    model.score_thresh = 0.0  # an untrained head scores ~0.01
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    for o, img in zip(out, images):
        assert 0 < len(o["boxes"]) <= model.detections_per_img
        assert (o["boxes"][:, 2:] <= torch.tensor([img.shape[2], img.shape[1]])).all()
        assert o["labels"].max() < NUM_CLASSES


def test_state_dict_round_trip_into_a_fresh_gfl(tmp_path):
    torch.manual_seed(1)
    model = build_plain_detector(tiny_cfg("GFL")).eval()
    path = tmp_path / "gfl.pth"
    torch.save({"model": model.state_dict()}, path)
    torch.manual_seed(2)
    fresh = build_plain_detector(tiny_cfg("GFL")).eval()
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    fresh.load_state_dict(state, strict=True)
    model.score_thresh = fresh.score_thresh = 0.0
    images, _ = batch("GFL")
    with torch.no_grad():
        a, b = model(images), fresh(images)
    for x, y in zip(a, b):
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)


def test_anchors_and_valid_flags():
    model = build_plain_detector(tiny_cfg("GFL"))
    images = ImageList(torch.zeros(2, 3, 128, 128), [(96, 128), (128, 90)])
    feats = [torch.zeros(2, 1, 128 // s, 128 // s) for s in (8, 16, 32, 64, 128)]
    anchors = model.grid_anchors(images, feats)
    assert [a.shape[0] for a in anchors] == [256, 64, 16, 4, 1]
    torch.testing.assert_close(
        anchors[0][:2], torch.tensor([[-32.0, -32, 32, 32], [-24, -32, 40, 32]])
    )
    torch.testing.assert_close(anchors[-1], torch.tensor([[-512.0, -512, 512, 512]]))
    valid = model.valid_anchors(anchors, images.image_sizes)
    # image 0 is 96 px high (own padding 96): rows y >= 96 of stride 8 are invalid; image 1 is
    # 90 px wide, its own padding 96: columns x >= 96 are invalid
    assert valid[0, :256].sum() == 12 * 16 and valid[1, :256].sum() == 16 * 12
    assert valid[:, 256 + 64 + 16 :].all()  # 64 and 128 px cells start inside both
    targets = [{"boxes": torch.tensor([[10.0, 10, 50, 50]]), "labels": torch.tensor([1])}] * 2
    matched = model.assign_targets(targets, anchors, images.image_sizes)
    for m, v in zip(matched, valid):
        assert ((m == -2) == ~v).all() and (m >= 0).any()
    bad = [torch.zeros(2, 1, 10, 10)] + feats[1:]
    with pytest.raises(ValueError, match="not stride 8"):
        model.grid_anchors(images, bad)


def test_anchor_sizes_are_refused():
    cfg = tiny_cfg("GFL")
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    with pytest.raises(ValueError, match="OCTAVE_BASE_SCALE"):
        build_plain_detector(cfg)


@pytest.mark.parametrize(
    "path, backbone",
    [
        ("configs/synthetic/gfl_R18_teacher.yaml", "resnet18"),
        ("configs/synthetic/gfl_MNv3_student.yaml", "mobilenet_v3_large"),
    ],
)
def test_synthetic_configs_build(path, backbone):
    cfg = get_cfg()
    cfg.merge_from_file(str(REPO / path))
    assert cfg.MODEL.META_ARCHITECTURE == "GFL" and cfg.MODEL.BACKBONE.NAME == backbone
    model = build_plain_detector(cfg)
    assert type(model) is GFL and model.reg_max == 16 and model.atss_topk == 9
    assert model.backbone.out_channels == 64 and model.head.loss_weights == (1.0, 0.25, 2.0)


# -- KD ------------------------------------------------------------------------------------


def test_student_step_reproduces_native_losses_and_fills_the_record(tmp_path):
    cfg = kd_cfg(tmp_path, "GFL", ["Hinton"])
    kd = build_detector(cfg).train()
    assert isinstance(kd, KDGFL)
    plain = build_plain_detector(tiny_cfg("GFL")).train()
    plain.load_state_dict(kd.student_state_dict(), strict=True)  # loads into the plain class
    images, targets = batch("GFL", with_empty=True)
    native = plain(images, copy.deepcopy(targets))
    rec, ours = kd.student_step(images, copy.deepcopy(targets))
    assert set(native) == set(ours)
    for k in native:
        torch.testing.assert_close(ours[k], native[k], rtol=0, atol=0)

    assert rec.strides == [8, 16, 32, 64, 128]
    d = rec.dense
    assert d.num_classes == NUM_CLASSES and d.num_anchors_per_loc == 1 and not d.softmax
    assert d.centerness is None and len(d.box_dist) == 5
    total = sum(t.shape[1] for t in d.cls_logits)
    assert d.labels.shape == (2, total) and d.matched_gt_boxes.shape == (2, total, 4)
    assert (d.labels[1] == NUM_CLASSES).all()  # the empty image is all background
    fg = d.labels[0][(d.labels[0] >= 0) & (d.labels[0] < NUM_CLASSES)]
    assert set(fg.unique().tolist()) <= {0, 2} and fg.numel() > 0
    for logits, dist, deltas, anchors, (h, w) in zip(
        d.cls_logits, d.box_dist, d.box_deltas, d.anchors, d.grid_sizes
    ):
        assert logits.shape[1] == dist.shape[1] == anchors.shape[0] == h * w
        assert dist.shape[-1] == 4 * 17 and deltas.shape[-1] == 4
        torch.testing.assert_close(deltas, integral(dist, 16))
    assert d.box_dist[0].requires_grad and d.box_deltas[0].requires_grad
    # the positives' decoded boxes are where the plain model's loss decodes them
    img, idx = torch.nonzero((d.labels >= 0) & (d.labels < NUM_CLASSES), as_tuple=True)
    boxes = d.box_coder.decode(torch.cat(d.box_deltas, 1)[img, idx], torch.cat(d.anchors)[idx])
    assert torch.isfinite(boxes).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
    teacher = kd.teacher_step(rec)
    assert [t.shape for t in teacher.dense.box_dist] == [t.shape for t in d.box_dist]
    assert teacher.features[8].shape[1] == 64  # the teacher's FPN is wider


@pytest.mark.parametrize(
    "methods, opts",
    [
        (["Hinton", "FRS", "CWD"], ["KD.CWD.RECIPE", "logits", "KD.FRS.WARMUP_ITERS", "0"]),
        (["RM", "PFI", "GlobalKD", "FGD"], ["KD.PFI.ADAPTER_KERNEL", "1"]),
    ],
)
def test_kd_forward_with_dense_methods(tmp_path, methods, opts):
    cfg = kd_cfg(tmp_path, "GFL", methods)
    cfg.merge_from_list(opts)
    model = build_detector(cfg).train()
    teacher = model.teacher
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    images, targets = batch("GFL", with_empty=True)
    losses = model(images, targets)
    kd_keys = [k for k in losses if k.startswith("loss_kd_")]
    assert kd_keys and {"loss_qfl", "loss_dfl", "loss_giou"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert any(losses[k].item() > 0 for k in kd_keys)
    sum(losses.values()).backward()
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, t_before[k], rtol=0, atol=0)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}


def test_gfl_teacher_for_an_fcos_student(tmp_path):
    _, yaml_path, pth_path = save_teacher(tmp_path, "GFL", "resnet34")
    cfg = tiny_cfg("FCOS")
    cfg.KD.METHODS = ["Hinton", "CWD"]
    cfg.KD.CWD.RECIPE = "logits"
    cfg.KD.TEACHER.CONFIG = yaml_path
    cfg.KD.TEACHER.WEIGHTS = pth_path
    model = build_detector(cfg).train()
    images, targets = batch("FCOS")
    losses = model(images, targets)
    assert torch.isfinite(losses["loss_kd_hinton_dense"]) and torch.isfinite(losses["loss_kd_cwd"])
