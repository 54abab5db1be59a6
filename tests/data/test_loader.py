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


# --- corrupt images and EXIF orientation (issue 11, item 15) ---------------------------------


def _truncate(path: str, keep: float = 0.5) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


@pytest.fixture()
def jpg_records(tmp_path: Path) -> list:
    paths = generate_synthetic_dataset(
        str(tmp_path / "syn"), num_train=5, num_val=0, image_size=32, image_format="jpg"
    )
    recs, _ = load_coco_json(paths["train_json"], paths["train_image_root"])
    return recs


def test_truncated_image_raises_naming_file(
    jpg_records: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    from PIL import ImageFile

    from kd2.data import loader
    from kd2.data.loader import CorruptImageError

    rec = jpg_records[1]
    _truncate(rec["file_name"])  # OpenCV decodes this silently with a grey bottom
    with pytest.raises(CorruptImageError) as e:
        read_image(rec["file_name"], json_file=rec["json_file"])
    msg = str(e.value)
    assert rec["file_name"] in msg and rec["json_file"] in msg and "truncated" in msg
    assert "DATALOADER.CORRUPT_IMAGES" in msg and isinstance(e.value, ValueError)
    assert e.value.path == rec["file_name"] and "truncated" in e.value.reason
    with pytest.raises(CorruptImageError, match=r"000002\.jpg"):
        DetectionDataset(jpg_records, train=True)[(1, 7)]  # "error" is the default
    for keep in (0.05, 0.9, 0.999):  # other cut points, and a JPEG lacking only its end marker
        bad = tmp_path / f"cut{keep}.jpg"
        data = Path(jpg_records[0]["file_name"]).read_bytes()
        bad.write_bytes(data[: min(int(len(data) * keep), len(data) - 2)])
        with pytest.raises(CorruptImageError, match=f"cut{keep}"):
            read_image(str(bad))
    png = tmp_path / "cut.png"
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    cv2.imwrite(str(png), rgb)
    _truncate(str(png))
    with pytest.raises(CorruptImageError, match=r"cut\.png"):
        read_image(str(png))
    # detection needs Pillow's default LOAD_TRUNCATED_IMAGES=False; if other code changed it,
    # say so once instead of failing silently
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    monkeypatch.setattr(loader, "_truncated_check_warned", False)
    with caplog.at_level("WARNING", logger="kd2.data.loader"):
        read_image(rec["file_name"])
    assert "LOAD_TRUNCATED_IMAGES" in caplog.text


def test_skip_corrupt_training_images(jpg_records: list, caplog) -> None:
    from kd2.data.loader import CorruptImageError

    good = DetectionDataset(jpg_records, train=True)
    expected = {i: good[(i, 11)] for i in range(5)}
    for i in (1, 2, 4):
        _truncate(jpg_records[i]["file_name"])
    ds = DetectionDataset(jpg_records, train=True, corrupt_images="skip")
    with caplog.at_level("WARNING", logger="kd2.data.loader"):
        # i -> first decodable (i + k) % N, same aug_seed: 1, 2 -> 3 and 4 -> 0 (wraps)
        for i, j in ((0, 0), (1, 3), (2, 3), (3, 3), (4, 0), (1, 3)):
            image, target = ds[(i, 11)]
            assert torch.equal(image, expected[j][0])
            assert torch.equal(target["boxes"], expected[j][1]["boxes"])
            assert target["image_id"] == jpg_records[j]["image_id"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3  # once per file, not per use
    assert jpg_records[1]["file_name"] in warnings[0] and "skipped 1 corrupt" in warnings[0]
    assert jpg_records[4]["file_name"] in warnings[2] and "skipped 3 corrupt" in warnings[2]
    assert ds.num_corrupt_skipped == 3
    assert sorted(ds.corrupt_skipped) == [1, 2, 4]

    # the stream stays a pure function of (seed, iteration): resume is exact
    fresh = DetectionDataset(jpg_records, train=True, corrupt_images="skip")
    full = list(islice(build_train_loader(fresh, batch_size_per_rank=2, seed=3), 5))
    resumed = list(islice(build_train_loader(ds, batch_size_per_rank=2, seed=3, start_iter=2), 3))
    assert _same_batches(full[2:], resumed)

    # evaluation never skips (an AP over a different image set would be silently wrong)
    ev = DetectionDataset(jpg_records, train=False, corrupt_images="skip")
    with pytest.raises(CorruptImageError, match="evaluation datasets never skip"):
        ev[1]
    assert torch.equal(ev[0][0], good[0][0])


def test_skip_when_every_image_is_corrupt(jpg_records: list) -> None:
    from kd2.data.loader import CorruptImageError

    for r in jpg_records:
        _truncate(r["file_name"])
    ds = DetectionDataset(jpg_records, train=True, corrupt_images="skip")
    with pytest.raises(CorruptImageError, match="All 5 training images are corrupt"):
        ds[(2, 0)]


def test_exif_orientation_not_applied(tmp_path: Path) -> None:
    from PIL import Image

    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20, 0] = 255  # stored: left half red, right half blue
    rgb[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = str(tmp_path / "rotated.jpg")
    Image.fromarray(rgb).save(path, exif=exif, quality=95)
    img = read_image(path)
    assert img.shape == (3, 20, 40)  # the stored pixel grid, as COCO annotations assume
    assert img[0, :, :16].mean() > 0.9 and img[2, :, :16].mean() < 0.1
    assert img[2, :, 24:].mean() > 0.9 and img[0, :, 24:].mean() < 0.1
    rec = {
        "file_name": path,
        "image_id": 1,
        "height": 20,
        "width": 40,
        "boxes": np.array([[0, 0, 20, 20]], np.float32),
        "labels": np.array([0]),
    }
    image, target = DetectionDataset([rec], train=False)[0]
    assert target["orig_size"] == (20, 40) and torch.equal(image, img)


def test_png_bit_identical_to_opencv(records: list, tmp_path: Path) -> None:
    # the synthetic benchmark data is PNG: its decoded values must not change
    def opencv(path: str) -> torch.Tensor:
        rgb = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)

    paths = [r["file_name"] for r in records]
    rng = np.random.default_rng(1)
    for name, arr in {
        "gray8": rng.integers(0, 256, (9, 11), dtype=np.uint8),
        "gray16": rng.integers(0, 65536, (9, 11), dtype=np.uint16),
        "bgr16": rng.integers(0, 65536, (9, 11, 3), dtype=np.uint16),
        "bgra8": rng.integers(0, 256, (9, 11, 4), dtype=np.uint8),
    }.items():
        paths.append(str(tmp_path / f"{name}.png"))
        cv2.imwrite(paths[-1], arr)
    for path in paths:
        ours, ref = read_image(path), opencv(path)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, path
        assert torch.equal(ours, ref) and ours.stride() == ref.stride(), path


def test_corrupt_images_config_key(records: list) -> None:
    from kd2.config import get_cfg

    cfg = get_cfg()
    assert cfg.DATALOADER.CORRUPT_IMAGES == "error"
    cfg.merge_from_list(["DATALOADER.CORRUPT_IMAGES", "skip"])
    ds = DetectionDataset(records, train=True, corrupt_images=cfg.DATALOADER.CORRUPT_IMAGES)
    assert ds.corrupt_images == "skip" and ds.num_corrupt_skipped == 0
    with pytest.raises(ValueError, match=r"DATALOADER\.CORRUPT_IMAGES.*'ignore'"):
        DetectionDataset(records, train=True, corrupt_images="ignore")
