"""Tests of the baseline distillation losses: Hinton KD, FitNets, FGFI and DeFeat.

Expected values are derived by hand (closed forms in the comments) or with independent numpy
arithmetic, never by calling the code under test. Records are tiny: 2 images of 128x128,
C_s = 4 student / C_t = 6 teacher channels, K = 3 classes, A = 2 anchors per location.
"""

from __future__ import annotations

import ast
import math
import pathlib

import numpy as np
import pytest
import torch

from kd2.losses import (
    FGFI,
    KD_METHOD_REGISTRY,
    TEACHER_PARTS,
    DeFeat,
    FitNet,
    Hinton,
    assign_fpn_levels,
    binary_kl_div_with_logits,
    defeat_gt_masks,
    defeat_head_loss,
    defeat_neck_loss,
    fgfi_imitation_mask,
    fgfi_loss,
    fitnet_loss,
    hinton_dense_loss,
    hinton_roi_loss,
)
from kd2.structures import DenseOutputs, RoiOutputs, StepRecord
from tests.helpers import method_node

C_S, C_T, K, A, IMG, N = 4, 6, 3, 2, 128, 2
TWO_STAGE_STRIDES = [4, 8, 16, 32, 64]
ONE_STAGE_STRIDES = [8, 16, 32, 64, 128]
DEFAULT_GT = [
    # image 0: one small box (level 0) and one large box (sqrt(121 * 121) >= 112 -> level 1)
    (torch.tensor([[4.0, 4.0, 40.0, 30.0], [0.0, 0.0, 120.0, 120.0]]), torch.tensor([0, 2])),
    # image 1: no GT at all
    (torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.long)),
]


# --------------------------------------------------------------------------------------------
# record builders
# --------------------------------------------------------------------------------------------


def _grid(stride: int) -> tuple[int, int]:
    n = math.ceil(IMG / stride)
    return n, n


def _anchors(stride: int, grid: tuple[int, int]) -> torch.Tensor:
    """(H * W * A, 4) square anchors of sides 2s and 4s, location-major, anchor index fastest."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cx = (xs.reshape(-1).float() + 0.5) * stride
    cy = (ys.reshape(-1).float() + 0.5) * stride
    half = torch.tensor([1.0, 2.0]) * stride  # (A,)
    boxes = torch.stack(
        [
            cx[:, None] - half[None],
            cy[:, None] - half[None],
            cx[:, None] + half[None],
            cy[:, None] + half[None],
        ],
        dim=-1,
    )  # (H * W, A, 4)
    return boxes.reshape(-1, 4)


def _dense(strides, num_classes, gen, requires_grad, labels) -> DenseOutputs:
    grids = [_grid(s) for s in strides]
    sizes = [h * w * A for h, w in grids]
    return DenseOutputs(
        cls_logits=[
            torch.randn(N, r, num_classes, generator=gen).requires_grad_(requires_grad)
            for r in sizes
        ],
        box_deltas=[
            torch.randn(N, r, 4, generator=gen).requires_grad_(requires_grad) for r in sizes
        ],
        anchors=[_anchors(s, g) for s, g in zip(strides, grids)],
        strides=list(strides),
        num_anchors_per_loc=A,
        num_classes=num_classes,
        grid_sizes=grids,
        labels=labels,
    )


def _dense_labels(strides, num_classes, gen, gt) -> torch.Tensor:
    """(N, sum R) random labels in {-1, 0..K}; all background for an image without GT."""
    total = sum(_grid(s)[0] * _grid(s)[1] * A for s in strides)
    labels = torch.randint(-1, num_classes + 1, (N, total), generator=gen)
    for i, (boxes, _) in enumerate(gt):
        if boxes.shape[0] == 0:
            labels[i] = num_classes
    return labels


def make_pair(arch: str, gt=None, seed: int = 0) -> tuple[StepRecord, StepRecord]:
    """A (student, teacher) pair of records; only the student's tensors require grad."""
    gt = DEFAULT_GT if gt is None else gt
    gen = torch.Generator().manual_seed(seed)
    strides = TWO_STAGE_STRIDES if arch == "two_stage" else ONE_STAGE_STRIDES
    records = []
    for is_student in (True, False):
        ch = C_S if is_student else C_T
        feats = {
            s: torch.randn(N, ch, *_grid(s), generator=gen).requires_grad_(is_student)
            for s in strides
        }
        rec = StepRecord(
            images=torch.zeros(N, 3, IMG, IMG),
            image_sizes=[(IMG, IMG)] * N,
            gt_boxes=[b for b, _ in gt],
            gt_labels=[lab for _, lab in gt],
            features=feats,
            num_classes=K,
        )
        if arch == "two_stage":
            rec.rpn = _dense(strides, 1, gen, is_student, None)
            roi_labels = [
                torch.tensor([0, 2, K, K]) if b.shape[0] else torch.full((4,), K) for b, _ in gt
            ]
            m = 4 * N
            rec.roi = RoiOutputs(
                proposals=[torch.tensor([[0.0, 0.0, 32.0, 32.0]]).repeat(4, 1) for _ in gt],
                labels=roi_labels,
                matched_gt_boxes=[torch.zeros(4, 4) for _ in gt],
                roi_features=torch.randn(m, ch, 2, 2, generator=gen),
                box_head_features=torch.randn(m, 8, generator=gen),
                cls_logits=torch.randn(m, K + 1, generator=gen).requires_grad_(is_student),
                box_deltas=torch.randn(m, K, 4, generator=gen),
            )
        else:
            labels = _dense_labels(strides, K, gen, gt) if is_student else None
            rec.dense = _dense(strides, K, gen, is_student, labels)
        records.append(rec)
    return records[0], records[1]


def build(name: str, arch: str, **overrides):
    """Build a registered method from its schema node with ``overrides``."""
    node = method_node(name, **overrides)
    strides = TWO_STAGE_STRIDES if arch == "two_stage" else ONE_STAGE_STRIDES
    return KD_METHOD_REGISTRY.get(name).from_config(
        node,
        student_channels={s: C_S for s in strides},
        teacher_channels={s: C_T for s in strides},
        num_classes=K,
        arch=arch,
    )


def _check_grads_and_finite(method, student, teacher) -> dict:
    losses = method(student, teacher)
    assert losses and all(k.startswith("loss_kd_") for k in losses)
    for k, v in losses.items():
        assert v.dim() == 0 and v.dtype == torch.float32, k
        assert torch.isfinite(v), k
    total = sum(losses.values())
    total.backward()
    # the teacher never needs gradients
    assert all(not f.requires_grad for f in teacher.features.values())
    return losses


def _weight_scaling(name, arch, base: dict, scaled: dict, factor: float):
    torch.manual_seed(0)
    m1 = build(name, arch, **base)
    m2 = build(name, arch, **scaled)
    m2.load_state_dict(m1.state_dict())
    s, t = make_pair(arch)
    l1, l2 = m1(s, t), m2(s, t)
    assert l1.keys() == l2.keys()
    for k in l1:
        torch.testing.assert_close(l2[k], l1[k] * factor, rtol=1e-5, atol=1e-7)


def _np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------
# package-level checks
# --------------------------------------------------------------------------------------------


def test_registry_and_no_framework_imports():
    for name in ("Hinton", "FitNet", "FGFI", "DeFeat"):
        assert KD_METHOD_REGISTRY.get(name) is not None
    src_dir = pathlib.Path(__file__).resolve().parents[2] / "kd2" / "losses"
    frameworks = ("torchvision", "detectron2", "transformers", "kd2.d2", "kd2.tv", "kd2.hf")
    for path in src_dir.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):  # function-local imports included
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module)
        bad = sorted(
            m for m in imported if m.split(".")[0] in frameworks or m.startswith(frameworks)
        )
        assert not bad, f"{path.name} imports a framework: {bad}"


# --------------------------------------------------------------------------------------------
# Hinton
# --------------------------------------------------------------------------------------------


def test_hinton_roi_hand_computed():
    # ROI 0: teacher z = [2 ln 2, 0, 0] at T = 2 -> p_t = [1/2, 1/4, 1/4]; student uniform 1/3.
    # KL = 1/2 ln(3/2) + 1/2 ln(3/4) = 1/2 ln(9/8); times T^2 = 4 -> 2 ln(9/8).
    # ROI 1: identical logits -> 0. Mean over the 2 ROIs -> ln(9/8).
    s = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5]], requires_grad=True)
    t = torch.tensor([[2 * math.log(2), 0.0, 0.0], [1.0, -1.0, 0.5]])
    loss = hinton_roi_loss(s, t, temperature=2.0)
    assert loss.item() == pytest.approx(math.log(9 / 8), rel=1e-5)
    mean = hinton_roi_loss(s, t, temperature=2.0, class_mean=True)
    assert mean.item() == pytest.approx(math.log(9 / 8) / 3, rel=1e-5)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_hinton_roi_random_vs_numpy():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    temp = 1.5
    ps, pt = _np_softmax(s.numpy() / temp), _np_softmax(t.numpy() / temp)
    expected = temp**2 * np.mean(np.sum(pt * np.log(pt / ps), axis=1))
    assert hinton_roi_loss(s, t, temp).item() == pytest.approx(float(expected), rel=1e-5)


def test_hinton_roi_no_rois_is_zero_with_graph():
    s = torch.zeros((0, K + 1), requires_grad=True)
    loss = hinton_roi_loss(s, torch.zeros((0, K + 1)))
    assert loss.item() == 0.0 and loss.requires_grad


def test_binary_kl_hand_computed():
    # p_t = sigma(0) = 1/2, p_s = sigma(ln 3) = 3/4:
    # KL = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(4/3).
    v = binary_kl_div_with_logits(torch.tensor([math.log(3)]), torch.tensor([0.0]), 1.0)
    assert v.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)
    # extreme logits stay finite
    big = binary_kl_div_with_logits(torch.tensor([-80.0, 80.0]), torch.tensor([80.0, -80.0]))
    assert torch.isfinite(big).all()


def test_hinton_dense_hand_computed():
    # N = 1, one level with R = 3 anchors, K = 2 classes, T = 2.
    # student logits 2 ln 3 (-> ln 3 after /T), teacher 0: each element 1/2 ln(4/3) * T^2.
    # labels [0 (fg), 2 (bg), -1 (ignored)]: 2 valid anchors x 2 classes = 4 elements, 1 fg.
    s = torch.full((1, 3, 2), 2 * math.log(3), requires_grad=True)
    t = torch.zeros((1, 3, 2))
    t[0, 2] = 50.0  # the ignored anchor must not contribute
    labels = torch.tensor([[0, 2, -1]])
    expected = 4 * 4 * 0.5 * math.log(4 / 3)
    loss = hinton_dense_loss([s], [t], labels, num_classes=2, temperature=2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    mean = hinton_dense_loss([s], [t], labels, num_classes=2, temperature=2.0, class_mean=True)
    assert mean.item() == pytest.approx(expected / 2, rel=1e-5)
    # split over two levels gives the same value
    two = hinton_dense_loss([s[:, :1], s[:, 1:]], [t[:, :1], t[:, 1:]], labels, 2, 2.0)
    assert two.item() == pytest.approx(expected, rel=1e-5)
    # no foreground: normaliser floored at 1, finite
    bg = hinton_dense_loss([s], [t], torch.tensor([[2, 2, -1]]), 2, 2.0)
    assert bg.item() == pytest.approx(expected, rel=1e-5)
    # everything ignored: 0 with a graph
    ign = hinton_dense_loss([s], [t], torch.full((1, 3), -1), 2, 2.0)
    assert ign.item() == 0.0 and ign.requires_grad


@pytest.mark.parametrize("arch", ["two_stage", "one_stage"])
def test_hinton_method(arch):
    m = build("Hinton", arch)
    head = "roi" if arch == "two_stage" else "dense"
    assert m.teacher_parts == frozenset({head}) and m.teacher_parts <= TEACHER_PARTS
    s, t = make_pair(arch)
    losses = _check_grads_and_finite(m, s, t)
    assert set(losses) == {f"loss_kd_hinton_{head}"}
    if arch == "two_stage":
        assert s.roi.cls_logits.grad.abs().sum() > 0
    else:
        assert sum(x.grad.abs().sum() for x in s.dense.cls_logits) > 0
    _weight_scaling("Hinton", arch, {"WEIGHT": 1.0}, {"WEIGHT": 2.5}, 2.5)


def test_hinton_config_and_no_gt():
    m = Hinton.from_config(
        method_node("Hinton", HEAD="dense", TEMPERATURE=1.0),
        student_channels={},
        teacher_channels={},
        num_classes=K,
        arch="two_stage",
    )
    assert m.head == "dense" and m.temperature == 1.0 and m.weight == 1.0
    with pytest.raises(ValueError):
        build("Hinton", "two_stage", HEAD="box")
    empty = [DEFAULT_GT[1], DEFAULT_GT[1]]
    for arch in ("two_stage", "one_stage"):
        s, t = make_pair(arch, gt=empty)
        _check_grads_and_finite(build("Hinton", arch), s, t)


# --------------------------------------------------------------------------------------------
# FitNet
# --------------------------------------------------------------------------------------------


def test_fitnet_hand_computed():
    # level a: (1,1,2,2) ones vs zeros -> 1/2 * mean(1) = 0.5
    # level b: (1,2,1,1) twos vs zeros -> 1/2 * mean(4) = 2.0; summed -> 2.5
    a = torch.ones(1, 1, 2, 2, requires_grad=True)
    b = torch.full((1, 2, 1, 1), 2.0, requires_grad=True)
    loss = fitnet_loss([a, b], [torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 1, 1)])
    assert loss.item() == pytest.approx(2.5)
    loss.backward()
    # d/ds 0.5 * mean((s - t)^2) = (s - t) / numel
    torch.testing.assert_close(a.grad, torch.full_like(a, 0.25))


def test_fitnet_identity_adapter_matches_numpy():
    strides = [8, 16]
    m = FitNet({s: C_S for s in strides}, {s: C_S for s in strides}, weight=3.0, adapter_kernel=1)
    with torch.no_grad():
        for conv in m.adapter.convs.values():
            conv.weight.copy_(torch.eye(C_S)[:, :, None, None])
            conv.bias.zero_()
    s, t = make_pair("one_stage")
    t.features = {k: v[:, :C_S] for k, v in t.features.items()}
    expected = sum(
        0.5 * np.mean((s.features[k].detach().numpy() - t.features[k].numpy()) ** 2)
        for k in strides
    )
    out = m(s, t)["loss_kd_fitnet"]
    assert out.item() == pytest.approx(3.0 * float(expected), rel=1e-5)


@pytest.mark.parametrize("arch", ["two_stage", "one_stage"])
def test_fitnet_method(arch):
    m = build("FitNet", arch)
    assert m.teacher_parts == frozenset({"features"})
    s, t = make_pair(arch)
    losses = _check_grads_and_finite(m, s, t)
    assert set(losses) == {"loss_kd_fitnet"}
    assert all(f.grad is not None for f in s.features.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.adapter.parameters())
    _weight_scaling("FitNet", arch, {"WEIGHT": 1.0}, {"WEIGHT": 4.0}, 4.0)


# --------------------------------------------------------------------------------------------
# FGFI
# --------------------------------------------------------------------------------------------


def _fgfi_toy_anchors():
    """Level 1: stride 16, 2x2 grid, A = 2 anchors of sides 16 and 32 at the cell centres.
    Level 2: stride 32, 1x1 grid, sides 32 and 64 centred at (16, 16)."""
    l1 = []
    for cy, cx in [(8, 8), (8, 24), (24, 8), (24, 24)]:  # (y, x) location-major
        for half in (8, 16):
            l1.append([cx - half, cy - half, cx + half, cy + half])
    l2 = [[0, 0, 32, 32], [-16, -16, 48, 48]]
    return [torch.tensor(l1, dtype=torch.float), torch.tensor(l2, dtype=torch.float)]


def test_fgfi_mask_hand_drawn():
    """DeFeat's ``get_roi_mask``: each GT on its 56-px level only, the best IoU over that level's
    anchors. Every toy GT but the last is small (sqrt((w+1)(h+1)) < 112): the first level."""
    anchors = _fgfi_toy_anchors()
    gts = [
        # image 0: on level 1 the large anchors of all four locations reach IoU 576/1472 = 0.39
        # (the level's max; threshold 0.196) and the small ones 0.25 -> every location. Level 2
        # holds the exact anchor [0,0,32,32] (IoU 1) but the GT is not assigned there: nothing.
        # (The old global maximum, 1, set the threshold to 0.5: level 2 only, no level-1 cell.)
        torch.tensor([[0.0, 0.0, 32.0, 32.0]]),
        # image 1: wide box; small anchors at (0,0) and (0,1) have IoU 0.5 (the level's max), the
        # large ones 0.33, threshold 0.25 -> top row; level 2: nothing.
        torch.tensor([[0.0, 0.0, 32.0, 16.0]]),
        # image 2: exactly the small anchor of location (y=1, x=0); nothing else above 0.5.
        torch.tensor([[0.0, 16.0, 16.0, 32.0]]),
        # image 3: no GT.
        torch.zeros((0, 4)),
    ]
    m1, m2 = fgfi_imitation_mask(anchors, [(2, 2), (1, 1)], 2, gts, psi=0.5)
    assert m1.dtype == torch.bool and m1.shape == (4, 2, 2) and m2.shape == (4, 1, 1)
    exp1 = torch.tensor(
        [[[1, 1], [1, 1]], [[1, 1], [0, 0]], [[0, 0], [1, 0]], [[0, 0], [0, 0]]], dtype=torch.bool
    )
    assert torch.equal(m1, exp1) and not m2.any()
    # psi = 0.7 lifts image 0's threshold to 0.27 > 0.25: the small anchors drop out, the large
    # ones (0.39) stay -> still every location
    m1b, _ = fgfi_imitation_mask(anchors, [(2, 2), (1, 1)], 2, gts[:1], psi=0.7)
    assert m1b.all()
    # two GTs in one image: the union of the individual masks
    both = torch.cat([gts[1], gts[2]])
    u1, u2 = fgfi_imitation_mask(anchors, [(2, 2), (1, 1)], 2, [both], psi=0.5)
    assert torch.equal(u1[0], exp1[1] | exp1[2]) and not u2.any()
    # a 120-px GT, sqrt(121 * 121) >= 112: level 2, whose best anchor [-16,-16,48,48] has IoU
    # 48*48 / (64*64 + 120*120 - 48*48) = 2304/16192 = 0.142 -> marked; level 1: nothing
    big = torch.tensor([[0.0, 0.0, 120.0, 120.0]])
    b1, b2 = fgfi_imitation_mask(anchors, [(2, 2), (1, 1)], 2, [big], psi=0.5)
    assert not b1.any() and b2.all()


def _np_iou(anchors: torch.Tensor, box) -> np.ndarray:
    """(R,) IoU of XYXY anchors with one box, areas (x2 - x1)(y2 - y1), in float64."""
    a = anchors.numpy().astype(np.float64)
    g = np.asarray(box, dtype=np.float64)
    iw = np.clip(np.minimum(a[:, 2], g[2]) - np.maximum(a[:, 0], g[0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], g[3]) - np.maximum(a[:, 1], g[1]), 0, None)
    inter = iw * ih
    area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    return inter / (area + (g[2] - g[0]) * (g[3] - g[1]) - inter)


def test_fgfi_mask_150px_box_on_its_56px_level_only():
    """The old rule (one maximum over all levels) and the port's (the GT's 56-px level) give
    disjoint masks for a 150-px box with the test anchors (sides 2s and 4s, strides 8..128)."""
    img = 256
    grids = [(math.ceil(img / s),) * 2 for s in ONE_STAGE_STRIDES]
    anchors = [_anchors(s, g) for s, g in zip(ONE_STAGE_STRIDES, grids)]
    box = [40.0, 40.0, 190.0, 190.0]  # sqrt(151 * 151) = 151 -> level 1 (stride 16)
    new = fgfi_imitation_mask(anchors, grids, A, [torch.tensor([box])], psi=0.5)
    ious = [_np_iou(a, box) for a in anchors]
    # the port: threshold = 0.5 * the best stride-16 IoU, a 64-px anchor inside the box
    assert ious[1].max() == pytest.approx(64 * 64 / (150 * 150))
    want16 = (ious[1] > 0.5 * ious[1].max()).reshape(*grids[1], A).any(-1)
    assert np.array_equal(new[1][0].numpy(), want16) and want16.sum() > 0
    assert all(not new[lvl].any() for lvl in (0, 2, 3, 4))
    # the old rule: the best IoU over every level is a 128-px anchor's (128^2 / 150^2 = 0.73),
    # so no 64-px anchor (0.18 < 0.36) qualified: the old mask had no stride-16 cell at all
    top = max(float(x.max()) for x in ious)
    assert top == pytest.approx(128 * 128 / (150 * 150))
    old = [(x > 0.5 * top).reshape(*g, A).any(-1) for x, g in zip(ious, grids)]
    assert not old[1].any() and (old[2].any() or old[3].any())
    assert not any((o & n[0].numpy()).any() for o, n in zip(old, new))


def test_fgfi_loss_hand_computed():
    """DeFeat ``batch_processor_kd`` (pixel-wise): per level Σ M·d / max(1, 2·C·Σ M), mean over
    levels (an empty level counts, with 0)."""
    # level a: (1,2,2,2) of ones, (0,0) = [1, 2]; mask (0,0) and (0,1): (1 + 4) + (1 + 1) = 7,
    #   normaliser 2 * C * Σ M = 2 * 2 * 2 = 8 -> 0.875
    # level b: (1,2,1,1) value [3, 0] masked -> 9 / (2 * 2 * 1) = 2.25
    # level c: nothing masked -> 0 / max(1, 0) = 0
    # mean: (0.875 + 2.25 + 0) / 3 = 1.0417  (the old joint 1/(2 N_p): (7 + 9) / 6 = 2.667)
    a = torch.ones(1, 2, 2, 2)
    a[0, :, 0, 0] = torch.tensor([1.0, 2.0])
    a.requires_grad_(True)
    b = torch.tensor([3.0, 0.0]).view(1, 2, 1, 1).requires_grad_(True)
    c = torch.ones(1, 2, 1, 1, requires_grad=True)
    ma = torch.tensor([[[True, True], [False, False]]])
    mb = torch.tensor([[[True]]])
    mc = torch.tensor([[[False]]])
    zeros = [torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)]
    loss = fgfi_loss([a, b, c], zeros, [ma, mb, mc])
    assert loss.item() == pytest.approx((0.875 + 2.25 + 0.0) / 3)
    assert fgfi_loss([a, b], zeros[:2], [ma, mb]).item() == pytest.approx((0.875 + 2.25) / 2)
    loss.backward()
    assert a.grad[0, :, 1, 1].abs().sum() == 0 and c.grad.abs().sum() == 0
    # d/da(0,0) = 2 a / 8 / 3
    torch.testing.assert_close(a.grad[0, :, 0, 0], torch.tensor([2.0, 4.0]) / 8 / 3)
    # empty masks: 0 with a graph
    z = fgfi_loss([a], [torch.zeros(1, 2, 2, 2)], [torch.zeros(1, 2, 2, dtype=torch.bool)])
    assert z.item() == 0.0 and z.requires_grad


@pytest.mark.parametrize("arch", ["two_stage", "one_stage"])
def test_fgfi_method(arch):
    m = build("FGFI", arch)
    assert m.teacher_parts == frozenset({"features"})
    assert m.weight == 3.0 and m.psi == 0.5  # DeFeat's FGFI config: hint_neck_w = 3
    s, t = make_pair(arch)
    losses = _check_grads_and_finite(m, s, t)
    assert set(losses) == {"loss_kd_fgfi"} and losses["loss_kd_fgfi"].item() > 0
    # every adapter gets a gradient; levels without any positive location get zeros
    assert all(p.grad is not None for p in m.adapter.parameters())
    assert sum(p.grad.abs().sum() for p in m.adapter.parameters()) > 0
    # the image without GT gets no gradient through the mask
    assert all(f.grad[1].abs().sum() == 0 for f in s.features.values())
    assert sum(f.grad[0].abs().sum() for f in s.features.values()) > 0
    _weight_scaling("FGFI", arch, {"WEIGHT": 0.01}, {"WEIGHT": 0.03}, 3.0)
    # no GT in the whole batch: finite zero
    s, t = make_pair(arch, gt=[DEFAULT_GT[1], DEFAULT_GT[1]])
    assert _check_grads_and_finite(m, s, t)["loss_kd_fgfi"].item() == 0.0


# --------------------------------------------------------------------------------------------
# DeFeat
# --------------------------------------------------------------------------------------------


def test_defeat_level_assignment_boundaries():
    def box(w1: float, h1: float) -> list[float]:  # (w + 1, h + 1) -> XYXY box
        return [10.0, 20.0, 10.0 + w1 - 1, 20.0 + h1 - 1]

    cases = [
        (box(20, 20), 0),
        (box(111.9, 111.9), 0),
        (box(112, 112), 1),  # exactly 2 * 56
        (box(56, 224), 1),  # sqrt(56 * 224) = 112
        (box(223.9, 223.9), 1),
        (box(224, 224), 2),
        (box(447.9, 447.9), 2),
        (box(448, 448), 3),
        (box(895.9, 895.9), 3),
        (box(896, 896), 4),
        (box(3000, 3000), 4),  # clamped to the last level
    ]
    boxes = torch.tensor([b for b, _ in cases])
    assert assign_fpn_levels(boxes, 5).tolist() == [lvl for _, lvl in cases]
    assert assign_fpn_levels(boxes, 3).tolist() == [min(lvl, 2) for _, lvl in cases]
    # mmdet's SingleRoIExtractor variant without the +1
    assert (
        assign_fpn_levels(torch.tensor([[0.0, 0.0, 112.0, 112.0]]), 4, plus_one=False).item() == 1
    )
    assert (
        assign_fpn_levels(torch.tensor([[0.0, 0.0, 111.0, 111.0]]), 4, plus_one=False).item() == 0
    )


def test_defeat_gt_masks_hand_drawn():
    strides, grids = [8, 16], [(16, 16), (8, 8)]
    gts = [
        torch.tensor(
            [
                [8.0, 8.0, 40.0, 24.0],  # level 0: cols [1, 5), rows [1, 3)
                [30.0, 30.0, 31.0, 31.0],  # level 0, tiny: single cell (3, 3)
                [40.0, 0.0, 41.0, 100.0],  # level 0, thin: col 5, rows [0, 12)
                [0.0, 0.0, 111.0, 111.0],  # (112 * 112) -> level 1: rows/cols [0, 6) at s=16
            ]
        ),
        torch.zeros((0, 4)),
    ]
    m0, m1 = defeat_gt_masks(gts, strides, grids)
    e0 = torch.zeros(2, 16, 16, dtype=torch.bool)
    e0[0, 1:3, 1:5] = True
    e0[0, 3, 3] = True
    e0[0, 0:12, 5] = True
    e1 = torch.zeros(2, 8, 8, dtype=torch.bool)
    e1[0, 0:6, 0:6] = True
    assert torch.equal(m0, e0) and torch.equal(m1, e1)
    # a box in the last cell of the grid still marks that cell (start clamped to W - 1)
    (edge,) = defeat_gt_masks([torch.tensor([[127.5, 127.5, 128.0, 128.0]])], [8], [(16, 16)])
    assert edge[0, 15, 15] and edge.sum() == 1


def test_defeat_neck_loss_hand_computed():
    # level a: C = 2, mask only (0,0) where s = [1, 2]: fg = 5 / (2 * 2 * 1) = 1.25;
    #          the 3 other cells are all ones: bg = 6 / (2 * 2 * 3) = 0.5
    # level b: C = 2, one unmasked cell s = [2, 2]: fg = 0 / max(1, 0) = 0, bg = 8 / 4 = 2
    # averaged over 2 levels: fg = 0.625, bg = 1.25
    a = torch.ones(1, 2, 2, 2)
    a[0, :, 0, 0] = torch.tensor([1.0, 2.0])
    a.requires_grad_(True)
    b = torch.full((1, 2, 1, 1), 2.0, requires_grad=True)
    ma = torch.tensor([[[True, False], [False, False]]])
    mb = torch.tensor([[[False]]])
    fg, bg = defeat_neck_loss([a, b], [torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 1, 1)], [ma, mb])
    assert fg.item() == pytest.approx(0.625) and bg.item() == pytest.approx(1.25)
    (fg + bg).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_defeat_head_loss_hand_computed():
    # K = 2 (3 logits). ROI 0 (pos): teacher [ln 2, 0, 0] vs uniform at T = 1 -> 1/2 ln(9/8).
    # ROI 1 (pos): identical -> 0. pos = (1/2 ln(9/8) + 0) / 2.
    # ROI 2 (neg, label K): teacher [0, 0, 2 ln 2] vs uniform at T = 2 -> 4 * 1/2 ln(9/8).
    s = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.1, -0.2], [0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[math.log(2), 0.0, 0.0], [0.3, 0.1, -0.2], [0.0, 0.0, 2 * math.log(2)]])
    labels = torch.tensor([0, 1, 2])
    pos, neg = defeat_head_loss(s, t, labels, num_classes=2, t_pos=1.0, t_neg=2.0)
    assert pos.item() == pytest.approx(0.25 * math.log(9 / 8), rel=1e-5)
    assert neg.item() == pytest.approx(2 * math.log(9 / 8), rel=1e-5)
    # no negatives: 0 with a graph
    pos2, neg2 = defeat_head_loss(s[:2], t[:2], labels[:2], 2)
    assert neg2.item() == 0.0 and neg2.requires_grad and torch.isfinite(pos2)


@pytest.mark.parametrize("arch", ["two_stage", "one_stage"])
def test_defeat_method(arch):
    m = build("DeFeat", arch)
    s, t = make_pair(arch)
    losses = _check_grads_and_finite(m, s, t)
    neck = {"loss_kd_defeat_fg", "loss_kd_defeat_bg"}
    if arch == "two_stage":
        assert m.teacher_parts == frozenset({"features", "roi"})
        assert set(losses) == neck | {"loss_kd_defeat_head_pos", "loss_kd_defeat_head_neg"}
        assert s.roi.cls_logits.grad.abs().sum() > 0
    else:
        assert m.teacher_parts == frozenset({"features"})
        assert set(losses) == neck
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.adapter.parameters())
    assert all(f.grad is not None for f in s.features.values())
    keys = ("NECK_FG_WEIGHT", "NECK_BG_WEIGHT", "HEAD_POS_WEIGHT", "HEAD_NEG_WEIGHT")
    base = {k: 1.0 for k in keys}
    _weight_scaling("DeFeat", arch, base, {k: 2.0 for k in base}, 2.0)
    # no GT in the whole batch (and only background ROIs): finite
    s, t = make_pair(arch, gt=[DEFAULT_GT[1], DEFAULT_GT[1]])
    losses = _check_grads_and_finite(m, s, t)
    assert losses["loss_kd_defeat_fg"].item() == 0.0
    if arch == "two_stage":
        assert losses["loss_kd_defeat_head_pos"].item() == 0.0


def test_defeat_head_disabled_and_amp():
    m = DeFeat(
        {s: C_S for s in TWO_STAGE_STRIDES},
        {s: C_T for s in TWO_STAGE_STRIDES},
        head_pos_weight=0.0,
        head_neg_weight=0.0,
    )
    assert m.teacher_parts == frozenset({"features"})
    s, t = make_pair("two_stage")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = m(s, t)
    assert set(losses) == {"loss_kd_defeat_fg", "loss_kd_defeat_bg"}
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_fgfi_rejects_mismatched_psi():
    with pytest.raises(ValueError):
        FGFI({8: 4}, {8: 4}, psi=1.5)
