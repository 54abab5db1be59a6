#!/usr/bin/env python
"""Export a trained detector — the student alone, never its teacher or KD adapters — with
``torch.export`` (a ``.pt2`` ExportedProgram and ONNX), then verify every file against the
PyTorch model.

    python tools/export_model.py --config-file configs/synthetic/faster_rcnn_MNv3_FGFI.yaml \\
        --output output/export MODEL.WEIGHTS output/.../model_final.pth

The graph takes one image, ``float32 (3, H, W)``: RGB in ``[0, 1]`` (torchvision and transformers
backends) or the Detectron2 model's own resized input tensor in its ``INPUT.FORMAT``, 0-255
(Detectron2 backend, through ``detectron2.export.TracingAdapter``); it returns ``boxes (D, 4)``
XYXY in the input's pixels, ``scores (D,)`` and contiguous ``labels (D,)``. The resize
(torchvision, transformers), the network and
the post-processing (NMS included) are in the graph, with dynamic height and width. While
``torch.export`` traces, the few torchvision and Detectron2 helpers whose Python code branches on
a size or a value are swapped for equivalents with the same results
(:func:`exportable_torchvision`, :func:`exportable_detectron2`).

``--format`` (any of them; default ``pt2 onnx``), written to ``--output`` with ``export.json``:

* ``pt2``: ``model.pt2``, ``torch.export.export(strict=False)``; load it with
  ``torch.export.load`` (after ``import torchvision``: NMS is a torchvision op).
* ``onnx``: ``model.onnx`` (opset 18), converted from that ExportedProgram by the dynamo-based
  ``torch.onnx.export``. Where that conversion fails, or its file disagrees with PyTorch, the
  legacy TorchScript-based exporter writes it instead (opset 17), and one line says why.
* ``torchscript``: ``model.ts`` (``torch.jit.trace``, deprecated by PyTorch; at the first sample
  image's size), only when asked for.

**Verification** (a mismatch is an error, exit code 1): each file (``torch.export.load``,
onnxruntime, ``torch.jit.load``) and the PyTorch model run on ``--sample-images`` (default: the
first ``--num-samples`` images of the config's ``DATASETS.TEST``); they must give the same
number of detections, the same labels, scores within ``--score-tol`` (1e-4) and boxes within
``--box-tol`` pixels (1e-3). A user mistake (a missing file, no sample images) is one
``kd2: error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if TYPE_CHECKING:
    from torch.export import ExportedProgram

from kd2.utils.errors import (  # noqa: E402
    ConfigError,
    DataError,
    KD2Error,
    MissingFileError,
    run_main,
)

FORMATS = ("pt2", "onnx", "torchscript")
FILE_NAMES = {"pt2": "model.pt2", "onnx": "model.onnx", "torchscript": "model.ts"}
OUTPUT_NAMES = ["boxes", "scores", "labels"]
#: The dynamo ONNX exporter's opset, and the legacy exporter's.
ONNX_OPSET, LEGACY_ONNX_OPSET = 18, 17
#: The range of the exported graph's dynamic height and width.
MIN_SIDE, MAX_SIDE = 32, 4096


def sample_images(predictor, paths: Sequence[str], count: int) -> list:
    """RGB uint8 images: ``paths``, else the first ``count`` of the config's test split."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not paths:
        if predictor.backend in OWN_LOOP_BACKENDS:
            from kd2.data import DatasetCatalog
        else:
            from detectron2.data import DatasetCatalog
        names = list(predictor.cfg.DATASETS.TEST)
        if not names:
            raise ConfigError(
                "no sample images to verify the export on: the config has no DATASETS.TEST",
                "give --sample-images",
            )
        try:
            paths = [r["file_name"] for r in DatasetCatalog.get(names[0])[:count]]
        except KD2Error:
            raise
        except KeyError as e:
            raise DataError(
                f"DATASETS.TEST {names[0]!r} cannot be read for sample images ({e})",
                "register it or give --sample-images",
            ) from None
    out = []
    for p in paths:
        if not os.path.isfile(p):
            raise MissingFileError(f"sample image {p!r} does not exist", "check --sample-images")
        try:
            with Image.open(p) as im:
                out.append(np.array(im.convert("RGB")))
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"sample image {p!r} is not a readable image ({e})") from None
    if not out:
        raise ConfigError("no sample images to verify the export on", "give --sample-images")
    return out


#: the backends whose detectors take torchvision's ``model([image])`` (kd2's own loop)
OWN_LOOP_BACKENDS = ("torchvision", "transformers")


class _TorchvisionExport:
    """A torchvision model, or a transformers DETR behind kd2's ``HFDetector`` (the same
    interface), as ``image (3, H, W) -> boxes, scores, labels``."""

    def __init__(self, predictor):
        import torch

        class Single(torch.nn.Module):
            def __init__(self, model, offset: int):
                super().__init__()
                self.model, self.offset = model, offset

            def forward(self, image):
                out = self.model([image])[0]
                return out["boxes"], out["scores"], out["labels"] - self.offset

        self.module = Single(predictor.model, predictor.label_offset).eval()
        self.predictor = predictor

    def inputs(self, image) -> tuple:
        return (self.predictor.model_inputs([image])[0],)


def _d2_inference(model, inputs):
    """Detectron2 inference without the rescale to ``height``/``width`` (boxes in the input's
    pixels): ``GeneralizedRCNN.inference`` or the dense detectors' (RetinaNet, kd2's GFL)
    ``forward_inference``."""
    if hasattr(model, "roi_heads"):
        inst = model.inference(inputs, do_postprocess=False)[0]
    else:
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        inst = model.forward_inference(images, features, model.head(features))[0]
    return [{"instances": inst}]


class _Detectron2Export:
    """The Detectron2 model through ``TracingAdapter`` (its own input tensor, flattened outputs)."""

    def __init__(self, predictor):
        import numpy as np
        import torch
        from detectron2.export import TracingAdapter

        self.predictor = predictor
        example = [{"image": self.inputs(np.zeros((64, 64, 3), dtype=np.uint8))[0]}]
        self.adapter = TracingAdapter(predictor.model, example, _d2_inference)

        class Single(torch.nn.Module):
            def __init__(self, adapter):
                super().__init__()
                self.adapter = adapter

            def forward(self, image):
                boxes, classes, scores = self.adapter(image)[:3]  # Instances fields, sorted
                return boxes, scores, classes

        self.module = Single(self.adapter).eval()

    def inputs(self, image) -> tuple:
        return (self.predictor.model_inputs([image])[0]["image"],)


def reference(exporter, image) -> list:
    """The PyTorch module's outputs on ``image`` (numpy)."""
    import torch

    with torch.no_grad():
        return [t.detach().cpu().numpy() for t in exporter.module(*exporter.inputs(image))]


# -- torch.export -------------------------------------------------------------------------------


def _batched_nms(boxes, scores, idxs, iou_threshold: float):
    """``torchvision.ops.batched_nms`` by the coordinate trick (eager torchvision's own path for
    up to 1000 CPU boxes, and its traced one), without its data-dependent branches: a
    ``numel() == 0`` test and the choice of the per-class loop for more boxes."""
    import torch
    from torchvision.ops import nms

    # >= 0 coordinates (clipped boxes): max(boxes, 0) is boxes.max(), and defined when empty
    max_coordinate = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def _resize_image_and_masks(image, self_min_size, self_max_size, target=None, fixed_size=None):
    """torchvision's ``GeneralizedRCNNTransform`` resize of one image, its size computed in
    float64 tensors (Python's float arithmetic, the same sizes) and read back as two new graph
    sizes: Python's ``min`` of symbolic scales would fix the graph to the sample's aspect ratio,
    and ``floor(h * min(...))`` symbolic expressions would be carried by every later shape."""
    import torch

    if target is not None or fixed_size is not None:
        return _ORIGINAL["resize"](image, self_min_size, self_max_size, target, fixed_size)
    h, w = image.shape[-2:]
    hw = torch.stack([torch.scalar_tensor(s, dtype=torch.float64) for s in (h, w)])
    scale = torch.minimum(self_min_size / hw.min(), self_max_size / hw.max())
    size = (hw * scale).floor().long().tolist()
    for s in size:  # resized sides lie in [1, max(min_size, max_size)]
        torch._check(s >= 1)
        torch._check(s <= max(self_min_size, self_max_size))
    image = torch.nn.functional.interpolate(
        image[None], size=size, mode="bilinear", align_corners=False
    )[0]
    return image, target


def _batch_images(self, images, size_divisible: int = 32):
    """``GeneralizedRCNNTransform.batch_images`` of one image as a zero pad to the next multiple
    of ``size_divisible``, in positive integer arithmetic: ``math.ceil`` of a symbolic size fixes
    it, and ONNX's integer ``Div`` truncates a negative ``-(-h // d)``."""
    import torch

    if len(images) != 1:
        return _ORIGINAL["batch_images"](self, images, size_divisible)
    image = images[0]
    h, w = image.shape[-2:]
    d = int(size_divisible)
    hp, wp = (h + d - 1) // d * d, (w + d - 1) // d * d
    return torch.nn.functional.pad(image, (0, wp - w, 0, hp - h))[None]


def _multiscale_roi_align(x_filtered, boxes, output_size, sampling_ratio, scales, mapper):
    """torchvision's ``MultiScaleRoIAlign`` without ``len(rois)`` (a data-dependent size Python
    cannot hold): the levels' results merged as torchvision's traced path does."""
    import torch
    from torchvision.ops import poolers, roi_align

    if scales is None or mapper is None:
        raise ValueError("scales and mapper should not be None")
    rois = poolers._convert_to_roi_format(boxes)
    if len(x_filtered) == 1:
        return roi_align(
            x_filtered[0],
            rois,
            output_size=output_size,
            spatial_scale=scales[0],
            sampling_ratio=sampling_ratio,
        )
    levels = mapper(boxes)
    results = []
    for level, (feature, scale) in enumerate(zip(x_filtered, scales)):
        results.append(
            roi_align(
                feature,
                rois[torch.where(levels == level)[0]],
                output_size=output_size,
                spatial_scale=scale,
                sampling_ratio=sampling_ratio,
            )
        )
    return poolers._onnx_merge_levels(levels, results)


#: The functions :func:`_swapped` replaced, by name, for the replacements that delegate.
_ORIGINAL: dict = {}
_MISSING = object()


@contextlib.contextmanager
def _swapped(swaps: list) -> Iterator[None]:
    """``setattr(owner, name, new)`` for each ``(key, owner, name, new)``, undone on exit; the
    replaced value is ``_ORIGINAL[key]`` meanwhile (a module's ``len`` is the builtin)."""
    import builtins

    saved = [(owner, name, owner.__dict__.get(name, _MISSING)) for _, owner, name, _ in swaps]
    try:
        for key, owner, name, new in swaps:
            _ORIGINAL[key] = getattr(owner, name, getattr(builtins, name, None))
            setattr(owner, name, new)
        yield
    finally:
        for owner, name, old in reversed(saved):
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)
        for key, *_ in swaps:
            _ORIGINAL.pop(key, None)


def exportable_torchvision() -> ContextManager[None]:
    """While ``torch.export`` traces: torchvision's detection helpers whose Python control flow
    on sizes would fail or fix the graph, swapped for equivalents of the same results (the
    functions above). Eager models outside the block are untouched."""
    from torchvision.models.detection import transform as tv_transform
    from torchvision.ops import boxes as tv_boxes
    from torchvision.ops import poolers

    return _swapped(
        [
            ("batched_nms", tv_boxes, "batched_nms", _batched_nms),
            ("resize", tv_transform, "_resize_image_and_masks", _resize_image_and_masks),
            ("batch_images", tv_transform.GeneralizedRCNNTransform, "batch_images", _batch_images),
            ("roi_align", poolers, "_multiscale_roi_align", _multiscale_roi_align),
        ]
    )


# -- Detectron2 under torch.export --------------------------------------------------------------


def _d2_boxes_init(self, tensor) -> None:
    """``Boxes.__init__`` of an ``(N, 4)`` tensor without its ``numel() == 0`` test (a reshape
    to ``(-1, 4)``, the identity on ``(N, 4)``)."""
    import torch

    if isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.shape[-1] == 4:
        self.tensor = tensor.to(torch.float32)
    else:
        _ORIGINAL["boxes_init"](self, tensor)


def _d2_boxes_clip(self, box_size) -> None:
    """``Boxes.clip`` without its assertion that every box is finite (a data-dependent test)."""
    import torch

    h, w = box_size
    t = self.tensor
    self.tensor = torch.stack(
        (
            t[:, 0].clamp(min=0, max=w),
            t[:, 1].clamp(min=0, max=h),
            t[:, 2].clamp(min=0, max=w),
            t[:, 3].clamp(min=0, max=h),
        ),
        dim=-1,
    )


def _d2_shapes_to_tensor(x, device=None):
    """``shapes_to_tensor`` that keeps symbolic sizes in the graph (``torch.as_tensor`` would
    bake the sample's size in)."""
    import torch

    return torch.stack([torch.scalar_tensor(v, dtype=torch.int64, device=device) for v in x])


def _d2_len(obj):
    """``len`` that returns ``__len__()`` as is: a graph size, not a Python int (Detectron2's
    own ``patch_builtin_len`` for tracing)."""
    return obj.__len__()


def _d2_find_top_rpn_proposals(
    proposals,
    pred_objectness_logits,
    image_sizes,
    nms_thresh: float,
    pre_nms_topk: int,
    post_nms_topk: int,
    min_box_size: float,
    training: bool,
):
    """Detectron2's ``find_top_rpn_proposals`` at inference with its two data-dependent tests
    (``if not valid_mask.all()``, ``if keep.sum() != len(boxes)``) made unconditional: the
    non-finite and the empty boxes are filtered always, the same proposals."""
    import torch
    from detectron2.layers import batched_nms, cat
    from detectron2.structures import Boxes, Instances

    if training:
        return _ORIGINAL["find_top_rpn_proposals"](
            proposals,
            pred_objectness_logits,
            image_sizes,
            nms_thresh,
            pre_nms_topk,
            post_nms_topk,
            min_box_size,
            training,
        )
    device = proposals[0].device
    batch_idx = torch.arange(len(image_sizes), device=device)
    topk_scores, topk_proposals, level_ids = [], [], []
    for level_id, (proposals_i, logits_i) in enumerate(zip(proposals, pred_objectness_logits)):
        num_proposals_i = torch.sym_min(logits_i.shape[1], pre_nms_topk)
        topk_scores_i, topk_idx = logits_i.topk(num_proposals_i, dim=1)
        topk_proposals.append(proposals_i[batch_idx[:, None], topk_idx])
        topk_scores.append(topk_scores_i)
        level_ids.append(torch.full((num_proposals_i,), level_id, dtype=torch.int64, device=device))
    topk_scores, topk_proposals = cat(topk_scores, dim=1), cat(topk_proposals, dim=1)
    level_ids = cat(level_ids, dim=0)
    results = []
    for n, image_size in enumerate(image_sizes):
        boxes, scores, lvl = Boxes(topk_proposals[n]), topk_scores[n], level_ids
        valid = torch.isfinite(boxes.tensor).all(dim=1) & torch.isfinite(scores)
        boxes, scores, lvl = boxes[valid], scores[valid], lvl[valid]
        boxes.clip(image_size)
        keep = boxes.nonempty(threshold=min_box_size)
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = batched_nms(boxes.tensor, scores, lvl, nms_thresh)[:post_nms_topk]
        res = Instances(image_size)
        res.proposal_boxes = boxes[keep]
        res.objectness_logits = scores[keep]
        results.append(res)
    return results


def _d2_fast_rcnn_inference_single_image(
    boxes, scores, image_shape, score_thresh: float, nms_thresh: float, topk_per_image: int
):
    """Detectron2's ``fast_rcnn_inference_single_image`` with its non-finite filter applied
    always (not under ``if not valid_mask.all()``): the same detections."""
    import torch
    from detectron2.layers import batched_nms
    from detectron2.structures import Boxes, Instances

    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    boxes, scores = boxes[valid], scores[valid][:, :-1]
    num_bbox_reg_classes = boxes.shape[1] // 4
    boxes = Boxes(boxes.reshape(-1, 4))
    boxes.clip(image_shape)
    boxes = boxes.tensor.view(-1, num_bbox_reg_classes, 4)
    filter_mask = scores > score_thresh
    filter_inds = filter_mask.nonzero()
    boxes = boxes[filter_inds[:, 0], 0] if num_bbox_reg_classes == 1 else boxes[filter_mask]
    scores = scores[filter_mask]
    keep = batched_nms(boxes, scores, filter_inds[:, 1], nms_thresh)
    if topk_per_image >= 0:
        keep = keep[:topk_per_image]
    boxes, scores, filter_inds = boxes[keep], scores[keep], filter_inds[keep]
    result = Instances(image_shape)
    result.pred_boxes = Boxes(boxes)
    result.scores = scores
    result.pred_classes = filter_inds[:, 1]
    return result, filter_inds[:, 0]


def exportable_detectron2() -> ContextManager[None]:
    """While ``torch.export`` traces a Detectron2 model: its helpers with data-dependent Python
    tests swapped for equivalents of the same results."""
    import detectron2.modeling.poolers as d2_poolers
    import detectron2.modeling.proposal_generator.rpn as rpn
    import detectron2.modeling.roi_heads.fast_rcnn as fast_rcnn
    import detectron2.structures.boxes as d2_boxes
    import detectron2.structures.image_list as image_list
    import detectron2.structures.instances as instances

    return _swapped(
        [
            ("boxes_init", d2_boxes.Boxes, "__init__", _d2_boxes_init),
            ("boxes_clip", d2_boxes.Boxes, "clip", _d2_boxes_clip),
            ("shapes_to_tensor", image_list, "shapes_to_tensor", _d2_shapes_to_tensor),
            ("shapes_to_tensor_poolers", d2_poolers, "shapes_to_tensor", _d2_shapes_to_tensor),
            ("len_instances", instances, "len", _d2_len),
            ("len_fast_rcnn", fast_rcnn, "len", _d2_len),
            ("find_top_rpn_proposals", rpn, "find_top_rpn_proposals", _d2_find_top_rpn_proposals),
            (
                "fast_rcnn_inference_single_image",
                fast_rcnn,
                "fast_rcnn_inference_single_image",
                _d2_fast_rcnn_inference_single_image,
            ),
        ]
    )


@contextlib.contextmanager
def third_party_notices_silenced() -> Iterator[None]:
    """Silence what the libraries say about their own internals (none of it is about the export
    or the user's model): ``torch.jit.script`` and ``pkg_resources`` deprecations that importing
    Detectron2 raises, its anchor generator's ``torch.meshgrid`` call, the deprecated torch API
    that torchvision's NMS fake kernel calls under ``torch.export``, and torch's one-time log
    line about ``is_fx_tracing`` (Detectron2's RoI pooler asks it)."""
    import logging

    fx_log = logging.getLogger("torch.fx._symbolic_trace")
    level = fx_log.level
    fx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category, message in (
                (FutureWarning, r".*create_unbacked_symint.* is deprecated"),
                (FutureWarning, r".*torch\.jit\.script.* is deprecated"),
                (DeprecationWarning, r"pkg_resources is deprecated"),
                (UserWarning, r"torch\.meshgrid: in an upcoming release"),
            ):
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        fx_log.setLevel(level)


def export_program(exporter, image, log: Callable[[str], None] = print) -> ExportedProgram:
    """``torch.export.export(strict=False)`` of the exporter's module with dynamic height and
    width; where the graph can only hold the sample's size, at that size (logged)."""
    import torch

    args = exporter.inputs(image)
    height = torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE)
    width = torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)
    d2 = exporter.predictor.backend == "detectron2"
    swaps = exportable_detectron2() if d2 else contextlib.nullcontext()
    with torch.no_grad(), exportable_torchvision(), swaps:
        try:
            return torch.export.export(
                exporter.module, args, dynamic_shapes=({1: height, 2: width},), strict=False
            )
        except Exception as e:  # noqa: BLE001 — any failure: try the sample's size
            log(
                f"pt2: no graph with dynamic height/width ({_first_line(e)}); exported at "
                f"{tuple(args[0].shape)} only"
            )
            return torch.export.export(exporter.module, args, strict=False)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def export_onnx_dynamo(program: ExportedProgram, path: str) -> None:
    import torch

    torch.onnx.export(
        program,
        (),
        path,
        dynamo=True,
        input_names=["image"],
        output_names=OUTPUT_NAMES,
        opset_version=ONNX_OPSET,
        external_data=False,
        verbose=False,
    )


def export_onnx_legacy(exporter, image, path: str) -> None:
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        # the logged fallback: its own deprecation notice, torch.jit.script (torchvision scripts
        # helpers while traced) and the tracer's notes are known
        warnings.simplefilter("ignore")
        torch.onnx.export(
            exporter.module,
            exporter.inputs(image),
            path,
            opset_version=LEGACY_ONNX_OPSET,
            dynamo=False,
            input_names=["image"],
            output_names=OUTPUT_NAMES,
            dynamic_axes={"image": {1: "height", 2: "width"}},
        )


def export_torchscript(exporter, image, path: str) -> None:
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        # asked for: torch.jit's deprecation notice, and the tracer's notes on the graph
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(
            exporter.module, exporter.inputs(image), check_trace=False, strict=False
        )
    traced.save(path)


def load_exported(path: str, fmt: str) -> Callable[[tuple], list]:
    """The exported file as a function: the graph's inputs -> its outputs (numpy)."""
    import numpy as np
    import torch

    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda inputs: session.run(None, {"image": inputs[0].numpy()})
    with warnings.catch_warnings():
        if fmt == "pt2":
            import torchvision  # noqa: F401 — registers torchvision::nms for the loader

            module = torch.export.load(path).module()
        else:
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.* is deprecated
            module = torch.jit.load(path)

    def run(inputs):
        with torch.no_grad():
            return [np.asarray(t.cpu()) for t in module(*inputs)]

    return run


def compare(ref, got, box_tol: float, score_tol: float) -> str | None:
    """``None`` when the outputs agree, else what differs. Detections are matched one to one
    (same label, scores within ``score_tol``, the closest box), so the order of (near-)equal
    scores does not matter."""
    import numpy as np

    (rb, rs, rl), (gb, gs, gl) = ref, got
    if len(rs) != len(gs):
        return f"{len(gs)} detections instead of {len(rs)}"
    rb, rs = np.asarray(rb, np.float64).reshape(-1, 4), np.asarray(rs, np.float64)
    gb, gs = np.asarray(gb, np.float64).reshape(-1, 4), np.asarray(gs, np.float64)
    rl, gl = np.asarray(rl).astype(np.int64), np.asarray(gl).astype(np.int64)
    free = np.ones(len(gs), dtype=bool)
    worst_box = 0.0
    for i in np.argsort(-rs, kind="stable"):
        ok = free & (gl == rl[i]) & (np.abs(gs - rs[i]) <= score_tol)
        if not ok.any():
            return f"no exported detection matches label {rl[i]} at score {rs[i]:.6f}"
        dist = np.where(ok, np.abs(gb - rb[i]).max(axis=1), np.inf)
        j = int(dist.argmin())
        free[j] = False
        worst_box = max(worst_box, float(dist[j]))
    if worst_box > box_tol:
        return f"boxes differ by up to {worst_box:.2e} px (tolerance {box_tol})"
    return None


def verify(
    path: str, fmt: str, exporter, images, refs, box_tol: float, score_tol: float
) -> List[dict]:
    """Per sample image ``{"image", "detections", "problem"}``; an exported file that cannot
    run on an image is a problem too."""
    run = load_exported(path, fmt)
    checks = []
    for i, (image, ref) in enumerate(zip(images, refs)):
        try:
            problem = compare(ref, run(exporter.inputs(image)), box_tol, score_tol)
        except Exception as e:  # noqa: BLE001 — e.g. a graph fixed to another size
            problem = f"the exported file does not run: {_first_line(e)}"
        checks.append({"image": i, "detections": int(len(ref[1])), "problem": problem})
    return checks


def _formats(values: List[str]) -> List[str]:
    out = []
    for v in values:
        for f in v.replace(",", " ").split():
            if f not in FORMATS:
                raise ConfigError(f"--format {f!r} is not one of {', '.join(FORMATS)}")
            if f not in out:
                out.append(f)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument(
        "--format",
        nargs="+",
        default=["pt2", "onnx"],
        metavar="FORMAT",
        help="pt2, onnx and/or torchscript (default: pt2 onnx)",
    )
    p.add_argument("--output", required=True)
    p.add_argument("--sample-images", nargs="*", default=[])
    p.add_argument("--num-samples", type=int, default=3)
    p.add_argument("--box-tol", type=float, default=1e-3)
    p.add_argument("--score-tol", type=float, default=1e-4)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS W")
    args = p.parse_args(argv)
    formats = _formats(args.format)
    if not os.path.isfile(args.config_file):
        raise MissingFileError(
            f"--config-file {args.config_file!r} does not exist", "check the path"
        )
    if args.num_samples < 1 and not args.sample_images:
        raise ConfigError(f"--num-samples {args.num_samples}", "verify on at least one image")
    with third_party_notices_silenced():
        return export_and_verify(args, formats)


def export_and_verify(args: argparse.Namespace, formats: List[str]) -> dict:
    """Build the student, export it in ``formats``, verify every file; the report."""
    import torch

    from kd2.engine.predictor import load_predictor
    from kd2.engine.run_dir import make_writable_dir

    try:
        predictor = load_predictor(args.config_file, args.opts)
    except KD2Error:
        raise
    except FileNotFoundError as e:
        raise MissingFileError(str(e)) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    images = sample_images(predictor, args.sample_images, args.num_samples)
    exporter = (
        _TorchvisionExport(predictor)
        if predictor.backend in OWN_LOOP_BACKENDS
        else _Detectron2Export(predictor)
    )
    make_writable_dir(args.output, "--output")
    # the eager run first: the references, and state the first run sets (torchvision's RoI
    # pooler caches its level scales) is then in place for the trace
    refs = [reference(exporter, image) for image in images]

    notes: List[str] = []

    def note(line: str) -> None:  # one line on stderr, kept in export.json
        notes.append(line)
        print(line, file=sys.stderr, flush=True)

    files: dict = {}
    program, no_program = None, ""
    if "pt2" in formats or "onnx" in formats:
        try:
            program = export_program(exporter, images[0], log=note)
        except Exception as e:  # noqa: BLE001 — ONNX can still take the legacy exporter
            if "pt2" in formats:
                raise
            no_program = f"torch.export failed: {_first_line(e)}"
    for fmt in formats:
        path = os.path.join(args.output, FILE_NAMES[fmt])
        entry = {"file": path}
        if fmt == "pt2":
            torch.export.save(program, path)
        elif fmt == "onnx":
            entry["exporter"] = "dynamo"
            reason = no_program
            if program is not None:
                try:
                    export_onnx_dynamo(program, path)
                    entry["checks"] = verify(
                        path, fmt, exporter, images, refs, args.box_tol, args.score_tol
                    )
                    bad = [c["problem"] for c in entry["checks"] if c["problem"]]
                    reason = f"its file disagrees with PyTorch: {bad[0]}" if bad else ""
                except Exception as e:  # noqa: BLE001 — any failure: the legacy exporter
                    reason = f"it failed: {_first_line(e)}"
            if reason:
                note(f"onnx: the dynamo exporter is not used ({reason}); legacy exporter")
                entry.update(exporter="legacy", fallback_reason=reason)
                entry.pop("checks", None)
                export_onnx_legacy(exporter, images[0], path)
        else:
            export_torchscript(exporter, images[0], path)
        if "checks" not in entry:
            entry["checks"] = verify(
                path, fmt, exporter, images, refs, args.box_tol, args.score_tol
            )
        files[fmt] = entry

    report = {
        "files": files,
        "formats": formats,
        "backend": predictor.backend,
        "architecture": type(predictor.model).__name__,
        "classes": predictor.class_names,
        "notes": notes,
        "box_tol_px": args.box_tol,
        "score_tol": args.score_tol,
        "torch": torch.__version__,
    }
    with open(os.path.join(args.output, "export.json"), "w") as f:
        json.dump(report, f, indent=2)
    bad = [(fmt, c) for fmt, e in files.items() for c in e["checks"] if c["problem"]]
    if bad:
        print(json.dumps(report, indent=2))
        fmt, first = bad[0]
        print(
            f"kd2: error: the exported model disagrees with PyTorch on {len(bad)} of "
            f"{sum(len(e['checks']) for e in files.values())} checks: {fmt} on sample image "
            f"{first['image']}: {first['problem']}",
            file=sys.stderr,
        )
        raise SystemExit(1)
    detections = sum(c["detections"] for c in next(iter(files.values()))["checks"])
    print(f"wrote {', '.join(e['file'] for e in files.values())}; each verified on "
          f"{len(images)} images ({detections} detections) within {args.box_tol} px / "
          f"{args.score_tol}")  # fmt: skip
    return report


if __name__ == "__main__":
    run_main(main)
