"""DSI (RT-DETRv4's semantic injector) against the official loss written out on the same tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd2.losses import DSI, semantic_alignment_loss
from kd2.structures import StepRecord


def _official(student_map, teacher_map):
    """RTv4Criterion.loss_distillation's expression (RT-DETRs/RT-DETRv4), written out."""
    h_s, w_s = student_map.shape[2:]
    if tuple(teacher_map.shape[2:]) != (h_s, w_s):
        teacher_map = F.interpolate(
            teacher_map, size=(h_s, w_s), mode="bilinear", align_corners=False
        )
    s = F.normalize(student_map.flatten(2).permute(0, 2, 1), p=2, dim=-1)
    t = F.normalize(teacher_map.flatten(2).permute(0, 2, 1), p=2, dim=-1)
    return (1 - F.cosine_similarity(s, t, dim=-1)).mean()


@pytest.mark.parametrize("teacher_size", [(6, 8), (5, 7)])
def test_the_loss_is_the_official_one(teacher_size):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 12, 6, 8, generator=g)
    t = torch.randn(2, 12, *teacher_size, generator=g)
    torch.testing.assert_close(semantic_alignment_loss(s, t), _official(s, t))
    assert float(semantic_alignment_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(semantic_alignment_loss(-t, t)) == pytest.approx(2.0, abs=1e-6)


def _record(features):
    return StepRecord(torch.zeros(1, 3, 64, 64), [(64, 64)], [], [], features, 3)


def test_the_method_projects_each_level_and_sums_the_weighted_terms():
    g = torch.Generator().manual_seed(1)
    s = {8: torch.randn(2, 4, 8, 8, generator=g), 16: torch.randn(2, 4, 4, 4, generator=g)}
    t = {16: torch.randn(2, 6, 4, 4, generator=g), 32: torch.randn(2, 6, 2, 2, generator=g)}
    method = DSI({8: 4, 16: 4}, {16: 6, 32: 6}, weight=5.0, smooth_l1_weight=0.5)
    assert method.projector.strides == [16]
    out = method(_record(s), _record(t))
    p = method.projector.convs["16"](s[16])
    torch.testing.assert_close(out["loss_kd_dsi"], 5.0 * _official(p, t[16]))
    torch.testing.assert_close(
        out["loss_kd_dsi_smooth_l1"], 5.0 * 0.5 * F.smooth_l1_loss(p, t[16], beta=1.0)
    )
    assert "loss_kd_dsi_smooth_l1" not in DSI({16: 4}, {16: 6})(_record(s), _record(t))
    out["loss_kd_dsi"].backward()
    assert method.projector.convs["16"].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="include \\[8\\]"):
        DSI({8: 4, 16: 4}, {16: 6}, strides=[8])
