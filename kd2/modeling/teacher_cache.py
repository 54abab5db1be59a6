"""The teacher cache on disk: what a teacher recorded for every (image, augmentation) of a training
set, read back instead of running the teacher (``KD.TEACHER.CACHE``).

A cache is a directory:

* ``manifest.json`` — the format version, the **fingerprint** (what the entries depend on: kd2's
  version, the teacher's config and weights, the training set, the student's input pipeline, the
  parts and strides; :mod:`kd2.engine.teacher_cache` computes it), the storage dtype, and the list
  of finished shards with their keys; rewritten atomically after every shard;
* ``shard_<i>.safetensors`` — the entries of up to ``shard_size`` variants, memory-mapped when
  read (safetensors: no pickles). An entry's tensors are named ``<key>/size`` (int32 ``[h, w,
  Hp, Wp]``: the image's size in the network input and the padded batch size it was recorded
  at), ``<key>/features/<stride>`` (``(C, H_s, W_s)``) and, for methods that read a dense head
  or an RPN, that head's per-image outputs ``<key>/<part>/<field>/<level>`` (``part`` ``dense``
  or ``rpn``; ``field`` ``cls_logits``, ``box_deltas``, ``centerness``, ``box_dist``: each
  ``(R_l, ...)``, always float32), ``<key>`` = ``<image_id>_<flip>``. A head's anchors,
  strides and box coder depend on the batch's padded size only and are not stored: the
  distiller takes them from the first live teacher step of each size (:func:`head_tensors`,
  :func:`head_from_tensors`).

A build that stops keeps its finished shards: the next build skips their keys (resume). An entry is
used only for a batch whose geometry equals the entry's (every image at its recorded size, the
batch padded to the recorded size): the teacher's maps near the padding depend on it, so any other
batch runs the live teacher (:meth:`TeacherCache.lookup` returns ``None``), never a silent mismatch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor

from kd2.utils.errors import ConfigError, MissingFileError

__all__ = [
    "CACHE_FORMAT",
    "CACHE_KEY",
    "CACHE_PARTS",
    "CacheWriter",
    "TeacherCache",
    "cache_key",
    "fingerprint_differences",
    "head_from_tensors",
    "head_tensors",
    "require_cacheable",
]

#: the format version written in the manifest
CACHE_FORMAT = 1
#: the record parts a cache stores
CACHE_PARTS = frozenset({"features", "dense", "rpn"})
#: the record parts that are heads (:class:`~kd2.structures.DenseOutputs`) and their per-image
#: tensor fields
HEAD_PARTS = ("dense", "rpn")
HEAD_FIELDS = ("cls_logits", "box_deltas", "centerness", "box_dist")
#: the model-target key that carries a sample's cache key into the distiller
CACHE_KEY = "kd_cache_key"
#: storage dtypes by name
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

MANIFEST = "manifest.json"


def require_cacheable(parts, head_split: int | None = None) -> None:
    """Refuse teacher ``parts`` (what KD.TEACHER's methods read) that a cache does not store,
    and a head a method runs on the student's features each step (``head_split``: CrossKD)."""
    extra = sorted(set(parts) - CACHE_PARTS)
    if extra:
        raise ConfigError(
            f"the methods learning from KD.TEACHER read its {', '.join(extra)} too; a teacher "
            f"cache stores its {', '.join(sorted(CACHE_PARTS))} only",
            "unset KD.TEACHER.CACHE (the teacher then runs live), or use methods that read "
            "features or heads",
        )
    if head_split is not None and set(parts) & set(HEAD_PARTS):
        raise ConfigError(
            "a method runs KD.TEACHER's head on the student's features each step (CrossKD's "
            "head split): that output depends on the student and cannot be cached",
            "unset KD.TEACHER.CACHE (the teacher then runs live)",
        )


def head_tensors(record, n: int) -> Dict[str, Tensor]:
    """Image ``n``'s dense-head / RPN outputs of a teacher ``record``, flat:
    ``{"<part>/<field>/<level>": (R_l, ...)}`` (the parts the record holds)."""
    out: Dict[str, Tensor] = {}
    for part in HEAD_PARTS:
        head = getattr(record, part, None)
        if head is None:
            continue
        for field in HEAD_FIELDS:
            for level, t in enumerate(getattr(head, field) or []):
                out[f"{part}/{field}/{level}"] = t[n]
    return out


def head_from_tensors(template, part: str, tensors: Mapping[str, Tensor]):
    """The :class:`~kd2.structures.DenseOutputs` of ``part`` with the batch's cached per-image
    tensors (``{"<part>/<field>/<level>": (N, R_l, ...)}``) and ``template``'s geometry (anchors,
    strides, box coder: a live record of the same padded size)."""
    fields = {}
    for field in HEAD_FIELDS:
        prefix = f"{part}/{field}/"
        levels = sorted(int(k[len(prefix) :]) for k in tensors if k.startswith(prefix))
        fields[field] = [tensors[f"{part}/{field}/{lv}"] for lv in levels] or None
    return dataclasses.replace(template, **fields)


def cache_key(image_id: int, flipped: bool) -> str:
    """The entry name of one augmentation variant of one training image."""
    return f"{int(image_id)}_{int(bool(flipped))}"


def fingerprint_differences(stored: Mapping, current: Mapping) -> List[str]:
    """The fingerprint fields that differ, as ``field: cache <a>, now <b>`` lines."""
    keys = sorted(set(stored) | set(current))
    return [
        f"{k}: cache {stored.get(k)!r}, now {current.get(k)!r}"
        for k in keys
        if stored.get(k) != current.get(k)
    ]


def _atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


class CacheWriter:
    """Write (or resume) a cache directory.

    Args:
        directory: the cache directory (created).
        fingerprint: what the entries depend on (JSON-serialisable).
        dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
        shard_size: variants per shard.

    An existing directory with another fingerprint or dtype is refused (:class:`ConfigError`):
    a cache is never mixed.
    """

    def __init__(
        self, directory: str, fingerprint: Mapping, dtype: str = "float16", shard_size: int = 256
    ):
        if dtype not in DTYPES:
            raise ConfigError(f"cache dtype {dtype!r} is not one of {sorted(DTYPES)}")
        self.directory = directory
        self.dtype = dtype
        self.shard_size = int(shard_size)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, MANIFEST)
        if os.path.isfile(path):
            with open(path) as f:
                self.manifest = json.load(f)
            diff = fingerprint_differences(self.manifest.get("fingerprint", {}), fingerprint)
            if diff or self.manifest.get("dtype") != dtype:
                raise ConfigError(
                    f"{directory!r} holds a cache of another teacher, config or dtype ("
                    + "; ".join(diff or [f"dtype: cache {self.manifest.get('dtype')}, now {dtype}"])
                    + ")",
                    "give another --output directory, or delete this one to rebuild it",
                )
        else:
            self.manifest = {
                "format": CACHE_FORMAT,
                "fingerprint": dict(fingerprint),
                "dtype": dtype,
                "shards": [],
                "complete": False,
            }
        self._pending: Dict[str, Tensor] = {}
        self._pending_keys: List[str] = []

    @property
    def done_keys(self) -> set:
        """The keys of the finished shards (skipped by a resumed build)."""
        return {k for s in self.manifest["shards"] for k in s["keys"]}

    def add(
        self,
        key: str,
        features: Mapping[int, Tensor],
        size: Sequence[int],
        heads: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Queue one entry: ``features`` ``{stride: (C, H_s, W_s)}``, ``size`` ``(h, w, Hp, Wp)``,
        ``heads`` the image's head outputs (:func:`head_tensors`); a full shard is written."""
        dt = DTYPES[self.dtype]
        heads = dict(heads or {})
        self._pending[f"{key}/size"] = torch.tensor([int(x) for x in size], dtype=torch.int32)
        for s, f in features.items():
            self._pending[f"{key}/features/{int(s)}"] = f.detach().to("cpu", dt).contiguous()
        # heads always in float32: methods compare logits through softmaxes and ranks, which
        # amplify float16's rounding (RM: 2e-3 relative), and a head's outputs are small
        for name, t in heads.items():
            self._pending[f"{key}/{name}"] = t.detach().to("cpu", torch.float32).contiguous()
        self._pending_keys.append(key)
        self.manifest.setdefault("strides", sorted(int(s) for s in features))
        self.manifest.setdefault("heads", sorted(heads))
        if len(self._pending_keys) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the queued entries as one shard and record it in the manifest."""
        if not self._pending_keys:
            return
        from safetensors.torch import save_file

        index = len(self.manifest["shards"])
        name = f"shard_{index:05d}.safetensors"
        path = os.path.join(self.directory, name)
        save_file(self._pending, path + ".tmp")
        os.replace(path + ".tmp", path)
        self.manifest["shards"].append(
            {"file": name, "keys": list(self._pending_keys), "bytes": os.path.getsize(path)}
        )
        _atomic_json(os.path.join(self.directory, MANIFEST), self.manifest)
        self._pending, self._pending_keys = {}, []

    def finish(self, **stats) -> dict:
        """Flush, mark the cache complete, record ``stats`` (size, time) in the manifest."""
        self.flush()
        self.manifest["complete"] = True
        self.manifest["stats"] = dict(stats)
        _atomic_json(os.path.join(self.directory, MANIFEST), self.manifest)
        return self.manifest


class TeacherCache:
    """Read a finished cache (``KD.TEACHER.CACHE``), its shards memory-mapped.

    Args:
        directory: the cache directory.
        fingerprint: the current run's fingerprint; a cache built for anything else is refused
            with the fields that differ.
        key: the config key that names the cache, for messages.
    """

    def __init__(self, directory: str, fingerprint: Mapping, key: str = "KD.TEACHER.CACHE"):
        path = os.path.join(directory, MANIFEST)
        if not os.path.isfile(path):
            raise MissingFileError(
                f"{key} {directory!r} is not a teacher cache (no {MANIFEST})",
                "build it with python tools/cache_teacher.py --config-file <this config>",
            )
        with open(path) as f:
            self.manifest = json.load(f)
        if not self.manifest.get("complete"):
            raise ConfigError(
                f"{key} {directory!r} is an unfinished cache build",
                "run tools/cache_teacher.py again with the same config: it resumes",
            )
        diff = fingerprint_differences(self.manifest.get("fingerprint", {}), fingerprint)
        if diff:
            raise ConfigError(
                f"{key} {directory!r} was built for another teacher, config, dataset or kd2 "
                "version: " + "; ".join(diff),
                "rebuild it with python tools/cache_teacher.py --config-file <this config>, or "
                f"unset {key}",
            )
        self.directory = directory
        self._shard_of = {k: s["file"] for s in self.manifest["shards"] for k in s["keys"]}
        self._open: Dict[str, object] = {}
        #: batches served from the cache / run live (geometry or key not in the cache)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._shard_of)

    def _file(self, name: str):
        if name not in self._open:
            from safetensors import safe_open

            self._open[name] = safe_open(os.path.join(self.directory, name), framework="pt")
        return self._open[name]

    def lookup(
        self,
        keys: Iterable[str],
        image_sizes: Sequence[Tuple[int, int]],
        padded: Tuple[int, int],
        device,
    ) -> Tuple[Dict[int, Tensor], Dict[str, Tensor]] | None:
        """The batch's teacher maps ``{stride: (N, C, H_s, W_s)}`` and head outputs
        ``{"<part>/<field>/<level>": (N, R_l, ...)}`` in float32 on ``device``, or ``None``
        (counted as a miss) when a key is not cached or an image's recorded geometry is not this
        batch's."""
        keys = list(keys)
        per_stride: Dict[int, List[Tensor]] = {int(s): [] for s in self.manifest["strides"]}
        per_head: Dict[str, List[Tensor]] = {h: [] for h in self.manifest.get("heads", [])}
        for key, (h, w) in zip(keys, image_sizes):
            name = self._shard_of.get(key)
            if name is None:
                self.misses += 1
                return None
            f = self._file(name)
            size = [int(x) for x in f.get_tensor(f"{key}/size").tolist()]
            if size != [int(h), int(w), int(padded[0]), int(padded[1])]:
                self.misses += 1
                return None
            for s in per_stride:
                per_stride[s].append(f.get_tensor(f"{key}/features/{s}"))
            for h in per_head:
                per_head[h].append(f.get_tensor(f"{key}/{h}"))
        self.hits += 1

        def batch(v: List[Tensor]) -> Tensor:
            return torch.stack(v).to(device=device, dtype=torch.float32)

        return (
            {s: batch(v) for s, v in per_stride.items()},
            {h: batch(v) for h, v in per_head.items()},
        )
