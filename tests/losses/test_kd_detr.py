"""KD-DETR: the point losses are the official ``KDCriterion``'s formulas written out independently
(softmax KL averaged over the classes and summed over the points, confidence-weighted L1 and GIoU
means), every student layer learns the teacher's last one, each group gives its own terms, and
empty point sets give zero losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou

from kd2.losses.kd_detr import KDDETR, point_losses
from kd2.structures import QueryOutputs, StepRecord


def _points(n, p, k, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, p, k, generator=g) * 2
    cxcy = torch.rand(n, p, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, p, 2, generator=g) * 0.3 + 0.05
    return logits, torch.cat([cxcy, wh], -1)


def _official(s_logits, s_boxes, t_logits, t_boxes, T=10.0):
    """The official loss_kl_div / loss_boxes with a weight, on flattened points."""
    s_logits, t_logits = s_logits.flatten(0, 1), t_logits.flatten(0, 1)
    s_boxes, t_boxes = s_boxes.flatten(0, 1), t_boxes.flatten(0, 1)
    weight = t_logits.sigmoid().max(1)[0]
    target = F.softmax(t_logits / T, dim=1)
    kl = F.kl_div(F.log_softmax(s_logits / T, dim=1), target, reduction="none").mean(1) * T * T
    cls = (kl * weight).sum()
    l1 = (F.l1_loss(s_boxes, t_boxes, reduction="none").mean(1) * weight).sum() / weight.sum()
    giou = 1 - torch.diag(
        generalized_box_iou(
            box_convert(s_boxes, "cxcywh", "xyxy"), box_convert(t_boxes, "cxcywh", "xyxy")
        )
    )
    return cls, l1, (giou * weight).sum() / weight.sum()


def test_point_losses_are_the_official_criterions():
    s_logits, s_boxes = _points(2, 6, 5, 0)
    t_logits, t_boxes = _points(2, 6, 5, 1)
    ours = point_losses(s_logits, s_boxes, t_logits, t_boxes, temperature=10.0)
    theirs = _official(s_logits, s_boxes, t_logits, t_boxes)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _record(logits, boxes, points) -> StepRecord:
    rec = StepRecord(
        images=torch.zeros(2, 3, 8, 8),
        image_sizes=[(8, 8)] * 2,
        gt_boxes=[torch.zeros(0, 4)] * 2,
        gt_labels=[torch.zeros(0, dtype=torch.long)] * 2,
        features={},
        num_classes=logits.shape[-1],
    )
    rec.queries = QueryOutputs(logits, boxes, torch.zeros(2, logits.shape[2], 4))
    rec.queries.points = points
    return rec


def test_every_student_layer_learns_the_teachers_last_layer_per_group():
    s_logits, s_boxes = (torch.stack(x) for x in zip(_points(2, 4, 3, 2), _points(2, 4, 3, 3)))
    t_logits, t_boxes = (torch.stack(x) for x in zip(_points(2, 4, 3, 4), _points(2, 4, 3, 5)))
    r_s, r_t = _points(2, 7, 3, 6), _points(2, 7, 3, 7)
    student = _record(s_logits, s_boxes, {"teacher": (s_logits, s_boxes), "random": tuple(
        x[None].expand(2, *x.shape) for x in r_s)})  # fmt: skip
    teacher = _record(t_logits, t_boxes, {"teacher": (t_logits, t_boxes), "random": tuple(
        x[None] for x in r_t)})  # fmt: skip
    method = KDDETR(weight=2.0, random_points=7)
    out = method(student, teacher)
    assert sorted(out) == sorted(KDDETR.card.terms)
    layers = [_official(s_logits[i], s_boxes[i], t_logits[-1], t_boxes[-1]) for i in range(2)]
    expected = [sum(terms) for terms in zip(*layers)]
    for term, w, value in zip(("cls", "bbox", "giou"), (1, 5, 2), expected):
        torch.testing.assert_close(out[f"loss_kd_kddetr_teacher_{term}"], value * w * 2.0)
    random = _official(*r_s, *r_t)
    for term, w, value in zip(("cls", "bbox", "giou"), (1, 5, 2), random):
        torch.testing.assert_close(out[f"loss_kd_kddetr_random_{term}"], 2 * value * w * 2.0)


def test_no_points_give_zero_losses_with_a_gradient_path():
    s_logits = torch.zeros(1, 2, 0, 3, requires_grad=True)
    s_boxes = torch.zeros(1, 2, 0, 4, requires_grad=True)
    student = _record(s_logits, s_boxes, {"teacher": (s_logits, s_boxes)})
    teacher = _record(s_logits.detach(), s_boxes.detach(), {"teacher": (s_logits, s_boxes)})
    out = KDDETR(random_points=0)(student, teacher)
    assert set(out) == {f"loss_kd_kddetr_teacher_{t}" for t in ("cls", "bbox", "giou")}
    assert all(float(v.detach()) == 0.0 for v in out.values())
    sum(out.values()).backward()


def test_a_method_without_points_is_refused():
    with pytest.raises(ValueError, match="needs distillation points"):
        KDDETR(teacher_points=False, random_points=0)
