"""The prototype generation module (PGM) of Global Knowledge distillation, as a trainer hook.

Every ``period`` iterations (one epoch by default) :class:`PrototypeRefresher`

1. takes the PGM instances: training-set GT boxes **strictly larger** than ``MIN_BOX_SIZE`` ×
   ``MIN_BOX_SIZE`` original pixels (width and height ``> 30`` by default: the released
   ``_filter_predictions``, ``box_w > min_size[0]``, so a 30-px box is left out); per class at
   most ``MAX_IMAGES_PER_CLASS`` images holding such a box, drawn once by a shuffle with ``SEED``
   (all the class's valid boxes of those images are used);
2. runs the images through the detectors' **test-time** input transform and FPN, and pools every
   box on every level with :func:`pool_instance_boxes` (the integer inclusive crop of the
   released code, with its feature-size / padded-size box scaling) — the teacher once (cached on
   disk in ``OUTPUT_DIR/pgm``), the student from its current weights at every refresh;
3. selects, per class and level, the prototypes with :func:`kd2.ops.pgm_select` and installs the
   un-normalised features of the picked instances in every :class:`~kd2.losses.GlobalKD` method
   of the model (buffers: saved in checkpoints, restored exactly on resume);
4. with several processes, rank 0 alone extracts and selects, and broadcasts the prototypes:
   every rank distils towards the same ones (the student's BatchNorm statistics differ between
   ranks between checkpoints, so ranks computing their own would disagree);
5. writes ``OUTPUT_DIR/pgm/prototypes_<iteration>.json`` (which instance each prototype is, with
   its image and box, and every instance's robustness η per level) for
   ``tools/show_prototypes.py``, and the tensors as ``.pt``.

The model provides ``kd_instance_features(images, boxes, teacher) -> {stride: (M, C)}``: that is
the only backend-specific part (``kd2.tv`` and ``kd2.d2`` meta-architectures implement it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Dict, List

import numpy as np
import torch
from torch import Tensor, nn

from kd2.losses.global_knowledge import robustness_by_class
from kd2.ops import box_mean_pool, pgm_select
from kd2.utils.checkpoint import atomic_save, write_text_atomic

__all__ = [
    "PrototypeRefresher",
    "build_prototype_refresher",
    "own_padded_size",
    "pool_instance_boxes",
    "select_pgm_instances",
]

logger = logging.getLogger(__name__)


def own_padded_size(image_size: Sequence[int], size_divisibility: int) -> tuple[int, int]:
    """``(H_p, W_p)``: an ``(h, w)`` input padded **on its own** up to a multiple of
    ``size_divisibility`` (``<= 1``: no padding), as the released PGM pads each image (one image
    per forward, mmdet's ``Pad(size_divisor=32)``)."""
    h, w = int(image_size[0]), int(image_size[1])
    d = int(size_divisibility)
    if d > 1:
        h, w = -(-h // d) * d, -(-w // d) * d
    return h, w


def pool_instance_boxes(
    features: Dict[int, Tensor],
    boxes: Sequence[Tensor],
    padded_sizes: Sequence[Sequence[int]],
) -> Dict[int, Tensor]:
    """Pool every image's boxes on every level (the backends' ``kd_instance_features`` tail).

    Follows DAVAR-Lab-ML ``ECCV22_Distilling_Object_Detectors_with_Global_Knowledge/
    ObjectPerceptron/mmdetection/third_party/kd/mmdet/strategy/prototype_generation_module.py``,
    ``_fetch_roi_features`` (l. 163-187): per level the box is scaled by ``feature size / padded
    image size`` on each axis (``w_ratio = W_l / W_p``, ``h_ratio = H_l / H_p``; float32 product,
    as the code's ``box.astype(np.float32) *= ratio``), its corners truncated to integers and the
    inclusive crop ``[y1 : y2 + 1, x1 : x2 + 1]`` averaged (:func:`kd2.ops.box_mean_pool` at
    stride 1 on the scaled box, which clamps a crop reaching past the map like the code's slice).

    That ratio is **not** ``1 / stride`` on the levels coarser than the input's divisibility:
    ``H_l = ⌈H_p / s⌉`` (every kd2 FPN makes P6 / P7 with a stride-2 ``max_pool2d(k=1)`` or a
    3×3/2 conv with padding 1, i.e. ``⌈H/2⌉``), so an 800-px padded side has 13 cells at P6
    (ratio 13/800 = 1/61.5, not 1/64) and 7 at P7 (1/114.3, not 1/128), and a box's cells shift
    by up to one wherever the padded side / 32 is odd. (``H_l`` is capped at the batched map's
    height, so a backbone whose coarse levels are not ``⌈H/2⌉`` still pools inside its map.)

    ``H_p, W_p`` are the image's **own** padded size (:func:`own_padded_size`), since the
    released code runs one image at a time; kd2 may batch images (``KD.GLOBALKD.BATCH_SIZE``),
    which pads them to the batch's largest: the cells are those of the image alone (a crop stops
    at its own last cell), the features those of the batched forward (identical to the one-image
    forward with ``BATCH_SIZE 1``; with larger batches they can differ near the image's bottom
    and right edges, where the batch adds padding).

    Args:
        features: ``{stride: (N, C, H, W)}`` FPN maps of ``N`` images.
        boxes: per image ``(G_i, 4)`` XYXY in the maps' input pixels.
        padded_sizes: per image ``(H_p, W_p)``, its own padded input size.

    Returns:
        ``{stride: (sum G_i, C)}`` pooled features, image-then-box order.
    """
    if len(padded_sizes) != len(boxes):
        raise ValueError(f"{len(padded_sizes)} padded sizes for {len(boxes)} images")
    flat = torch.cat(list(boxes)).float()
    device = flat.device
    index = torch.cat([torch.full((len(b),), i, dtype=torch.long) for i, b in enumerate(boxes)]).to(
        device
    )
    sizes = torch.tensor([[int(v) for v in hw] for hw in padded_sizes], dtype=torch.float64)
    pad = sizes.reshape(-1, 2).to(device)[index]  # (M, 2)
    out = {}
    for s, f in features.items():
        # (M, 2): the image's own (H_l, W_l), never more than the batched map has
        cells = torch.ceil(pad / float(s))
        cells = torch.minimum(cells, cells.new_tensor([f.shape[-2], f.shape[-1]]))
        ratio = (cells / pad).float()  # python-float ratio, cast to float32 by the product
        scale = torch.stack([ratio[:, 1], ratio[:, 0], ratio[:, 1], ratio[:, 0]], dim=1)
        # the slice of the image's own map stops at its last cell, even where the batched map
        # (padded to a larger image) goes on
        last = (cells - 1).float()
        last = torch.stack([last[:, 1], last[:, 0], last[:, 1], last[:, 0]], dim=1)
        out[s] = box_mean_pool(f, torch.minimum(flat * scale, last), index, 1.0)
    return out


def select_pgm_instances(
    records: Sequence[Dict[str, Any]],
    num_classes: int,
    *,
    min_size: float = 30.0,
    max_images_per_class: int = 800,
    seed: int = 1,
) -> List[Dict[str, Any]]:
    """The PGM's instances, drawn once and deterministically.

    Args:
        records: kd2 dataset records (``boxes`` (G, 4) XYXY original pixels, ``labels`` (G,)
            contiguous classes ``0..K-1``, ``file_name``, ``image_id``).
        num_classes: ``K``.
        min_size: a box qualifies when its width and height are both ``> min_size`` (strictly,
            as the released ``_filter_predictions``: ``box_w > min_size[0]``).
        max_images_per_class: per class, at most this many images (those holding a qualifying
            box of the class), drawn by ``numpy.random.RandomState(seed).permutation``.
        seed: the draw's seed.

    Returns:
        instances sorted by (record index, box index), each ``{"record": i, "box": [x1, y1,
        x2, y2], "label": c, "file_name", "image_id"}``.
    """
    per_class: List[List[int]] = [[] for _ in range(num_classes)]
    valid: Dict[int, List[tuple]] = {}  # record -> its qualifying (box, label), in box order
    for i, rec in enumerate(records):
        boxes = np.asarray(rec["boxes"], dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(rec["labels"], dtype=np.int64).reshape(-1)
        box_w = np.abs(boxes[:, 2] - boxes[:, 0])
        box_h = np.abs(boxes[:, 3] - boxes[:, 1])
        ok = (box_w > min_size) & (box_h > min_size)
        ok &= (labels >= 0) & (labels < num_classes)
        valid[i] = [([float(v) for v in boxes[j]], int(labels[j])) for j in np.nonzero(ok)[0]]
        for c in set(labels[ok].tolist()):
            per_class[c].append(i)
    chosen = set()
    for c, images in enumerate(per_class):
        rng = np.random.RandomState(seed)
        order = rng.permutation(len(images))[:max_images_per_class]
        chosen.update((images[j], c) for j in order)
    out = []
    for i, rec in enumerate(records):
        for box, label in valid[i]:
            if (i, label) in chosen:
                out.append(
                    {
                        "record": i,
                        "box": box,
                        "label": label,
                        "file_name": rec["file_name"],
                        "image_id": rec["image_id"],
                    }
                )
    return out


class PrototypeRefresher:
    """Runs the PGM for the model's GlobalKD methods (see the module docstring).

    Args:
        model: a distillation meta-architecture (``kd_methods``, ``kd_instance_features``).
        records: the training set's records.
        node: ``cfg.KD.GLOBALKD``.
        output_dir: where ``pgm/`` goes.
        max_iter: the schedule's length (for the attenuation ``1 − epoch / num_epochs``).
        epoch_iters: iterations per epoch.
        read_image: ``fn(record) -> (3, H, W)`` float image in ``[0, 1]``.
        device: where the feature extraction runs.
    """

    def __init__(
        self,
        model: nn.Module,
        records: Sequence[Dict[str, Any]],
        node,
        *,
        output_dir: str,
        max_iter: int,
        epoch_iters: int,
        read_image: Callable[[Dict[str, Any]], Tensor],
        device: torch.device | str = "cpu",
    ):
        self.model = model
        self.methods = [m for m in model.kd_methods.values() if getattr(m, "needs_prototypes", 0)]
        if not self.methods:
            raise ValueError("the model has no method that needs prototypes (GlobalKD)")
        self.records = list(records)
        self.node = node
        self.output_dir = os.path.join(output_dir, "pgm")
        self.epoch_iters = max(1, int(epoch_iters))
        self.period = int(node.REFRESH_PERIOD) or self.epoch_iters
        self.read_image = read_image
        self.device = torch.device(device)
        self.batch_size = max(1, int(node.BATCH_SIZE))
        num_classes = self.methods[0].num_classes
        self.instances = select_pgm_instances(
            self.records,
            num_classes,
            min_size=float(node.MIN_BOX_SIZE),
            max_images_per_class=int(node.MAX_IMAGES_PER_CLASS),
            seed=int(node.SEED),
        )
        counts = np.bincount([d["label"] for d in self.instances], minlength=num_classes)
        logger.info(
            "PGM: %d instances (per class %s), refresh every %d iterations",
            len(self.instances),
            counts.tolist(),
            self.period,
        )
        if not self.instances:
            logger.warning(
                "PGM: no training box is larger than %s x %s pixels; every instance is distilled "
                "with eta = 1 (lower KD.GLOBALKD.MIN_BOX_SIZE for small objects)",
                node.MIN_BOX_SIZE,
                node.MIN_BOX_SIZE,
            )
        for m in self.methods:
            m.epoch_iters, m.max_iter = self.epoch_iters, int(max_iter)
        self._teacher_feats: Dict[int, Tensor] | None = None

    # -- features -----------------------------------------------------------------------------
    def _extract(self, teacher: bool) -> Dict[int, Tensor]:
        """``{stride: (M, C)}`` pooled features of all instances, in instance order."""
        by_record: Dict[int, List[int]] = {}
        for k, d in enumerate(self.instances):
            by_record.setdefault(d["record"], []).append(k)
        rec_ids = sorted(by_record)
        out: Dict[int, List[Tensor]] = {}
        order: List[int] = []
        who = "teacher" if teacher else "student"
        t0 = time.perf_counter()
        for b in range(0, len(rec_ids), self.batch_size):
            chunk = rec_ids[b : b + self.batch_size]
            images = [self.read_image(self.records[i]).to(self.device) for i in chunk]
            boxes = [
                torch.tensor([self.instances[k]["box"] for k in by_record[i]], device=self.device)
                for i in chunk
            ]
            feats = self.model.kd_instance_features(images, boxes, teacher=teacher)
            for s, f in feats.items():
                out.setdefault(s, []).append(f.float().cpu())
            for i in chunk:
                order.extend(by_record[i])
            done = min(b + self.batch_size, len(rec_ids))
            if done == len(rec_ids) or (b // self.batch_size) % 20 == 0:
                el = time.perf_counter() - t0
                eta = el / done * (len(rec_ids) - done)
                logger.info(
                    "PGM %s features: %d/%d images, ETA %.0fs", who, done, len(rec_ids), eta
                )
        inv = torch.empty(len(order), dtype=torch.long)
        inv[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        return {s: torch.cat(v)[inv] for s, v in out.items()}

    def _teacher_features(self) -> Dict[int, Tensor]:
        if self._teacher_feats is not None:
            return self._teacher_feats
        key = hashlib.sha256(
            json.dumps([(d["file_name"], d["box"], d["label"]) for d in self.instances]).encode()
            + repr(
                sorted((k, tuple(v.shape)) for k, v in self.model.teacher.state_dict().items())
            ).encode()
            + str(float(sum(p.double().sum() for p in self.model.teacher.parameters()))).encode()
        ).hexdigest()[:16]
        path = os.path.join(self.output_dir, f"teacher_features_{key}.pt")
        if os.path.isfile(path):
            self._teacher_feats = torch.load(path, map_location="cpu", weights_only=True)
            logger.info("PGM: teacher features from the cache %s", path)
        else:
            self._teacher_feats = self._extract(teacher=True)

            os.makedirs(self.output_dir, exist_ok=True)
            atomic_save(self._teacher_feats, path)
        return self._teacher_feats

    # -- refresh ------------------------------------------------------------------------------
    def maybe_refresh(self, iteration: int) -> bool:
        """Refresh at multiples of the period, and whenever a method has no prototypes yet."""
        due = iteration % self.period == 0
        stale = any(int(m.refreshed_at) != iteration for m in self.methods)
        missing = any(not m.has_prototypes() for m in self.methods)
        if (due and stale) or missing:
            self.refresh(iteration)
            return True
        return False

    @torch.no_grad()
    def refresh(self, iteration: int) -> None:
        t0 = time.perf_counter()
        node = self.node
        labels = torch.tensor([d["label"] for d in self.instances], dtype=torch.long)
        main = _is_main_process()
        if main and self.instances:
            t_feats = self._teacher_features()
            s_feats = self._extract(teacher=False)
        else:
            t_feats, s_feats = {}, {}
        report: Dict[str, Any] = {"iteration": iteration, "levels": {}, "instances": []}
        tensors: Dict[str, Tensor] = {}
        for method in self.methods:
            k, p = method.num_classes, method.num_prototypes
            for s in method.strides:
                bank_s = method.protos_student.get(s)
                bank_t = method.protos_teacher.get(s)
                ps = torch.zeros_like(bank_s, device="cpu")
                pt = torch.zeros_like(bank_t, device="cpu")
                valid = torch.zeros(k, dtype=torch.bool)
                picks: Dict[int, List[int]] = {}
                if main and s in s_feats and s in t_feats:
                    for c in range(k):
                        rows = (labels == c).nonzero(as_tuple=True)[0]
                        if rows.numel() == 0:
                            continue
                        xs, xt = s_feats[s][rows], t_feats[s][rows]
                        idx = pgm_select(
                            xs,
                            xt,
                            num_prototypes=p,
                            alpha=float(node.ALPHA),
                            bandwidth=float(node.BANDWIDTH),
                            quantile=float(node.QUANTILE),
                        )
                        ps[c], pt[c] = xs[idx], xt[idx]
                        valid[c] = True
                        picks[c] = rows[idx].tolist()
                ps, pt, valid = _broadcast_from_main(ps.to(bank_s), pt.to(bank_t), valid)
                method.set_prototypes(s, ps, pt, valid, iteration)
                ps, pt, valid = ps.cpu(), pt.cpu(), valid.cpu()
                tensors[f"student_{s}"], tensors[f"teacher_{s}"] = ps, pt
                eta = torch.ones(len(self.instances))
                if main and s in s_feats and s in t_feats and self.instances:
                    eta = robustness_by_class(s_feats[s], t_feats[s], labels, ps, pt, valid)
                report["levels"][str(s)] = {
                    "prototypes": {str(c): v for c, v in picks.items()},
                    "eta": [round(float(e), 5) for e in eta],
                }
        report["instances"] = [
            {k: d[k] for k in ("file_name", "image_id", "box", "label")} for d in self.instances
        ]
        if main:
            os.makedirs(self.output_dir, exist_ok=True)
            base = os.path.join(self.output_dir, f"prototypes_{iteration:07d}")
            write_text_atomic(base + ".json", json.dumps(report))
            atomic_save(tensors, base + ".pt")
        checksum = sum(float(t.double().sum()) for t in tensors.values())
        logger.info(
            "PGM refresh at iteration %d: %d instances, %.1fs, prototype checksum %.10e",
            iteration,
            len(self.instances),
            time.perf_counter() - t0,
            checksum,
        )


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _broadcast_from_main(*tensors: Tensor) -> tuple:
    """Rank 0's values of ``tensors`` on every rank (identity in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    out = []
    for t in tensors:
        t = t.contiguous()
        is_bool = t.dtype == torch.bool  # broadcast as uint8: not every backend takes bool
        buf = t.to(torch.uint8) if is_bool else t
        dist.broadcast(buf, 0)
        out.append(buf.bool() if is_bool else buf)
    return tuple(out)


def build_prototype_refresher(
    cfg, model: nn.Module, records: Sequence[Dict[str, Any]], read_image
) -> PrototypeRefresher | None:
    """A refresher when one of the model's KD methods needs prototypes, else ``None``."""
    methods = getattr(model, "kd_methods", {})
    if not any(getattr(m, "needs_prototypes", False) for m in methods.values()):
        return None
    epoch_iters = math.ceil(len(records) / max(1, cfg.SOLVER.IMS_PER_BATCH))
    return PrototypeRefresher(
        model,
        records,
        cfg.KD.GLOBALKD,
        output_dir=cfg.OUTPUT_DIR,
        max_iter=cfg.SOLVER.MAX_ITER,
        epoch_iters=epoch_iters,
        read_image=read_image,
        device=cfg.MODEL.DEVICE,
    )
