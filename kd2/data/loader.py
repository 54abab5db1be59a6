"""Image reading, the detection dataset, and deterministic, resumable data loaders.

Training stream (the contract that makes resuming exact):

* The **global sample stream** has positions ``p = 0, 1, 2, ...``. Position ``p`` belongs to
  epoch ``e = p // N`` (``N`` = dataset size) and maps to dataset index ``perm_e[p % N]``, where
  ``perm_e`` is a permutation of ``range(N)`` drawn from ``numpy.random.default_rng((seed, e))``.
* Position ``p`` has its own augmentation seed ``aug_seed(p) = blake2b("seed/p")`` (63 bits);
  all augmentation randomness of that sample comes from ``random.Random(aug_seed(p))``, so it
  does not depend on worker processes or on how far the run got before a restart.
* With world size ``W`` and per-rank batch size ``B``, the batch of iteration ``it`` on rank ``r``
  is positions ``[(it*W + r)*B, (it*W + r + 1)*B)``. Ranks therefore see disjoint positions,
  and a run restarted at iteration ``k`` sees exactly the batches an uninterrupted run would
  have seen from ``k`` on.

Batches are ``(images, targets)``: ``images`` a list of ``(3, H, W)`` float tensors (RGB, values
in ``[0, 1]``, original size), ``targets`` a list of dicts ``{"boxes": float32 (G, 4) XYXY
pixels, "labels": int64 (G,) contiguous 0..K-1, "image_id": int, "orig_size": (H, W)}``.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any, Dict, Iterator, List, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "read_image",
    "DetectionDataset",
    "TrainingSampler",
    "build_train_loader",
    "build_test_loader",
    "trivial_batch_collator",
]

Target = Dict[str, Any]
Batch = Tuple[List[torch.Tensor], List[Target]]


def _source(json_file: str | None) -> str:
    return f" (listed in {json_file})" if json_file else ""


def read_image(path: str, *, json_file: str | None = None) -> torch.Tensor:
    """Read an image file with OpenCV.

    Args:
        path: image file path.
        json_file: the annotation file that listed the image, used in error messages only.

    Returns:
        ``(3, H, W)`` float32 tensor, RGB, values in ``[0, 1]``. Grayscale files are expanded
        to 3 channels; EXIF orientation is applied (OpenCV's default).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file exists but cannot be decoded as an image.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Image file not found: {path}{_source(json_file)}. Check the dataset's image root "
            "(or DETECTRON2_DATASETS for builtin datasets)."
        )
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(
            f"Cannot decode image file {path}{_source(json_file)}: the file is corrupt or not an "
            "image format OpenCV can read."
        )
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)


class DetectionDataset(Dataset):
    """Map-style dataset over kd2 records (see :mod:`kd2.data.coco`).

    ``dataset[i]`` returns the un-augmented sample ``i``. ``dataset[(i, aug_seed)]`` returns
    sample ``i`` augmented (only when ``train``) with randomness drawn solely from
    ``random.Random(aug_seed)``: currently a horizontal flip with probability ``flip_prob``.

    Args:
        records: per-image records (``file_name``, ``image_id``, ``height``, ``width``,
            ``boxes`` (G, 4) XYXY, ``labels`` (G,); optional ``json_file``).
        train: enable augmentation for ``(index, aug_seed)`` items.
        flip_prob: probability of a horizontal flip in training.
    """

    _REQUIRED = ("file_name", "image_id", "height", "width", "boxes", "labels")

    def __init__(self, records: Sequence[Dict[str, Any]], *, train: bool, flip_prob: float = 0.5):
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.records = list(records)
        for r in self.records[:1]:
            missing = [k for k in self._REQUIRED if k not in r]
            if missing:
                raise KeyError(f"Dataset records lack keys {missing}; got keys {sorted(r)}")
        self.train = bool(train)
        self.flip_prob = float(flip_prob)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: Union[int, Tuple[int, int]]) -> Tuple[torch.Tensor, Target]:
        """Return ``(image (3, H, W), target)`` for ``item = index`` or ``(index, aug_seed)``."""
        if isinstance(item, (tuple, list)):
            index, aug_seed = int(item[0]), int(item[1])
        else:
            index, aug_seed = int(item), None
        rec = self.records[index]
        json_file = rec.get("json_file")
        image = read_image(rec["file_name"], json_file=json_file)
        h, w = int(image.shape[1]), int(image.shape[2])
        if (h, w) != (int(rec["height"]), int(rec["width"])):
            raise ValueError(
                f"Image {rec['file_name']}{_source(json_file)} is {h}x{w} (HxW) but its "
                f"annotation says {rec['height']}x{rec['width']}; the image or annotation file "
                "is wrong."
            )
        boxes = torch.as_tensor(np.asarray(rec["boxes"], dtype=np.float32).reshape(-1, 4)).clone()
        labels = torch.as_tensor(np.asarray(rec["labels"], dtype=np.int64).reshape(-1)).clone()
        if self.train and aug_seed is not None:
            rng = random.Random(aug_seed)
            if rng.random() < self.flip_prob:
                image = image.flip(-1)
                boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        target = {
            "boxes": boxes,
            "labels": labels,
            "image_id": int(rec["image_id"]),
            "orig_size": (h, w),
        }
        return image, target


def trivial_batch_collator(batch: Sequence[Tuple[torch.Tensor, Target]]) -> Batch:
    """``[(image, target), ...] -> ([images], [targets])`` (no stacking: sizes differ)."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    return images, targets


class TrainingSampler:
    """Deterministic, infinite, resumable stream of batches of ``(dataset_index, aug_seed)``.

    See the module docstring for the exact mapping. Iterating yields the batches of iterations
    ``start_iter, start_iter + 1, ...`` for ``rank``; it can be used as a ``batch_sampler``.

    Args:
        size: dataset size ``N`` (> 0).
        batch_size_per_rank: ``B``.
        seed: global seed (>= 0), identical on every rank.
        rank, world_size: this process's rank ``r`` and ``W``.
        start_iter: first iteration to yield.
        shuffle: permute each epoch (else positions map to ``p % N``).
    """

    def __init__(
        self,
        size: int,
        *,
        batch_size_per_rank: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_iter: int = 0,
        shuffle: bool = True,
    ):
        if size <= 0:
            raise ValueError(f"TrainingSampler needs a non-empty dataset, got size={size}")
        if batch_size_per_rank <= 0:
            raise ValueError(f"batch_size_per_rank must be > 0, got {batch_size_per_rank}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, W={world_size}")
        if seed < 0 or start_iter < 0:
            raise ValueError(f"seed and start_iter must be >= 0, got {seed}, {start_iter}")
        self.size = int(size)
        self.batch_size = int(batch_size_per_rank)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start_iter = int(start_iter)
        self.shuffle = bool(shuffle)
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._perm_epoch = epoch
        return self._perm

    def index_at(self, position: int) -> int:
        """Dataset index of global stream position ``position``."""
        epoch, offset = divmod(int(position), self.size)
        if not self.shuffle:
            return offset
        return int(self._permutation(epoch)[offset])

    def aug_seed_at(self, position: int) -> int:
        """Augmentation seed (63-bit int) of global stream position ``position``."""
        digest = hashlib.blake2b(f"{self.seed}/{int(position)}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    def positions(self, iteration: int) -> range:
        """Global positions of this rank's batch at ``iteration``."""
        start = (int(iteration) * self.world_size + self.rank) * self.batch_size
        return range(start, start + self.batch_size)

    def batch(self, iteration: int) -> List[Tuple[int, int]]:
        """``[(dataset_index, aug_seed), ...]`` of this rank's batch at ``iteration``."""
        return [(self.index_at(p), self.aug_seed_at(p)) for p in self.positions(iteration)]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        it = self.start_iter
        while True:
            yield self.batch(it)
            it += 1


def _worker_init(worker_id: int) -> None:
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _as_dataset(dataset: Union[Dataset, Sequence[Dict[str, Any]]], train: bool) -> Dataset:
    if isinstance(dataset, Dataset):
        return dataset
    return DetectionDataset(dataset, train=train)


def build_train_loader(
    dataset: Union[Dataset, Sequence[Dict[str, Any]]],
    *,
    batch_size_per_rank: int,
    seed: int,
    start_iter: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> Iterator[Batch]:
    """Infinite iterator of training batches ``(images, targets)`` from ``start_iter`` on.

    Args:
        dataset: a :class:`DetectionDataset` (``train=True`` to augment) or any map-style
            dataset accepting ``(index, aug_seed)`` items; a list of records is wrapped in
            ``DetectionDataset(records, train=True)``.
        batch_size_per_rank: images per batch on this rank.
        seed: global seed, identical on every rank.
        start_iter: iteration of the first batch (for exact resumption).
        rank, world_size: distributed position (each rank calls this with its own rank).
        num_workers: DataLoader worker processes; the output does not depend on it.
    """
    ds = _as_dataset(dataset, train=True)
    sampler = TrainingSampler(
        len(ds),
        batch_size_per_rank=batch_size_per_rank,
        seed=seed,
        rank=rank,
        world_size=world_size,
        start_iter=start_iter,
    )
    loader = DataLoader(
        ds,
        batch_sampler=sampler,
        collate_fn=trivial_batch_collator,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )
    return iter(loader)


def build_test_loader(
    dataset: Union[Dataset, Sequence[Dict[str, Any]]], batch_size: int = 1, num_workers: int = 0
) -> DataLoader:
    """Loader over every image once, in dataset order, without augmentation.

    Yields ``(images, targets)`` batches of up to ``batch_size``; ``len()`` is the number of
    batches. A list of records is wrapped in ``DetectionDataset(records, train=False)``.
    """
    ds = _as_dataset(dataset, train=False)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=trivial_batch_collator,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )
