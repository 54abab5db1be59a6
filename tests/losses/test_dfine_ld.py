"""D-FINE localization KD: the decoupled distillation loss equals transformers' own ``loss_ddf``
on the same tensors; the query pairing is the minimal-cost assignment; the method trains a D-FINE
student from a D-FINE teacher and refuses models without (or with other) distributions."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("transformers")  # the hf extra (make install; CI runs these)

from kd2.losses import decoupled_distillation_loss, match_queries
from kd2.losses.query_matching import cxcywh_to_xyxy
from kd2.losses.utils import box_iou
from kd2.utils.errors import ConfigError


def _boxes(n, q, g):
    cxcy = torch.rand(n, q, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, q, 2, generator=g) * 0.3 + 0.05
    return torch.cat([cxcy, wh], -1)


def test_the_loss_is_transformers_ddf_on_the_same_tensors():
    from transformers import DFineConfig
    from transformers.loss.loss_d_fine import DFineLoss

    g = torch.Generator().manual_seed(0)
    config = DFineConfig(num_labels=4, max_num_bins=8)
    bins = config.max_num_bins + 1
    n, q = 2, 6
    pred = torch.randn(n, q, 4 * bins, generator=g)
    target = torch.randn(n, q, 4 * bins, generator=g)
    logits = torch.randn(n, q, 4, generator=g)
    boxes = _boxes(n, q, g)
    gt = [_boxes(1, 2, g)[0], _boxes(1, 1, g)[0]]
    indices = [(torch.tensor([4, 1]), torch.tensor([0, 1])), (torch.tensor([2]), torch.tensor([0]))]
    outputs = {
        "pred_corners": pred,
        "ref_points": boxes,
        "pred_boxes": boxes,
        "teacher_corners": target,
        "teacher_logits": logits,
    }
    targets = [{"boxes": b, "class_labels": torch.zeros(len(b), dtype=torch.long)} for b in gt]
    want = DFineLoss(config).loss_local(outputs, targets, indices, num_boxes=3)["loss_ddf"]

    weights = logits.sigmoid().amax(-1)
    positive = torch.zeros(n, q, dtype=torch.bool)
    for i, (src, tgt) in enumerate(indices):
        iou = box_iou(cxcywh_to_xyxy(boxes[i, src]), cxcywh_to_xyxy(gt[i][tgt])).diagonal()
        weights[i, src] = iou
        positive[i, src] = True
    got = decoupled_distillation_loss(
        pred.reshape(n * q, -1), target.reshape(n * q, -1), weights.reshape(-1),
        positive.reshape(-1), num_images=n,
    )  # fmt: skip
    torch.testing.assert_close(got, want.to(got.dtype))


def test_no_pairs_give_a_zero_loss_on_the_graph():
    pred = torch.randn(0, 36, requires_grad=True)
    loss = decoupled_distillation_loss(
        pred, pred.detach(), torch.zeros(0), torch.zeros(0, dtype=torch.bool), num_images=2
    )
    assert float(loss) == 0.0 and loss.requires_grad


def test_query_pairing_is_the_minimal_cost_assignment():
    g = torch.Generator().manual_seed(1)
    s_logits, t_logits = torch.randn(1, 4, 3, generator=g), torch.randn(1, 5, 3, generator=g)
    s_boxes, t_boxes = _boxes(1, 4, g), _boxes(1, 5, g)
    ((rows, cols),) = match_queries(s_logits, s_boxes, t_logits, t_boxes)
    assert rows.tolist() == [0, 1, 2, 3] and len(set(cols.tolist())) == 4

    from kd2.losses.query_matching import pairwise_giou

    cost = (
        2 * torch.cdist(s_logits[0].sigmoid(), t_logits[0].sigmoid(), p=1) / 3
        + 5 * torch.cdist(s_boxes[0], t_boxes[0], p=1)
        - 2 * pairwise_giou(cxcywh_to_xyxy(s_boxes[0]), cxcywh_to_xyxy(t_boxes[0]))
    )
    best = min(
        sum(float(cost[r, c]) for r, c in enumerate(perm))
        for perm in itertools.permutations(range(5), 4)
    )
    assert sum(float(cost[r, c]) for r, c in zip(rows, cols)) == pytest.approx(best)


def _teacher_with_distributions(cfg):
    """A random D-FINE's edge heads start at zero (uniform distributions): give the teacher's
    some, so that its distributions teach something."""
    state = torch.load(cfg.KD.TEACHER.WEIGHTS)["model"]
    g = torch.Generator().manual_seed(0)
    for k in state:
        if "bbox_embed" in k:
            state[k] = torch.randn(state[k].shape, generator=g) * 0.3
    torch.save({"model": state}, cfg.KD.TEACHER.WEIGHTS)


def test_a_dfine_teacher_teaches_a_dfine_students_distributions(tmp_path):
    from kd2.hf import build_detector
    from tests.helpers import batch
    from tests.hf.test_backend import kd_hf_cfg

    cfg = kd_hf_cfg(tmp_path, ["DFineLD"])
    _teacher_with_distributions(cfg)
    model = build_detector(cfg).train()
    images, targets = batch(with_empty=True)
    losses = model(images, targets)
    loss = losses["loss_kd_dfine_ld"]
    assert torch.isfinite(loss) and float(loss) > 0
    loss.backward()
    heads = [p for n, p in model.named_parameters() if "bbox_embed" in n and p.grad is not None]
    assert heads and any(float(p.grad.abs().sum()) > 0 for p in heads)


def test_models_without_or_with_other_distributions_are_refused(tmp_path):
    from kd2.hf import build_detector
    from tests.helpers import batch
    from tests.hf.test_backend import kd_hf_cfg

    images, targets = batch(with_empty=True)
    rt = build_detector(kd_hf_cfg(tmp_path, ["DFineLD"], model_type="rt_detr")).train()
    with pytest.raises(ConfigError, match="does not predict"):
        rt(images, targets)
    cfg = kd_hf_cfg(tmp_path, ["DFineLD"])
    model = build_detector(cfg).train()
    model.teacher.detector.config.max_num_bins = 16  # as if the teacher had other bins
    with pytest.raises(ConfigError, match="differ from the student's"):
        model(images, targets)
