"""Teach-DETR: the matcher is transformers' (Deformable DETR's) on the same tensors, the
score-weighted criterion is the official one written out independently, and a CNN teacher of
another backend teaches a D-FINE student through its detections."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import generalized_box_iou
from torchvision.ops import sigmoid_focal_loss as tv_focal

pytest.importorskip("transformers")  # the hf extra (make install; CI runs these)

from kd2.losses.query_matching import cxcywh_to_xyxy, match_to_boxes
from kd2.losses.teach_detr import teach_detr_losses, teacher_targets


def _boxes(q, g):
    cxcy = torch.rand(q, 2, generator=g) * 0.6 + 0.2
    return torch.cat([cxcy, torch.rand(q, 2, generator=g) * 0.3 + 0.05], -1)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    n, q, k = 2, 7, 4
    logits = torch.randn(n, q, k, generator=g)
    boxes = torch.stack([_boxes(q, g), _boxes(q, g)])
    labels = [torch.tensor([1, 3, 0]), torch.zeros(0, dtype=torch.long)]
    targets = [_boxes(3, g), torch.zeros(0, 4)]
    scores = [torch.tensor([0.9, 0.4, 0.7]), torch.zeros(0)]
    return logits, boxes, labels, targets, scores


def test_the_matching_is_transformers_hungarian_matcher():
    from transformers import DFineConfig
    from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher

    logits, boxes, labels, targets, _ = _problem()
    config = DFineConfig(num_labels=4)  # focal costs: class 2, bbox 5, giou 2, alpha .25, gamma 2
    theirs = RTDetrHungarianMatcher(config)(
        {"logits": logits, "pred_boxes": boxes},
        [{"class_labels": lb, "boxes": t} for lb, t in zip(labels, targets)],
    )
    ours = match_to_boxes(logits, boxes, labels, targets)
    for (q1, t1), (q2, t2) in zip(ours, theirs):
        assert q1.tolist() == q2.tolist() and t1.tolist() == t2.tolist()


@pytest.mark.parametrize("giou_weighting", ["code", "paper"])
def test_the_criterion_is_the_official_score_weighted_one(giou_weighting):
    logits, boxes, labels, targets, scores = _problem(1)
    matches = match_to_boxes(logits, boxes, labels, targets)
    cls, l1, giou = teach_detr_losses(
        logits, boxes, labels, targets, scores, matches, giou_weighting=giou_weighting
    )
    # the official loss_weighted_labels / loss_weighted_boxes, written with torchvision's ops
    n, q, k = logits.shape
    num_boxes = 3
    onehot = torch.zeros(n, q, k)
    weight = torch.full((n, q), 0.5)
    src, tgt, s = [], [], []
    for i, (qi, ti) in enumerate(matches):
        onehot[i, qi, labels[i][ti]] = 1
        weight[i, qi] = scores[i][ti]
        src.append(boxes[i, qi])
        tgt.append(targets[i][ti])
        s.append(scores[i][ti])
    src, tgt, s = torch.cat(src), torch.cat(tgt), torch.cat(s)
    focal = tv_focal(logits, onehot, alpha=0.25, gamma=2, reduction="none") / num_boxes
    want_cls = (focal * weight[..., None]).mean(1).sum() * q
    want_l1 = ((src - tgt).abs() * s[:, None]).sum() / num_boxes
    g = torch.diag(generalized_box_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt)))
    want_giou = (1 - g * s if giou_weighting == "code" else (1 - g) * s).sum() / num_boxes
    torch.testing.assert_close(cls, want_cls)
    torch.testing.assert_close(l1, want_l1)
    torch.testing.assert_close(giou, want_giou)


def test_teacher_boxes_below_the_threshold_are_dropped_and_normalised():
    det = [
        {
            "boxes": torch.tensor([[0.0, 0.0, 32.0, 64.0], [8.0, 8.0, 16.0, 16.0]]),
            "scores": torch.tensor([0.8, 0.1]),
            "labels": torch.tensor([2, 1]),
        }
    ]
    labels, boxes, scores = teacher_targets(det, (64, 64), 0.3)
    assert labels[0].tolist() == [2] and scores[0].tolist() == [pytest.approx(0.8)]
    torch.testing.assert_close(boxes[0], torch.tensor([[0.25, 0.5, 0.5, 1.0]]))


def test_a_torchvision_cnn_teacher_teaches_a_dfine_student_with_teach_detr_and_pkd(tmp_path):
    from kd2.hf import build_detector
    from tests.helpers import batch, save_teacher
    from tests.hf.test_backend import hf_cfg

    _, yaml_path, pth_path = save_teacher(tmp_path, "FasterRCNN", channels=32)
    cfg = hf_cfg()
    cfg.KD.METHODS = ["TeachDETR", "PKD"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = yaml_path, pth_path
    cfg.KD.TEACHER.BACKEND = "torchvision"
    cfg.KD.TEACHDETR.SCORE_THRESH = 0.0  # a random teacher's scores are low
    model = build_detector(cfg).train()
    assert model.kd_teacher_parts[""] == {"features", "detections"}
    images, targets = batch(with_empty=True)
    losses = model(images, targets)
    terms = [k for k in losses if k.startswith("loss_kd_teachdetr_")]
    assert len(terms) == 3 and float(losses["loss_kd_teachdetr_bbox"]) > 0
    assert all(torch.isfinite(losses[k]) for k in terms)
    sum(losses.values()).backward()
