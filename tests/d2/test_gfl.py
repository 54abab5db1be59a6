"""kd2's Detectron2 GFL (kd2.d2.gfl) against the torchvision one, training, checkpoints, the
DistillGFL record and the yacs / LazyConfig builders (skipped where detectron2 is missing)."""

from __future__ import annotations

import copy
import os
from collections import OrderedDict

import pytest
import torch
from torch import nn

detectron2 = pytest.importorskip("detectron2", reason="detectron2 is not installed (see README)")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import LazyCall as L  # noqa: E402
from detectron2.config import LazyConfig, get_cfg, instantiate  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from torchvision.models.detection.image_list import ImageList  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

from kd2.d2 import add_kd_config, student_config  # noqa: E402
from kd2.d2.gfl import GFL, GFLBox2BoxTransform, GFLHead, gfl_lazy_model  # noqa: E402
from kd2.d2.lazy import kd_config, load_teacher  # noqa: E402
from kd2.d2.meta_arch import DistillGFL  # noqa: E402
from kd2.tv import gfl as tv_gfl  # noqa: E402
from kd2.tv.record import dense_labels_from_matches  # noqa: E402
from tests.helpers import REPO  # noqa: E402

K = 3
LOSS_KEYS = {"loss_qfl", "loss_dfl", "loss_giou"}


def lazy_gfl(depth: int = 18, fpn: int = 32):
    """A tiny GFL LazyConfig node (trainable BN instead of FrozenBN: random weights)."""
    m = gfl_lazy_model(depth, num_classes=K, fpn_channels=fpn)
    m.backbone.bottom_up.stages.norm = "BN"
    m.backbone.bottom_up.stem.norm = "BN"
    m.backbone.bottom_up.freeze_at = 0
    return m


def batch():
    """Two images of different sizes: the second one's own padded size (64 x 96) is smaller than
    the batch's (96 x 128), so it has ignored anchors."""
    g = torch.Generator().manual_seed(0)
    out = []
    for (h, w), boxes, classes in [
        ((96, 128), [[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 90.0, 60.0]], [0, 2]),
        ((60, 90), [[5.0, 5.0, 30.0, 40.0]], [1]),
    ]:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(boxes))
        inst.gt_classes = torch.tensor(classes)
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        out.append({"image": image, "instances": inst, "height": h, "width": w})
    return out


class _TvBackbone(nn.Module):
    """A Detectron2 FPN as a torchvision detection backbone (an ordered dict, ``out_channels``)."""

    def __init__(self, body: nn.Module, names) -> None:
        super().__init__()
        self.body, self.names = body, list(names)
        self.out_channels = body.output_shape()[self.names[0]].channels

    def forward(self, x):
        feats = self.body(x)
        return OrderedDict((n, feats[n]) for n in self.names)


def _copy_head_to_tv(d2_head: GFLHead, tv_head: tv_gfl.GFLHead) -> None:
    """Detectron2 layout (flat ``conv, GN, ReLU`` towers) -> torchvision layout."""
    sd, out = d2_head.state_dict(), {}
    branches = (
        ("cls_subnet", "classification_head.conv", "cls_score", "classification_head.cls_logits"),
        ("bbox_subnet", "regression_head.conv", "bbox_pred", "regression_head.bbox_reg"),
    )
    for tower, tv_tower, pred, tv_pred in branches:
        for i in range(4):
            out[f"{tv_tower}.{i}.0.weight"] = sd[f"{tower}.{3 * i}.weight"]
            out[f"{tv_tower}.{i}.1.weight"] = sd[f"{tower}.{3 * i + 1}.weight"]
            out[f"{tv_tower}.{i}.1.bias"] = sd[f"{tower}.{3 * i + 1}.bias"]
        for k in ("weight", "bias"):
            out[f"{tv_pred}.{k}"] = sd[f"{pred}.{k}"]
    for level in range(len(d2_head.scales)):
        out[f"regression_head.scales.{level}.scale"] = sd[f"scales.{level}.scale"]
    tv_head.load_state_dict(out, strict=True)


def _exact(a, b, msg=""):
    torch.testing.assert_close(a, b, rtol=0, atol=0, msg=msg)


def test_same_detector_as_the_torchvision_gfl():
    """Same weights, same normalised input: same head outputs, anchors, labels, losses (and
    gradients) and detections as kd2.tv.gfl.GFL."""
    torch.manual_seed(0)
    d2 = instantiate(lazy_gfl()).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move every head parameter off its init (zero biases, unit scales)
        for p in d2.head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    tv = tv_gfl.GFL(
        _TvBackbone(copy.deepcopy(d2.backbone), d2.head_in_features),
        K,
        anchor_strides=d2.anchor_strides,
        size_divisible=d2.backbone.size_divisibility,
    ).eval()
    _copy_head_to_tv(d2.head, tv.head)
    assert tv.box_coder.octave_base_scale == d2.box2box_transform.octave_base_scale == 8.0

    data = batch()
    images = d2.preprocess_image(data)
    gt = [x["instances"] for x in data]
    targets = [{"boxes": i.gt_boxes.tensor, "labels": i.gt_classes} for i in gt]
    feats = d2.backbone(images.tensor)
    features = [feats[f] for f in d2.head_in_features]
    tv_images = ImageList(images.tensor, [tuple(s) for s in images.image_sizes])
    tv_maps = list(tv.backbone(images.tensor).values())

    # head outputs
    predictions = d2.head(features)
    logits, dists = d2._transpose(predictions)
    tv_out = tv.head(tv_maps)
    _exact(torch.cat(logits, 1), tv_out["cls_logits"], "cls_logits")
    _exact(torch.cat(dists, 1), tv_out["bbox_regression"], "bbox_regression")

    # anchors and ATSS labels (with the second image's padding ignored)
    anchors = d2.anchor_generator(features)
    tv_anchors = tv.grid_anchors(tv_images, tv_maps)
    for a, b in zip(anchors, tv_anchors):
        _exact(a.tensor, b, "anchors")
    torch.testing.assert_close(anchors[0].tensor[1], torch.tensor([-24.0, -32.0, 40.0, 32.0]))
    labels, boxes = d2.label_anchors(anchors, gt)
    matched = tv.assign_targets(targets, tv_anchors, tv_images.image_sizes)
    tv_labels, tv_boxes = dense_labels_from_matches(matched, targets, K)
    _exact(torch.stack(labels), tv_labels, "labels")
    _exact(torch.stack(boxes), tv_boxes, "matched boxes")
    assert (tv_labels[1] == -1).any() and not (tv_labels[0] == -1).any()
    assert ((tv_labels >= 0) & (tv_labels < K)).sum() > 3

    # losses and their gradients
    with EventStorage(0):
        losses = d2.forward_training(images, features, predictions, gt)
    tv_losses = tv.compute_loss(targets, tv_out, tv_anchors, tv_images.image_sizes)
    assert set(losses) == set(tv_losses) == LOSS_KEYS
    for k in LOSS_KEYS:
        _exact(losses[k], tv_losses[k], k)
        assert losses[k] > 0
    sum(losses.values()).backward()
    sum(tv_losses.values()).backward()
    for d2_name, tv_p in (
        ("cls_score", tv.head.classification_head.cls_logits),
        ("bbox_pred", tv.head.regression_head.bbox_reg),
    ):
        torch.testing.assert_close(getattr(d2.head, d2_name).weight.grad, tv_p.weight.grad)
    torch.testing.assert_close(
        d2.head.scales[0].scale.grad, tv.head.regression_head.scales[0].scale.grad
    )

    # detections (before the rescale to the original size)
    with torch.no_grad():
        results = d2.forward_inference(images, features, d2.head(features))
        tv_dets = tv.postprocess_detections(tv.head(tv_maps), tv_anchors, tv_images.image_sizes)
    for r, t in zip(results, tv_dets):
        assert len(r) > 0
        torch.testing.assert_close(r.pred_boxes.tensor, t["boxes"])
        torch.testing.assert_close(r.scores, t["scores"])
        _exact(r.pred_classes, t["labels"])


def test_box_transform_and_valid_anchors():
    coder = GFLBox2BoxTransform(8.0)
    anchors = torch.tensor([[-32.0, -32.0, 32.0, 32.0]])
    boxes = torch.tensor([[-8.0, -4.0, 16.0, 0.0]])
    deltas = coder.get_deltas(anchors, boxes)
    torch.testing.assert_close(deltas, torch.tensor([[1.0, 0.5, 2.0, 0.0]]))
    torch.testing.assert_close(coder.apply_deltas(deltas, anchors), boxes)
    model = instantiate(lazy_gfl())
    assert model.backbone.size_divisibility == 32
    assert model.own_padded_size((60, 90)) == (64, 96)
    feats = [torch.zeros(1, 1, h, w) for h, w in [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]]
    anchors = model.anchor_generator(feats)
    assert [len(a) for a in anchors] == [192, 48, 12, 4, 1]
    torch.testing.assert_close(anchors[-1].tensor, torch.tensor([[-512.0, -512, 512, 512]]))
    valid = model.valid_anchors(anchors, [(96, 128), (60, 90)])
    assert valid[0].all()
    assert valid[1, :192].sum() == 8 * 12  # stride 8: rows y * 8 < 64, columns x * 8 < 96


@torch.no_grad()
def _positives_quality(model: GFL, data) -> tuple:
    """Mean IoU of the positives' decoded boxes with their GT, and mean score of their class."""
    images = model.preprocess_image(data)
    feats = model.backbone(images.tensor)
    rec, anchors, _ = model.dense_outputs([feats[f] for f in model.head_in_features])
    labels, boxes = model.label_anchors(anchors, [x["instances"] for x in data])
    labels, boxes = torch.stack(labels), torch.stack(boxes)
    img, idx = torch.nonzero((labels >= 0) & (labels < K), as_tuple=True)
    decoded = model.box2box_transform.apply_deltas(
        torch.cat(rec.box_deltas, 1)[img, idx], torch.cat(rec.anchors)[idx]
    )
    iou = box_iou(decoded, boxes[img, idx]).diagonal().mean()
    scores = torch.cat(rec.cls_logits, 1)[img, idx].sigmoid()
    return iou.item(), scores.gather(1, labels[img, idx][:, None]).mean().item()


def test_plain_gfl_trains_evaluates_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = instantiate(lazy_gfl()).train()
    assert isinstance(model, GFL) and model.head.cls_score.out_channels == K
    assert model.head.bbox_pred.out_channels == 4 * 17 and len(model.head.scales) == 5
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # Early on the total loss is no progress measure: the box losses are weighted by the
    # positives' scores (normaliser max(sum w, 1)) and QFL's targets are the predicted IoUs, so
    # both grow as the detector improves. Measure the improvement itself.
    iou0, score0 = _positives_quality(model, batch())
    with EventStorage(0):
        for _ in range(6):
            losses = model(batch())
            assert set(losses) == LOSS_KEYS and all(torch.isfinite(v) for v in losses.values())
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
    iou1, score1 = _positives_quality(model, batch())
    assert iou1 > iou0 and score1 > score0, (iou0, iou1, score0, score1)

    model.eval()
    model.test_score_thresh = 0.0  # a barely trained head scores low
    with torch.no_grad():
        out = model(batch())
    for o, x in zip(out, batch()):
        inst = o["instances"]
        assert isinstance(inst, Instances) and 0 < len(inst) <= 100
        assert inst.image_size == (x["height"], x["width"])
        assert inst.pred_classes.max() < K and (inst.scores >= 0).all()
        b = inst.pred_boxes.tensor
        assert (b[:, 2:] <= torch.tensor([x["width"], x["height"]])).all() and (b >= 0).all()

    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("gfl")
    state = torch.load(tmp_path / "gfl.pth", map_location="cpu", weights_only=True)["model"]
    torch.manual_seed(7)
    fresh = instantiate(lazy_gfl()).eval()
    fresh.load_state_dict(state, strict=True)
    fresh.test_score_thresh = 0.0
    with torch.no_grad():
        again = fresh(batch())
    for a, b in zip(out, again):
        a, b = a["instances"], b["instances"]
        _exact(a.pred_boxes.tensor, b.pred_boxes.tensor)
        _exact(a.scores, b.scores)
        _exact(a.pred_classes, b.pred_classes)


@pytest.mark.parametrize(
    "methods",
    [
        ["CWD"],
        ["LD"],
        ["CrossKD", "GID", "LD"],
    ],
)
def test_distill_gfl_with_a_gfl_teacher_through_lazyconfig(tmp_path, methods):
    torch.manual_seed(1)
    DetectionCheckpointer(instantiate(lazy_gfl(18, 64)), save_dir=str(tmp_path)).save("t")
    lazy = lazy_gfl()
    lazy._target_ = DistillGFL
    lazy.teacher = L(load_teacher)(model=lazy_gfl(18, 64), weights=str(tmp_path / "t.pth"))
    lazy.kd_cfg = L(kd_config)(METHODS=methods)
    model = instantiate(lazy).train()
    assert isinstance(model.teacher, GFL) and not model.teacher.training
    assert model._detector_family() == "gfl"

    # the detection losses are the plain GFL's
    native = instantiate(lazy_gfl()).train()
    native.load_state_dict(model.student_state_dict(), strict=True)
    with EventStorage(0):
        expected = native(batch())
        rec, got = model.student_step(batch())
        teacher = model.teacher_step(batch(), rec)
        losses = model(batch())
    for k in LOSS_KEYS:
        _exact(got[k], expected[k], k)

    d = rec.dense
    total = sum(t.shape[1] for t in d.cls_logits)
    assert d.num_anchors_per_loc == 1 and d.num_classes == K and d.centerness is None
    assert d.labels.shape == (2, total) and d.matched_gt_boxes.shape == (2, total, 4)
    assert set(d.labels.unique().tolist()) <= set(range(-1, K + 1)) and (d.labels[1] == -1).any()
    assert isinstance(d.box_coder, tv_gfl.GFLBoxCoder) and rec.strides == [8, 16, 32, 64, 128]
    for logits, dist, deltas, anchors, (h, w) in zip(
        d.cls_logits, d.box_dist, d.box_deltas, d.anchors, d.grid_sizes
    ):
        assert logits.shape == (2, h * w, K) and dist.shape == (2, h * w, 4 * 17)
        assert anchors.shape == (h * w, 4)
        _exact(deltas, tv_gfl.integral(dist, 16))
    assert d.box_dist[0].requires_grad
    td = teacher.dense
    assert [t.shape for t in td.box_dist] == [t.shape for t in d.box_dist]
    assert td.labels is None and teacher.features[8].shape[1] == 64

    kd = [k for k in losses if k.startswith("loss_kd_")]
    assert kd and all(torch.isfinite(losses[k]) and losses[k] > 0 for k in kd)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    model.eval()
    with torch.no_grad():
        assert "instances" in model(batch())[0]


def test_distill_gfl_with_an_fcos_teacher():
    """A Detectron2 FCOS teacher's dense record is its own (deltas, centerness, K logits)."""
    from detectron2.model_zoo import get_config

    fcos = copy.deepcopy(get_config("common/models/fcos.py").model)
    fcos.backbone.bottom_up.stages.depth = 18
    fcos.backbone.bottom_up.stages.pop("stride_in_1x1")
    fcos.backbone.bottom_up.stages.norm = fcos.backbone.bottom_up.stem.norm = "BN"
    fcos.backbone.out_channels = 32
    fcos.backbone.top_block.in_channels = 32
    fcos.head.input_shape = [ShapeSpec(channels=32)] * 5
    fcos.head.conv_dims = [32] * 4
    fcos.num_classes = K
    lazy = lazy_gfl()
    lazy._target_ = DistillGFL
    lazy.teacher = fcos
    lazy.kd_cfg = L(kd_config)(METHODS=["CWD"])
    torch.manual_seed(2)
    model = instantiate(lazy).train()
    with EventStorage(0):
        rec, _ = model.student_step(batch())
        teacher = model.teacher_step(batch(), rec)
        losses = model(batch())
    assert teacher.dense.box_dist is None and teacher.dense.centerness is not None
    assert [t.shape for t in teacher.dense.cls_logits] == [t.shape for t in rec.dense.cls_logits]
    assert torch.isfinite(losses["loss_kd_cwd"])


def _gfl_yacs(depth: int = 18, fpn: int = 32):
    cfg = get_cfg()
    add_kd_config(cfg)
    from detectron2 import model_zoo

    cfg.merge_from_file(model_zoo.get_config_file("Base-RetinaNet.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.META_ARCHITECTURE = "GFL"
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.OUT_CHANNELS = fpn
    cfg.MODEL.GFL.NUM_CLASSES = K
    cfg.KD.PREFLIGHT.ENABLED = False
    return cfg


def test_yacs_gfl_and_distill_gfl_build(tmp_path):
    cfg = _gfl_yacs()
    assert list(cfg.MODEL.GFL.IN_FEATURES) == ["p3", "p4", "p5", "p6", "p7"]
    cfg.MODEL.GFL.NMS_THRESH_TEST = 0.5
    model = build_model(cfg)
    assert type(model) is GFL and model.num_classes == K and model.reg_max == 16
    assert model.atss_topk == 9 and model.test_nms_thresh == 0.5 and model.test_score_thresh == 0.05
    assert model.test_topk_candidates == 1000 and model.loss_weights == (1.0, 0.25, 2.0)
    with EventStorage(0):
        losses = model.train()(batch())
    assert set(losses) == LOSS_KEYS and all(torch.isfinite(v) for v in losses.values())

    tcfg = _gfl_yacs(fpn=64)
    DetectionCheckpointer(build_model(tcfg), save_dir=str(tmp_path)).save("teacher")
    (tmp_path / "teacher.yaml").write_text(tcfg.dump())
    cfg = _gfl_yacs()
    cfg.MODEL.META_ARCHITECTURE = "DistillGFL"
    cfg.KD.METHODS = ["CWD"]
    cfg.KD.TEACHER.CONFIG = str(tmp_path / "teacher.yaml")
    cfg.KD.TEACHER.WEIGHTS = str(tmp_path / "teacher.pth")
    kd = build_model(cfg).train()
    assert type(kd) is DistillGFL and type(kd.teacher) is GFL
    with EventStorage(0):
        losses = kd(batch())
    assert LOSS_KEYS < set(losses) and torch.isfinite(losses["loss_kd_cwd"])
    plain = build_model(student_config(cfg))  # DistillGFL -> GFL, no teacher
    assert type(plain) is GFL
    plain.load_state_dict(kd.student_state_dict(), strict=True)


def test_lazy_gfl_protocol_config_builds_and_needs_teacher_weights():
    path = os.path.join(REPO, "configs", "COCO-Distillation", "lazy_gfl_R50_FPN_1x_R101.py")
    cfg = LazyConfig.load(path)
    assert cfg.model._target_ is DistillGFL and cfg.train.max_iter == 90000
    assert cfg.model.backbone.bottom_up.stages.depth == 50
    assert cfg.model.teacher.model.backbone.bottom_up.stages.depth == 101
    assert cfg.model.teacher.model._target_ is GFL and cfg.model.head._target_ is GFLHead
    cfg.model.kd_cfg.METHODS = ["CWD"]
    assert list(instantiate(cfg.model.kd_cfg).METHODS) == ["CWD"]
    with pytest.raises(FileNotFoundError, match="model.teacher.weights"):
        instantiate(cfg.model.teacher)


def test_gfl_head_resumes_from_every_cut():
    """CrossKD's cut of the Detectron2 GFL head reproduces its distributions (Scale included)."""
    from kd2.d2.meta_arch import _dense_outputs, _tower_head
    from kd2.modeling.head_split import capture_tower_taps, resume_head

    torch.manual_seed(0)
    model = instantiate(lazy_gfl()).eval()
    with torch.no_grad():
        for scale in model.head.scales:
            scale.scale.fill_(1.7)
        feats = [torch.randn(2, 32, s, s) for s in (12, 6, 3, 2, 1)]
        strides = [8, 16, 32, 64, 128]
        plain = _dense_outputs(model, feats, strides)[0]
        head = _tower_head(model)
        for k in range(5):
            with capture_tower_taps(head, k) as (cls_taps, reg_taps):
                _dense_outputs(model, feats, strides)
            out = resume_head(head, k, cls_taps, reg_taps)
            for a, b in zip(out["box_dist"] + out["box_deltas"], plain.box_dist + plain.box_deltas):
                torch.testing.assert_close(a, b)
