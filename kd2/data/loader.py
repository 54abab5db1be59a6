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
pixels, "labels": int64 (G,) contiguous 0..K-1, "image_id": int, "orig_size": (H, W),
"flipped": bool}`` (``flipped``: the sample's augmentation, the teacher cache's key with
``image_id``).

Corrupt images (``DATALOADER.CORRUPT_IMAGES``): a file that cannot be decoded completely raises
:class:`CorruptImageError` naming it (``"error"``, the default). With ``"skip"`` a *training*
dataset replaces it by the next decodable index ``(i + 1) % N, (i + 2) % N, ...`` with the same
augmentation seed, so the stream stays a pure function of ``(seed, iteration)`` and resuming stays
exact; evaluation datasets always raise.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from typing import Any, Dict, Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "CorruptImageError",
    "read_image",
    "DetectionDataset",
    "TrainingSampler",
    "build_train_loader",
    "build_test_loader",
    "trivial_batch_collator",
    "model_targets",
]

Target = Dict[str, Any]
Batch = Tuple[List[torch.Tensor], List[Target]]


def _source(json_file: str | None) -> str:
    return f" (listed in {json_file})" if json_file else ""


logger = logging.getLogger(__name__)

CORRUPT_IMAGE_POLICIES = ("error", "skip")

_SKIP_HINT = (
    "To train without such files, set DATALOADER.CORRUPT_IMAGES skip: each corrupt training "
    "image is then replaced by the next decodable one and logged (evaluation never skips)."
)
_truncated_check_warned = False


class CorruptImageError(ValueError):
    """An image file exists but cannot be decoded completely (truncated, corrupt, not an image).

    Attributes ``path``, ``json_file`` (the annotation file that listed it, or ``None``) and
    ``reason`` (the decoder's message) are set.
    """

    def __init__(self, message: str, *, path: str, json_file: str | None, reason: str):
        super().__init__(message)
        self.path = path
        self.json_file = json_file
        self.reason = reason


def _rgb_uint8(im: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB array of a loaded Pillow image, equal to OpenCV's IMREAD_COLOR."""
    if im.mode == "I" or im.mode.startswith("I;16"):
        # 16-bit grayscale: keep the high byte, as OpenCV's IMREAD_COLOR does (Pillow's
        # convert("RGB") would clip instead).
        gray = (np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode != "RGB":
        im = im.convert("RGB")  # grayscale, palette, RGBA (alpha dropped), CMYK, 1-bit
    return np.asarray(im)


def read_image(path: str, *, json_file: str | None = None) -> torch.Tensor:
    """Read an image file with Pillow, refusing truncated or corrupt files.

    The pixels are returned **as stored**: EXIF orientation is *not* applied, because COCO-format
    annotations (boxes, ``height``/``width``) refer to the stored pixel grid, and
    :class:`DetectionDataset` checks the decoded size against the annotation. (OpenCV's
    ``imread``, which kd2 used before, applies EXIF orientation; so does Detectron2's own
    ``detectron2.data.detection_utils.read_image``, which the Detectron2 backend uses.)

    Values equal OpenCV's ``imread(IMREAD_COLOR)`` + BGR->RGB for PNG (8- and 16-bit, gray,
    palette, alpha dropped) and, with the same libjpeg-turbo, for baseline JPEG.

    Corruption detection: a truncated JPEG or PNG (any cut point, including a JPEG that only
    lacks its end marker) and a file that is not an image raise :class:`CorruptImageError`.
    Bytes altered *inside* a JPEG's entropy-coded data are often undetectable: the file decodes
    without any error (wrong pixels in some blocks); kd2 does not try to detect that.
    Detection relies on ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` being False (Pillow's default);
    if other code set it True, truncated files decode silently again and a warning is logged once.

    Args:
        path: image file path.
        json_file: the annotation file that listed the image, used in error messages only.

    Returns:
        ``(3, H, W)`` float32 tensor, RGB, values in ``[0, 1]``. Grayscale files are expanded
        to 3 channels.

    Raises:
        FileNotFoundError: the file does not exist.
        CorruptImageError: (a ``ValueError``) the file exists but cannot be decoded completely;
            the message names the file, the annotation file and the decoder's reason.
    """
    global _truncated_check_warned
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Image file not found: {path}{_source(json_file)}. Check the dataset's image root "
            "(or DETECTRON2_DATASETS for builtin datasets)."
        )
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _truncated_check_warned:
        _truncated_check_warned = True
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code): truncated image "
            "files will decode silently (grey or black bottom) instead of raising "
            "CorruptImageError."
        )
    try:
        with Image.open(path) as im:
            im.load()
            rgb = _rgb_uint8(im)
    except MemoryError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad files
        reason = f"{type(e).__name__}: {e}"
        raise CorruptImageError(
            f"Cannot decode image file {path}{_source(json_file)}: {reason}. The file is "
            f"truncated, corrupt or not an image format Pillow can read. {_SKIP_HINT}",
            path=path,
            json_file=json_file,
            reason=reason,
        ) from e
    # float32 copy first (Pillow's array is read-only); same values and strides as before
    return torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1).div_(255.0)


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
        corrupt_images: ``"error"`` (raise :class:`CorruptImageError`) or ``"skip"``
            (``DATALOADER.CORRUPT_IMAGES``). With ``"skip"`` a training dataset
            replaces a corrupt image ``i`` by the first decodable ``(i + k) % N``,
            ``k = 1, 2, ...``, augmented with the same ``aug_seed`` (so batches stay a pure
            function of ``(seed, iteration)``), logs a warning the first time each file is
            skipped, and records it in ``corrupt_skipped`` (``{index: file_name}``; per
            process: each DataLoader worker keeps and logs its own). Evaluation datasets
            (``train=False``) always raise.
    """

    _REQUIRED = ("file_name", "image_id", "height", "width", "boxes", "labels")

    def __init__(
        self,
        records: Sequence[Dict[str, Any]],
        *,
        train: bool,
        flip_prob: float = 0.5,
        corrupt_images: str = "error",
    ):
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if corrupt_images not in CORRUPT_IMAGE_POLICIES:
            raise ValueError(
                f"DATALOADER.CORRUPT_IMAGES (corrupt_images) must be one of "
                f"{CORRUPT_IMAGE_POLICIES}, got {corrupt_images!r}"
            )
        self.records = list(records)
        for r in self.records[:1]:
            missing = [k for k in self._REQUIRED if k not in r]
            if missing:
                raise KeyError(f"Dataset records lack keys {missing}; got keys {sorted(r)}")
        self.train = bool(train)
        self.flip_prob = float(flip_prob)
        self.corrupt_images = corrupt_images
        self.corrupt_skipped: Dict[int, str] = {}

    @property
    def num_corrupt_skipped(self) -> int:
        """Number of distinct corrupt images skipped so far (in this process)."""
        return len(self.corrupt_skipped)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: Union[int, Tuple[int, int]]) -> Tuple[torch.Tensor, Target]:
        """Return ``(image (3, H, W), target)`` for ``item = index`` or ``(index, aug_seed)``."""
        if isinstance(item, (tuple, list)):
            index, aug_seed = int(item[0]), int(item[1])
        else:
            index, aug_seed = int(item), None
        if not (self.train and self.corrupt_images == "skip"):
            try:
                return self._load(index, aug_seed)
            except CorruptImageError as e:
                if self.corrupt_images != "skip":
                    raise
                raise CorruptImageError(
                    f"{e} DATALOADER.CORRUPT_IMAGES is 'skip', but evaluation datasets never "
                    "skip images: an AP over a different image set would be silently wrong.",
                    path=e.path,
                    json_file=e.json_file,
                    reason=e.reason,
                ) from e.__cause__
        n = len(self.records)
        for k in range(n):
            j = (index + k) % n
            if j in self.corrupt_skipped:
                continue
            try:
                return self._load(j, aug_seed)
            except CorruptImageError as e:
                self.corrupt_skipped[j] = e.path
                logger.warning(
                    "Skipping corrupt training image %s%s (%s): it is replaced by the next "
                    "decodable image (DATALOADER.CORRUPT_IMAGES skip); skipped %d corrupt "
                    "image(s) so far.",
                    e.path,
                    _source(e.json_file),
                    e.reason,
                    len(self.corrupt_skipped),
                )
        raise CorruptImageError(
            f"All {n} training images are corrupt (DATALOADER.CORRUPT_IMAGES skip skipped every "
            f"one), e.g. {self.corrupt_skipped[index]}.",
            path=self.corrupt_skipped[index],
            json_file=self.records[index].get("json_file"),
            reason="all images corrupt",
        )

    def load_variant(self, index: int, flipped: bool) -> Tuple[torch.Tensor, Target]:
        """Sample ``index`` with the flip given instead of drawn: one of the finite augmentation
        variants a training sample can be (what ``tools/cache_teacher.py`` runs the teacher on)."""
        return self._load(index, None, flip=bool(flipped))

    def _load(
        self, index: int, aug_seed: int | None, flip: bool | None = None
    ) -> Tuple[torch.Tensor, Target]:
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
        if flip is None:
            flip = (
                self.train
                and aug_seed is not None
                and (random.Random(aug_seed).random() < self.flip_prob)
            )
        if flip:
            image = image.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        target = {
            "boxes": boxes,
            "labels": labels,
            "image_id": int(rec["image_id"]),
            "orig_size": (h, w),
            "flipped": bool(flip),
        }
        return image, target


def trivial_batch_collator(batch: Sequence[Tuple[torch.Tensor, Target]]) -> Batch:
    """``[(image, target), ...] -> ([images], [targets])`` (no stacking: sizes differ)."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    return images, targets


def model_targets(
    targets: Sequence[Target], offset: int, device, cache_keys: bool = False
) -> List[Dict[str, Any]]:
    """A batch's targets as a kd2-loop detector reads them: ``boxes`` and ``labels`` shifted by
    ``offset`` (torchvision's background class) on ``device``; with ``cache_keys``, each image's
    teacher-cache entry key (``KD.TEACHER.CACHE``) under ``CACHE_KEY``."""
    from kd2.modeling.teacher_cache import CACHE_KEY, cache_key

    out = []
    for t in targets:
        mt: Dict[str, Any] = {
            "boxes": t["boxes"].to(device),
            "labels": (t["labels"] + offset).to(device),
        }
        if cache_keys:
            mt[CACHE_KEY] = cache_key(t["image_id"], t.get("flipped", False))
        out.append(mt)
    return out


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
    # No cv2 call here: a worker is a fork of a process whose OpenCV thread pool may be running
    # (the synthetic generators blur and resize large images in-process), and reconfiguring that
    # pool in the child deadlocks; the workers decode with Pillow and use no OpenCV op.
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
