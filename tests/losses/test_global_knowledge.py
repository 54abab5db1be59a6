"""Global Knowledge distillation: RDM functions on hand-computed cases, the PGM hook, resume."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from kd2.data.synthetic import generate_synthetic_dataset
from kd2.losses.global_knowledge import (
    GlobalKD,
    global_knowledge_loss,
    robust_decoupled_feature_loss,
    robust_fg_masks,
    robust_soft_label_loss,
    robustness,
    robustness_by_class,
)
from kd2.modeling.prototypes import own_padded_size, pool_instance_boxes, select_pgm_instances
from kd2.ops import box_mean_pool
from kd2.structures import DenseOutputs, StepRecord
from kd2.tv import Trainer
from kd2.tv.build import build_detector
from tests.helpers import batch, engine_cfg, kd_cfg, save_teacher

# -- robustness -------------------------------------------------------------------------------


def test_robustness_hand_computed():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    ps = torch.tensor([[1.0, 0.0], [3.0, 3.0]])  # cos to s: row0 -> (1, .7071), row1 -> (0, .7071)
    pt = torch.tensor(
        [[1.0, 0.0], [0.0, -1.0]]
    )  # cos to t: row0 -> (.7071, -.7071), row1 -> (0, -1)
    eta = robustness(s, t, ps, pt)
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(eta, torch.tensor([1 - (1 - r), 1 - (r - 0.0)]))
    assert not eta.requires_grad


def test_robustness_degenerate_inputs_stay_in_unit_interval():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    ps, pt = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    eta = robustness(s, t, ps, pt)
    assert eta.shape == (50,) and bool(((eta >= 0) & (eta <= 1)).all())
    # opposite extremes: q_s = 1, q_t = -1 -> raw 1 - 2 = -1, clamped to 0
    eta = robustness(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]]), torch.eye(2)[:1], torch.eye(2)[:1]
    )
    assert float(eta) == 0.0
    zeros = robustness(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(2, 4))
    torch.testing.assert_close(zeros, torch.ones(3))  # cos 0 in both spaces -> eta 1
    nan = robustness(
        torch.full((2, 4), float("nan")), torch.ones(2, 4), torch.ones(1, 4), torch.ones(1, 4)
    )
    torch.testing.assert_close(nan, torch.zeros(2))
    assert robustness(torch.zeros(0, 4), torch.zeros(0, 4), ps[:, :4], pt[:, :4]).shape == (0,)
    torch.testing.assert_close(
        robustness(s, t, torch.zeros(0, 8), torch.zeros(0, 8)), torch.ones(50)
    )
    with pytest.raises(ValueError, match="instance counts differ"):
        robustness(s, t[:3], ps, pt)


def test_robustness_by_class_matches_per_class_calls():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(20, 6, generator=g), torch.randn(20, 5, generator=g)
    labels = torch.randint(0, 3, (20,), generator=g)
    ps, pt = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 5, generator=g)
    valid = torch.tensor([True, True, False])
    got = robustness_by_class(s, t, labels, ps, pt, valid)
    for c in range(3):
        on = labels == c
        want = robustness(s[on], t[on], ps[c], pt[c]) if valid[c] else torch.ones(int(on.sum()))
        torch.testing.assert_close(got[on], want)


# -- FG map painting --------------------------------------------------------------------------


def test_robust_fg_masks_overwrite_and_single_cell_max():
    boxes = torch.tensor(
        [
            [4.0, 4.0, 16.0, 12.0],  # rows [1, 3), cols [1, 4), eta .5
            [8.0, 8.0, 20.0, 20.0],  # rows [2, 5), cols [2, 5), eta .9 (overwrites)
            [1.0, 1.0, 3.0, 3.0],  # inside cell (0, 0): single cell, max with 0 -> .3
            [5.0, 5.0, 6.0, 6.0],  # inside cell (1, 1) painted .5 earlier: max(.5, .2) = .5
            [17.0, 17.0, 19.0, 19.0],  # inside (4, 4) painted .9: max(.9, .95) = .95
            [0.0, 0.0, 8.0, 8.0],  # image 1: rows [0, 2), cols [0, 2)
        ]
    )
    index = torch.tensor([0, 0, 0, 0, 0, 1])
    eta = torch.tensor([0.5, 0.9, 0.3, 0.2, 0.95, 0.7])
    levels = torch.zeros(6, dtype=torch.long)
    (m,) = robust_fg_masks(boxes, index, levels, eta, [4], [(6, 6)], 2)
    want = torch.zeros(2, 6, 6)
    want[0, 1:3, 1:4] = 0.5
    want[0, 2:5, 2:5] = 0.9
    want[0, 0, 0] = 0.3
    want[0, 4, 4] = 0.95
    want[1, 0:2, 0:2] = 0.7
    torch.testing.assert_close(m, want)


def test_robust_fg_masks_levels_and_empty():
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 16.0, 16.0]])
    masks = robust_fg_masks(
        boxes,
        torch.tensor([0, 0]),
        torch.tensor([1, 0]),
        torch.tensor([0.4, 0.6]),
        [4, 8],
        [(4, 4), (2, 2)],
        1,
    )
    assert float(masks[1].sum()) == pytest.approx(0.4)  # the first box on level 1: one cell
    assert float(masks[0].sum()) == pytest.approx(0.6 * 16)
    empty = robust_fg_masks(
        torch.zeros(0, 4),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0),
        [4],
        [(3, 3)],
        2,
    )
    assert empty[0].shape == (2, 3, 3) and float(empty[0].sum()) == 0


# -- losses -----------------------------------------------------------------------------------


def test_decoupled_feature_loss_hand_computed_and_uniform_eta_invariance():
    s = torch.zeros(1, 2, 2, 2, requires_grad=True)
    t = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 3.0]]]])
    m = torch.tensor([[[0.5, 0.0], [0.0, 0.0]]])
    (fg,), (bg,) = robust_decoupled_feature_loss([s], [t], [m])
    # fg: 0.5 * (1 + 1) / (2 * 2 * 0.5) = 0.5 ; bg: (4 + 0 + 0 + 9) / (2 * 2 * 3)
    assert float(fg) == pytest.approx(0.5)
    assert float(bg) == pytest.approx(13 / 12)
    (fg1,), _ = robust_decoupled_feature_loss([s], [t], [m * 2])
    assert float(fg1) == pytest.approx(float(fg))  # a uniform eta only rescales Σ M: no effect
    (fg + bg).backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0


def test_soft_label_loss_hand_computed():
    zs = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, -1.0]], requires_grad=True)
    zt = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, -1.0]])
    eta = torch.tensor([0.5, 1.0])
    got = robust_soft_label_loss(zs, zt, eta, temperature=2.0)
    pt = F.softmax(zt[0] / 2, -1)
    kl0 = float((pt * (pt.log() - F.log_softmax(zs[0].detach() / 2, -1))).sum())
    want = (0.5 * 4 * kl0 / 3 + 1.0 * 0.0) / 2
    assert float(got) == pytest.approx(want, rel=1e-5)
    got.backward()
    assert zs.grad is not None
    assert float(robust_soft_label_loss(zs[:0], zt[:0], eta[:0])) == 0.0


def test_global_knowledge_loss_value_and_gradients_to_student_only():
    s = torch.tensor([[1.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0]], requires_grad=True)
    ps = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    pt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    eta = torch.tensor([0.5])
    loss = global_knowledge_loss(s, t, ps, pt, eta)
    # g_s = .5 * (1, 0), g_t = .5 * (0, 1): SmoothL1 (beta 1) of |d| = .5 each -> .5 * .25 = .125
    assert float(loss) == pytest.approx(0.125)
    loss.backward()
    assert s.grad is not None and t.grad is None and ps.grad is None
    assert float(global_knowledge_loss(s[:0], t[:0], ps, pt, eta[:0])) == 0.0


# -- one-stage soft labels: eta at the anchor box's 56-px level ----------------------------------


def _one_stage_pair(t8, t16):
    """One 64x64 image, strides 8 (8x8) and 16 (4x4), one anchor per cell, K = 2 classes.

    The only positive is the stride-16 anchor of cell (2, 2): box [8, 8, 72, 72] (64 px,
    sqrt(65 * 65) < 112 -> the 56-px rule puts it on stride 8, not on its own stride 16).
    Student maps are the constant (1, 0); the teacher's are the constants ``t8`` / ``t16``.
    """
    k, n = 2, 1
    anchors, sizes = [], []
    for s, g in ((8, 8), (16, 4)):
        ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        c = (torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) * s
        half = 2.0 * s
        anchors.append(torch.cat([c - half, c + half], dim=1))
        sizes.append(g * g)
    labels = torch.full((n, sum(sizes)), k)
    labels[0, sizes[0] + 2 * 4 + 2] = 0
    assert anchors[1][2 * 4 + 2].tolist() == [8.0, 8.0, 72.0, 72.0]
    g = torch.Generator().manual_seed(0)
    records = []
    for student in (True, False):
        feats = {
            8: torch.tensor([1.0, 0.0] if student else t8).view(1, 2, 1, 1).expand(1, 2, 8, 8),
            16: torch.tensor([1.0, 0.0] if student else t16).view(1, 2, 1, 1).expand(1, 2, 4, 4),
        }
        feats = {s: f.clone().requires_grad_(student) for s, f in feats.items()}
        dense = DenseOutputs(
            cls_logits=[torch.randn(n, r, k, generator=g).requires_grad_(student) for r in sizes],
            box_deltas=[torch.zeros(n, r, 4) for r in sizes],
            anchors=anchors,
            strides=[8, 16],
            num_anchors_per_loc=1,
            num_classes=k,
            grid_sizes=[(8, 8), (4, 4)],
            labels=labels if student else None,
        )
        records.append(
            StepRecord(
                images=torch.zeros(n, 3, 64, 64),
                image_sizes=[(64, 64)],
                gt_boxes=[torch.tensor([[8.0, 8.0, 72.0, 72.0]])],
                gt_labels=[torch.tensor([0])],
                features=feats,
                num_classes=k,
                dense=dense,
            )
        )
    return records[0], records[1]


def test_one_stage_soft_label_eta_uses_the_56px_level_not_the_anchor_level():
    """kd_one_stage_strategy.py ``soft_weight``: eta of a positive anchor comes from the level
    ``_map_roi_levels`` gives its box. Here eta at stride 8 is 1/sqrt(2) and at the anchor's own
    stride 16 it is 0: the old code (own level) gave a soft loss of exactly 0."""
    t8, t16 = [1.0, 1.0], [0.0, 1.0]
    student, teacher = _one_stage_pair(t8, t16)
    method = GlobalKD(
        {8: 2, 16: 2}, {8: 2, 16: 2}, num_classes=2, arch="one_stage", num_prototypes=1
    )
    proto = torch.tensor([1.0, 0.0]).view(1, 1, 2).repeat(2, 1, 1)  # (K, P, C)
    for s in (8, 16):
        method.set_prototypes(s, proto, proto, torch.tensor([True, False]), 0)
    losses = method(student, teacher)
    # stride 8: q_s = cos((1,0),(1,0)) = 1, q_t = cos((1,1),(1,0)) = 1/sqrt(2) -> eta = 1/sqrt(2)
    # stride 16: q_t = cos((0,1),(1,0)) = 0 -> eta = 0 (the anchor's own level: the old rule)
    eta_56px = 1.0 / math.sqrt(2.0)
    idx = 2 * 4 + 2
    zs = student.dense.cls_logits[1][0, idx : idx + 1].detach()
    zt = teacher.dense.cls_logits[1][0, idx : idx + 1]
    pt = F.softmax(zt / 2, -1)
    kl = float((pt * (pt.log() - F.log_softmax(zs / 2, -1))).sum()) * 4 / 2  # T^2 / C
    assert kl > 1e-4
    got = losses["loss_kd_gk_soft"].item()
    assert got == pytest.approx(eta_56px * kl, rel=1e-5)
    old_rule = 0.0 * kl  # eta at the anchor's own stride 16
    assert abs(got - old_rule) > 1e-4
    losses["loss_kd_gk_soft"].backward()
    assert student.dense.cls_logits[1].grad[0, idx].abs().sum() > 0


# -- PGM instance selection -------------------------------------------------------------------


def test_select_pgm_instances_filters_caps_and_is_deterministic():
    recs = []
    for i in range(10):
        recs.append(
            {
                "file_name": f"{i}.png",
                "image_id": i,
                "boxes": [[0, 0, 40, 40], [0, 0, 10, 50], [5, 5, 50, 36]],
                "labels": [0, 0, 1],
            }
        )
    out = select_pgm_instances(recs, 2, min_size=30, max_images_per_class=3, seed=1)
    assert out == select_pgm_instances(recs, 2, min_size=30, max_images_per_class=3, seed=1)
    assert all(d["box"] != [0.0, 0.0, 10.0, 50.0] for d in out)  # 10 px wide: filtered
    per_class = {c: {d["record"] for d in out if d["label"] == c} for c in (0, 1)}
    assert len(per_class[0]) == 3 and len(per_class[1]) == 3
    other = select_pgm_instances(recs, 2, min_size=30, max_images_per_class=3, seed=2)
    assert {d["record"] for d in other} != {d["record"] for d in out} or len(recs) <= 3


def test_select_pgm_instances_min_size_is_strict():
    """prototype_generation_module.py ``_filter_predictions``: ``box_w > min_size[0]`` and
    ``box_h > min_size[1]``; the old ``>=`` kept 30-px boxes."""
    recs = [
        {
            "file_name": "0.png",
            "image_id": 0,
            "boxes": [[0, 0, 30, 40], [0, 0, 40, 30], [0, 0, 30.5, 30.5], [10, 10, 40, 40.5]],
            "labels": [0, 0, 0, 0],
        }
    ]
    out = select_pgm_instances(recs, 1, min_size=30, max_images_per_class=5, seed=1)
    assert [d["box"] for d in out] == [[0.0, 0.0, 30.5, 30.5]]  # 30 px wide or tall: out


# -- PGM pooling: feature size / padded size, not 1 / stride ------------------------------------


def _index_maps(n: int, h: int, w: int) -> torch.Tensor:
    """(n, 2, h, w): channel 0 holds the row index, channel 1 the column index."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([ys, xs]).float()[None].repeat(n, 1, 1, 1)


def test_pool_instance_boxes_scales_by_feature_over_padded_size():
    """prototype_generation_module.py ``_fetch_roi_features``: ``h_ratio = H_l / H_pad``. An
    800-px padded side has ceil(800 / 64) = 13 cells at P6 and 7 at P7, so the ratios are 13/800
    and 7/800, not 1/64 and 1/128."""
    # image 0: 800 x 1024 (own padding = batch padding); image 1: 600 x 1024 -> own pad 608
    feats = {64: _index_maps(2, 13, 16), 128: _index_maps(2, 7, 8)}
    boxes = [
        torch.tensor([[0.0, 640.0, 100.0, 700.0], [0.0, 700.0, 100.0, 790.0]]),
        torch.tensor([[0.0, 550.0, 100.0, 560.0]]),
    ]
    out = pool_instance_boxes(feats, boxes, [(800, 1024), (608, 1024)])
    rows64, rows128 = out[64][:, 0].tolist(), out[128][:, 0].tolist()
    # P6, box 0: rows int(640 * 13/800) = 10 .. int(700 * 13/800) = 11 -> mean 10.5
    #   (1/64: rows 10 .. 10, mean 10)
    # P6, box 1: rows int(700 * 13/800) = 11 .. int(790 * 13/800) = 12 -> 11.5 (1/64: 10 .. 12)
    # P6, image 1 (own pad 608 -> ceil(608/64) = 10 cells): int(550 * 10/608) = 9 .. 9
    #   (1/64: 8; the batch's 13/800 would give int(8.94) = 8 .. int(9.1) = 9)
    assert rows64 == pytest.approx([10.5, 11.5, 9.0])
    # P7, box 0: int(640 * 7/800) = 5 .. int(700 * 7/800) = 6 -> 5.5 (1/128: 5 .. 5)
    # P7, box 1: int(700 * 7/800) = 6 .. int(790 * 7/800) = 6 -> 6 (1/128: 5 .. 6)
    # P7, image 1 (ceil(608/128) = 5 cells): int(550 * 5/608) = 4 .. int(560 * 5/608) = 4
    assert rows128 == pytest.approx([5.5, 6.0, 4.0])
    # columns: 1024 is a multiple of 128, the ratio is 1/stride: cols 0 .. int(100/s) = 1 / 0
    assert out[64][:, 1].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert out[128][:, 1].tolist() == pytest.approx([0.0, 0.0, 0.0])
    # the old 1/stride pooling, for the record: box 0 on P6 averaged row 10 only
    old = box_mean_pool(feats[64], torch.cat(boxes), torch.tensor([0, 0, 1]), 64)
    assert old[:, 0].tolist() == pytest.approx([10.0, 11.0, 8.0])
    # a box touching the image's own bottom edge stops at its own last cell (row 9 of 10), not
    # at the batch map's row 10
    edge = pool_instance_boxes(
        {64: _index_maps(1, 13, 16)}, [torch.tensor([[0.0, 600.0, 10.0, 608.0]])], [(608, 1024)]
    )
    assert edge[64][0, 0].item() == pytest.approx(9.0)
    assert own_padded_size((600, 1000), 32) == (608, 1024)
    assert own_padded_size((600, 1000), 0) == (600, 1000)


def test_tv_pgm_features_use_the_official_cells(tmp_path):
    """A 96 x 128 test input: P6 has ceil(96/64) = 2 rows (96/32 = 3 is odd), so the ratio is
    2/96 = 1/48 and y = 50 falls in row 1 (1/64 would give row 0)."""
    cfg = kd_cfg(tmp_path, "RetinaNet", ["GlobalKD"])
    model = build_detector(cfg).eval()
    img = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0))
    box = torch.tensor([[0.0, 50.0, 60.0, 90.0]])
    got = model.kd_instance_features([img], [box])
    with torch.no_grad():
        image_list, _ = model.transform([img])
        assert tuple(image_list.tensors.shape[-2:]) == (96, 128)
        feats = dict(zip(model.kd_strides, model.backbone(image_list.tensors).values()))
    p6 = feats[64]
    assert tuple(p6.shape[-2:]) == (2, 2)  # ceil(3 / 2): torchvision's P6 / P7 halve with ceil
    # rows int(50/48) = 1 .. int(90/48) = 1, cols int(0/64) = 0 .. int(60/64) = 0
    torch.testing.assert_close(got[64][0], p6[0, :, 1, 0])
    old = p6[0, :, 0:2, 0].mean(dim=1)  # 1/64: rows 0 .. 1
    assert not torch.allclose(got[64][0], old)
    # the finer levels keep the ratio 1/stride (96 and 128 are multiples of 32)
    torch.testing.assert_close(got[8][0], feats[8][0, :, 6:12, 0:8].mean(dim=(1, 2)))


def test_d2_pgm_features_use_the_official_cells(tmp_path):
    """The Detectron2 path, same rule: a 96 x 128 input has 2 P6 rows (ratio 2/96)."""
    pytest.importorskip("detectron2")
    from detectron2.modeling import build_model

    from tests.d2.test_detectron2 import kd_cfg as d2_kd_cfg

    model = build_model(d2_kd_cfg(tmp_path, "GeneralizedRCNN", ["GlobalKD"])).eval()
    model.pgm_test_size = (96, 128)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 96, 128, generator=g)
    box = torch.tensor([[0.0, 50.0, 60.0, 90.0]])
    got = model.kd_instance_features([img], [box])
    with torch.no_grad():
        x = img * 255.0
        x = x.flip(0) if model.input_format == "BGR" else x
        images = model.preprocess_image([{"image": x}])
        feats = model.backbone(images.tensor)
    p6 = feats["p6"]
    assert tuple(images.tensor.shape[-2:]) == (96, 128) and tuple(p6.shape[-2:]) == (2, 2)
    torch.testing.assert_close(got[64][0], p6[0, :, 1, 0])  # row int(50 * 2/96) = 1 only
    assert not torch.allclose(got[64][0], p6[0, :, 0:2, 0].mean(dim=1))  # 1/64: rows 0 .. 1


# -- end to end -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["FasterRCNN", "RetinaNet", "FCOS"])
def test_globalkd_forward_on_both_families(tmp_path, arch):
    cfg = kd_cfg(tmp_path, arch, ["GlobalKD"])
    cfg.KD.GLOBALKD.GLOBAL_LOSS = True
    model = build_detector(cfg).train()
    method = model.kd_methods["GlobalKD"]
    g = torch.Generator().manual_seed(0)
    for s in method.strides:  # random prototypes for classes 0 and 1, none for class 2
        ps, pt = method.protos_student.get(s), method.protos_teacher.get(s)
        valid = torch.tensor([True, True, False])
        method.set_prototypes(
            s, torch.randn(ps.shape, generator=g), torch.randn(pt.shape, generator=g), valid, 0
        )
    images, targets = batch(arch, with_empty=True)
    losses = model(images, targets)
    keys = {"loss_kd_gk_fg", "loss_kd_gk_bg", "loss_kd_gk_soft", "loss_kd_gk_global"}
    assert keys <= set(losses) and all(torch.isfinite(losses[k]) for k in keys)
    assert float(losses["loss_kd_gk_fg"]) > 0 and float(losses["loss_kd_gk_bg"]) > 0
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert method.adapter.convs[str(method.strides[0])].weight.grad is not None


@pytest.fixture(scope="module")
def gk_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gk")
    p = generate_synthetic_dataset(str(root), num_train=8, num_val=2, image_size=64, seed=5)
    return f"{p['train_json']}:{p['train_image_root']}"


def _gk_cfg(data, out, tyaml, tpth, max_iter=4):
    cfg = engine_cfg((data, ""), out, arch="RetinaNet", max_iter=max_iter)
    cfg.SOLVER.STEPS = (3,)
    cfg.SOLVER.WARMUP_ITERS = 1
    cfg.KD.METHODS = ["GlobalKD"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = tyaml, tpth
    cfg.KD.GLOBALKD.MIN_BOX_SIZE = 4
    cfg.KD.GLOBALKD.NUM_PROTOTYPES = 3
    cfg.KD.GLOBALKD.REFRESH_PERIOD = 2
    return cfg


def test_prototypes_refresh_and_resume_exactly(gk_data, tmp_path):
    _, tyaml, tpth = save_teacher(tmp_path, "RetinaNet", "resnet34", num_classes=6)
    full = Trainer(_gk_cfg(gk_data, tmp_path / "a", tyaml, tpth))
    full.train()
    method = full.model.kd_methods["GlobalKD"]
    assert int(method.refreshed_at) == 2  # refreshed at 0 and 2
    pgm = tmp_path / "a" / "pgm"
    assert (pgm / "prototypes_0000000.json").is_file() and (
        pgm / "prototypes_0000002.json"
    ).is_file()
    assert len([f for f in os.listdir(pgm) if f.startswith("teacher_features")]) == 1
    report = json.load(open(pgm / "prototypes_0000002.json"))
    level = next(iter(report["levels"].values()))
    assert len(level["eta"]) == len(report["instances"]) > 0
    assert all(0.0 <= e <= 1.0 for e in level["eta"])
    picks = [i for v in level["prototypes"].values() for i in v]
    assert picks and all(0 <= i < len(report["instances"]) for i in picks)
    s0 = method.strides[0]
    assert bool(getattr(method, f"valid_{s0}").any())

    # a run stopped after the checkpoint at 2 and resumed ends identical, prototypes included
    part = Trainer(_gk_cfg(gk_data, tmp_path / "b", tyaml, tpth))
    part.max_iter = 2
    part.train()
    ckpt = torch.load(tmp_path / "b" / "model_final.pth", weights_only=True)
    assert any("protos_student" in k for k in ckpt["kd"])
    resumed = Trainer(_gk_cfg(gk_data, tmp_path / "b", tyaml, tpth))
    resumed.resume_or_load(resume=True)
    assert int(resumed.model.kd_methods["GlobalKD"].refreshed_at) == 0  # restored, not recomputed
    resumed.train()
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    for k, v in full.model.kd_methods.state_dict().items():
        torch.testing.assert_close(resumed.model.kd_methods.state_dict()[k], v, rtol=0, atol=0)

    # tools/show_prototypes.py renders the file: one grid per level plus the eta plot
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "show_prototypes",
        os.path.join(os.path.dirname(__file__), "..", "..", "tools", "show_prototypes.py"),
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    written = tool.main([str(pgm / "prototypes_0000002.json"), "--output", str(tmp_path / "png")])
    assert len(written) == len(method.strides) + 1
    assert all(os.path.getsize(p) > 1000 for p in written)
