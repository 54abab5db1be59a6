"""Tests of Rank Mimicking (RM) and Prediction-guided Feature Imitation (PFI).

Expected values are derived by hand (closed forms in the comments) or with independent
per-object / per-location numpy loops, never by calling the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd2.config.defaults import _C
from kd2.losses import KD_METHOD_REGISTRY, PFI, RM, pfi_loss, rank_mimicking_loss
from kd2.structures import DenseOutputs, StepRecord
from tests.helpers import method_node
from tests.losses.test_baselines import C_S, C_T, ONE_STAGE_STRIDES, make_pair

# KL([3/4, 1/4] ‖ [1/2, 1/2]) = 3/4 ln(3/2) + 1/4 ln(1/2)
KL_A = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
# KL([1/3, 1/3, 1/3] ‖ [1/2, 1/4, 1/4]) = 1/3 ln(2/3) + 2/3 ln(4/3)
KL_B = math.log(2 / 3) / 3 + 2 * math.log(4 / 3) / 3
# KL([1/2, 1/2] ‖ [2/3, 1/3]) = 1/2 ln(3/4) + 1/2 ln(3/2) = 1/2 ln(9/8)
KL_C = 0.5 * math.log(9 / 8)


def _np_rm(s, t, obj, img, temp=1.0) -> float:
    """Reference: explicit loops over images and objects."""
    per_img = []
    for i in sorted(set(img.tolist())):
        kls = []
        for g in sorted(set(obj[img == i].tolist())):
            m = obj == g
            zs, zt = s[m] / temp, t[m] / temp
            ps = np.exp(zs - zs.max()) / np.exp(zs - zs.max()).sum()
            pt = np.exp(zt - zt.max()) / np.exp(zt - zt.max()).sum()
            kls.append(float(np.sum(pt * np.log(pt / ps))))
        per_img.append(np.mean(kls))
    return float(np.mean(per_img))


# --------------------------------------------------------------------------------------------
# rank_mimicking_loss
# --------------------------------------------------------------------------------------------


def test_rm_hand_computed_two_images_interleaved_ids():
    # image 4: object 7 (teacher [ln 3, 0], student [0, 0]) -> KL_A,
    #          object 3 (teacher [0, 0, 0], student [ln 2, 0, 0]) -> KL_B;
    # image 9: object 11 with a single anchor -> KL 0. (An image without objects has no
    # anchors here and must not count.) Expected: ((KL_A + KL_B) / 2 + 0) / 2.
    s = torch.tensor([0.0, math.log(2), 5.0, 0.0, 0.0, 0.0], requires_grad=True)
    t = torch.tensor([math.log(3), 0.0, -2.0, 0.0, 0.0, 0.0], requires_grad=True)
    obj = torch.tensor([7, 3, 11, 7, 3, 3])
    img = torch.tensor([4, 4, 9, 4, 4, 4])
    loss = rank_mimicking_loss(s, t, obj, img)
    expected = ((KL_A + KL_B) / 2 + 0.0) / 2
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None  # the teacher is a constant
    # the single-anchor object gets no gradient (its softmax is identically 1)
    assert s.grad[2].item() == pytest.approx(0.0, abs=1e-7)


def test_rm_temperature():
    # T = 2 with teacher [2 ln 3, 0] and student [0, 0] gives the KL_A distributions.
    s, t = torch.zeros(2), torch.tensor([2 * math.log(3), 0.0])
    ids = torch.zeros(2, dtype=torch.long)
    assert rank_mimicking_loss(s, t, ids, ids, temperature=2.0).item() == pytest.approx(
        KL_A, rel=1e-5
    )


def test_rm_random_vs_numpy_loops():
    g = torch.Generator().manual_seed(3)
    obj = torch.tensor([0, 1, 0, 2, 2, 1, 0, 3, 3, 3, 4])
    img = torch.tensor([0, 0, 0, 1, 1, 0, 0, 2, 2, 2, 2])
    s = torch.randn(obj.numel(), generator=g) * 3
    t = torch.randn(obj.numel(), generator=g) * 3
    exp = _np_rm(s.double().numpy(), t.double().numpy(), obj.numpy(), img.numpy(), temp=1.5)
    got = rank_mimicking_loss(s, t, obj, img, temperature=1.5).item()
    assert got == pytest.approx(exp, rel=1e-4)


def test_rm_no_positives_is_finite_zero():
    s = torch.zeros(0, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    loss = rank_mimicking_loss(s, torch.zeros(0), empty, empty)
    assert torch.isfinite(loss) and loss.item() == 0.0 and loss.requires_grad
    loss.backward()


def test_rm_keeps_anchor_correspondence():
    s = torch.tensor([2.0, -1.0, 0.5])
    t = torch.tensor([-1.0, 0.0, 3.0])
    ids = torch.zeros(3, dtype=torch.long)
    base = rank_mimicking_loss(s, t, ids, ids).item()
    perm = torch.tensor([2, 0, 1])
    both = rank_mimicking_loss(s[perm], t[perm], ids, ids).item()
    only_student = rank_mimicking_loss(s[perm], t, ids, ids).item()
    assert both == pytest.approx(base, rel=1e-6)
    assert abs(only_student - base) > 1e-2
    # sorted profiles would be the same for (s, t) and (s[perm], t): check a sort-free value
    ps = np.exp(s.numpy()) / np.exp(s.numpy()).sum()
    pt = np.exp(t.numpy()) / np.exp(t.numpy()).sum()
    assert base == pytest.approx(float(np.sum(pt * np.log(pt / ps))), rel=1e-5)


def test_rm_rejects_bad_inputs():
    with pytest.raises(ValueError):
        rank_mimicking_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError):
        rank_mimicking_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.0)


# --------------------------------------------------------------------------------------------
# pfi_loss
# --------------------------------------------------------------------------------------------


def _pfi_case():
    # N = 1, C = 2, A*K = 2, H = 1, W = 2.
    # loc 0: D_f = ((1-0)^2 + (3-0)^2) / 2 = 5;  D_p = ((1-0)^2 + (1-3)^2) / 2 = 2.5
    # loc 1: D_f = ((2-2)^2 + (2-0)^2) / 2 = 2;  D_p = ((2-0)^2 + 0) / 2 = 2
    # loss = (2.5 * 5 + 2 * 2) / 2 = 8.25
    sf = torch.tensor([[[[1.0, 2.0]], [[3.0, 2.0]]]], requires_grad=True)
    tf = torch.tensor([[[[0.0, 2.0]], [[0.0, 0.0]]]], requires_grad=True)
    sz = torch.tensor([[[[1.0, 2.0]], [[1.0, 0.0]]]], requires_grad=True)
    tz = torch.tensor([[[[0.0, 0.0]], [[3.0, 0.0]]]], requires_grad=True)
    return sf, tf, sz, tz


def test_pfi_hand_computed_detached():
    sf, tf, sz, tz = _pfi_case()
    loss = pfi_loss(sf, tf, sz, tz)
    assert loss.item() == pytest.approx(8.25, rel=1e-6)
    loss.backward()
    # d/ds_{c,loc} = D_p(loc) * 2 (s - t) / C / (H*W): loc 0 ch 0 -> 2.5 * 2 * 1 / 2 / 2 = 1.25
    assert sf.grad[0, 0, 0, 0].item() == pytest.approx(1.25, rel=1e-6)
    assert sf.grad[0, 1, 0, 0].item() == pytest.approx(3.75, rel=1e-6)
    assert sz.grad is None and tf.grad is None and tz.grad is None


def test_pfi_not_detached_flows_into_logits():
    sf, tf, sz, tz = _pfi_case()
    loss = pfi_loss(sf, tf, sz, tz, detach_prediction=False)
    assert loss.item() == pytest.approx(8.25, rel=1e-6)
    loss.backward()
    # d/dz_{j,loc} = D_f(loc) * 2 (z_s - z_t) / (A*K) / (H*W): loc 0 j 1 -> 5 * 2 * (-2) / 4 = -5
    assert sz.grad[0, 1, 0, 0].item() == pytest.approx(-5.0, rel=1e-6)
    assert sz.grad[0, 0, 0, 1].item() == pytest.approx(2 * 2 * 2 / 4, rel=1e-6)
    assert tf.grad is None and tz.grad is None


def test_pfi_shape_errors():
    with pytest.raises(ValueError):
        pfi_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2), *[torch.zeros(1, 4, 2, 2)] * 2)
    with pytest.raises(ValueError):
        pfi_loss(*[torch.zeros(1, 2, 2, 2)] * 2, *[torch.zeros(1, 4, 3, 2)] * 2)


# --------------------------------------------------------------------------------------------
# methods on hand-built one-stage records
# --------------------------------------------------------------------------------------------

K2 = 2


def _tiny_record(cls_logits, feats, labels=None, boxes=None) -> StepRecord:
    """N = 2 images, one level of stride 8 with a 1x3 grid, A = 1, K = 2."""
    n = cls_logits.shape[0]
    dense = DenseOutputs(
        cls_logits=[cls_logits],
        box_deltas=[torch.zeros(n, 3, 4)],
        anchors=[torch.zeros(3, 4)],
        strides=[8],
        num_anchors_per_loc=1,
        num_classes=K2,
        grid_sizes=[(1, 3)],
        labels=labels,
        matched_gt_boxes=boxes,
    )
    return StepRecord(
        images=torch.zeros(n, 3, 8, 24),
        image_sizes=[(8, 24)] * n,
        gt_boxes=[torch.zeros(0, 4)] * n,
        gt_labels=[torch.zeros(0, dtype=torch.long)] * n,
        features={8: feats},
        num_classes=K2,
        dense=dense,
    )


def _rm_records():
    bx = [0.0, 0.0, 8.0, 8.0]
    bz = [8.0, 0.0, 24.0, 8.0]
    # image 0: anchors 0, 1 -> class 0 of box bx (object A), anchor 2 -> class 1 of bz (single).
    # image 1: anchor 0 ignored, anchors 1, 2 -> class 1 of bx: a different object from image
    # 0's bx because the image differs.
    labels = torch.tensor([[0, 0, 1], [-1, 1, 1]])
    boxes = torch.tensor([[bx, bx, bz], [bz, bx, bx]])
    s = torch.full((2, 3, K2), 50.0)  # off-class entries are large: they must be ignored
    t = torch.full((2, 3, K2), -50.0)
    s[0, 0, 0], s[0, 1, 0], t[0, 0, 0], t[0, 1, 0] = 0.0, 0.0, math.log(3), 0.0  # KL_A
    s[0, 2, 1], t[0, 2, 1] = 1.0, 2.0  # single anchor: KL 0
    s[1, 1, 1], s[1, 2, 1], t[1, 1, 1], t[1, 2, 1] = math.log(2), 0.0, 0.0, 0.0  # KL_C
    s.requires_grad_(True)
    feats = torch.zeros(2, 4, 1, 3)
    student = _tiny_record(s, feats.clone().requires_grad_(True), labels, boxes)
    teacher = _tiny_record(t, feats)
    return student, teacher


def test_rm_method_on_record():
    student, teacher = _rm_records()
    method = KD_METHOD_REGISTRY.get("RM").from_config(
        _C.KD.RM, student_channels={8: 4}, teacher_channels={8: 4}, num_classes=K2, arch="one_stage"
    )
    assert isinstance(method, RM) and method.teacher_parts == frozenset({"dense"})
    losses = method(student, teacher)
    assert set(losses) == {"loss_kd_rm"}
    # image 0: (KL_A + 0) / 2, image 1: KL_C; mean over the 2 images; weight 4.
    expected = 4.0 * ((KL_A + 0.0) / 2 + KL_C) / 2
    assert losses["loss_kd_rm"].item() == pytest.approx(expected, rel=1e-5)
    losses["loss_kd_rm"].backward()
    assert student.dense.cls_logits[0].grad is not None


def test_rm_method_no_positives():
    student, teacher = _rm_records()
    student.dense.labels = torch.tensor([[K2, -1, K2], [K2, K2, K2]])
    loss = RM()(student, teacher)["loss_kd_rm"]
    assert loss.item() == 0.0 and loss.requires_grad


def test_rm_method_random_record_smoke():
    student, teacher = make_pair("one_stage", seed=1)
    labels = student.dense.labels
    gen = torch.Generator().manual_seed(0)
    choices = torch.tensor([[4.0, 4.0, 40.0, 30.0], [0.0, 0.0, 120.0, 120.0]])
    student.dense.matched_gt_boxes = choices[torch.randint(0, 2, labels.shape, generator=gen)]
    loss = RM(weight=1.0)(student, teacher)["loss_kd_rm"]
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()


def _np_pfi_level(sf, tf, sz, tz, a) -> float:
    """numpy reference on (N, R, K) logits with R = H * W * A (location-major, anchor fastest)."""
    n, c, h, w = sf.shape
    total = 0.0
    for i in range(n):
        for y in range(h):
            for x in range(w):
                df = np.mean((sf[i, :, y, x] - tf[i, :, y, x]) ** 2)
                r0 = (y * w + x) * a
                dp = np.mean((sz[i, r0 : r0 + a] - tz[i, r0 : r0 + a]) ** 2)
                total += df * dp
    return total / (n * h * w)


def test_pfi_method_on_records_vs_numpy():
    student, teacher = make_pair("one_stage", seed=2)
    # make the channels equal: the teacher gets student-sized features
    gen = torch.Generator().manual_seed(5)
    teacher.features = {
        s: torch.randn(f[:, :C_S].shape, generator=gen) for s, f in teacher.features.items()
    }
    del teacher.features[128]  # a stride missing from the teacher is skipped
    node = method_node("PFI", WEIGHT=2.0)
    chans = {s: C_S for s in ONE_STAGE_STRIDES}
    method = PFI.from_config(
        node, student_channels=chans, teacher_channels=chans, num_classes=3, arch="one_stage"
    )
    assert method.adapter is None and method.teacher_parts == frozenset({"features", "dense"})
    loss = method(student, teacher)["loss_kd_pfi"]
    sd, td = student.dense, teacher.dense
    vals = []
    for lvl, s in enumerate(ONE_STAGE_STRIDES[:-1]):
        vals.append(
            _np_pfi_level(
                student.features[s].detach().numpy(),
                teacher.features[s].numpy(),
                sd.cls_logits[lvl].detach().numpy(),
                td.cls_logits[lvl].numpy(),
                sd.num_anchors_per_loc,
            )
        )
    assert loss.item() == pytest.approx(2.0 * float(np.mean(vals)), rel=1e-4)
    loss.backward()
    assert student.features[8].grad is not None
    assert sd.cls_logits[0].grad is None  # detached prediction factor by default


def test_pfi_method_adapter_and_errors():
    chans_s = {s: C_S for s in ONE_STAGE_STRIDES}
    chans_t = {s: C_T for s in ONE_STAGE_STRIDES}
    with pytest.raises(ValueError, match="ADAPTER_KERNEL"):
        PFI.from_config(
            method_node("PFI"),
            student_channels=chans_s,
            teacher_channels=chans_t,
            num_classes=3,
            arch="one_stage",
        )
    method = PFI.from_config(
        method_node("PFI", ADAPTER_KERNEL=1, DETACH_PREDICTION=False),
        student_channels=chans_s,
        teacher_channels=chans_t,
        num_classes=3,
        arch="one_stage",
    )
    student, teacher = make_pair("one_stage", seed=3)
    loss = method(student, teacher)["loss_kd_pfi"]
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    loss.backward()
    assert method.adapter.convs["8"].weight.grad is not None
    assert student.dense.cls_logits[0].grad is not None  # DETACH_PREDICTION False


@pytest.mark.parametrize("name", ["RM", "PFI"])
def test_two_stage_raises(name):
    chans = {s: C_S for s in ONE_STAGE_STRIDES}
    with pytest.raises(ValueError, match="one-stage"):
        KD_METHOD_REGISTRY.get(name).from_config(
            getattr(_C.KD, name),
            student_channels=chans,
            teacher_channels=chans,
            num_classes=3,
            arch="two_stage",
        )


def test_defaults():
    assert _C.KD.RM.WEIGHT == 4.0 and _C.KD.RM.TEMPERATURE == 1.0
    assert _C.KD.PFI.WEIGHT == 1.5 and _C.KD.PFI.DETACH_PREDICTION is True
    assert _C.KD.PFI.ADAPTER_KERNEL == 0
