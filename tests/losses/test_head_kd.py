"""The tensor functions of CrossKD, GID and LD against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd2.losses import (
    localization_distillation_loss,
    quality_focal_kd_loss,
    recolor_features,
    select_general_instances,
)


def test_recolor_features_takes_the_teachers_statistics():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 5, generator=g, requires_grad=True)
    t = 3.0 * torch.randn(2, 3, 4, 5, generator=g) + 7.0
    out = recolor_features(s, t, eps=0.0)
    flat = lambda x: x.transpose(0, 1).reshape(3, -1)  # noqa: E731
    torch.testing.assert_close(flat(out).mean(1), flat(t).mean(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat(out).std(1), flat(t).std(1), atol=1e-4, rtol=1e-4)
    # hand: one channel, values (1, 3) -> standardised (-1/sqrt2, 1/sqrt2) (unbiased std sqrt2)
    small = recolor_features(
        torch.tensor([1.0, 3.0]).view(1, 1, 1, 2), torch.tensor([0.0, 10.0]).view(1, 1, 1, 2), 0.0
    )
    torch.testing.assert_close(small.flatten(), torch.tensor([0.0, 10.0]))
    out.sum().backward()
    assert s.grad is not None
    with pytest.raises(ValueError, match="1x1 conv"):
        recolor_features(torch.randn(1, 2, 3, 3), torch.randn(1, 4, 3, 3))


def test_quality_focal_kd_loss_hand_computed():
    s = torch.tensor([[0.0, 2.0]], requires_grad=True)
    t = torch.tensor([[0.0, -1.0]])
    p_t = 1 / (1 + math.exp(1.0))
    p_s = 1 / (1 + math.exp(-2.0))
    bce = -(p_t * math.log(p_s) + (1 - p_t) * math.log(1 - p_s))
    # the first element: equal probabilities, focal factor 0
    assert quality_focal_kd_loss(s, t).item() == pytest.approx(bce * abs(p_s - p_t), rel=1e-5)
    assert quality_focal_kd_loss(s, t, beta=2.0).item() == pytest.approx(
        bce * abs(p_s - p_t) ** 2, rel=1e-5
    )
    quality_focal_kd_loss(s, t).backward()
    assert s.grad[0, 0] == 0 and s.grad[0, 1] > 0


def test_ld_hand_computed_and_mean_over_bins():
    s = torch.zeros(1, 4, 2)
    t = torch.zeros(1, 4, 2)
    t[0, 0] = torch.tensor([math.log(3.0) * 10, 0.0])  # side 0: teacher (3/4, 1/4) at T = 10
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    expected = 100.0 * kl / 2  # T^2 x KL averaged over the 2 bins; other sides 0
    assert localization_distillation_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    ref = F.kl_div(F.log_softmax(s / 10, -1), F.softmax(t / 10, -1), reduction="none").mean(-1)
    assert localization_distillation_loss(s, t).item() == pytest.approx(
        (100 * ref).sum(1).mean().item(), rel=1e-6
    )
    empty = localization_distillation_loss(
        torch.zeros(0, 4, 17, requires_grad=True), torch.zeros(0, 4, 17)
    )
    assert empty.item() == 0.0 and empty.requires_grad


def test_select_general_instances_orders_suppresses_and_caps():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # diff 0.5
            [1.0, 1.0, 11.0, 11.0],  # diff 0.9, overlaps box 0 (IoU 0.68)
            [20.0, 20.0, 30.0, 30.0],  # diff 0.2
            [50.0, 50.0, 60.0, 60.0],  # diff 0.0
        ]
    )
    student = torch.tensor([[0.1, 0.2], [0.0, 0.0], [0.5, 0.5], [0.3, 0.3]])
    teacher = torch.tensor([[0.6, 0.2], [0.9, 0.1], [0.3, 0.5], [0.3, 0.3]])
    assert select_general_instances(boxes, student, teacher).tolist() == [1, 2, 3]
    assert select_general_instances(boxes, student, teacher, top_k=2).tolist() == [1, 2]
    assert select_general_instances(boxes, student, teacher, iou_threshold=0.7).tolist() == [
        1,
        0,
        2,
        3,
    ]
    none = select_general_instances(torch.zeros(0, 4), torch.zeros(0, 2), torch.zeros(0, 2))
    assert none.numel() == 0


def test_recolor_features_matches_the_official_align_scale():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 4, 3, 5, generator=g), 2.0 * torch.randn(2, 4, 3, 5, generator=g) + 1.0
    # CrossKD align_scale, written out: eps on the student's std only
    n, c, h, w = s.shape
    sf, tf = s.permute(1, 0, 2, 3).reshape(c, -1), t.permute(1, 0, 2, 3).reshape(c, -1)
    ref = (sf - sf.mean(-1, keepdim=True)) / (sf.std(-1, keepdim=True) + 1e-6)
    ref = ref * tf.std(-1, keepdim=True) + tf.mean(-1, keepdim=True)
    ref = ref.reshape(c, n, h, w).permute(1, 0, 2, 3)
    torch.testing.assert_close(recolor_features(s, t), ref)


def _official_bckd(levels, num_classes):
    """BCKD as the official LDHead computes it (TinyTigerPan/BCKD ``loss_single`` per level, with
    ``novel_kd_loss`` and mmdet's ``GIoULoss``): each level's terms over the batch, divided by the
    batch's positives, the box term only on levels with a positive."""
    num_pos = sum(int(((lab >= 0) & (lab < num_classes)).sum()) for *_, lab in levels)
    avg = max(float(num_pos), 1.0)
    cls_total, loc_total = 0.0, 0.0
    for s_cls, t_cls, s_box, t_box, labels in levels:
        label_weights = (labels >= 0).double()
        target = t_cls.sigmoid()
        kd = F.binary_cross_entropy_with_logits(s_cls, target, reduction="none")
        kd = (kd * (target - s_cls.sigmoid()).abs()).sum(dim=1)
        cls_total = cls_total + (kd * label_weights).sum() / avg
        if ((labels >= 0) & (labels < num_classes)).any():
            w = (t_cls.sigmoid() - s_cls.detach().sigmoid()).abs().max(dim=1)[0] * label_weights
            lt = torch.max(s_box[:, :2], t_box[:, :2])
            rb = torch.min(s_box[:, 2:], t_box[:, 2:])
            inter = (rb - lt).clamp(min=0).prod(dim=1)
            area_s = (s_box[:, 2:] - s_box[:, :2]).prod(dim=1)
            area_t = (t_box[:, 2:] - t_box[:, :2]).prod(dim=1)
            union = (area_s + area_t - inter).clamp(min=1e-6)
            enc = torch.max(s_box[:, 2:], t_box[:, 2:]) - torch.min(s_box[:, :2], t_box[:, :2])
            enc_area = enc.clamp(min=0).prod(dim=1).clamp(min=1e-6)
            giou = inter / union - (enc_area - union) / enc_area
            loc_total = loc_total + ((1 - giou) * w).sum() / avg
    return cls_total * 1.0, loc_total * 4.0


def test_bckd_matches_the_official_per_level_computation():
    from kd2.losses import BCKD
    from kd2.structures import DenseOutputs, StepRecord

    g = torch.Generator().manual_seed(0)
    n, k, counts = 2, 3, [6, 4]

    def boxes(r):
        xy = torch.rand(n, r, 2, generator=g, dtype=torch.float64) * 20
        return torch.cat(
            [xy, xy + 2 + torch.rand(n, r, 2, generator=g, dtype=torch.float64) * 10], -1
        )

    class Identity:  # "deltas" are the boxes themselves
        def decode(self, deltas, anchors):
            return deltas

    s_cls = [torch.randn(n, r, k, generator=g, dtype=torch.float64) for r in counts]
    t_cls = [torch.randn(n, r, k, generator=g, dtype=torch.float64) for r in counts]
    s_box, t_box = [boxes(r) for r in counts], [boxes(r) for r in counts]
    # level 0 has positives, level 1 none (its box term is dropped), some locations ignored
    labels = torch.tensor([[0, 3, -1, 2, 3, 3, 3, 3, -1, 3], [3, 1, 3, 3, 3, -1, 3, 3, 3, 3]])

    def dense(cls, box, student):
        return DenseOutputs(
            cls_logits=cls,
            box_deltas=box,
            anchors=[torch.zeros(r, 4, dtype=torch.float64) for r in counts],
            strides=[8, 16],
            num_anchors_per_loc=1,
            num_classes=k,
            grid_sizes=[(2, 3), (2, 2)],
            labels=labels if student else None,
            box_coder=Identity(),
        )

    def record(d):
        return StepRecord(
            images=torch.zeros(n, 3, 32, 32), image_sizes=[(32, 32)] * n, gt_boxes=[], gt_labels=[],
            features={}, num_classes=k, dense=d,
        )  # fmt: skip

    method = BCKD()
    method.bind_detector("gfl")
    got = method(record(dense(s_cls, s_box, True)), record(dense(t_cls, t_box, False)))
    split = list(torch.split(labels, counts, dim=1))
    levels = [
        (s_cls[i].flatten(0, 1), t_cls[i].flatten(0, 1), s_box[i].flatten(0, 1),
         t_box[i].flatten(0, 1), split[i].flatten())
        for i in range(2)
    ]  # fmt: skip
    cls, loc = _official_bckd(levels, k)
    torch.testing.assert_close(got["loss_kd_bckd_cls"], cls)
    torch.testing.assert_close(got["loss_kd_bckd_loc"], loc)
