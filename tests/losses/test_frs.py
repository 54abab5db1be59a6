"""Tests of FRS (feature-richness score distillation) and of ``tools/show_richness.py``.

Expected values are derived by hand (closed forms in the comments) or with independent numpy
arithmetic. Method records come from the builders of ``tests/losses/test_baselines.py``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from kd2.config import get_cfg
from kd2.engine import setup_cfg
from kd2.losses import FRS, KD_METHOD_REGISTRY, feature_richness, frs_feature_loss, frs_head_loss
from kd2.tv.build import build_plain_detector
from tests.helpers import tiny_cfg
from tests.losses.test_baselines import build, make_pair

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LN3 = math.log(3.0)


def _np_sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _np_bce(zs: np.ndarray, zt: np.ndarray) -> np.ndarray:
    p, q = _np_sigmoid(zs), _np_sigmoid(zt)
    return -(q * np.log(p) + (1.0 - q) * np.log(1.0 - p))


# --------------------------------------------------------------------------------------------
# plain functions
# --------------------------------------------------------------------------------------------


def test_feature_richness_hand_computed():
    # location 0: max(σ(0), σ(ln 3)) = max(1/2, 3/4) = 3/4; location 1: max(σ(-ln 3), σ(0)) = 1/2
    z = torch.tensor([[[[0.0, -LN3]], [[LN3, 0.0]]]], requires_grad=True)  # (1, 2, 1, 2)
    s = feature_richness(z)
    assert s.shape == (1, 1, 1, 2) and s.dtype == torch.float32
    assert not s.requires_grad
    torch.testing.assert_close(s, torch.tensor([[[[0.75, 0.5]]]]))


def test_frs_feature_loss_hand_computed():
    # s = 0; t at loc 0 = (1, 3), loc 1 = (2, 0); mask (1, 0.5).
    # numerator 1·(1 + 9) + 0.5·(4 + 0) = 12; Σ mask = 1.5 -> 8.
    s = torch.zeros(1, 2, 1, 2, requires_grad=True)
    t = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]], requires_grad=True)
    m = torch.tensor([[[[1.0, 0.5]]]], requires_grad=True)
    loss = frs_feature_loss(s, t, m)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(8.0)
    loss.backward()
    # d/ds = -2 m (t - s) / Σm
    torch.testing.assert_close(
        s.grad, torch.tensor([[[[-2 / 1.5, -2.0 / 1.5]], [[-6 / 1.5, 0.0]]]])
    )
    assert t.grad is None and m.grad is None


def test_frs_head_loss_hand_computed():
    # p_s = σ(0) = 1/2 everywhere -> BCE = ln 2 for any target; 3 channels, Σ mask cancels: 3 ln 2
    s = torch.zeros(1, 3, 1, 2, requires_grad=True)
    t = torch.tensor([[[[5.0, -1.0]], [[0.0, 2.0]], [[-3.0, 1.0]]]], requires_grad=True)
    m = torch.tensor([[[[1.0, 0.5]]]], requires_grad=True)
    loss = frs_head_loss(s, t, m)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(3 * math.log(2.0), rel=1e-6)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None and m.grad is None
    # p_s = σ(ln 3) = 3/4, q = 1/2: BCE = -(1/2 ln 3/4 + 1/2 ln 1/4); one location, mask 0.4
    one = frs_head_loss(
        torch.full((1, 1, 1, 1), LN3), torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 0.4)
    )
    assert one.item() == pytest.approx(-(0.5 * math.log(0.75) + 0.5 * math.log(0.25)), rel=1e-6)


def test_frs_head_loss_matches_the_released_probability_bce_at_saturation():
    """duzhixing/FRS ``distill_frs_single.py`` l. 67: ``F.binary_cross_entropy(σ(z_s), σ(z_t))``.
    fp32 σ(20) is exactly 1, torch clamps log(1 - 1) = -inf at -100: with p_t = σ(0) = 1/2 the
    released value is -(1/2 log 1 + 1/2 (-100)) = 50, not the logit form's 20 - 10 = 10 (the
    old kd2 value), and the gradient is 0 (σ'(20) = 0 in fp32), not 1 - 1/2."""
    m = torch.ones(1, 1, 1, 1)
    t = torch.zeros(1, 1, 1, 1)
    s = torch.full((1, 1, 1, 1), 20.0, requires_grad=True)
    loss = frs_head_loss(s, t, m)
    assert loss.item() == pytest.approx(50.0)
    loss.backward()
    assert s.grad.item() == 0.0
    s2 = torch.full((1, 1, 1, 1), 20.0, requires_grad=True)
    stable = frs_head_loss(s2, t, m, from_logits=True)
    assert stable.item() == pytest.approx(10.0, rel=1e-6)  # what kd2 computed before
    stable.backward()
    assert s2.grad.item() == pytest.approx(0.5)
    # a student logit of -30, p_t = 1/2: the value agrees (30 * 1/2 + log terms), but torch's
    # eps = 1e-12 in the BCE backward fades the gradient: (p - q) p (1 - p) / 1e-12
    s3 = torch.full((1, 1, 1, 1), -30.0, requires_grad=True)
    low = frs_head_loss(s3, t, m)
    assert low.item() == pytest.approx(15.0, rel=1e-5)
    low.backward()
    p = 1.0 / (1.0 + math.exp(30.0))
    assert s3.grad.item() == pytest.approx((p - 0.5) * p / 1e-12, rel=1e-3)
    # the released value on a mixed level equals numpy's clamped-log BCE of fp32 sigmoids
    z = torch.tensor([[[[-120.0, -30.0, 0.0, 12.5, 16.0, 16.7, 40.0]]]]).permute(0, 3, 1, 2)
    q = torch.tensor([[[[0.3, -2.0, 1.0, 0.0, 4.0, -1.0, 2.0]]]]).permute(0, 3, 1, 2)
    p32 = torch.sigmoid(z).numpy().astype(np.float64)  # what fp32 σ gives, then exact logs
    q64 = _np_sigmoid(q.numpy().astype(np.float64))
    with np.errstate(divide="ignore"):
        want = -(
            q64 * np.maximum(np.log(p32), -100.0) + (1 - q64) * np.maximum(np.log(1 - p32), -100.0)
        )
    got = frs_head_loss(z, q, torch.ones(1, 1, 1, 1))
    assert got.item() == pytest.approx(float(want.sum()), rel=1e-5)
    assert got.item() > frs_head_loss(z, q, torch.ones(1, 1, 1, 1), from_logits=True).item() + 50


def test_frs_head_loss_gradients_finite_and_autocast():
    z = torch.linspace(-200.0, 200.0, 401).view(1, 401, 1, 1).requires_grad_(True)
    t = torch.linspace(-30.0, 30.0, 401).view(1, 401, 1, 1)
    for from_logits in (False, True):
        z.grad = None
        loss = frs_head_loss(z, t, torch.ones(1, 1, 1, 1), from_logits=from_logits)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
        assert (z.grad.abs() <= 1.0 + 1e-6).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = frs_head_loss(z.detach().bfloat16(), t, torch.ones(1, 1, 1, 1))
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_frs_method_bce_form_from_config():
    student, teacher = make_pair("one_stage")
    for flag in (False, True):
        m = build("FRS", "one_stage", BCE_FROM_LOGITS=flag)
        assert m.bce_from_logits is flag
    assert get_cfg().KD.FRS.BCE_FROM_LOGITS is False
    assert build("FRS", "one_stage").bce_from_logits is False
    # saturate one student logit: only the released form jumps (to 100 (1 - p_t) for it)
    m_off = build("FRS", "one_stage", WARMUP_ITERS=0)
    m_on = build("FRS", "one_stage", WARMUP_ITERS=0, BCE_FROM_LOGITS=True)
    m_on.load_state_dict(m_off.state_dict())
    base_off = m_off(student, teacher)["loss_kd_frs_cls"].item()
    base_on = m_on(student, teacher)["loss_kd_frs_cls"].item()
    assert base_off == pytest.approx(base_on, rel=1e-5)  # randn logits: no saturation
    with torch.no_grad():
        student.dense.cls_logits[0][0, 0, 0] = 30.0
    sat_off = m_off(student, teacher)["loss_kd_frs_cls"].item()
    sat_on = m_on(student, teacher)["loss_kd_frs_cls"].item()
    assert sat_off - base_off > 2.0 * (sat_on - base_on) > 0


def test_frs_losses_random_vs_numpy():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    m = torch.rand(2, 1, 3, 5, generator=g)
    sn, tn, mn = s.numpy().astype(np.float64), t.numpy().astype(np.float64), m.numpy()
    feat = float(np.sum(mn * (tn - sn) ** 2) / np.sum(mn))
    head = float(np.sum(mn * _np_bce(sn, tn)) / np.sum(mn))
    assert frs_feature_loss(s, t, m).item() == pytest.approx(feat, rel=1e-5)
    assert frs_head_loss(s, t, m).item() == pytest.approx(head, rel=1e-5)


@pytest.mark.parametrize("fn", [frs_feature_loss, frs_head_loss])
def test_frs_zero_and_empty_mask(fn):
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4)
    loss = fn(s, t, torch.zeros(2, 1, 4, 4))
    assert loss.item() == 0.0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    empty = fn(torch.zeros(0, 3, 4, 4), torch.zeros(0, 3, 4, 4), torch.zeros(0, 1, 4, 4))
    assert empty.item() == 0.0 and empty.dim() == 0
    with pytest.raises(ValueError):
        fn(s, t, torch.ones(2, 3, 4, 4))  # mask must be (N, 1, H, W)


# --------------------------------------------------------------------------------------------
# the registered method
# --------------------------------------------------------------------------------------------


def _np_maps(flat: torch.Tensor, grid, a: int) -> np.ndarray:
    """(N, H*W*A, D) -> (N, A*D, H, W) with numpy, channel a*D + d."""
    n, _, d = flat.shape
    h, w = grid
    return flat.detach().numpy().reshape(n, h, w, a * d).transpose(0, 3, 1, 2).astype(np.float64)


def _expected(method: FRS, student, teacher, part: str) -> tuple[float, float]:
    """Unweighted (Σ_l L_FPN, Σ_l L_head) with numpy (adapter outputs taken from the method)."""
    sh, th = getattr(student, part), getattr(teacher, part)
    a = th.num_anchors_per_loc
    feat = head = 0.0
    for lvl, stride in enumerate(th.strides):
        zt = _np_maps(th.cls_logits[lvl], th.grid_sizes[lvl], a)
        zs = _np_maps(sh.cls_logits[lvl], sh.grid_sizes[lvl], a)
        mask = _np_sigmoid(zt).max(axis=1, keepdims=True)
        with torch.no_grad():
            fs = method.adapter.convs[str(stride)](student.features[stride]).double().numpy()
        ft = teacher.features[stride].detach().double().numpy()
        feat += np.sum(mask * (ft - fs) ** 2) / np.sum(mask)
        head += np.sum(mask * _np_bce(zs, zt)) / np.sum(mask)
    return float(feat), float(head)


@pytest.mark.parametrize(
    "arch,part,alpha,beta",
    [("one_stage", "dense", 0.005, 0.02), ("two_stage", "rpn", 0.002, 0.1)],
)
def test_frs_method_matches_numpy_with_default_weights(arch, part, alpha, beta):
    torch.manual_seed(0)
    method = build("FRS", arch)
    assert isinstance(method, FRS) and KD_METHOD_REGISTRY.get("FRS") is FRS
    assert method.teacher_parts == frozenset({"features", part})
    student, teacher = make_pair(arch)
    method.before_step(10_000)  # past the warm-up
    losses = method(student, teacher)
    assert set(losses) == {"loss_kd_frs_feat", "loss_kd_frs_cls"}
    feat, head = _expected(method, student, teacher, part)
    assert losses["loss_kd_frs_feat"].item() == pytest.approx(alpha * feat, rel=1e-4)
    assert losses["loss_kd_frs_cls"].item() == pytest.approx(beta * head, rel=1e-4)
    for v in losses.values():
        assert v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v)
    sum(losses.values()).backward()
    head_s = getattr(student, part)
    assert all(f.grad is not None for f in student.features.values())
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in head_s.cls_logits)
    assert all(not f.requires_grad for f in teacher.features.values())
    assert all(p.grad is not None for p in method.adapter.parameters())


def test_frs_default_weights_fcos_and_explicit_weights():
    torch.manual_seed(0)
    default = build("FRS", "one_stage")
    explicit = build("FRS", "one_stage", WEIGHT_FEAT=1.0, WEIGHT_CLS=2.0, WARMUP_ITERS=0)
    explicit.load_state_dict(default.state_dict())
    student, teacher = make_pair("one_stage")
    # a dense head with centerness is FCOS: alpha 0.01, beta 0.05
    student.dense.centerness = [
        torch.zeros(t.shape[0], t.shape[1], 1) for t in student.dense.cls_logits
    ]
    default.before_step(500)
    d, e = default(student, teacher), explicit(student, teacher)
    assert default.detector_family(student) == "fcos"
    torch.testing.assert_close(d["loss_kd_frs_feat"], e["loss_kd_frs_feat"] * 0.01)
    torch.testing.assert_close(d["loss_kd_frs_cls"], e["loss_kd_frs_cls"] * 0.05 / 2.0)


def test_frs_warmup_via_before_step():
    torch.manual_seed(0)
    method = build("FRS", "two_stage")
    student, teacher = make_pair("two_stage")
    method.before_step(0)
    zero = method(student, teacher)
    assert all(v.item() == 0.0 for v in zero.values())
    method.before_step(250)
    half = method(student, teacher)
    method.before_step(500)
    full = method(student, teacher)
    method.before_step(5000)
    later = method(student, teacher)
    for k in full:
        assert full[k].item() > 0
        torch.testing.assert_close(half[k], full[k] * 0.5)
        torch.testing.assert_close(later[k], full[k])


def test_frs_needs_the_head():
    method = build("FRS", "one_stage")
    student, teacher = make_pair("one_stage")
    teacher.dense = None
    with pytest.raises(ValueError, match="dense"):
        method(student, teacher)


def test_frs_config_defaults_and_yaml():
    node = get_cfg().KD.FRS
    assert (node.WEIGHT_FEAT, node.WEIGHT_CLS, node.WARMUP_ITERS, node.ADAPTER_KERNEL) == (
        -1.0,
        -1.0,
        500,
        3,
    )
    cfg = setup_cfg(os.path.join(REPO, "configs", "synthetic", "faster_rcnn_MNv3_FRS.yaml"))
    assert list(cfg.KD.METHODS) == ["FRS"]
    assert cfg.MODEL.META_ARCHITECTURE == "FasterRCNN"


# --------------------------------------------------------------------------------------------
# tools/show_richness.py
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,strides", [("FasterRCNN", "[4, 8, 16, 32, 64]"), ("FCOS", "[8, 16, 32, 64, 128]")]
)
def test_show_richness_tool(tmp_path, arch, strides):
    cfg = tiny_cfg(arch, channels=64)
    torch.manual_seed(0)
    model = build_plain_detector(cfg)
    yaml_path, pth_path = tmp_path / "model.yaml", tmp_path / "model.pth"
    yaml_path.write_text(cfg.dump())
    torch.save({"model": model.state_dict()}, pth_path)
    img_path, out = tmp_path / "img.png", tmp_path / "vis" / "richness.png"
    rng = np.random.default_rng(0)
    cv2.imwrite(str(img_path), rng.integers(0, 255, (80, 100, 3), dtype=np.uint8))
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "show_richness.py"),
        "--config-file",
        str(yaml_path),
        "--image",
        str(img_path),
        "--weights",
        str(pth_path),
        "--output",
        str(out),
        "MODEL.DEVICE",
        "cpu",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and out.stat().st_size > 0
    assert "with 6 panels" in r.stdout  # the image + 5 FPN levels
    assert strides in r.stdout  # RPN objectness levels / the one-stage head's levels
