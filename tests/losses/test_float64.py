"""Every distillation method, and the tensor helpers under it, is exact in float64: its losses
come back in float64 and ``torch.autograd.gradcheck`` holds with respect to the student's
tensors, also on near-constant channels (std ≈ 1e-6) and at a tiny overall scale (1e-6), where
a hidden cast to float32 gives wrong gradients (issue 25).

The cases iterate :data:`kd2.losses.KD_METHOD_REGISTRY`: a registered method without a case here
fails :func:`test_every_registered_method_has_a_float64_case`.

Variants: ``near_constant`` gives channel 0 of the student's maps (and the teacher's, for the
feature methods) a std of 1e-6 around 1; ``tiny`` scales the maps by 1e-6, for the methods that
standardise channels (PKD, CrossKD's re-colouring), whose losses do not depend on that scale.
The other feature losses are sums of O(1) terms that cancel at that scale (attentions ≈ 1, KLs
of near-uniform softmaxes): their float64 rounding there exceeds what central differences can
resolve, so gradcheck cannot tell a right gradient from a wrong one, in any precision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd2.losses import (
    BCKD,
    CWD,
    DSI,
    FBKD,
    FGD,
    FGFI,
    FRS,
    GID,
    KD_METHOD_REGISTRY,
    KDDETR,
    LD,
    MGD,
    PFI,
    PKD,
    RKD,
    RM,
    ClassifierKD,
    CrossKD,
    DeFeat,
    DETRDistill,
    DFineLD,
    FitNet,
    GlobalKD,
    Hinton,
    TeachDETR,
    binary_kl_div_with_logits,
    box_iou,
    channel_attention,
    crop_boxes,
    masked_squared_error,
    quality_focal_kd_loss,
    rank_mimicking_loss,
    recolor_features,
    softmax_kl_div,
    spatial_attention,
)
from kd2.losses.crosskd import fcos_centerness_targets
from kd2.losses.fbkd import NonLocalBlock, fbkd_spatial_mask
from kd2.losses.fgd import GlobalContextBlock
from kd2.losses.frs import frs_head_loss
from kd2.losses.global_knowledge import prototype_cosines
from kd2.losses.ld import pairwise_diou, side_kl
from kd2.losses.pkd import channel_standardize
from kd2.losses.rkd import pairwise_distances, rkd_angle_loss, rkd_distance_loss
from kd2.losses.utils import aligned_box_iou, compute_dtype, zero_like_loss
from kd2.ops import box_mean_pool, reference, roi_align
from kd2.structures import DenseOutputs, HeadSplit, QueryOutputs, RoiOutputs, StepRecord

DT = torch.float64
N, K = 2, 2  # images, classes
STRIDES = (8, 16)
IMAGE = (32, 32)  # (H, W) of the padded input
GT_BOXES = [
    torch.tensor([[2.0, 3.0, 17.0, 20.0], [14.0, 10.0, 30.0, 29.0]], dtype=DT),
    torch.tensor([[4.0, 12.0, 22.0, 28.0]], dtype=DT),
]
GT_LABELS = [torch.tensor([0, 1]), torch.tensor([1])]
NEAR_CONSTANT_STD = 1e-6
TINY = 1e-6
# gradcheck's relative tolerance, and an absolute one well below the gradients checked
ATOL, RTOL = 1e-6, 1e-3


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: threads only add contention on a shared machine (x100 slower on 2 cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, g: torch.Generator, scale: float = 1.0, shift: float = 0.0) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=DT) * scale + shift


def _grid(stride: int) -> tuple[int, int]:
    return IMAGE[0] // stride, IMAGE[1] // stride


def _maps(channels: int, g: torch.Generator, variant: str = "plain") -> list[Tensor]:
    """One ``(N, C, H_l, W_l)`` map per stride; ``near_constant``: channel 0 is
    ``1 + 1e-6 · noise``; ``tiny``: everything times 1e-6."""
    out = []
    for s in STRIDES:
        x = _randn(N, channels, *_grid(s), g=g)
        if variant == "near_constant":
            x[:, 0] = 1.0 + NEAR_CONSTANT_STD * x[:, 0]
        elif variant == "tiny":
            x = x * TINY
        out.append(x)
    return out


def _eps(variant: str) -> float:
    """gradcheck's step for a method that standardises channels: well below the spread it
    divides by (1e-6 in both variants). The other methods are smooth on the scale of the values
    themselves, and take 1e-6."""
    return {"plain": 1e-6, "near_constant": 1e-9, "tiny": 1e-12}[variant]


def _anchors(stride: int) -> Tensor:
    """``(H W, 4)`` XYXY anchors of side ``2 · stride`` at the cell centres, location-major."""
    h, w = _grid(stride)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=DT), torch.arange(w, dtype=DT), indexing="ij")
    cx, cy = (xs.flatten() + 0.5) * stride, (ys.flatten() + 0.5) * stride
    return torch.stack([cx - stride, cy - stride, cx + stride, cy + stride], dim=1)


ANCHORS = [_anchors(s) for s in STRIDES]
COUNTS = [a.shape[0] for a in ANCHORS]


def _assignment() -> tuple[Tensor, Tensor]:
    """IoU assignment of the anchors: ``labels (N, R)`` (≥ 0.25 foreground, [0.1, 0.25) ignored,
    else background ``K``) and ``matched_gt_boxes (N, R, 4)``."""
    anchors = torch.cat(ANCHORS)
    labels, matched = [], []
    for gt, cls in zip(GT_BOXES, GT_LABELS):
        iou, idx = box_iou(anchors, gt).max(dim=1)
        lab = torch.full((anchors.shape[0],), K, dtype=torch.long)
        lab[iou >= 0.25] = cls[idx[iou >= 0.25]]
        lab[(iou >= 0.1) & (iou < 0.25)] = -1
        labels.append(lab)
        matched.append(gt[idx])
    return torch.stack(labels), torch.stack(matched)


LABELS, MATCHED = _assignment()


class _Coder:
    """Box coder: the anchor shifted by ``4 · delta``, side by side."""

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        return anchors.to(deltas.dtype) + 4.0 * deltas


def _split(t: Tensor) -> list[Tensor]:
    """``(N, ΣR, D)`` -> per level ``(N, R_l, D)``."""
    return list(torch.split(t, COUNTS, dim=1))


def _dense(
    cls: list[Tensor],
    box: list[Tensor],
    *,
    student: bool,
    dist: list[Tensor] | None = None,
    split: HeadSplit | None = None,
) -> DenseOutputs:
    return DenseOutputs(
        cls_logits=cls,
        box_deltas=box,
        anchors=ANCHORS,
        strides=list(STRIDES),
        num_anchors_per_loc=1,
        num_classes=K,
        grid_sizes=[_grid(s) for s in STRIDES],
        labels=LABELS if student else None,
        matched_gt_boxes=MATCHED if student else None,
        box_coder=_Coder(),
        box_dist=dist,
        head_split=split,
    )


def _record(
    features: list[Tensor] | None = None,
    dense: DenseOutputs | None = None,
    roi: RoiOutputs | None = None,
    images: Tensor | None = None,
) -> StepRecord:
    return StepRecord(
        images=images if images is not None else torch.zeros(N, 3, *IMAGE, dtype=DT),
        image_sizes=[IMAGE] * N,
        gt_boxes=GT_BOXES,
        gt_labels=GT_LABELS,
        features=dict(zip(STRIDES, features)) if features is not None else {},
        num_classes=K,
        dense=dense,
        roi=roi,
    )


def _logits(g: torch.Generator, width: int = K, scale: float = 1.0, shift: float = 0.0):
    return [_randn(N, r, width, g=g, scale=scale, shift=shift) for r in COUNTS]


def _double(method: nn.Module) -> nn.Module:
    """The method in float64 with every parameter drawn at random, so that the zero-initialised
    branches (FGD's GC blocks, FBKD's non-local BatchNorm) take part in the gradients."""
    method = method.double()
    g = _g(123)
    with torch.no_grad():
        for p in method.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.5)
    return method


@dataclass
class Case:
    """A method, the student's float64 tensors (``inputs``) and
    ``records(*inputs) -> (student, teacher)``.

    ``groups``: ``(input indices, loss names)`` checked together (default: all inputs with all
    losses); a tensor that reaches a loss only through a weight the method detaches by design
    (LD's class score, PFI's prediction factor) is held constant for that loss. ``unused``:
    input indices no loss reads (an FPN level without instances). ``forward`` wraps the
    method's call (a fixed random mask, replayed detached weights)."""

    method: nn.Module
    inputs: tuple[Tensor, ...]
    records: Callable[..., tuple[StepRecord, StepRecord]]
    eps: float = 1e-6
    forward: Callable | None = None
    groups: list[tuple[tuple[int, ...], tuple[str, ...] | None]] | None = None
    unused: tuple[int, ...] = ()


class _Replay:
    """Calls ``fn`` during the first evaluation and replays its results, in call order, in the
    later ones (``rewind()`` before each): a weight the method computes from the student's
    tensors under ``no_grad`` (GlobalKD's η, FBKD's spatial mask) stays the constant it is by
    design while gradcheck perturbs those tensors."""

    def __init__(self, fn: Callable):
        self.fn, self.cache, self.calls = fn, [], 0

    def rewind(self) -> None:
        self.calls = 0

    def __call__(self, *args, **kwargs):
        if self.calls == len(self.cache):
            self.cache.append(self.fn(*args, **kwargs))
        self.calls += 1
        return self.cache[self.calls - 1]


def _feature_case(
    method: nn.Module, c_s: int, c_t: int, variant: str = "plain", standardises: bool = False
) -> Case:
    """A method reading the FPN maps (and the GT), the student's maps differentiated."""
    s = _maps(c_s, _g(1), variant)
    t = _maps(c_t, _g(2), variant)
    return Case(
        _double(method),
        tuple(s),
        lambda *x: (_record(list(x)), _record(t)),
        eps=_eps(variant) if standardises else 1e-6,
    )


def _channels(variant: str) -> tuple[int, int]:
    # the channel-normalising cases need the identity adapter: a 1x1 conv would mix the
    # near-constant channel with the others
    return (3, 4) if variant == "plain" else (3, 3)


def _dict(c: int) -> dict[int, int]:
    return {s: c for s in STRIDES}


# ------------------------------------------------------------------------------------ cases


def case_fitnet(variant: str) -> Case:
    return _feature_case(FitNet(_dict(3), _dict(4)), 3, 4)


def case_dsi(variant: str) -> Case:
    return _feature_case(DSI(_dict(3), _dict(4), weight=1.0, smooth_l1_weight=0.5), 3, 4)


def case_pkd(variant: str) -> Case:
    c_s, c_t = _channels(variant)
    return _feature_case(PKD(_dict(c_s), _dict(c_t), weight=1.0), c_s, c_t, variant, True)


def case_cwd(variant: str) -> Case:
    if variant == "logits":
        method = CWD(_dict(3), _dict(3), recipe="logits", weight=1.0)
        t_cls = _logits(_g(2))
        s_cls = _logits(_g(1))

        def records(*x):
            return (
                _record(dense=_dense(list(x), _logits(_g(3), 4), student=True)),
                _record(dense=_dense(t_cls, _logits(_g(4), 4), student=False)),
            )

        return Case(method.double(), tuple(s_cls), records)
    c_s, c_t = _channels(variant)
    return _feature_case(CWD(_dict(c_s), _dict(c_t), recipe="neck", weight=1.0), c_s, c_t, variant)


def case_mgd(variant: str) -> Case:
    case = _feature_case(MGD(_dict(3), _dict(3), alpha=1.0, mask_ratio=0.5), 3, 3, variant)

    def forward(method, student, teacher):
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same random mask at every evaluation
            return method(student, teacher)

    case.forward = forward
    return case


def case_fgd(variant: str) -> Case:
    c_s, c_t = _channels(variant)
    method = FGD(
        _dict(c_s),
        _dict(c_t),
        arch="one_stage",
        alpha=1.0,
        beta=1.0,
        gamma=1.0,
        lambda_=1.0,
        temperature=0.5,
    )
    method.bind_detector("retinanet")
    return _feature_case(method, c_s, c_t, variant)


def case_fbkd(variant: str) -> Case:
    c_s, c_t = (4, 8) if variant == "plain" else (4, 4)
    method = FBKD(
        _dict(c_s),
        _dict(c_t),
        arch="one_stage",
        mask_weight=1.0,
        channel_weight=1.0,
        spatial_weight=1.0,
        nonlocal_weight=1.0,
    )
    case = _feature_case(method, c_s, c_t, variant)
    mask = _Replay(fbkd_spatial_mask)

    def forward(m, student, teacher):
        mask.rewind()
        with mock.patch("kd2.losses.fbkd.fbkd_spatial_mask", mask):
            return m(student, teacher)

    case.forward = forward
    return case


def _roi(cls_logits: Tensor) -> RoiOutputs:
    m = cls_logits.shape[0]
    return RoiOutputs(
        proposals=[torch.tensor([[0.0, 0.0, 16.0, 16.0]], dtype=DT).repeat(m // N, 1)] * N,
        labels=[torch.tensor([0, 1, K]), torch.tensor([K, 1, K])],
        matched_gt_boxes=[torch.zeros(m // N, 4, dtype=DT)] * N,
        roi_features=torch.zeros(m, 1, 2, 2, dtype=DT),
        box_head_features=torch.zeros(m, 4, dtype=DT),
        cls_logits=cls_logits,
        box_deltas=torch.zeros(m, K, 4, dtype=DT),
    )


def case_defeat(variant: str) -> Case:
    two_stage = variant == "two_stage"
    method = DeFeat(_dict(3), _dict(4), use_head=two_stage)
    s, t = _maps(3, _g(1)), _maps(4, _g(2))
    s_roi, t_roi = _randn(6, K + 1, g=_g(3)), _randn(6, K + 1, g=_g(4))
    if not two_stage:
        return Case(_double(method), tuple(s), lambda *x: (_record(list(x)), _record(t)))

    def records(*x):
        return _record(list(x[:2]), roi=_roi(x[2])), _record(t, roi=_roi(t_roi))

    return Case(_double(method), (*s, s_roi), records)


def case_fgfi(variant: str) -> Case:
    method = FGFI(_dict(3), _dict(4))
    s, t = _maps(3, _g(1)), _maps(4, _g(2))
    dense = _dense(_logits(_g(3)), _logits(_g(4), 4), student=True)

    def records(*x):
        return _record(list(x), dense), _record(t)

    # the 56-px rule puts every GT of the 32-px images on the finest level
    return Case(_double(method), tuple(s), records, unused=(1,))


def case_rkd(variant: str) -> Case:
    case = _feature_case(RKD(_dict(3), _dict(4)), 3, 4)
    case.unused = (1,)  # every GT is on the finest level (the 56-px rule)
    return case


def _one_stage_case(method, c_s, c_t, *, t_shift: float = 0.0, with_box: bool = False) -> Case:
    """Student FPN maps and dense class logits (and box deltas) differentiated."""
    s, t = _maps(c_s, _g(1)), _maps(c_t, _g(2))
    s_cls, t_cls = _logits(_g(3)), _logits(_g(4), shift=t_shift)
    s_box, t_box = _logits(_g(5), 4), _logits(_g(6), 4)
    inputs = (*s, *s_cls, *s_box) if with_box else (*s, *s_cls)

    def records(*x):
        box = list(x[4:6]) if with_box else s_box
        return (
            _record(list(x[:2]), _dense(list(x[2:4]), box, student=True)),
            _record(t, _dense(t_cls, t_box, student=False)),
        )

    return Case(_double(method), inputs, records)


def case_globalkd(variant: str) -> Case:
    method = GlobalKD(
        _dict(3), _dict(4), num_classes=K, arch="one_stage", num_prototypes=2, global_loss=True
    )
    case = _one_stage_case(method, 3, 4)
    if variant == "prototypes":
        g = _g(7)
        for s in STRIDES:
            case.method.set_prototypes(
                s, _randn(K, 2, 3, g=g), _randn(K, 2, 4, g=g), torch.ones(K, dtype=torch.bool), 0
            )
        eta = _Replay(case.method._eta)
        case.method._eta = eta

        def forward(m, student, teacher):
            eta.rewind()
            return m(student, teacher)

        case.forward = forward
    return case


def case_frs(variant: str) -> Case:
    method = FRS(
        _dict(3),
        _dict(4),
        arch="one_stage",
        weight_feat=1.0,
        weight_cls=1.0,
        warmup_iters=0,
        bce_from_logits=variant == "from_logits",
    )
    return _one_stage_case(method, 3, 4)


def case_pfi(variant: str) -> Case:
    detached = variant == "detached"
    method = PFI(_dict(3), _dict(4), adapter_kernel=1, detach_prediction=detached)
    case = _one_stage_case(method, 3, 4)
    if detached:  # the logits only weigh the feature term, through a detached factor
        case.groups = [((0, 1), None)]
    return case


def case_hinton(variant: str) -> Case:
    if variant == "roi":
        s_roi, t_roi = _randn(6, K + 1, g=_g(3)), _randn(6, K + 1, g=_g(4))
        return Case(
            Hinton(head="roi").double(),
            (s_roi,),
            lambda x: (_record(roi=_roi(x)), _record(roi=_roi(t_roi))),
        )
    s_cls, t_cls = _logits(_g(3)), _logits(_g(4))
    box = _logits(_g(5), 4)

    def records(*x):
        return (
            _record(dense=_dense(list(x), box, student=True)),
            _record(dense=_dense(t_cls, box, student=False)),
        )

    return Case(Hinton(head="dense").double(), tuple(s_cls), records)


def case_rm(variant: str) -> Case:
    s_cls, t_cls = _logits(_g(3)), _logits(_g(4))
    box = _logits(_g(5), 4)

    def records(*x):
        return (
            _record(dense=_dense(list(x), box, student=True)),
            _record(dense=_dense(t_cls, box, student=False)),
        )

    return Case(RM().double(), tuple(s_cls), records)


def case_bckd(variant: str) -> Case:
    s_cls, t_cls = _logits(_g(41)), _logits(_g(42))
    s_box, t_box = _logits(_g(43), 4, scale=0.5), _logits(_g(44), 4, scale=0.5)

    def records(*x):
        return (
            _record(dense=_dense(list(x[:2]), list(x[2:]), student=True)),
            _record(dense=_dense(t_cls, t_box, student=False)),
        )

    method = BCKD().double()
    method.bind_detector("retinanet")
    # the box term weighs each location by the detached score gap: no class gradient there
    groups = [((0, 1), ("loss_kd_bckd_cls",)), ((2, 3), ("loss_kd_bckd_loc",))]
    return Case(method, (*s_cls, *s_box), records, groups=groups)


def case_ld(variant: str) -> Case:
    bins = 4  # reg_max 3
    s_cls, t_cls = _logits(_g(3)), _logits(_g(4))
    s_dist, t_dist = _logits(_g(5), 4 * bins), _logits(_g(6), 4 * bins)
    box = _logits(_g(7), 4)

    def records(*x):
        return (
            _record(dense=_dense(list(x[:2]), box, student=True, dist=list(x[2:]))),
            _record(dense=_dense(t_cls, box, student=False, dist=t_dist)),
        )

    method = LD().double()
    method.bind_detector("gfl")
    # the distribution terms weigh each location by the student's detached class score
    groups = [((2, 3), ("loss_kd_ld", "loss_kd_ld_vlr")), ((0, 1), ("loss_kd_ld_cls",))]
    return Case(method, (*s_cls, *s_dist), records, groups=groups)


class _Rest(nn.Module):
    """A frozen teacher head after the cut: a smooth activation, then 1×1 predictors."""

    def __init__(self, width: int, bins: int):
        super().__init__()
        self.cls = nn.Conv2d(width, K, 1)
        self.box = nn.Conv2d(width, 4, 1)
        self.dist = nn.Conv2d(width, 4 * bins, 1) if bins else None

    @staticmethod
    def _flat(x: Tensor) -> Tensor:  # (N, D, H, W) -> (N, H W, D), location-major
        return x.permute(0, 2, 3, 1).flatten(1, 2)

    def forward(self, cls_in: list[Tensor], reg_in: list[Tensor]) -> dict:
        out = {
            "cls_logits": [self._flat(self.cls(F.softplus(x))) for x in cls_in],
            "box_deltas": [self._flat(0.3 * self.box(F.softplus(x))) for x in reg_in],
            "box_dist": None,
        }
        if self.dist is not None:
            out["box_dist"] = [self._flat(self.dist(F.softplus(x))) for x in reg_in]
        return out


def case_crosskd(variant: str) -> Case:
    family = variant if variant in ("retinanet", "fcos", "gfl") else "retinanet"
    feature_variant = variant if variant in ("near_constant", "tiny") else "plain"
    c_s, c_t = (3, 4) if variant == "retinanet" else (4, 4)  # retinanet: the 1x1 mappers
    bins = 4 if family == "gfl" else 0
    method = CrossKD({s: c_s for s in STRIDES}, {s: c_t for s in STRIDES})
    method.bind_detector(family)
    method = _double(method)
    rest = _double(_Rest(c_t, bins))
    # the student's tower features near-constant or tiny; the teacher's colours are ordinary
    s_cls, s_reg = _maps(c_s, _g(1), feature_variant), _maps(c_s, _g(2), feature_variant)
    t_cls, t_reg = _maps(c_t, _g(3)), _maps(c_t, _g(4))
    t_split = HeadSplit(1, t_cls, t_reg, rest)
    with torch.no_grad():
        t_out = rest(t_cls, t_reg)
        t_out["box_deltas"] = [b + 0.1 * torch.randn_like(b) for b in t_out["box_deltas"]]
    s_box = _logits(_g(5), 4)

    def records(*x):
        s_split = HeadSplit(1, list(x[:2]), list(x[2:]), rest)
        s_dist = [torch.zeros_like(d) for d in t_out["box_dist"]] if bins else None
        student = _record(
            dense=_dense(_logits(_g(6)), s_box, student=True, dist=s_dist, split=s_split)
        )
        teacher = _record(
            dense=_dense(
                t_out["cls_logits"],
                t_out["box_deltas"],
                student=False,
                dist=t_out["box_dist"],
                split=t_split,
            )
        )
        return student, teacher

    return Case(method, (*s_cls, *s_reg), records, eps=_eps(feature_variant))


def case_gid(variant: str) -> Case:
    method = GID(
        _dict(3),
        _dict(4),
        feature_weight=1.0,
        relation_weight=1.0,
        cls_weight=1.0,
        reg_weight=1.0,
        top_k=4,
        pool_size=2,
    )
    method.bind_detector("retinanet")
    # a surer teacher everywhere: the instances are the teacher's boxes (constants)
    case = _one_stage_case(method, 3, 4, t_shift=4.0, with_box=True)
    case.unused = (1,)  # every instance is on the finest level (Detectron2's rule)
    return case


class _Classifier:
    """A frozen crop classifier with a smooth stem, on float64 crops."""

    num_classes, crop_size = K, 6

    def __init__(self):
        g = _g(11)
        self.w_logits = _randn(3, K, g=g)
        self.w_stem = _randn(4, 3, 3, 3, g=g, scale=0.3)

    def logits(self, crops: Tensor) -> Tensor:
        return crops.mean(dim=(2, 3)) @ self.w_logits

    def stem(self, crops: Tensor) -> Tensor:
        return torch.tanh(F.conv2d(crops, self.w_stem, padding=1))


def case_classifierkd(variant: str) -> Case:
    method = ClassifierKD(num_classes=K, cls_weight=1.0, loc_weight=1.0, chunk=4).double()
    method.attach_classifier(_Classifier())
    images = _randn(N, 3, *IMAGE, g=_g(12))
    if variant == "softmax_roi":
        m = 6
        proposals = [_randn(m // N, 4, g=_g(13 + i), scale=2.0) for i in range(N)]
        proposals = [p + torch.tensor([6.0, 6.0, 24.0, 26.0], dtype=DT) for p in proposals]
        labels = [torch.tensor([0, 1, K]), torch.tensor([1, K, 1])]
        gts = [GT_BOXES[0][[0, 1, 1]], GT_BOXES[1][[0, 0, 0]]]

        class _RoiCoder:
            def decode(self, deltas, boxes):
                return boxes + 2.0 * deltas

        def records(cls_logits, deltas):
            roi = RoiOutputs(
                proposals=proposals,
                labels=labels,
                matched_gt_boxes=gts,
                roi_features=torch.zeros(m, 1, 2, 2, dtype=DT),
                box_head_features=torch.zeros(m, 4, dtype=DT),
                cls_logits=cls_logits,
                box_deltas=deltas,
                box_coder=_RoiCoder(),
            )
            return _record(roi=roi, images=images), _record()

        inputs = (_randn(m, K + 1, g=_g(15)), _randn(m, K, 4, g=_g(16), scale=0.5))
        return Case(method, inputs, records)
    s_cls, s_box = _logits(_g(3)), _logits(_g(5), 4, scale=0.3)

    def dense_records(*x):
        return _record(dense=_dense(list(x[:2]), list(x[2:]), student=True), images=images), (
            _record()
        )

    return Case(method, (*s_cls, *s_box), dense_records)


def _queries(g: torch.Generator, layers: int = 2, q: int = 5, bins: int = 4):
    """A DETR decoder's ``(L, N, Q, K)`` logits, normalised ``cxcywh`` boxes and per-edge
    distribution logits ``(L, N, Q, 4 (bins + 1))``."""
    logits = _randn(layers, N, q, K, g=g)
    cxcy = 0.2 + 0.6 * torch.rand(layers, N, q, 2, generator=g, dtype=DT)
    wh = 0.1 + 0.3 * torch.rand(layers, N, q, 2, generator=g, dtype=DT)
    return logits, torch.cat([cxcy, wh], -1), _randn(layers, N, q, 4 * (bins + 1), g=g)


def case_dfineld(variant: str) -> Case:
    s_logits, s_boxes, s_corners = _queries(_g(31))
    t_logits, t_boxes, t_corners = _queries(_g(32), layers=1)
    matched = [(torch.tensor([1, 3]), torch.tensor([0, 1])), (torch.tensor([2]), torch.tensor([0]))]
    dist = (4, 4.0, 0.5)
    hidden = torch.zeros(N, 5, 2, dtype=DT)

    def records(corners):
        s, t = _record(), _record()
        s.queries = QueryOutputs(s_logits, s_boxes, hidden, corners, s_boxes, dist, matched)
        t.queries = QueryOutputs(t_logits, t_boxes, hidden, t_corners, t_boxes, dist)
        return s, t

    return Case(DFineLD(), (s_corners,), records)


def case_teachdetr(variant: str) -> Case:
    s_logits, s_boxes, _ = _queries(_g(33))
    scores = [torch.tensor([0.9, 0.5], dtype=DT), torch.tensor([0.7], dtype=DT)]
    detections = [
        {"boxes": b, "scores": s, "labels": lb} for b, s, lb in zip(GT_BOXES, scores, GT_LABELS)
    ]

    def records(logits, boxes):
        s, t = _record(), _record()
        s.queries = QueryOutputs(logits, boxes, torch.zeros(N, 5, 2, dtype=DT))
        t.detections = detections
        return s, t

    return Case(TeachDETR(giou_weighting=variant), (s_logits, s_boxes), records)


def case_kddetr(variant: str) -> Case:
    s_logits, s_boxes, _ = _queries(_g(34), q=4)
    t_logits, t_boxes, _ = _queries(_g(35), layers=1, q=4)
    r_logits, r_boxes, _ = _queries(_g(36), layers=1, q=3)
    hidden = torch.zeros(N, 5, 2, dtype=DT)

    def records(logits, boxes):
        s, t = _record(), _record()
        s.queries = QueryOutputs(logits, boxes, hidden)
        t.queries = QueryOutputs(t_logits, t_boxes, hidden)
        # the same decoder answers both groups: the random group reuses the first 3 points
        s.queries.points = {
            "teacher": (logits, boxes),
            "random": (logits[:, :, :3], boxes[:, :, :3]),
        }
        t.queries.points = {"teacher": (t_logits, t_boxes), "random": (r_logits, r_boxes)}
        return s, t

    return Case(KDDETR(random_points=3), (s_logits, s_boxes), records)


def case_detrdistill(variant: str) -> Case:
    s_logits, s_boxes, _ = _queries(_g(37), q=4)
    t_logits, t_boxes, _ = _queries(_g(38), layers=1, q=5)
    g_logits, g_boxes, _ = _queries(_g(39), q=5)
    t_hidden = _randn(N, 5, 4, g=_g(40))
    s_maps, t_maps = _maps(3, _g(41), "plain"), _maps(4, _g(42), "plain")

    def records(logits, boxes, map8, map16, group_logits, group_boxes):
        s, t = _record([map8, map16]), _record(t_maps)
        s.queries = QueryOutputs(logits, boxes, torch.zeros(N, 4, 2, dtype=DT))
        s.queries.points = {"teacher": (group_logits, group_boxes)}
        t.queries = QueryOutputs(t_logits, t_boxes, t_hidden)
        return s, t

    method = _double(DETRDistill(_dict(3), _dict(4), topk=4))
    return Case(method, (s_logits, s_boxes, *s_maps, g_logits, g_boxes), records)


#: method name -> (case builder, variants)
CASES: dict[str, tuple[Callable[[str], Case], tuple[str, ...]]] = {
    "FitNet": (case_fitnet, ("plain",)),
    "DSI": (case_dsi, ("plain",)),
    "PKD": (case_pkd, ("plain", "near_constant", "tiny")),
    "CWD": (case_cwd, ("plain", "near_constant", "logits")),
    "MGD": (case_mgd, ("plain", "near_constant")),
    "FGD": (case_fgd, ("plain", "near_constant")),
    "FBKD": (case_fbkd, ("plain", "near_constant")),
    "DeFeat": (case_defeat, ("one_stage", "two_stage")),
    "FGFI": (case_fgfi, ("plain",)),
    "RKD": (case_rkd, ("plain",)),
    "GlobalKD": (case_globalkd, ("unit_eta", "prototypes")),
    "FRS": (case_frs, ("released_bce", "from_logits")),
    "PFI": (case_pfi, ("detached", "prediction_gradient")),
    "Hinton": (case_hinton, ("dense", "roi")),
    "RM": (case_rm, ("plain",)),
    "LD": (case_ld, ("plain",)),
    "BCKD": (case_bckd, ("plain",)),
    "CrossKD": (case_crosskd, ("retinanet", "fcos", "gfl", "near_constant", "tiny")),
    "GID": (case_gid, ("plain",)),
    "ClassifierKD": (case_classifierkd, ("sigmoid_dense", "softmax_roi")),
    "DFineLD": (case_dfineld, ("plain",)),
    "TeachDETR": (case_teachdetr, ("code", "paper")),
    "KDDETR": (case_kddetr, ("plain",)),
    "DETRDistill": (case_detrdistill, ("plain",)),
}


def test_every_registered_method_has_a_float64_case():
    registered = {name for name, _ in KD_METHOD_REGISTRY}
    assert registered == set(CASES), (
        f"methods without a float64 gradcheck case: {sorted(registered - set(CASES))}; cases of "
        f"unregistered methods: {sorted(set(CASES) - registered)}"
    )


def _losses(case: Case, *inputs: Tensor) -> dict[str, Tensor]:
    student, teacher = case.records(*inputs)
    if case.forward is not None:
        return case.forward(case.method, student, teacher)
    return case.method(student, teacher)


@pytest.mark.parametrize(
    "name, variant", [(name, v) for name, (_, variants) in CASES.items() for v in variants]
)
def test_method_gradcheck_in_float64(name, variant):
    torch.manual_seed(0)
    case = CASES[name][0](variant)
    case.method.train()
    inputs = tuple(x.detach().clone().requires_grad_(True) for x in case.inputs)
    losses = _losses(case, *inputs)
    assert losses and all(v.dtype == DT for v in losses.values()), {
        k: v.dtype for k, v in losses.items()
    }
    assert all(torch.isfinite(v) for v in losses.values()), losses
    undeclared = set(losses) - set(type(case.method).card.terms)
    assert not undeclared, f"{name} returns terms its MethodCard does not name: {undeclared}"
    if name == "GID":  # enough instances for the relation term
        assert sum(len(b) for b in case.method.general_instances(*case.records(*inputs))) >= 3
    for indices, keys in case.groups or [(tuple(range(len(inputs))), None)]:
        keys = keys or tuple(losses)
        # every checked tensor reaches a checked loss (else the check would be vacuous)
        grads = torch.autograd.grad(
            sum(losses[k] for k in keys), [inputs[i] for i in indices], allow_unused=True
        )
        reached = {i for i, g in zip(indices, grads) if g is not None and bool(g.abs().sum())}
        checked = tuple(i for i in indices if i not in case.unused)
        assert reached == set(checked), (keys, sorted(reached), checked)

        def fn(*xs, checked=checked, keys=keys):
            full = list(inputs)
            for i, x in zip(checked, xs):
                full[i] = x
            out = _losses(case, *full)
            return tuple(out[k] for k in keys)

        args = tuple(inputs[i] for i in checked)
        assert torch.autograd.gradcheck(fn, args, eps=case.eps, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------- the helpers


def _near_constant(shape, g) -> Tensor:
    x = _randn(*shape, g=g)
    x[:, 0] = 1.0 + NEAR_CONSTANT_STD * x[:, 0]
    return x


def _boxes(m: int, g: torch.Generator, size: float = 20.0) -> Tensor:
    xy = torch.rand(m, 2, generator=g, dtype=DT) * size
    wh = 2.0 + torch.rand(m, 2, generator=g, dtype=DT) * size
    return torch.cat([xy, xy + wh], dim=1)


def _helper_cases():
    g = _g(21)
    x = _randn(2, 3, 4, 4, g=g)
    t = _randn(2, 3, 4, 4, g=g)
    nc = _near_constant((2, 3, 4, 4), g)
    z, zt = _randn(5, 4, g=g), _randn(5, 4, g=g)
    b1, b2 = _boxes(5, g), _boxes(5, g)
    feats = _randn(2, 3, 6, 7, g=g)
    rois = _boxes(4, g, 30.0)
    index = torch.tensor([0, 1, 1, 0])
    images = _randn(2, 3, 16, 16, g=g)
    crop_box = torch.tensor([[2.3, 3.1, 11.7, 12.2], [1.4, 5.5, 14.1, 9.8]], dtype=DT)
    scores = _randn(7, g=g)
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    imgs = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    mask = torch.rand(2, 1, 4, 4, generator=g, dtype=DT)
    return {
        "channel_standardize": (channel_standardize, (x,), 1e-6),
        "channel_standardize_near_constant": (channel_standardize, (nc,), 1e-8),
        "channel_standardize_tiny": (channel_standardize, (x * TINY,), 1e-12),
        "recolor_features_near_constant": (lambda s: recolor_features(s, nc * 3.0), (nc,), 1e-8),
        "recolor_features_tiny": (lambda s: recolor_features(s, t), (x * TINY,), 1e-12),
        "softmax_kl_div": (lambda s: softmax_kl_div(s, zt, 2.0), (z,), 1e-6),
        "masked_squared_error": (lambda s: masked_squared_error(s, t, mask[:, 0]), (x,), 1e-6),
        "binary_kl_div_with_logits": (lambda s: binary_kl_div_with_logits(s, zt, 2.0), (z,), 1e-6),
        "quality_focal_kd_loss": (lambda s: quality_focal_kd_loss(s, zt), (z,), 1e-6),
        "frs_head_loss": (lambda s: frs_head_loss(s, t, mask), (x,), 1e-6),
        "spatial_attention": (lambda s: spatial_attention(s, 0.5), (x,), 1e-6),
        "channel_attention_near_constant": (lambda s: channel_attention(s, 0.5), (nc,), 1e-6),
        "box_iou": (box_iou, (b1, b2), 1e-6),
        "aligned_box_iou": (aligned_box_iou, (b1, b2), 1e-6),
        "aligned_giou": (lambda a, b: aligned_box_iou(a, b, giou=True), (b1, b2), 1e-6),
        "pairwise_diou": (pairwise_diou, (b1, b2), 1e-6),
        "fcos_centerness_targets": (
            lambda p: fcos_centerness_targets(p, b1),
            ((b1[:, :2] + b1[:, 2:]) / 2 + 0.3,),
            1e-6,
        ),
        "pairwise_distances": (pairwise_distances, (z,), 1e-6),
        "rkd_distance_loss": (lambda s: rkd_distance_loss(s, zt), (z,), 1e-6),
        "rkd_angle_loss": (lambda s: rkd_angle_loss(s, zt), (z,), 1e-6),
        "prototype_cosines": (lambda s: prototype_cosines(s, zt[:2]), (z,), 1e-6),
        "side_kl": (lambda s: side_kl(s, zt.view(5, 2, 2) * 2, 3.0), (z.view(5, 2, 2),), 1e-6),
        "rank_mimicking_loss": (
            lambda s: rank_mimicking_loss(s, scores.flip(0), ids, imgs),
            (scores,),
            1e-6,
        ),
        "non_local_block": (_double(NonLocalBlock(3, 1, 2)), (x,), 1e-6),
        "global_context_block": (_double(GlobalContextBlock(3)), (x,), 1e-6),
        "roi_align": (lambda f: roi_align(f, rois, index, 0.25, 2, 2), (feats,), 1e-6),
        "box_mean_pool": (lambda f: box_mean_pool(f, rois, index, 4), (feats,), 1e-6),
        "box_mean_pool_torch": (
            lambda f: reference.box_mean_pool_torch(f, rois, index, 4),
            (feats,),
            1e-6,
        ),
        "crop_boxes": (
            lambda b: crop_boxes(images, b, torch.tensor([0, 1]), 5),
            (crop_box,),
            1e-6,
        ),
    }


HELPERS = _helper_cases()


@pytest.mark.parametrize("name", sorted(HELPERS))
def test_helper_gradcheck_in_float64(name):
    fn, inputs, eps = HELPERS[name]
    inputs = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
    out = fn(*inputs)
    assert out.dtype == DT
    assert torch.autograd.gradcheck(fn, inputs, eps=eps, atol=ATOL, rtol=RTOL)


def test_compute_dtype_keeps_float64_and_upcasts_half_types():
    x64, x32 = torch.zeros(2, dtype=DT), torch.zeros(2)
    assert compute_dtype(x64) == DT and compute_dtype(x32, x64) == DT
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.long):
        assert compute_dtype(torch.zeros(2, dtype=dtype)) == torch.float32
    assert (
        zero_like_loss(x32, x64).dtype == DT and zero_like_loss(x32.half()).dtype == torch.float32
    )
