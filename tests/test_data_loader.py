"""Tests of kd2.data.loader: image reading, augmentation seeds, exact resume, sharding."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from kd2.data import (
    DetectionDataset,
    TrainingSampler,
    build_test_loader,
    build_train_loader,
    generate_synthetic_dataset,
    load_coco_json,
    read_image,
)


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list:
    paths = generate_synthetic_dataset(
        str(tmp_path_factory.mktemp("syn")), num_train=7, num_val=0, image_size=64
    )
    recs, _ = load_coco_json(paths["train_json"], paths["train_image_root"])
    return recs


def _same_batches(a: list, b: list) -> bool:
    for (ims_a, tg_a), (ims_b, tg_b) in zip(a, b, strict=True):
        for x, y in zip(ims_a, ims_b, strict=True):
            if not torch.equal(x, y):
                return False
        for x, y in zip(tg_a, tg_b, strict=True):
            if x["image_id"] != y["image_id"] or not torch.equal(x["boxes"], y["boxes"]):
                return False
            if not torch.equal(x["labels"], y["labels"]) or x["orig_size"] != y["orig_size"]:
                return False
    return True


def test_read_image_rgb_float(tmp_path: Path) -> None:
    bgr = np.zeros((5, 7, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV's BGR
    cv2.imwrite(str(tmp_path / "blue.png"), bgr)
    img = read_image(str(tmp_path / "blue.png"))
    assert img.shape == (3, 5, 7) and img.dtype == torch.float32
    assert torch.all(img[2] == 1.0) and torch.all(img[:2] == 0.0)


def test_flip_only_from_aug_seed(records: list) -> None:
    i = next(k for k, r in enumerate(records) if len(r["labels"]))
    ds = DetectionDataset(records, train=True, flip_prob=0.5)
    plain, t0 = ds[i]
    outs = {s: ds[(i, s)] for s in range(16)}
    flipped = [s for s, (im, _) in outs.items() if not torch.equal(im, plain)]
    assert 0 < len(flipped) < 16  # both outcomes happen
    s = flipped[0]
    im, t = outs[s]
    w = records[i]["width"]
    assert torch.equal(im, plain.flip(-1))
    expected = torch.stack([w - t0["boxes"][:, 2], t0["boxes"][:, 1], w - t0["boxes"][:, 0]], 1)
    assert torch.equal(t["boxes"][:, :3], expected) and torch.equal(t["labels"], t0["labels"])
    again, t2 = ds[(i, s)]
    assert torch.equal(again, im) and torch.equal(t2["boxes"], t["boxes"])  # reproducible
    assert t["image_id"] == records[i]["image_id"] and t["orig_size"] == (64, 64)
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    # evaluation datasets never augment
    ev = DetectionDataset(records, train=False, flip_prob=1.0)
    assert torch.equal(ev[(i, s)][0], plain)


def test_sampler_epochs_and_ranks() -> None:
    n, b, w = 7, 3, 2
    samplers = [
        TrainingSampler(n, batch_size_per_rank=b, seed=5, rank=r, world_size=w) for r in range(w)
    ]
    s0 = samplers[0]
    for epoch in range(3):  # each epoch is a permutation of the dataset
        assert sorted(s0.index_at(p) for p in range(epoch * n, (epoch + 1) * n)) == list(range(n))
    assert [s0.index_at(p) for p in range(n)] != [s0.index_at(p) for p in range(n, 2 * n)]
    seen: list = []
    for it in range(4):
        per_rank = [set(s.positions(it)) for s in samplers]
        assert not per_rank[0] & per_rank[1]  # ranks see disjoint positions
        seen += [p for pos in per_rank for p in pos]
    assert sorted(seen) == list(range(4 * w * b))  # and together cover the stream, no gaps
    assert s0.batch(1) == [(s0.index_at(p), s0.aug_seed_at(p)) for p in range(6, 9)]
    other = TrainingSampler(n, batch_size_per_rank=b, seed=6)
    assert [other.index_at(p) for p in range(n)] != [s0.index_at(p) for p in range(n)]


def test_exact_resume_and_ranks(records: list) -> None:
    ds = DetectionDataset(records, train=True)
    full = list(islice(build_train_loader(ds, batch_size_per_rank=2, seed=3), 6))
    resumed = list(islice(build_train_loader(ds, batch_size_per_rank=2, seed=3, start_iter=3), 3))
    assert _same_batches(full[3:], resumed)
    assert not _same_batches(full[:3], full[3:])

    ranks = [
        list(islice(build_train_loader(ds, batch_size_per_rank=2, seed=3, rank=r, world_size=2), 2))
        for r in range(2)
    ]
    # rank 0 of 2 takes stream positions [0,2) and [4,6); a single rank takes [0,2), [2,4), ...
    assert _same_batches(ranks[0], [full[0], full[2]])
    assert _same_batches(ranks[1], [full[1], full[3]])


def test_workers_do_not_change_batches(records: list) -> None:
    ds = DetectionDataset(records, train=True)
    a = list(islice(build_train_loader(ds, batch_size_per_rank=2, seed=1, start_iter=2), 3))
    it = build_train_loader(ds, batch_size_per_rank=2, seed=1, start_iter=2, num_workers=1)
    b = list(islice(it, 3))
    del it
    assert _same_batches(a, b)


def test_test_loader_in_order(records: list) -> None:
    loader = build_test_loader(records, batch_size=3)
    assert len(loader) == 3
    ids = [t["image_id"] for _, targets in loader for t in targets]
    assert ids == [r["image_id"] for r in records]
    images, targets = next(iter(loader))
    assert len(images) == 3 and images[0].shape == (3, 64, 64)
