"""Train and evaluate the classifier teacher of classifier-to-detector distillation.

The teacher is a torchvision ResNet (:class:`kd2.modeling.classifier_teacher.CropClassifier`)
trained on the **GT boxes** of a detection dataset, cropped exactly as the distillation loss
crops them (:func:`kd2.losses.classifier_kd.crop_boxes`: the spatial-transformer crop of the
normalised image, bilinear, ``size × size``), with the detector's input normalisation
(``docs/algorithms.md`` §4.2: "the teacher must have been trained with the same
normalisation"). Training augments with the loader's horizontal flip and a random jitter of each
box (shifts and rescaling of up to ``jitter`` of its side), so the teacher also sees the
imperfect boxes the detector will predict.

Crops are made on the fly from batches of images, so memory does not grow with the dataset
(COCO's 860k objects included).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd2.data import build_test_loader, build_train_loader
from kd2.losses.classifier_kd import crop_boxes
from kd2.modeling.classifier_teacher import CropClassifier, save_crop_classifier

__all__ = ["evaluate_crop_classifier", "gt_crops", "train_crop_classifier"]

logger = logging.getLogger(__name__)


def gt_crops(
    images: Sequence[Tensor],
    targets: Sequence[Dict],
    *,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    size: int,
    jitter: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tuple[Tensor, Tensor]:
    """Crops of every GT box of a batch, in the classifier's input normalisation.

    Args:
        images: ``(3, H_i, W_i)`` RGB images in ``[0, 1]``.
        targets: dicts with ``boxes`` ``(G_i, 4)`` XYXY pixels and ``labels`` ``(G_i,)``.
        pixel_mean / pixel_std: RGB normalisation in ``[0, 1]`` units.
        size: crop side.
        jitter: each box side moves by ``U(-jitter, jitter)`` of the box's width/height
            (0 = the exact GT boxes).
        generator: randomness of the jitter.

    Returns:
        ``(crops (M, 3, size, size), labels (M,))`` over all images, image then box order.
    """
    mean = torch.tensor(pixel_mean).view(3, 1, 1)
    std = torch.tensor(pixel_std).view(3, 1, 1)
    crops, labels = [], []
    for img, t in zip(images, targets):
        boxes = t["boxes"].float().reshape(-1, 4)
        if boxes.numel() == 0:
            continue
        if jitter > 0:
            wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
            noise = torch.rand(boxes.shape, generator=generator) * 2 - 1
            boxes = boxes + noise * jitter * wh
            x1y1 = torch.minimum(boxes[:, :2], boxes[:, 2:] - 1)  # keep at least 1 px
            boxes = torch.cat([x1y1, torch.maximum(boxes[:, 2:], x1y1 + 1)], dim=1)
        x = ((img.to(mean.device) - mean) / std)[None]
        index = torch.zeros(len(boxes), dtype=torch.long)
        crops.append(crop_boxes(x, boxes, index, size))
        labels.append(t["labels"].long().reshape(-1))
    if not crops:
        return torch.zeros(0, 3, size, size), torch.zeros(0, dtype=torch.long)
    return torch.cat(crops), torch.cat(labels)


@torch.no_grad()
def evaluate_crop_classifier(
    model: CropClassifier, records: List[Dict], *, batch_images: int = 16, device: str = "cpu"
) -> Dict[str, object]:
    """Top-1 accuracy on the exact GT crops of ``records`` (overall and per class)."""
    was_training = model.training
    model.eval()
    k = model.num_classes
    correct = torch.zeros(k, dtype=torch.long)
    total = torch.zeros(k, dtype=torch.long)
    try:
        for images, targets in build_test_loader(records, batch_size=batch_images):
            crops, labels = gt_crops(
                images,
                targets,
                pixel_mean=model.pixel_mean,
                pixel_std=model.pixel_std,
                size=model.crop_size,
            )
            if len(labels) == 0:
                continue
            pred = model(crops.to(device)).argmax(dim=1).cpu()
            total += torch.bincount(labels, minlength=k)
            correct += torch.bincount(labels[pred == labels], minlength=k)
    finally:
        model.train(was_training)
    n = int(total.sum())
    per_class = {
        int(c): (float(correct[c]) / float(total[c]) * 100 if total[c] else float("nan"))
        for c in range(k)
    }
    return {
        "top1": float(correct.sum()) / n * 100 if n else float("nan"),
        "num_crops": n,
        "per_class_top1": per_class,
    }


def _sgd_cosine(model: nn.Module, lr: float, weight_decay: float, max_iter: int):
    """SGD (momentum 0.9) on the trainable parameters with a cosine schedule to 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: 0.5 * (1 + math.cos(math.pi * min(it, max_iter) / max_iter))
    )
    return opt, sched


def _sgd_step(model, opt, crops: Tensor, labels: Tensor, device, epoch: int, it: int):
    """One optimizer step on a batch of crops; a non-finite loss stops the run."""
    crops, labels = crops.to(device), labels.to(device)
    logits = model(crops)
    loss = F.cross_entropy(logits, labels)
    if not math.isfinite(loss.item()):
        raise FloatingPointError(
            f"crop-classifier loss became {loss.item()} at epoch {epoch} iteration {it}; lower --lr"
        )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss, logits, labels


class _EpochRun:
    """The running training figures of one epoch, logged every 20 steps with an ETA."""

    def __init__(self, epoch: int, epochs: int, iters_per_epoch: int, t0: float, progress: bool):
        self.epoch, self.epochs, self.iters_per_epoch = epoch, epochs, iters_per_epoch
        self.t0, self.progress = t0, progress
        self.seen = self.correct = 0
        self.loss_sum = 0.0

    def summary(self, val: Dict[str, object]) -> Dict[str, float]:
        """The epoch's history entry, its validation logged."""
        logger.info(
            "crop classifier: epoch %d/%d val top-1 %.2f%% on %d crops",
            self.epoch + 1,
            self.epochs,
            val["top1"],
            val["num_crops"],
        )
        return {
            "epoch": self.epoch + 1,
            "train_loss": self.loss_sum / max(self.seen, 1),
            "train_top1": 100.0 * self.correct / max(self.seen, 1),
            "val_top1": val["top1"],
        }

    def log(self, it: int, loss: Tensor, logits: Tensor, labels: Tensor) -> None:
        self.seen += len(labels)
        self.correct += int((logits.argmax(1) == labels).sum())
        self.loss_sum += loss.item() * len(labels)
        max_iter = self.epochs * self.iters_per_epoch
        done = self.epoch * self.iters_per_epoch + it + 1
        if self.progress and (done % 20 == 0 or done == max_iter):
            elapsed = time.time() - self.t0
            logger.info(
                "crop classifier: epoch %d/%d iter %d/%d loss %.3f train top-1 %.1f%% "
                "(%.0fs elapsed, ETA %.0fs)",
                self.epoch + 1,
                self.epochs,
                done,
                max_iter,
                self.loss_sum / max(self.seen, 1),
                100.0 * self.correct / max(self.seen, 1),
                elapsed,
                elapsed / done * (max_iter - done),
            )


def train_crop_classifier(
    train_records: List[Dict],
    val_records: List[Dict],
    *,
    output_dir: str,
    num_classes: int,
    arch: str = "resnet50",
    crop_size: int = 112,
    pixel_mean: Sequence[float] = (0.485, 0.456, 0.406),
    pixel_std: Sequence[float] = (0.229, 0.224, 0.225),
    epochs: int = 12,
    batch_images: int = 16,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    jitter: float = 0.1,
    seed: int = 0,
    device: str = "cpu",
    class_names: Sequence[str] = (),
    progress: bool = True,
) -> Dict[str, object]:
    """Train a :class:`CropClassifier` on the GT crops of ``train_records``.

    SGD (momentum 0.9) with a cosine schedule over ``epochs`` (an epoch = every training image
    once, ``batch_images`` images per step, all of their objects in the batch). Evaluates top-1
    on the exact val crops after every epoch; writes ``output_dir/model_final.pth`` (loadable by
    ``KD.CLASSIFIERKD.TEACHER.WEIGHTS``) and ``output_dir/metrics.json``.

    Returns:
        ``{"top1": ..., "num_crops": ..., "per_class_top1": ..., "history": [...],
        "weights": path, "train_seconds": s}``.
    """
    if not train_records:
        raise ValueError("no training images: the training dataset is empty")
    if sum(len(r["boxes"]) for r in train_records) == 0:
        raise ValueError("the training dataset has no GT boxes to crop")
    os.makedirs(output_dir, exist_ok=True)
    torch.manual_seed(seed)
    model = CropClassifier(
        arch,
        num_classes,
        crop_size,
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
        class_names=class_names,
    ).to(device)
    iters_per_epoch = max(1, math.ceil(len(train_records) / batch_images))
    opt, sched = _sgd_cosine(model, lr, weight_decay, epochs * iters_per_epoch)
    loader = build_train_loader(train_records, batch_size_per_rank=batch_images, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    history: List[Dict[str, float]] = []
    t0 = time.time()
    model.train()
    for epoch in range(epochs):
        step = _EpochRun(epoch, epochs, iters_per_epoch, t0, progress)
        for it in range(iters_per_epoch):
            images, targets = next(loader)
            crops, labels = gt_crops(
                images,
                targets,
                pixel_mean=pixel_mean,
                pixel_std=pixel_std,
                size=crop_size,
                jitter=jitter,
                generator=gen,
            )
            if len(labels) < 2:  # BatchNorm needs two samples; such batches are rare
                sched.step()
                continue
            loss, logits, labels = _sgd_step(model, opt, crops, labels, device, epoch, it)
            sched.step()
            step.log(it, loss, logits, labels)
        val = evaluate_crop_classifier(model, val_records, batch_images=batch_images, device=device)
        history.append(step.summary(val))
    weights = os.path.join(output_dir, "model_final.pth")
    model.cpu()
    save_crop_classifier(weights, model, top1=val["top1"], epochs=epochs, seed=seed)
    result = dict(val, history=history, weights=weights, train_seconds=time.time() - t0)
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result
