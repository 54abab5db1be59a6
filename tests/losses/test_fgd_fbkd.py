"""Tests of FGD (focal and global distillation) and FBKD (attention-guided + non-local KD).

Expected values are derived by hand (closed forms in the comments) or by independent explicit
loops / numpy arithmetic, never by calling the code under test. Method records come from the
builders of ``tests/losses/test_baselines.py`` (2 images of 128x128, ``C_s = 4`` student and
``C_t = 6`` teacher channels; image 1 has no GT).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from kd2.config import get_cfg
from kd2.losses import KD_METHOD_REGISTRY
from kd2.losses.fbkd import (
    FBKD,
    NonLocalBlock,
    fbkd_attention_transfer_loss,
    fbkd_masked_feature_loss,
    fbkd_nonlocal_loss,
    fbkd_nonlocal_setting,
    fbkd_spatial_mask,
)
from kd2.losses.fgd import (
    FGD,
    FGD_DEFAULTS,
    GlobalContextBlock,
    channel_attention,
    fgd_attention_loss,
    fgd_feature_loss,
    fgd_global_loss,
    fgd_masks,
    spatial_attention,
)
from kd2.tv.build import build_detector
from tests.helpers import batch, kd_cfg
from tests.losses.test_baselines import (
    C_S,
    C_T,
    DEFAULT_GT,
    ONE_STAGE_STRIDES,
    TWO_STAGE_STRIDES,
    build,
    make_pair,
)

# --------------------------------------------------------------------------------------------
# explicit references
# --------------------------------------------------------------------------------------------


def _softmax(values: list[float]) -> list[float]:
    m = max(values)
    e = [math.exp(v - m) for v in values]
    return [x / sum(e) for x in e]


def _attention_loops(f: np.ndarray, temp: float) -> tuple[np.ndarray, np.ndarray]:
    """(spatial (N, H, W), channel (N, C)) attention by explicit loops."""
    n, c, h, w = f.shape
    sp = np.zeros((n, h, w))
    ch = np.zeros((n, c))
    for i in range(n):
        energy = [
            sum(abs(f[i, k, y, x]) for k in range(c)) / c / temp for y in range(h) for x in range(w)
        ]
        probs = _softmax(energy)
        for j, p in enumerate(probs):
            sp[i, j // w, j % w] = h * w * p
        energy = [
            sum(abs(f[i, k, y, x]) for y in range(h) for x in range(w)) / (h * w) / temp
            for k in range(c)
        ]
        ch[i] = [c * p for p in _softmax(energy)]
    return sp, ch


# --------------------------------------------------------------------------------------------
# FGD: attention and masks
# --------------------------------------------------------------------------------------------


def test_spatial_and_channel_attention_hand_computed():
    # F (1, 2, 1, 2): channel 0 = [1, 0], channel 1 = [-3, 2].
    # spatial: mean_c |F| = [2, 1] -> /0.5 = [4, 2] -> 2 * softmax
    # channel: mean_hw |F| = [0.5, 2.5] -> /0.5 = [1, 5] -> 2 * softmax
    f = torch.tensor([[[[1.0, 0.0]], [[-3.0, 2.0]]]], requires_grad=True)
    sp = spatial_attention(f, 0.5)
    ch = channel_attention(f, 0.5)
    assert sp.shape == (1, 1, 1, 2) and ch.shape == (1, 2, 1, 1)
    assert sp.dtype == ch.dtype == torch.float32
    e = 1.0 / (1.0 + math.exp(-2.0))  # softmax([4, 2])[0]
    torch.testing.assert_close(sp.flatten(), torch.tensor([2 * e, 2 * (1 - e)]))
    e = 1.0 / (1.0 + math.exp(4.0))  # softmax([1, 5])[0]
    torch.testing.assert_close(ch.flatten(), torch.tensor([2 * e, 2 * (1 - e)]))
    (sp.sum() + ch[0, 1].sum()).backward()
    assert f.grad is not None  # differentiable
    # a larger random map: sums H*W and C, and matches the explicit loops
    g = torch.randn(2, 3, 2, 4, generator=torch.Generator().manual_seed(0))
    sp_ref, ch_ref = _attention_loops(g.numpy().astype(np.float64), 0.8)
    np.testing.assert_allclose(spatial_attention(g, 0.8)[:, 0].numpy(), sp_ref, rtol=1e-5)
    np.testing.assert_allclose(channel_attention(g, 0.8)[..., 0, 0].numpy(), ch_ref, rtol=1e-5)


def test_fgd_masks_two_box_overlap_on_4x4():
    # 64x64 image, 4x4 map (1 cell = 16 px).
    # A [0, 0, 24, 24] -> x, y in [0, 1.5] -> rows/cols 0..2 (floor 0, ceil 2): 9 cells, 1/9.
    # B [32, 32, 48, 48] -> [2, 3]: rows/cols 2..3: 4 cells, 1/4; the overlap (2, 2) keeps 1/4.
    boxes = torch.tensor([[0.0, 0.0, 24.0, 24.0], [32.0, 32.0, 48.0, 48.0]])
    fg, bg = fgd_masks([boxes], [(64, 64)], (4, 4))
    a, b = 1 / 9, 1 / 4
    expected_fg = torch.tensor([[a, a, a, 0.0], [a, a, a, 0.0], [a, a, b, b], [0.0, 0.0, b, b]])
    torch.testing.assert_close(fg[0], expected_fg)
    # background = the 4 uncovered cells, 1/4 each
    expected_bg = torch.tensor([[0, 0, 0, 0.25], [0, 0, 0, 0.25], [0, 0, 0, 0], [0.25, 0.25, 0, 0]])
    torch.testing.assert_close(bg[0], expected_bg)
    assert fg.dtype == bg.dtype == torch.float32 and fg.shape == (1, 4, 4)


def test_fgd_masks_scaling_floor_ceil_edges_and_empty():
    boxes = [
        # image 0, un-padded (h, w) = (64, 32) on a 4x4 map: x * 4/32, y * 4/64.
        # [0, 0, 16, 16] -> x [0, 2] -> cols 0..2; y [0, 1] -> rows 0..1: 6 cells, 1/6.
        # (padded-size scaling would give 2x2 cells; a transposed mask rows 0..2, cols 0..1)
        torch.tensor([[0.0, 0.0, 16.0, 16.0]]),
        # image 1, 64x64: [20, 4, 28, 12] -> x [1.25, 1.75] -> cols 1..2; y [.25, .75] -> rows 0..1
        torch.tensor([[20.0, 4.0, 28.0, 12.0]]),
        # image 2: the whole image -> ceil(4) = 4: rows/cols 0..4 clipped to 0..3, weight from the
        # unclipped corners 1 / (5 * 5); no background left -> bg all 0
        torch.tensor([[0.0, 0.0, 64.0, 64.0]]),
        # image 3: no boxes -> fg 0, bg 1 / 16
        torch.zeros(0, 4),
    ]
    sizes = [(64, 32), (64, 64), (64, 64), (64, 64)]
    fg, bg = fgd_masks(boxes, sizes, (4, 4))
    exp = torch.zeros(4, 4, 4)
    exp[0, 0:2, 0:3] = 1 / 6
    exp[1, 0:2, 1:3] = 1 / 4
    exp[2] = 1 / 25
    torch.testing.assert_close(fg, exp)
    torch.testing.assert_close(bg[0], (exp[0] == 0).float() / 10)
    torch.testing.assert_close(bg[1], (exp[1] == 0).float() / 12)
    assert torch.equal(bg[2], torch.zeros(4, 4))
    torch.testing.assert_close(bg[3], torch.full((4, 4), 1 / 16))
    # non-square map: rows follow y, columns follow x
    fg, _ = fgd_masks([torch.tensor([[0.0, 0.0, 8.0, 30.0]])], [(64, 64)], (8, 4))
    # x [0, 0.5] -> cols 0..1; y [0, 3.75] -> rows 0..4: 5 x 2 cells
    exp = torch.zeros(8, 4)
    exp[0:5, 0:2] = 1 / 10
    torch.testing.assert_close(fg[0], exp)


# --------------------------------------------------------------------------------------------
# FGD: losses
# --------------------------------------------------------------------------------------------


def test_fgd_feature_loss_matches_explicit_loop():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 2, 3, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 2, 3, generator=g)
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.zeros(0, 4)]
    fg_w, bg_w = fgd_masks(boxes, [(32, 48), (32, 48)], (2, 3))
    temp = 0.5
    fg, bg = fgd_feature_loss(s, t, fg_w, bg_w, temp)
    assert fg.dim() == bg.dim() == 0 and fg.dtype == torch.float32
    sn, tn = s.detach().numpy().astype(np.float64), t.numpy().astype(np.float64)
    sp, ch = _attention_loops(tn, temp)  # the teacher's attention
    exp_fg = exp_bg = 0.0
    for i in range(2):
        for k in range(3):
            for y in range(2):
                for x in range(3):
                    d = sp[i, y, x] * ch[i, k] * (sn[i, k, y, x] - tn[i, k, y, x]) ** 2
                    exp_fg += float(fg_w[i, y, x]) * d
                    exp_bg += float(bg_w[i, y, x]) * d
    assert fg.item() == pytest.approx(exp_fg / 2, rel=1e-5)
    assert bg.item() == pytest.approx(exp_bg / 2, rel=1e-5)
    assert fg.item() > 0 and bg.item() > 0
    (fg + bg).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert not t.requires_grad and t.grad is None


def test_fgd_attention_loss_matches_explicit_loop_and_gradient():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 3, 2, 2, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 2, 2, generator=g)
    loss = fgd_attention_loss(s, t, 0.5)
    sp_s, ch_s = _attention_loops(s.detach().numpy().astype(np.float64), 0.5)
    sp_t, ch_t = _attention_loops(t.numpy().astype(np.float64), 0.5)
    expected = (np.abs(ch_s - ch_t).sum() + np.abs(sp_s - sp_t).sum()) / 2
    assert loss.dim() == 0 and loss.item() == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert fgd_attention_loss(t, t, 0.5).item() == pytest.approx(0.0, abs=1e-6)


def _np_gc(block: GlobalContextBlock, x: np.ndarray) -> np.ndarray:
    """GcBlock forward in numpy: x + W2 ReLU(LN(W1 ctx)), ctx = Σ softmax(Wk x) x."""
    wk = block.context.weight.detach().numpy()[0, :, 0, 0].astype(np.float64)
    bk = float(block.context.bias.detach())
    c1, ln, _, c2 = block.transform
    w1, b1 = c1.weight.detach().numpy()[:, :, 0, 0], c1.bias.detach().numpy()
    gam, bet = ln.weight.detach().numpy()[:, 0, 0], ln.bias.detach().numpy()[:, 0, 0]
    w2, b2 = c2.weight.detach().numpy()[:, :, 0, 0], c2.bias.detach().numpy()
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        flat = x[i].reshape(x.shape[1], -1)  # (C, HW)
        logits = wk @ flat + bk
        p = np.exp(logits - logits.max())
        p /= p.sum()
        ctx = flat @ p  # (C,)
        hdn = w1 @ ctx + b1
        hdn = (hdn - hdn.mean()) / np.sqrt(hdn.var() + ln.eps) * gam + bet
        add = w2 @ np.maximum(hdn, 0.0) + b2
        out[i] = x[i] + add[:, None, None]
    return out


def test_global_context_block_identity_at_init_and_explicit_forward():
    torch.manual_seed(0)
    block = GlobalContextBlock(6)
    assert torch.equal(block.transform[-1].weight, torch.zeros_like(block.transform[-1].weight))
    assert torch.equal(block.context.bias, torch.zeros(1))
    x = torch.randn(2, 6, 3, 4)
    torch.testing.assert_close(block(x), x)  # zero-initialised last conv: identity
    with torch.no_grad():
        block.transform[-1].weight.normal_()
        block.transform[-1].bias.normal_()
        block.transform[1].weight.uniform_(0.5, 1.5)
    ref = _np_gc(block, x.numpy().astype(np.float64))
    np.testing.assert_allclose(block(x).detach().numpy(), ref, rtol=1e-4, atol=1e-5)


def test_fgd_global_loss_value_and_teacher_block_trains():
    torch.manual_seed(0)
    sb, tb = GlobalContextBlock(4), GlobalContextBlock(4)
    s = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.randn(2, 4, 3, 3)
    loss = fgd_global_loss(s, t, sb, tb)
    # at init both blocks are the identity: Σ (s - t)² / N
    expected = ((s.detach() - t) ** 2).sum().item() / 2
    assert loss.dim() == 0 and loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    # the teacher-side block is trainable and gets the gradient (its last conv first)
    assert all(p.grad is not None for p in tb.parameters())
    assert tb.transform[-1].bias.grad.abs().sum() > 0
    assert sb.transform[-1].bias.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# FGD: the registered method
# --------------------------------------------------------------------------------------------


def _check(method, student, teacher) -> dict:
    losses = method(student, teacher)
    assert losses and all(k.startswith("loss_kd_") for k in losses)
    for k, v in losses.items():
        assert v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v), k
    sum(losses.values()).backward()
    assert all(not f.requires_grad and f.grad is None for f in teacher.features.values())
    assert all(f.grad is not None for s, f in student.features.items() if s in method.strides)
    return losses


@pytest.mark.parametrize("arch", ["two_stage", "one_stage"])
def test_fgd_method(arch):
    torch.manual_seed(0)
    m = build("FGD", arch)
    assert m.teacher_parts == frozenset({"features"})
    assert m.strides == (TWO_STAGE_STRIDES[:4] if arch == "two_stage" else ONE_STAGE_STRIDES)
    assert list(m.student_gc) == list(m.teacher_gc) == [str(s) for s in m.strides]
    s, t = make_pair(arch)
    losses = _check(m, s, t)
    assert set(losses) == {
        "loss_kd_fgd_fg",
        "loss_kd_fgd_bg",
        "loss_kd_fgd_attention",
        "loss_kd_fgd_global",
    }
    assert m.family == ("faster_rcnn" if arch == "two_stage" else "retinanet")
    assert all(v.item() > 0 for v in losses.values())
    # every trainable part takes part: align convs (C_s != C_t) and both GC blocks per level
    assert all(p.grad is not None for p in m.parameters())
    assert all(m.teacher_gc[k].transform[-1].bias.grad.abs().sum() > 0 for k in m.teacher_gc)
    # the method is the sum over levels of the plain functions times the defaults
    alpha, beta, gamma, lam, temp = FGD_DEFAULTS[m.family]
    s, t = make_pair(arch)
    fg = bg = at = gl = 0.0
    with torch.no_grad():
        for st in m.strides:
            sa = m.adapter.convs[str(st)](s.features[st])
            tf = t.features[st]
            fw, bw = fgd_masks(s.gt_boxes, s.image_sizes, tuple(tf.shape[-2:]))
            a, b = fgd_feature_loss(sa, tf, fw, bw, temp)
            fg, bg = fg + a.item(), bg + b.item()
            at += fgd_attention_loss(sa, tf, temp).item()
            gl += fgd_global_loss(sa, tf, m.student_gc[str(st)], m.teacher_gc[str(st)]).item()
        out = m(s, t)
    assert out["loss_kd_fgd_fg"].item() == pytest.approx(alpha * fg, rel=1e-5)
    assert out["loss_kd_fgd_bg"].item() == pytest.approx(beta * bg, rel=1e-5)
    assert out["loss_kd_fgd_attention"].item() == pytest.approx(gamma * at, rel=1e-5)
    assert out["loss_kd_fgd_global"].item() == pytest.approx(lam * gl, rel=1e-5)
    # no GT in the whole batch: fg is exactly 0, everything finite
    s, t = make_pair(arch, gt=[DEFAULT_GT[1], DEFAULT_GT[1]])
    losses = _check(m, s, t)
    assert losses["loss_kd_fgd_fg"].item() == 0.0 and losses["loss_kd_fgd_bg"].item() > 0


def test_fgd_defaults_per_detector_and_weights():
    # FCOS is a dense head with centerness: T 0.8 and its weights
    m = build("FGD", "one_stage")
    s, _ = make_pair("one_stage")
    s.dense.centerness = [torch.zeros(x.shape[0], x.shape[1], 1) for x in s.dense.cls_logits]
    assert m.resolved(s) == (1.6e-3, 8e-4, 8e-4, 8e-6, 0.8)
    assert FGD_DEFAULTS["retinanet"] == (1e-3, 5e-4, 5e-4, 5e-6, 0.5)
    assert FGD_DEFAULTS["faster_rcnn"] == (5e-5, 2.5e-5, 5e-5, 5e-7, 0.5)
    # bind_detector wins over inference; explicit values win over defaults
    m = build("FGD", "one_stage", ALPHA=2.0, TEMPERATURE=1.5)
    m.bind_detector("fcos")
    assert m.resolved(make_pair("one_stage")[0]) == (2.0, 8e-4, 8e-4, 8e-6, 1.5)
    with pytest.raises(ValueError):
        m.bind_detector("yolo")
    # configured weights scale the losses linearly
    torch.manual_seed(0)
    ones = {"ALPHA": 1.0, "BETA": 1.0, "GAMMA": 1.0, "LAMBDA": 1.0}
    m1 = build("FGD", "two_stage", **ones)
    m2 = build("FGD", "two_stage", **{k: 3.0 for k in ones})
    m2.load_state_dict(m1.state_dict())
    s, t = make_pair("two_stage")
    l1, l2 = m1(s, t), m2(s, t)
    for k in l1:
        torch.testing.assert_close(l2[k], 3.0 * l1[k], rtol=1e-5, atol=1e-8)
    # STRIDES selects levels; node=None and the config node give the defaults
    assert build("FGD", "two_stage", STRIDES=[8, 32]).strides == [8, 32]
    with pytest.raises(ValueError, match="STRIDES"):
        build("FGD", "two_stage", STRIDES=[2])
    for node in (get_cfg().KD.FGD,):
        m = FGD.from_config(
            node, student_channels={8: 4}, teacher_channels={8: 4}, num_classes=3, arch="one_stage"
        )
        assert m.configured == (-1.0,) * 4 and m.configured_temperature == -1.0
        # equal channels: no align conv at all
        assert isinstance(m.adapter.convs["8"], torch.nn.Identity)
    with pytest.raises(ValueError):
        build("FGD", "one_stage", TEMPERATURE=0.0)


# --------------------------------------------------------------------------------------------
# FBKD: plain functions
# --------------------------------------------------------------------------------------------


def test_fbkd_spatial_mask_and_masked_feature_loss_hand_computed():
    # raw student and teacher whose spatial attentions are [2e, 2(1-e)] and uniform [1, 1]
    s_raw = torch.tensor([[[[1.0, 0.0]], [[-3.0, 2.0]]]], requires_grad=True)
    t = torch.ones(1, 3, 1, 2)
    mask = fbkd_spatial_mask(s_raw, t, 0.5)
    e = 1.0 / (1.0 + math.exp(-2.0))
    torch.testing.assert_close(
        mask.flatten(), torch.tensor([(2 * e + 1) / 2, (2 * (1 - e) + 1) / 2])
    )
    assert not mask.requires_grad
    # L = sqrt(Σ M (t - s)²): s = 0, t = 1 everywhere, 3 channels -> sqrt(3 · Σ M) = sqrt(3 · 2)
    s = torch.zeros(1, 3, 1, 2, requires_grad=True)
    loss = fbkd_masked_feature_loss(s, t, mask)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(math.sqrt(6.0), rel=1e-6)
    loss.backward()
    # d/ds sqrt(Σ M (t - s)²) = -M (t - s) / L
    torch.testing.assert_close(s.grad, -(mask * (t - 0.0)).expand(1, 3, 1, 2) / math.sqrt(6.0))
    # equal maps: 0 with a finite (zero) gradient, where the official sum ** 0.5 gives nan
    s = t.clone().requires_grad_(True)
    loss = fbkd_masked_feature_loss(s, t, mask)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_fbkd_attention_transfer_hand_computed():
    # identity adaptations: L_channel = ‖mean_hw t − mean_hw s‖, L_spatial = ‖mean_c t − mean_c s‖
    s = torch.zeros(2, 2, 1, 2, requires_grad=True)
    t = torch.tensor(
        [[[[1.0, 3.0]], [[0.0, 0.0]]], [[[0.0, 0.0]], [[2.0, 2.0]]]]
    )  # mean_hw: [[2, 0], [0, 2]] -> 2-norm sqrt(8); mean_c: [[.5, 1.5], [1, 1]] -> sqrt(4.5)
    ch, sp = fbkd_attention_transfer_loss(s, t, lambda x: x, lambda x: x)
    assert ch.dim() == sp.dim() == 0
    assert ch.item() == pytest.approx(math.sqrt(8.0))
    assert sp.item() == pytest.approx(math.sqrt(4.5))
    (ch + sp).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    # learned adaptations map C_s -> C_t
    lin, conv = torch.nn.Linear(2, 5), torch.nn.Conv2d(1, 1, 3, padding=1)
    ch, sp = fbkd_attention_transfer_loss(
        torch.randn(2, 2, 3, 3), torch.randn(2, 5, 3, 3), lin, conv
    )
    (ch + sp).backward()
    assert lin.weight.grad is not None and conv.weight.grad is not None
    assert fbkd_nonlocal_loss(torch.zeros(2, 3), torch.ones(2, 3)).item() == pytest.approx(
        math.sqrt(6.0)
    )


def test_fbkd_nonlocal_setting_table():
    assert fbkd_nonlocal_setting(4) == (4, 8)
    assert fbkd_nonlocal_setting(8) == (4, 4)
    assert [fbkd_nonlocal_setting(s) for s in (16, 32, 64, 128)] == [(2, 2)] * 4


def _np_pool(x: np.ndarray, k: int) -> np.ndarray:
    c, h, w = x.shape
    kh, kw = min(k, h), min(k, w)
    out = np.empty((c, h // kh, w // kw))
    for i in range(h // kh):
        for j in range(w // kw):
            out[:, i, j] = x[:, i * kh : (i + 1) * kh, j * kw : (j + 1) * kw].max(axis=(1, 2))
    return out


def test_nonlocal_block_identity_at_init_and_explicit_forward():
    torch.manual_seed(0)
    block = NonLocalBlock(4, reduction=2, maxpool_stride=2)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(block(x), x)  # BN weight and bias zero: identity at init
    # φ and g are pooled by 2 then by maxpool_stride: 2·s effective
    assert block.subsample(torch.zeros(1, 1, 32, 32)).shape[-2:] == (8, 8)
    assert NonLocalBlock(4, 4, 8).subsample(torch.zeros(1, 1, 32, 48)).shape[-2:] == (2, 3)
    assert NonLocalBlock(4, 4, 8).subsample(torch.zeros(1, 1, 3, 1)).shape[-2:] == (1, 1)
    with torch.no_grad():
        for conv in (block.theta, block.phi, block.g, block.conv_out):
            conv.weight.normal_()
        block.norm.weight.fill_(1.0)
    block.norm.reset_running_stats()  # the training-mode call above updated them
    block.eval()  # BN with running stats mean 0 / var 1: z / sqrt(1 + eps)
    xn = x.numpy().astype(np.float64)

    def conv1x1(conv, v):  # v (C, H, W)
        w = conv.weight.detach().numpy()[:, :, 0, 0]
        out = np.einsum("oc,chw->ohw", w, v)
        if conv.bias is not None:
            out += conv.bias.detach().numpy()[:, None, None]
        return out

    for i in range(2):
        theta = conv1x1(block.theta, xn[i]).reshape(2, -1)  # (C', HW)
        phi = _np_pool(_np_pool(conv1x1(block.phi, xn[i]), 2), 2).reshape(2, -1)  # (C', P)
        g = _np_pool(_np_pool(conv1x1(block.g, xn[i]), 2), 2).reshape(2, -1)  # (C', P)
        assert phi.shape[1] == 4  # 8x8 -> 4x4 -> 2x2
        pairwise = theta.T @ phi / phi.shape[1]  # (HW, P)
        y = (pairwise @ g.T).T.reshape(2, 8, 8)
        ref = xn[i] + conv1x1(block.conv_out, y) / np.sqrt(1.0 + block.norm.eps)
        np.testing.assert_allclose(block(x)[i].detach().numpy(), ref, rtol=1e-4, atol=1e-4)
    # one image with a single cell trains without a BatchNorm error
    block.train()
    assert torch.isfinite(block(torch.randn(1, 4, 1, 1))).all()


# --------------------------------------------------------------------------------------------
# FBKD: the registered method
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["two_stage", "one_stage"])
def test_fbkd_method(arch):
    torch.manual_seed(0)
    m = build("FBKD", arch)
    assert m.teacher_parts == frozenset({"features"})
    assert m.strides == (TWO_STAGE_STRIDES[:4] if arch == "two_stage" else ONE_STAGE_STRIDES)
    finest = m.strides[0]
    assert m.student_nonlocal[str(finest)].maxpool_stride == (8 if arch == "two_stage" else 4)
    assert m.student_nonlocal[str(finest)].inter_channels == C_S // 4
    assert m.teacher_nonlocal[str(finest)].inter_channels == C_T // 4
    s, t = make_pair(arch)
    losses = _check(m, s, t)
    assert set(losses) == {
        "loss_kd_fbkd_mask",
        "loss_kd_fbkd_channel",
        "loss_kd_fbkd_spatial",
        "loss_kd_fbkd_nonlocal",
    }
    assert all(v.item() > 0 for v in losses.values())
    assert all(p.grad is not None for p in m.parameters())
    # the teacher-side non-local blocks are trainable: their BN affine gets the gradient
    assert all(b.norm.bias.grad.abs().sum() > 0 for b in m.teacher_nonlocal.values())
    # the method is the sum over levels of the plain functions times the weights
    s, t = make_pair(arch)
    tot = dict.fromkeys(("mask", "channel", "spatial", "nonlocal"), 0.0)
    with torch.no_grad():
        for st in m.strides:
            k, raw, tf = str(st), s.features[st], t.features[st]
            mask = fbkd_spatial_mask(raw, tf, 0.5)
            tot["mask"] += fbkd_masked_feature_loss(m.adapter.convs[k](raw), tf, mask).item()
            ch, sp = fbkd_attention_transfer_loss(raw, tf, m.channel_adapt[k], m.spatial_adapt[k])
            tot["channel"] += ch.item()
            tot["spatial"] += sp.item()
            rs = m.nonlocal_adapt[k](m.student_nonlocal[k](raw))
            tot["nonlocal"] += fbkd_nonlocal_loss(rs, m.teacher_nonlocal[k](tf)).item()
        out = m(s, t)
    weights = {"mask": 7e-5, "channel": 4e-3, "spatial": 4e-3, "nonlocal": 7e-5}
    for name, w in weights.items():
        assert out[f"loss_kd_fbkd_{name}"].item() == pytest.approx(w * tot[name], rel=1e-5)
    # no GT anywhere (FBKD uses none): finite
    s, t = make_pair(arch, gt=[DEFAULT_GT[1], DEFAULT_GT[1]])
    _check(m, s, t)


def test_fbkd_config():
    for node in (get_cfg().KD.FBKD,):
        m = FBKD.from_config(
            node, student_channels={8: 4}, teacher_channels={8: 4}, num_classes=3, arch="one_stage"
        )
        assert (m.mask_weight, m.channel_weight, m.spatial_weight, m.nonlocal_weight) == (
            7e-5,
            4e-3,
            4e-3,
            7e-5,
        )
        assert m.temperature == 0.5 and m.strides == [8]
        # the official 1x1 adaptation conv exists even with equal channels
        assert isinstance(m.adapter.convs["8"], torch.nn.Conv2d)
    torch.manual_seed(0)
    keys = ("MASK_WEIGHT", "CHANNEL_WEIGHT", "SPATIAL_WEIGHT", "NONLOCAL_WEIGHT")
    m1 = build("FBKD", "one_stage", **{k: 1.0 for k in keys})
    m2 = build("FBKD", "one_stage", **{k: 2.0 for k in keys})
    m2.load_state_dict(m1.state_dict())
    s, t = make_pair("one_stage")
    l1, l2 = m1(s, t), m2(s, t)
    for k in l1:
        torch.testing.assert_close(l2[k], 2.0 * l1[k], rtol=1e-5, atol=1e-8)
    assert build("FBKD", "one_stage", STRIDES=[16]).strides == [16]
    with pytest.raises(ValueError):
        build("FBKD", "one_stage", TEMPERATURE=0.0)


# --------------------------------------------------------------------------------------------
# both: AMP, registry, end to end
# --------------------------------------------------------------------------------------------


def test_registry_and_autocast():
    assert KD_METHOD_REGISTRY.get("FGD") is FGD and KD_METHOD_REGISTRY.get("FBKD") is FBKD
    for name in ("FGD", "FBKD"):
        m = build(name, "two_stage")
        s, t = make_pair("two_stage")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = m(s, t)
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("arch", ["FasterRCNN", "RetinaNet", "FCOS"])
def test_fgd_fbkd_train_one_step_end_to_end(tmp_path, arch):
    torch.manual_seed(0)
    cfg = kd_cfg(tmp_path, arch, ["FGD", "FBKD"])
    model = build_detector(cfg).train()
    teacher = model.teacher
    t_before = copy.deepcopy(teacher.state_dict())
    fgd = model.kd_methods["FGD"]
    assert len(fgd.strides) == (4 if arch == "FasterRCNN" else 5)
    kd_params = dict(model.kd_methods.named_parameters())
    before = {k: v.detach().clone() for k, v in kd_params.items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    images, targets = batch(arch, with_empty=True)
    losses = model(images, targets)
    kd_keys = {k for k in losses if k.startswith("loss_kd_")}
    assert {"loss_kd_fgd_global", "loss_kd_fbkd_nonlocal"} <= kd_keys and len(kd_keys) == 8
    assert all(torch.isfinite(v) for v in losses.values())
    family = {"FasterRCNN": "faster_rcnn", "RetinaNet": "retinanet", "FCOS": "fcos"}[arch]
    assert fgd.family == family
    assert fgd.resolved()[-1] == (0.8 if arch == "FCOS" else 0.5)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in kd_params.values())
    opt.step()
    # the GC / non-local blocks of the teacher side train; the teacher itself does not
    assert not torch.equal(
        kd_params["FGD.teacher_gc.16.transform.3.bias"],
        before["FGD.teacher_gc.16.transform.3.bias"],
    )
    assert not torch.equal(
        kd_params["FBKD.teacher_nonlocal.16.norm.bias"],
        before["FBKD.teacher_nonlocal.16.norm.bias"],
    )
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, t_before[k], rtol=0, atol=0)
