"""RKD potentials against hand-computed cases, and the instance embeddings of the method."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kd2.losses import RKD, rkd_angle_loss, rkd_distance_loss
from kd2.losses.rkd import pairwise_distances
from kd2.tv.build import build_detector
from tests.helpers import batch, kd_cfg


def _smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def test_pairwise_distances_hand_computed():
    e = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])
    d = pairwise_distances(e)
    expected = torch.tensor([[0.0, 5.0, 4.0], [5.0, 0.0, 3.0], [4.0, 3.0, 0.0]])
    torch.testing.assert_close(d, expected, atol=1e-5, rtol=0)


def test_distance_loss_hand_computed_and_scale_invariant():
    t = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])  # distances 5, 4, 3: mean 4
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # 1, 1, sqrt2: mean (2 + sqrt2) / 3
    mu_s = (2.0 + math.sqrt(2.0)) / 3.0
    pairs = [(1.0 / mu_s, 5 / 4), (1.0 / mu_s, 4 / 4), (math.sqrt(2.0) / mu_s, 3 / 4)]
    expected = 2 * sum(_smooth_l1(a - b) for a, b in pairs) / 9  # both triangles, 9 entries
    assert rkd_distance_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert rkd_distance_loss(3.0 * t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_angle_loss_matches_an_explicit_triplet_loop():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g)

    def angle(e, i, j, k):
        a, b = e[j] - e[i], e[k] - e[i]
        na, nb = a.norm(), b.norm()
        if na == 0 or nb == 0:
            return 0.0
        return float((a / na) @ (b / nb))

    # the reference's layout: entry [i, j, k] = <unit(e_j - e_i), unit(e_k - e_i)>
    total = sum(
        _smooth_l1(angle(s, i, j, k) - angle(t, i, j, k))
        for i, j, k in itertools.product(range(4), repeat=3)
    )
    assert rkd_angle_loss(s, t).item() == pytest.approx(total / 64, rel=1e-5)
    assert rkd_angle_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_too_few_instances_give_a_zero_with_a_graph():
    s = torch.randn(1, 4, requires_grad=True)
    for fn in (rkd_distance_loss, rkd_angle_loss):
        out = fn(s, torch.randn(1, 6))
        assert out.item() == 0.0 and out.requires_grad
    out = rkd_angle_loss(torch.randn(2, 4, requires_grad=True), torch.randn(2, 4))
    assert out.item() == 0.0


def test_gradient_reaches_the_student_only():
    s = torch.randn(5, 4, requires_grad=True)
    t = torch.randn(5, 8, requires_grad=True)
    (rkd_distance_loss(s, t) + rkd_angle_loss(s, t)).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_method_embeds_every_gt_box_on_its_level(tmp_path):
    model = build_detector(kd_cfg(tmp_path, "FasterRCNN", ["RKD"])).train()
    images, targets = batch("FasterRCNN", with_empty=False)
    rec, _ = model.student_step(images, targets)
    with torch.no_grad():
        trec = model.teacher_step(rec)
    method: RKD = model.kd_methods["RKD"]
    s, t = method.instance_embeddings(rec, trec)
    assert s.shape == (3, 32) and t.shape == (3, 64)  # 3 GT boxes; student 32, teacher 64 ch.
    torch.testing.assert_close(s.norm(dim=1), torch.ones(3))
    losses = method(rec, trec)
    assert set(losses) == {"loss_kd_rkd_distance", "loss_kd_rkd_angle"}
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
