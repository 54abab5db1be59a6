"""CrossKD, GID and LD as methods: the cut-open heads, the losses' normalisers against
hand-computed records, the official formulas, and end-to-end steps on every detector they apply
to (and clear refusals of the others)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from kd2.losses import CrossKD
from kd2.losses.crosskd import fcos_centerness_targets, quality_focal_kd_loss
from kd2.losses.gid import canonical_levels, gid_relation_loss
from kd2.losses.ld import pairwise_diou, side_kl, valuable_localization_region
from kd2.losses.utils import aligned_box_iou, atss_candidates
from kd2.modeling.head_split import capture_tower_taps, flat_layers, resume_head, split_index
from kd2.ops import roi_align
from kd2.structures import DenseOutputs, HeadSplit, StepRecord
from kd2.tv import record as R
from kd2.tv.build import build_detector, build_plain_detector
from tests.helpers import batch, kd_cfg, save_teacher, tiny_cfg

# ------------------------------------------------------------------------ the cut-open heads


@pytest.mark.parametrize("arch", ["RetinaNet", "FCOS", "GFL"])
def test_resume_head_reproduces_the_head_from_every_cut(arch):
    torch.manual_seed(0)
    model = build_plain_detector(tiny_cfg(arch)).eval()
    maps = [torch.randn(2, 32, s, s) for s in (12, 6, 3, 2, 1)]
    head = R.tower_head(model)
    with torch.no_grad():
        plain = model.head(maps)
        for k in range(5):
            with capture_tower_taps(head, k) as (cls_taps, reg_taps):
                out = model.head(maps)
            for key in plain:  # the hooks change nothing
                torch.testing.assert_close(out[key], plain[key], rtol=0, atol=0)
            assert len(cls_taps) == len(reg_taps) == len(maps)
            if k > 0:  # before the activation: torchvision's RetinaNet ReLU is in place
                assert all((t < 0).any() for t in cls_taps + reg_taps)
            resumed = resume_head(head, k, cls_taps, reg_taps)
            torch.testing.assert_close(torch.cat(resumed["cls_logits"], 1), plain["cls_logits"])
            box = resumed["box_dist"] if arch == "GFL" else resumed["box_deltas"]
            torch.testing.assert_close(torch.cat(box, 1), plain["bbox_regression"])
    with pytest.raises(ValueError, match="cannot cut it after block 5"):
        split_index(head.cls_tower, 5)


def test_tower_head_refuses_a_detector_without_towers():
    model = build_plain_detector(tiny_cfg("FasterRCNN"))
    with pytest.raises(ValueError, match="no conv-tower dense head"):
        R.tower_head(model)


# --------------------------------------------------------------------------------- CrossKD


def _dense(cls, box, anchors, labels, *, dist=None, gt=None, coder=None, resume=None, ctr=None):
    """A one-level, one-image DenseOutputs (R locations) with a head split."""
    r = cls.shape[0]
    feats = [torch.zeros(1, 2, 1, r)]
    return DenseOutputs(
        cls_logits=[cls[None]],
        box_deltas=[box[None]],
        anchors=[anchors],
        strides=[8],
        num_anchors_per_loc=1,
        num_classes=cls.shape[1],
        grid_sizes=[(1, r)],
        centerness=ctr,
        labels=labels[None],
        matched_gt_boxes=gt[None] if gt is not None else None,
        box_coder=coder,
        box_dist=[dist[None]] if dist is not None else None,
        head_split=HeadSplit(1, feats, feats, resume),
    )


class _Shift:
    """Box coder: a box = its anchor shifted by the delta (x, y, x, y)."""

    def decode(self, deltas, anchors):
        return anchors + deltas


def _record(dense):
    return StepRecord(
        images=torch.zeros(1, 3, 8, 24),
        image_sizes=[(8, 24)],
        gt_boxes=[torch.zeros(0, 4)],
        gt_labels=[torch.zeros(0, dtype=torch.long)],
        features={},
        num_classes=dense.num_classes,
        dense=dense,
    )


def _crosskd(family, **kw):
    m = CrossKD({8: 2}, {8: 2}, **kw)
    m.bind_detector(family)
    return m


@pytest.mark.parametrize("family", ["retinanet", "fcos"])
def test_crosskd_normalisers_by_hand(family):
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [8.0, 0.0, 16.0, 8.0], [16.0, 0.0, 24.0, 8.0]])
    labels = torch.tensor([0, 1, -1])  # K = 1: a positive, a background, an ignored one
    t_cls = torch.tensor([[1.0], [-1.0], [3.0]])
    c_cls = torch.tensor([[0.0], [0.5], [-2.0]])
    t_box = torch.zeros(3, 4)
    c_box = torch.tensor([[0.0, 0.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    gt = torch.tensor([[0.0, 0.0, 12.0, 8.0]] * 3)

    def resume(cls_in, reg_in):
        keep = cls_in[0].sum() * 0 + reg_in[0].sum() * 0
        return {"cls_logits": [c_cls[None] + keep], "box_deltas": [c_box[None] + keep]}

    s = _dense(torch.zeros(3, 1), torch.zeros(3, 4), anchors, labels, gt=gt, coder=_Shift())
    t = _dense(t_cls, t_box, anchors, labels, coder=_Shift(), resume=resume)
    s.head_split.resume = None
    losses = _crosskd(family)(_record(s), _record(t))
    valid = torch.tensor([True, True, False])
    qfl = quality_focal_kd_loss(c_cls[valid], t_cls[valid])
    w = torch.sigmoid(t_cls[:2, 0])  # the ignored location weighs 0
    iou = torch.tensor([8 * 8 / (12 * 8), 1.0])  # box 0 widened by 4 px; box 1 unchanged
    if family == "retinanet":
        norm = 1.0  # one positive
        giou = iou  # the enclosing box is the union here
        reg = (w * (1 - giou)).sum() / norm * 1.0
        cls = qfl / norm * 1.0
    else:
        # the positive's point (4, 4) in GT (0, 0, 12, 8): l 4, r 8, t 4, b 4
        norm = math.sqrt(4 / 8 * 4 / 4)
        reg = (w * -iou.log()).sum() / norm * 0.75
        cls = qfl / norm * 0.4
    torch.testing.assert_close(losses["loss_kd_crosskd_cls"], cls)
    torch.testing.assert_close(losses["loss_kd_crosskd_reg"], reg)


def test_crosskd_gfl_terms_by_hand():
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [8.0, 0.0, 16.0, 8.0]])
    labels = torch.tensor([0, 1])
    g = torch.Generator().manual_seed(0)
    t_cls, c_cls = torch.randn(2, 1, generator=g), torch.randn(2, 1, generator=g)
    t_dist, c_dist = torch.randn(2, 12, generator=g), torch.randn(2, 12, generator=g)
    t_box, c_box = torch.zeros(2, 4), torch.tensor([[0.0, 0.0, 8.0, 0.0], [0.0] * 4])

    def resume(cls_in, reg_in):
        return {
            "cls_logits": [c_cls[None]],
            "box_deltas": [c_box[None]],
            "box_dist": [c_dist[None]],
        }

    s = _dense(torch.zeros(2, 1), torch.zeros(2, 4), anchors, labels, dist=torch.zeros(2, 12))
    t = _dense(t_cls, t_box, anchors, labels, dist=t_dist, coder=_Shift(), resume=resume)
    losses = _crosskd("gfl")(_record(s), _record(t))
    w = torch.sigmoid(t_cls[:, 0])
    # mmdet KnowledgeDistillationKLDivLoss, class_reduction "sum", T = 1, per side
    kl = F.kl_div(
        F.log_softmax(c_dist.view(-1, 3), 1), F.softmax(t_dist.view(-1, 3), 1), reduction="none"
    ).sum(1)
    reg = (w[:, None].expand(-1, 4).reshape(-1) * kl).sum() / 4.0 / w.sum() * 3.0
    giou = torch.tensor([0.5, 1.0])  # box 0 doubled in width
    torch.testing.assert_close(losses["loss_kd_crosskd_reg"], reg)
    torch.testing.assert_close(
        losses["loss_kd_crosskd_box"], (w * (1 - giou)).sum() / w.sum() * 2.0
    )
    torch.testing.assert_close(losses["loss_kd_crosskd_cls"], quality_focal_kd_loss(c_cls, t_cls))


def test_fcos_centerness_and_aligned_giou_match_torchvision():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(20, 2, generator=g) * 50
    b = torch.rand(20, 2, generator=g) * 50
    boxes1 = torch.cat([a, a + 1 + torch.rand(20, 2, generator=g) * 30], 1)
    boxes2 = torch.cat([b, b + 1 + torch.rand(20, 2, generator=g) * 30], 1)
    ref = torchvision.ops.generalized_box_iou(boxes1, boxes2).diagonal()
    torch.testing.assert_close(aligned_box_iou(boxes1, boxes2, giou=True), ref)
    torch.testing.assert_close(
        aligned_box_iou(boxes1, boxes2), torchvision.ops.box_iou(boxes1, boxes2).diagonal()
    )
    pts = torch.tensor([[4.0, 4.0], [6.0, 2.0]])
    gt = torch.tensor([[0.0, 0.0, 12.0, 8.0], [0.0, 0.0, 12.0, 8.0]])
    expected = torch.tensor([math.sqrt(4 / 8 * 4 / 4), math.sqrt(1.0 * 2 / 6)])
    torch.testing.assert_close(fcos_centerness_targets(pts, gt), expected)


def _identical_pair(tmp_path, arch, methods):
    """A student whose teacher is a copy of itself (BatchNorm in eval mode on both sides)."""
    _, yaml_path, pth_path = save_teacher(tmp_path, arch, "resnet18", channels=32)
    cfg = tiny_cfg(arch)
    cfg.KD.METHODS = list(methods)
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = yaml_path, pth_path
    model = build_detector(cfg)
    model.load_state_dict(model.teacher.state_dict(), strict=False)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return model


@pytest.mark.parametrize("arch", ["RetinaNet", "FCOS", "GFL"])
def test_crosskd_vanishes_when_the_student_is_the_teacher(tmp_path, arch):
    model = _identical_pair(tmp_path, arch, ["CrossKD"])
    if arch == "FCOS":  # FCOS's ReLU'd sides start at 0: degenerate boxes have no IoU
        with torch.no_grad():
            for m in (model, model.teacher):
                m.head.regression_head.bbox_reg.bias.fill_(1.0)
    images, targets = batch(arch, with_empty=False)
    losses = model(images, targets)
    kd = {k: v for k, v in losses.items() if k.startswith("loss_kd_crosskd")}
    assert len(kd) == (3 if arch == "GFL" else 2)
    assert all(v.abs().item() < 1e-6 for v in kd.values()), kd
    # a different student gives non-zero terms (the test can fail); a mere rescaling would not:
    # the re-colouring undoes it
    torch.manual_seed(0)
    with torch.no_grad():
        for tower in (model.head.classification_head.conv, model.head.regression_head.conv):
            w = [m for m in flat_layers(tower) if isinstance(m, torch.nn.Conv2d)][1].weight
            w.add_(torch.randn_like(w) * w.std())
    losses = model(images, targets)
    assert all(losses[k].item() > 5e-6 for k in kd), {k: losses[k].item() for k in kd}


def test_crosskd_gradients_reach_the_student_below_the_cut_only(tmp_path):
    cfg = kd_cfg(tmp_path, "RetinaNet", ["CrossKD"])  # teacher FPN 64 channels, student 32
    model = build_detector(cfg).train()
    method = model.kd_methods["CrossKD"]
    assert method.head_split == 3 and method.cls_mapper is not None  # 1x1 mapper 32 -> 64
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    images, targets = batch("RetinaNet", with_empty=False)
    losses = model(images, targets)
    kd = losses["loss_kd_crosskd_cls"] + losses["loss_kd_crosskd_reg"]
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(kd, list(params.values()), allow_unused=True)
    got = {k for k, g in zip(params, grads) if g is not None and g.abs().sum() > 0}
    tower = "head.classification_head.conv"
    assert {f"{tower}.{i}.0.weight" for i in range(3)} <= got  # blocks 0-2 are below the cut
    assert (
        f"{tower}.3.0.weight" not in got and "head.classification_head.cls_logits.weight" not in got
    )
    assert "backbone.body.conv1.weight" in got and "kd_methods.CrossKD.cls_mapper.weight" in got
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.teacher.state_dict().items())


# ------------------------------------------------------------------------------------- GID


def test_roi_align_matches_torchvision_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 5, 9, 11, generator=g, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor(
        [[3, 4, 40, 30], [-20, -10, 15, 12], [0, 0, 88, 72], [50, 40, 95, 90], [10.5, 11, 12, 13]],
        dtype=torch.float64,
    )
    index = torch.tensor([0, 1, 1, 0, 1])
    for scale in (1 / 8, 1 / 4):
        ours = roi_align(f, boxes, index, scale, 10, 2)
        ref = torchvision.ops.roi_align(
            f, torch.cat([index[:, None].double(), boxes], 1), 10, scale, 2, aligned=True
        )
        torch.testing.assert_close(ours, ref)
        g1, g2 = (torch.autograd.grad(x.sum(), f)[0] for x in (ours, ref))
        torch.testing.assert_close(g1, g2)
    assert roi_align(f, boxes[:0], index[:0], 0.125, 10).shape == (0, 5, 10, 10)


def test_canonical_levels_follow_detectron2s_rule():
    boxes = torch.tensor(
        [
            [0, 0, 224, 224],
            [0, 0, 112, 112],
            [0, 0, 447, 447],
            [0, 0, 4, 4],
            [0, 0, 2000, 2000],
            [0, 0, 223, 223],
        ],
        dtype=torch.float32,
    )
    assert canonical_levels(boxes, [8, 16, 32, 64, 128]).tolist() == [1, 0, 1, 0, 4, 0]


def test_gid_relation_matches_the_ports_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)

    def pdist(e):  # GID/gid/loss.py loss_RkdDistance, written out
        d = torch.cdist(e, e)
        d = d * (1 - torch.eye(len(e)))
        return d / d[d > 0].mean()

    ref = F.smooth_l1_loss(pdist(s), pdist(t), beta=1.0, reduction="sum") / (5 * 5 - 5)
    torch.testing.assert_close(gid_relation_loss(s, t), ref)
    assert gid_relation_loss(s[:2], t[:2]).item() == 0.0


@pytest.mark.parametrize("arch", ["RetinaNet", "FCOS", "GFL"])
def test_gid_trains_end_to_end_and_selects_at_most_top_k(tmp_path, arch):
    cfg = kd_cfg(tmp_path, arch, ["GID"])
    cfg.KD.GID.TOP_K = 4
    model = build_detector(cfg).train()
    images, targets = batch(arch, with_empty=False)
    losses = model(images, targets)
    kd = {k: v for k, v in losses.items() if k.startswith("loss_kd_gid")}
    assert set(kd) == {f"loss_kd_gid_{k}" for k in ("feature", "relation", "cls", "reg")}
    assert all(torch.isfinite(v) and v.item() > 0 for v in kd.values()), kd
    sum(losses.values()).backward()
    assert model.kd_methods["GID"].adapter.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["GID", "CrossKD", "LD"])
def test_refused_on_faster_rcnn_with_the_reason(tmp_path, method):
    cfg = kd_cfg(tmp_path, "FasterRCNN", [method])
    with pytest.raises(ValueError, match=f"KD method '{method}'.*does not apply"):
        build_detector(cfg)


# -------------------------------------------------------------------------------------- LD


def test_ld_weighted_terms_match_the_official_kl_loss():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 17, generator=g), torch.randn(3, 4, 17, generator=g)
    w = torch.rand(3, generator=g)
    T = 10.0
    # mmdet KnowledgeDistillationKLDivLoss: kl_div(...).mean(1) * T², weight per side, avg 4
    rows = (
        F.kl_div(
            F.log_softmax(s.view(-1, 17) / T, 1), F.softmax(t.view(-1, 17) / T, 1), reduction="none"
        ).mean(1)
        * T
        * T
    )
    ref = (rows * w[:, None].expand(-1, 4).reshape(-1)).sum() / 4.0
    torch.testing.assert_close((w * side_kl(s, t, T)).sum() / 4.0, ref)


def test_pairwise_diou_matches_torchvision():
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(6, 2, generator=g) * 40, torch.rand(3, 2, generator=g) * 40
    boxes1 = torch.cat([a, a + 2 + torch.rand(6, 2, generator=g) * 20], 1)
    boxes2 = torch.cat([b, b + 2 + torch.rand(3, 2, generator=g) * 20], 1)
    torch.testing.assert_close(
        pairwise_diou(boxes1, boxes2), torchvision.ops.distance_box_iou(boxes1, boxes2)
    )


def test_vlr_matches_an_explicit_transcription_of_assign_neg():
    centres = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)
    c8 = centres.reshape(-1, 2).flip(1) * 8 + 4
    c16 = centres[:4, :4].reshape(-1, 2).flip(1) * 16 + 8
    anchors = torch.cat([torch.cat([c8 - 32, c8 + 32], 1), torch.cat([c16 - 64, c16 + 64], 1)])
    gt = torch.tensor([[5.0, 7.0, 40.0, 50.0], [30.0, 20.0, 60.0, 62.0]])
    counts = [64, 16]
    ours = valuable_localization_region(anchors, counts, gt, topk=9)
    ious = torchvision.ops.box_iou(anchors, gt)
    diou = torchvision.ops.distance_box_iou(anchors, gt)
    expected = torch.zeros(len(anchors))
    for j in range(len(gt)):
        cand = []
        for start, n in ((0, 64), (64, 16)):
            d = (
                (anchors[start : start + n, :2] + anchors[start : start + n, 2:]) / 2
                - (gt[j, :2] + gt[j, 2:]) / 2
            ).norm(dim=1)
            cand += (d.topk(9, largest=False).indices + start).tolist()
        thr = ious[cand, j].mean() + ious[cand, j].std()
        for i in range(len(anchors)):
            if 0.25 * thr <= diou[i, j] < thr and ious[i, j] > expected[i]:
                expected[i] = ious[i, j]
    torch.testing.assert_close(ours, expected)
    assert (ours > 0).sum() > 3
    _, _, thresholds = atss_candidates(anchors, counts, gt)
    assert thresholds.shape == (2,)


def test_ld_trains_a_gfl_student_with_all_three_terms(tmp_path):
    cfg = kd_cfg(tmp_path, "GFL", ["LD"])
    model = build_detector(cfg).train()
    images, targets = batch("GFL", with_empty=False)
    losses = model(images, targets)
    for key in ("loss_kd_ld", "loss_kd_ld_vlr", "loss_kd_ld_cls"):
        assert torch.isfinite(losses[key]) and losses[key].item() > 0, key
    sum(losses.values()).backward()
    cfg.KD.LD.VLR_WEIGHT, cfg.KD.LD.CLS_WEIGHT = 0.0, 0.0
    losses = build_detector(cfg).train()(images, targets)
    assert "loss_kd_ld_vlr" not in losses and "loss_kd_ld_cls" not in losses


def test_ld_refuses_a_dense_head_without_distributions(tmp_path):
    with pytest.raises(ValueError, match="LD distils the box-side distributions of a GFL head"):
        build_detector(kd_cfg(tmp_path, "FCOS", ["LD"]))


def test_ld_and_gid_are_zero_free_of_nan_on_an_image_without_objects(tmp_path):
    cfg = kd_cfg(tmp_path, "GFL", ["LD", "GID", "CrossKD"])
    model = build_detector(cfg).train()
    images, targets = batch("GFL", with_empty=True)
    targets[0] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
