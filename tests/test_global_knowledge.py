"""Global Knowledge distillation: RDM functions on hand-computed cases, the PGM hook, resume."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from kd2.data.synthetic import generate_synthetic_dataset
from kd2.engine import Trainer
from kd2.losses.global_knowledge import (
    global_knowledge_loss,
    robust_decoupled_feature_loss,
    robust_fg_masks,
    robust_soft_label_loss,
    robustness,
    robustness_by_class,
)
from kd2.modeling.prototypes import select_pgm_instances
from kd2.tv.build import build_detector

from .helpers import batch, engine_cfg, kd_cfg, save_teacher

# -- robustness -------------------------------------------------------------------------------


def test_robustness_hand_computed():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    ps = torch.tensor([[1.0, 0.0], [3.0, 3.0]])  # cos to s: row0 -> (1, .7071), row1 -> (0, .7071)
    pt = torch.tensor(
        [[1.0, 0.0], [0.0, -1.0]]
    )  # cos to t: row0 -> (.7071, -.7071), row1 -> (0, -1)
    eta = robustness(s, t, ps, pt)
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(eta, torch.tensor([1 - (1 - r), 1 - (r - 0.0)]))
    assert not eta.requires_grad


def test_robustness_degenerate_inputs_stay_in_unit_interval():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    ps, pt = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    eta = robustness(s, t, ps, pt)
    assert eta.shape == (50,) and bool(((eta >= 0) & (eta <= 1)).all())
    # opposite extremes: q_s = 1, q_t = -1 -> raw 1 - 2 = -1, clamped to 0
    eta = robustness(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]]), torch.eye(2)[:1], torch.eye(2)[:1]
    )
    assert float(eta) == 0.0
    zeros = robustness(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(2, 4))
    torch.testing.assert_close(zeros, torch.ones(3))  # cos 0 in both spaces -> eta 1
    nan = robustness(
        torch.full((2, 4), float("nan")), torch.ones(2, 4), torch.ones(1, 4), torch.ones(1, 4)
    )
    torch.testing.assert_close(nan, torch.zeros(2))
    assert robustness(torch.zeros(0, 4), torch.zeros(0, 4), ps[:, :4], pt[:, :4]).shape == (0,)
    torch.testing.assert_close(
        robustness(s, t, torch.zeros(0, 8), torch.zeros(0, 8)), torch.ones(50)
    )
    with pytest.raises(ValueError, match="instance counts differ"):
        robustness(s, t[:3], ps, pt)


def test_robustness_by_class_matches_per_class_calls():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(20, 6, generator=g), torch.randn(20, 5, generator=g)
    labels = torch.randint(0, 3, (20,), generator=g)
    ps, pt = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 5, generator=g)
    valid = torch.tensor([True, True, False])
    got = robustness_by_class(s, t, labels, ps, pt, valid)
    for c in range(3):
        on = labels == c
        want = robustness(s[on], t[on], ps[c], pt[c]) if valid[c] else torch.ones(int(on.sum()))
        torch.testing.assert_close(got[on], want)


# -- FG map painting --------------------------------------------------------------------------


def test_robust_fg_masks_overwrite_and_single_cell_max():
    boxes = torch.tensor(
        [
            [4.0, 4.0, 16.0, 12.0],  # rows [1, 3), cols [1, 4), eta .5
            [8.0, 8.0, 20.0, 20.0],  # rows [2, 5), cols [2, 5), eta .9 (overwrites)
            [1.0, 1.0, 3.0, 3.0],  # inside cell (0, 0): single cell, max with 0 -> .3
            [5.0, 5.0, 6.0, 6.0],  # inside cell (1, 1) painted .5 earlier: max(.5, .2) = .5
            [17.0, 17.0, 19.0, 19.0],  # inside (4, 4) painted .9: max(.9, .95) = .95
            [0.0, 0.0, 8.0, 8.0],  # image 1: rows [0, 2), cols [0, 2)
        ]
    )
    index = torch.tensor([0, 0, 0, 0, 0, 1])
    eta = torch.tensor([0.5, 0.9, 0.3, 0.2, 0.95, 0.7])
    levels = torch.zeros(6, dtype=torch.long)
    (m,) = robust_fg_masks(boxes, index, levels, eta, [4], [(6, 6)], 2)
    want = torch.zeros(2, 6, 6)
    want[0, 1:3, 1:4] = 0.5
    want[0, 2:5, 2:5] = 0.9
    want[0, 0, 0] = 0.3
    want[0, 4, 4] = 0.95
    want[1, 0:2, 0:2] = 0.7
    torch.testing.assert_close(m, want)


def test_robust_fg_masks_levels_and_empty():
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 16.0, 16.0]])
    masks = robust_fg_masks(
        boxes,
        torch.tensor([0, 0]),
        torch.tensor([1, 0]),
        torch.tensor([0.4, 0.6]),
        [4, 8],
        [(4, 4), (2, 2)],
        1,
    )
    assert float(masks[1].sum()) == pytest.approx(0.4)  # the first box on level 1: one cell
    assert float(masks[0].sum()) == pytest.approx(0.6 * 16)
    empty = robust_fg_masks(
        torch.zeros(0, 4),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0),
        [4],
        [(3, 3)],
        2,
    )
    assert empty[0].shape == (2, 3, 3) and float(empty[0].sum()) == 0


# -- losses -----------------------------------------------------------------------------------


def test_decoupled_feature_loss_hand_computed_and_uniform_eta_invariance():
    s = torch.zeros(1, 2, 2, 2, requires_grad=True)
    t = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 3.0]]]])
    m = torch.tensor([[[0.5, 0.0], [0.0, 0.0]]])
    (fg,), (bg,) = robust_decoupled_feature_loss([s], [t], [m])
    # fg: 0.5 * (1 + 1) / (2 * 2 * 0.5) = 0.5 ; bg: (4 + 0 + 0 + 9) / (2 * 2 * 3)
    assert float(fg) == pytest.approx(0.5)
    assert float(bg) == pytest.approx(13 / 12)
    (fg1,), _ = robust_decoupled_feature_loss([s], [t], [m * 2])
    assert float(fg1) == pytest.approx(float(fg))  # a uniform eta only rescales Σ M: no effect
    (fg + bg).backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0


def test_soft_label_loss_hand_computed():
    zs = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, -1.0]], requires_grad=True)
    zt = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, -1.0]])
    eta = torch.tensor([0.5, 1.0])
    got = robust_soft_label_loss(zs, zt, eta, temperature=2.0)
    pt = F.softmax(zt[0] / 2, -1)
    kl0 = float((pt * (pt.log() - F.log_softmax(zs[0].detach() / 2, -1))).sum())
    want = (0.5 * 4 * kl0 / 3 + 1.0 * 0.0) / 2
    assert float(got) == pytest.approx(want, rel=1e-5)
    got.backward()
    assert zs.grad is not None
    assert float(robust_soft_label_loss(zs[:0], zt[:0], eta[:0])) == 0.0


def test_global_knowledge_loss_value_and_gradients_to_student_only():
    s = torch.tensor([[1.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0]], requires_grad=True)
    ps = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    pt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    eta = torch.tensor([0.5])
    loss = global_knowledge_loss(s, t, ps, pt, eta)
    # g_s = .5 * (1, 0), g_t = .5 * (0, 1): SmoothL1 (beta 1) of |d| = .5 each -> .5 * .25 = .125
    assert float(loss) == pytest.approx(0.125)
    loss.backward()
    assert s.grad is not None and t.grad is None and ps.grad is None
    assert float(global_knowledge_loss(s[:0], t[:0], ps, pt, eta[:0])) == 0.0


# -- PGM instance selection -------------------------------------------------------------------


def test_select_pgm_instances_filters_caps_and_is_deterministic():
    recs = []
    for i in range(10):
        recs.append(
            {
                "file_name": f"{i}.png",
                "image_id": i,
                "boxes": [[0, 0, 40, 40], [0, 0, 10, 50], [5, 5, 50, 36]],
                "labels": [0, 0, 1],
            }
        )
    out = select_pgm_instances(recs, 2, min_size=30, max_images_per_class=3, seed=1)
    assert out == select_pgm_instances(recs, 2, min_size=30, max_images_per_class=3, seed=1)
    assert all(d["box"] != [0.0, 0.0, 10.0, 50.0] for d in out)  # 10 px wide: filtered
    per_class = {c: {d["record"] for d in out if d["label"] == c} for c in (0, 1)}
    assert len(per_class[0]) == 3 and len(per_class[1]) == 3
    other = select_pgm_instances(recs, 2, min_size=30, max_images_per_class=3, seed=2)
    assert {d["record"] for d in other} != {d["record"] for d in out} or len(recs) <= 3


# -- end to end -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["FasterRCNN", "RetinaNet", "FCOS"])
def test_globalkd_forward_on_both_families(tmp_path, arch):
    cfg = kd_cfg(tmp_path, arch, ["GlobalKD"])
    cfg.KD.GLOBALKD.GLOBAL_LOSS = True
    model = build_detector(cfg).train()
    method = model.kd_methods["GlobalKD"]
    g = torch.Generator().manual_seed(0)
    for s in method.strides:  # random prototypes for classes 0 and 1, none for class 2
        ps, pt = method.protos_student.get(s), method.protos_teacher.get(s)
        valid = torch.tensor([True, True, False])
        method.set_prototypes(
            s, torch.randn(ps.shape, generator=g), torch.randn(pt.shape, generator=g), valid, 0
        )
    images, targets = batch(arch, with_empty=True)
    losses = model(images, targets)
    keys = {"loss_kd_gk_fg", "loss_kd_gk_bg", "loss_kd_gk_soft", "loss_kd_gk_global"}
    assert keys <= set(losses) and all(torch.isfinite(losses[k]) for k in keys)
    assert float(losses["loss_kd_gk_fg"]) > 0 and float(losses["loss_kd_gk_bg"]) > 0
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert method.adapter.convs[str(method.strides[0])].weight.grad is not None


@pytest.fixture(scope="module")
def gk_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gk")
    p = generate_synthetic_dataset(str(root), num_train=8, num_val=2, image_size=64, seed=5)
    return f"{p['train_json']}:{p['train_image_root']}"


def _gk_cfg(data, out, tyaml, tpth, max_iter=4):
    cfg = engine_cfg((data, ""), out, arch="RetinaNet", max_iter=max_iter)
    cfg.SOLVER.STEPS = (3,)
    cfg.SOLVER.WARMUP_ITERS = 1
    cfg.KD.METHODS = ["GlobalKD"]
    cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS = tyaml, tpth
    cfg.KD.GLOBALKD.MIN_BOX_SIZE = 4
    cfg.KD.GLOBALKD.NUM_PROTOTYPES = 3
    cfg.KD.GLOBALKD.REFRESH_PERIOD = 2
    return cfg


def test_prototypes_refresh_and_resume_exactly(gk_data, tmp_path):
    _, tyaml, tpth = save_teacher(tmp_path, "RetinaNet", "resnet34", num_classes=6)
    full = Trainer(_gk_cfg(gk_data, tmp_path / "a", tyaml, tpth))
    full.train()
    method = full.model.kd_methods["GlobalKD"]
    assert int(method.refreshed_at) == 2  # refreshed at 0 and 2
    pgm = tmp_path / "a" / "pgm"
    assert (pgm / "prototypes_0000000.json").is_file() and (
        pgm / "prototypes_0000002.json"
    ).is_file()
    assert len([f for f in os.listdir(pgm) if f.startswith("teacher_features")]) == 1
    report = json.load(open(pgm / "prototypes_0000002.json"))
    level = next(iter(report["levels"].values()))
    assert len(level["eta"]) == len(report["instances"]) > 0
    assert all(0.0 <= e <= 1.0 for e in level["eta"])
    picks = [i for v in level["prototypes"].values() for i in v]
    assert picks and all(0 <= i < len(report["instances"]) for i in picks)
    s0 = method.strides[0]
    assert bool(getattr(method, f"valid_{s0}").any())

    # a run stopped after the checkpoint at 2 and resumed ends identical, prototypes included
    part = Trainer(_gk_cfg(gk_data, tmp_path / "b", tyaml, tpth))
    part.max_iter = 2
    part.train()
    ckpt = torch.load(tmp_path / "b" / "model_final.pth", weights_only=True)
    assert any("protos_student" in k for k in ckpt["kd"])
    resumed = Trainer(_gk_cfg(gk_data, tmp_path / "b", tyaml, tpth))
    resumed.resume_or_load(resume=True)
    assert int(resumed.model.kd_methods["GlobalKD"].refreshed_at) == 0  # restored, not recomputed
    resumed.train()
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    for k, v in full.model.kd_methods.state_dict().items():
        torch.testing.assert_close(resumed.model.kd_methods.state_dict()[k], v, rtol=0, atol=0)

    # tools/show_prototypes.py renders the file: one grid per level plus the eta plot
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "show_prototypes",
        os.path.join(os.path.dirname(__file__), "..", "tools", "show_prototypes.py"),
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    written = tool.main([str(pgm / "prototypes_0000002.json"), "--output", str(tmp_path / "png")])
    assert len(written) == len(method.strides) + 1
    assert all(os.path.getsize(p) > 1000 for p in written)
