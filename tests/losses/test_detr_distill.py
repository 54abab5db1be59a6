"""DETRDistill: each part equals the official distiller's and head's math written out
independently on the same tensors (the soft-BCE assignment cost, the matched logits losses, the
target-aware mask and MSE, Deformable DETR's criterion under the teacher's assignment), student
layers pair with teacher layers as far from the last, and images without boxes work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, box_iou, generalized_box_iou, sigmoid_focal_loss

pytest.importorskip("scipy")

from kd2.losses.detr_distill import (
    DETRDistill,
    matched_logit_losses,
    target_aware_feature_loss,
    target_aware_mask,
    target_aware_scores,
)
from kd2.losses.query_matching import match_queries, match_to_boxes, soft_bce_class_cost
from kd2.losses.teach_detr import teach_detr_losses
from kd2.structures import QueryOutputs, StepRecord


def _xyxy(b):
    return box_convert(b, "cxcywh", "xyxy")


def _boxes(*shape, g):
    cxcy = torch.rand(*shape, 2, generator=g) * 0.6 + 0.2
    return torch.cat([cxcy, torch.rand(*shape, 2, generator=g) * 0.3 + 0.05], -1)


def test_the_assignment_cost_is_the_official_soft_bce():
    g = torch.Generator().manual_seed(0)
    logits, probs = torch.randn(5, 3, generator=g), torch.rand(4, 3, generator=g)
    # DistillCrossEntropyLossCost._binary_cross_entropy
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    theirs = torch.einsum("nc,mc->nm", pos, probs) + torch.einsum("nc,mc->nm", neg, 1 - probs)
    torch.testing.assert_close(soft_bce_class_cost(logits, probs), theirs)


def test_matched_logit_losses_are_the_official_heads():
    g = torch.Generator().manual_seed(1)
    s_logits, t_logits = torch.randn(2, 6, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    s_boxes, t_boxes = _boxes(2, 6, g=g), _boxes(2, 5, g=g)
    pairs = match_queries(s_logits, s_boxes, t_logits, t_boxes, (1.0, 5.0, 2.0), "soft_bce")
    assert [len(p[0]) for p in pairs] == [5, 5]
    cls, l1, giou = matched_logit_losses(s_logits, s_boxes, t_logits, t_boxes, pairs)
    labels = torch.zeros(2, 6, 3)
    num = 10
    for i, (sq, tq) in enumerate(pairs):
        labels[i, sq] = t_logits[i, tq].sigmoid()
    theirs_cls = F.binary_cross_entropy_with_logits(s_logits, labels, reduction="sum") / num
    src = torch.cat([s_boxes[i, sq] for i, (sq, _) in enumerate(pairs)])
    tgt = torch.cat([t_boxes[i, tq] for i, (_, tq) in enumerate(pairs)])
    torch.testing.assert_close(cls, theirs_cls)
    torch.testing.assert_close(l1, (src - tgt).abs().sum() / num)
    theirs_giou = (1 - torch.diag(generalized_box_iou(_xyxy(src), _xyxy(tgt)))).sum() / num
    torch.testing.assert_close(giou, theirs_giou)


def test_the_target_aware_mask_and_loss_are_the_official_distillers():
    g = torch.Generator().manual_seed(2)
    logits, boxes = torch.randn(2, 7, 3, generator=g), _boxes(2, 7, g=g)
    gt = [_boxes(2, g=g), torch.zeros(0, 4)]
    query, scores = target_aware_scores(logits, boxes, gt, topk=4)
    # the teacher's top-4 (query, class) pairs, scored by probability x best IoU with the GT
    probs, index = logits.sigmoid().flatten(1).topk(4, dim=1)
    assert query.tolist() == (index // 3).tolist()
    iou = box_iou(_xyxy(boxes[0, index[0] // 3]), _xyxy(gt[0])).max(-1)[0]
    torch.testing.assert_close(scores[0], probs[0] * iou)
    torch.testing.assert_close(scores[1], probs[1])
    hidden = torch.randn(2, 7, 8, generator=g)
    queries = torch.stack([hidden[i, query[i]] for i in range(2)])
    f_t, f_s = torch.randn(2, 8, 5, 6, generator=g), torch.randn(2, 8, 5, 6, generator=g)
    mask = target_aware_mask(queries, scores, f_t)
    # the official: cosine of the normalised queries and maps, score-weighted, clamped, max-scaled
    mat = torch.einsum("bnc,bchw->bnhw", F.normalize(queries, dim=-1), F.normalize(f_t, dim=1))
    theirs = torch.einsum("bnhw,bn->bhw", mat, scores).clamp(min=1e-2)
    theirs = (theirs / theirs.flatten(1, 2).max(-1)[0][:, None, None])[:, None]
    torch.testing.assert_close(mask, theirs)
    torch.testing.assert_close(
        target_aware_feature_loss(f_s, f_t, mask), F.mse_loss(theirs * f_t, theirs * f_s)
    )


def test_the_group_criterion_is_deformable_detrs_under_the_given_assignment():
    g = torch.Generator().manual_seed(3)
    logits, boxes = torch.randn(2, 6, 3, generator=g), _boxes(2, 6, g=g)
    labels = [torch.tensor([2, 0]), torch.zeros(0, dtype=torch.long)]
    gt = [_boxes(2, g=g), torch.zeros(0, 4)]
    matches = match_to_boxes(logits, boxes, labels, gt)
    ones = [torch.ones(2), torch.ones(0)]
    cls, l1, giou = teach_detr_losses(
        logits, boxes, labels, gt, ones, matches, unmatched_weight=1.0
    )
    onehot = torch.zeros_like(logits)
    q, t = matches[0]
    onehot[0, q, labels[0][t]] = 1
    torch.testing.assert_close(cls, sigmoid_focal_loss(logits, onehot, reduction="sum") / 2)
    torch.testing.assert_close(l1, (boxes[0, q] - gt[0][t]).abs().sum() / 2)
    theirs = (1 - torch.diag(generalized_box_iou(_xyxy(boxes[0, q]), _xyxy(gt[0][t])))).sum() / 2
    torch.testing.assert_close(giou, theirs)


def test_student_layers_pair_with_teacher_layers_as_far_from_the_last():
    m = DETRDistill({8: 4}, {8: 4})
    assert [m.teacher_layer(i, 2, 3) for i in range(2)] == [1, 2]
    assert [m.teacher_layer(i, 3, 1) for i in range(3)] == [0, 0, 0]
    m.layer_by_layer = False
    assert [m.teacher_layer(i, 2, 3) for i in range(2)] == [2, 2]


def _record(logits, boxes, hidden, features, gt_boxes, gt_labels) -> StepRecord:
    rec = StepRecord(
        images=torch.zeros(2, 3, 32, 32),
        image_sizes=[(32, 32)] * 2,
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        features=features,
        num_classes=logits.shape[-1],
    )
    rec.queries = QueryOutputs(logits, boxes, hidden)
    return rec


def test_every_part_runs_with_an_image_without_boxes_and_reaches_the_student():
    g = torch.Generator().manual_seed(4)
    gt_boxes = [torch.tensor([[2.0, 3.0, 20.0, 18.0]]), torch.zeros(0, 4)]
    gt_labels = [torch.tensor([1]), torch.zeros(0, dtype=torch.long)]
    s_logits = torch.randn(2, 2, 5, 3, generator=g, requires_grad=True)
    s_boxes = _boxes(2, 2, 5, g=g).requires_grad_(True)
    s_feat = {8: torch.randn(2, 4, 4, 4, generator=g, requires_grad=True)}
    t_logits, t_boxes = torch.randn(1, 2, 6, 3, generator=g), _boxes(1, 2, 6, g=g)
    t_hidden = torch.randn(2, 6, 8, generator=g)
    student = _record(s_logits, s_boxes, torch.zeros(2, 5, 4), s_feat, gt_boxes, gt_labels)
    teacher = _record(t_logits, t_boxes, t_hidden, {8: torch.randn(2, 8, 4, 4, generator=g)},
                      gt_boxes, gt_labels)  # fmt: skip
    group = (torch.randn(2, 2, 6, 3, generator=g, requires_grad=True), _boxes(2, 2, 6, g=g))
    student.queries.points = {"teacher": group}
    method = DETRDistill({8: 4}, {8: 8}, topk=5)
    out = method(student, teacher)
    assert sorted(out) == sorted(DETRDistill.card.terms)
    assert all(torch.isfinite(v) and float(v.detach()) > 0 for v in out.values()), out
    sum(out.values()).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (s_logits, s_feat[8]))
