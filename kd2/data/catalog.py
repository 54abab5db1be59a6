"""A small name -> dataset registry in Detectron2's spirit.

``DatasetCatalog`` maps a name to a function returning the dataset's records (see
:mod:`kd2.data.coco`); results are cached per name. ``MetadataCatalog`` maps a name to a
:class:`Metadata` (a ``dict`` with attribute access) holding at least, for COCO-format datasets,
``json_file``, ``image_root``, ``evaluator_type="coco"`` and, once loaded, ``thing_classes``,
``thing_dataset_id_to_contiguous_id`` and ``contiguous_id_to_dataset_id``.

Builtin names (registered at import; paths resolved when first used, relative to the
``DETECTRON2_DATASETS`` environment variable, default ``"datasets"``):

* ``coco_2017_train`` / ``coco_2017_val``: ``$DETECTRON2_DATASETS/coco/{train2017,val2017}``
  with ``coco/annotations/instances_{train,val}2017.json``;
* ``synthetic_train`` / ``synthetic_val``: ``$DETECTRON2_DATASETS/kd2_synthetic/`` (see
  :mod:`kd2.data.synthetic`), generated there with the default arguments on first use if absent;
* ``synthetic_crowded_train`` / ``synthetic_crowded_val``:
  ``$DETECTRON2_DATASETS/kd2_synthetic_crowded/``, the second benchmark's "crowded" profile
  (:func:`~kd2.data.synthetic.generate_crowded_benchmark`), generated there the same way;
* ``synthetic_train_labeled`` / ``synthetic_train_hidden``: ``synthetic_train`` with 75 % of its
  labels hidden (:mod:`kd2.data.subsets`, ``$DETECTRON2_DATASETS/kd2_synthetic_semi/``): the
  labelled quarter, and the hidden rest's ground truth (its images, without labels, in
  ``kd2_synthetic_semi/unlabeled/``), for pseudo-label experiments.

Explicit datasets: any name of the form ``"path/to/instances.json:path/to/image_dir"`` is
registered automatically (as a COCO dataset under that very name) the first time it is used,
so a config can point at files without any registration code. Relative paths are taken
relative to the current directory at first use. :func:`parse_coco_name` splits such a name
(Detectron2's integration, :mod:`kd2.d2.data`, shares it).

Config registration: ``DATASETS.REGISTER`` lists ``[name, json_file, image_root]`` triples;
:func:`register_config_datasets` registers them (``register_coco_instances``), relative paths
relative to the current directory. It is idempotent: the same name with the same files again is
a no-op; the same name with other files, or a builtin's name, is an error.

Paths are resolved once per name and cached; after changing ``DETECTRON2_DATASETS`` call
``DatasetCatalog.clear_cache()``.
"""

from __future__ import annotations

import difflib
import logging
import os
import shutil
import threading
from typing import Any, Callable, Dict, List, Sequence, Tuple

from kd2.data.coco import load_coco_json
from kd2.utils.errors import ConfigError, MissingFileError, UnknownNameError

__all__ = [
    "DatasetCatalog",
    "MetadataCatalog",
    "Metadata",
    "register_coco_instances",
    "register_config_datasets",
    "register_coco_datasets",
    "check_class_count",
    "config_coco_datasets",
    "parse_coco_name",
    "unknown_dataset_error",
    "datasets_root",
    "records_of",
    "SYNTHETIC_GENERATOR_KWARGS",
    "SYNTHETIC_CROWDED_GENERATOR_KWARGS",
]

logger = logging.getLogger(__name__)

#: Keyword arguments passed to :func:`generate_synthetic_dataset` when the builtin synthetic
#: datasets are generated on first use (empty = the generator's defaults).
SYNTHETIC_GENERATOR_KWARGS: Dict[str, Any] = {}
#: The same for :func:`~kd2.data.synthetic.generate_crowded_benchmark` (``synthetic_crowded_*``).
SYNTHETIC_CROWDED_GENERATOR_KWARGS: Dict[str, Any] = {}


def records_of(names) -> List[Dict[str, Any]]:
    """The records of the datasets ``names`` (e.g. ``DATASETS.TRAIN``), concatenated in order."""
    records: List[Dict[str, Any]] = []
    for name in names:
        records.extend(DatasetCatalog.get(name))
    return records


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` (default ``"datasets"``), expanded, read at call time."""
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def unknown_dataset_error(kind: str, name: str, registered: List[str]) -> UnknownNameError:
    """The error for a dataset ``name`` that is not among ``registered`` (the closest named)."""
    close = difflib.get_close_matches(name, registered, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UnknownNameError(
        f"{kind} '{name}' is not registered.{hint} Registered datasets: {sorted(registered)}",
        "register it with DatasetCatalog.register(name, fn) or register_coco_instances(name, "
        "json_file, image_root), or use a 'path/to/instances.json:path/to/image_dir' name",
    )


class Metadata(dict):
    """Dataset metadata: a ``dict`` whose keys can also be read as attributes."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(
                f"Metadata has no field '{key}'; available: {sorted(self.keys())}"
            ) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value


class _DatasetCatalog:
    """Registry ``name -> fn() -> list[dict]`` with per-name caching."""

    def __init__(self) -> None:
        self._fns: Dict[str, Callable[[], List[Dict[str, Any]]]] = {}
        self._cache: Dict[str, List[Dict[str, Any]]] = {}
        self._lock = threading.RLock()

    def register(self, name: str, fn: Callable[[], List[Dict[str, Any]]]) -> None:
        """Register ``fn`` (no arguments, returns records) under ``name`` (must be new)."""
        if not callable(fn):
            raise TypeError(f"DatasetCatalog.register('{name}', fn): fn must be callable")
        with self._lock:
            if name in self._fns:
                raise ValueError(
                    f"Dataset '{name}' is already registered; call DatasetCatalog.remove('{name}')"
                    " first to replace it."
                )
            self._fns[name] = fn

    def get(self, name: str) -> List[Dict[str, Any]]:
        """The records of dataset ``name`` (loaded once, then cached).

        The list and its dicts are fresh shallow copies; the numpy arrays inside are shared and
        must not be modified in place.

        Raises:
            KeyError: ``name`` is unknown (lists the registered names and the closest one).
        """
        with self._lock:
            _maybe_register_explicit(name)
            if name not in self._fns:
                raise unknown_dataset_error("Dataset", name, list(self._fns))
            if name not in self._cache:
                records = self._fns[name]()
                if not isinstance(records, list):
                    raise TypeError(
                        f"The function registered for dataset '{name}' returned "
                        f"{type(records).__name__}; it must return a list of dicts."
                    )
                self._cache[name] = records
            return [dict(r) for r in self._cache[name]]

    def list(self) -> List[str]:
        """Registered names."""
        return list(self._fns)

    def remove(self, name: str) -> None:
        """Unregister ``name`` (and drop its cache and metadata)."""
        with self._lock:
            self._fns.pop(name)
            self._cache.pop(name, None)
            MetadataCatalog._remove(name)

    def clear_cache(self) -> None:
        """Forget loaded records and lazily filled metadata (e.g. after changing
        ``DETECTRON2_DATASETS``)."""
        with self._lock:
            self._cache.clear()
            MetadataCatalog._reset_lazy()

    def __contains__(self, name: object) -> bool:
        return name in self._fns


class _MetadataCatalog:
    """Registry ``name -> Metadata``."""

    def __init__(self) -> None:
        self._metas: Dict[str, Metadata] = {}
        # names whose metadata is completed by loading the dataset -> their static fields
        self._lazy: Dict[str, Dict[str, Any]] = {}
        self._filled: set = set()

    def get(self, name: str) -> Metadata:
        """The metadata of ``name``.

        For COCO-format datasets the class fields are filled by loading the dataset (once).

        Raises:
            KeyError: ``name`` is neither registered as a dataset nor has metadata.
        """
        with DatasetCatalog._lock:
            _maybe_register_explicit(name)
            if name in self._lazy and name not in self._filled:
                DatasetCatalog.get(name)  # its loader fills the metadata
            if name in self._metas:
                return self._metas[name]
            if name in DatasetCatalog:
                return self._metas.setdefault(name, Metadata())
            raise unknown_dataset_error("Dataset (metadata)", name, DatasetCatalog.list())

    def list(self) -> List[str]:
        """Names that have metadata."""
        return list(self._metas)

    # ---- internal helpers used by the loaders below
    def _set_lazy(self, name: str, static: Dict[str, Any]) -> None:
        self._lazy[name] = dict(static)
        self._metas[name] = Metadata(static)

    def _fill(self, name: str, fields: Dict[str, Any]) -> None:
        self._metas.setdefault(name, Metadata()).update(fields)
        self._filled.add(name)

    def _remove(self, name: str) -> None:
        self._metas.pop(name, None)
        self._lazy.pop(name, None)
        self._filled.discard(name)

    def _reset_lazy(self) -> None:
        for name, static in self._lazy.items():
            self._metas[name] = Metadata(static)
        self._filled.clear()


DatasetCatalog = _DatasetCatalog()
MetadataCatalog = _MetadataCatalog()


def _register_lazy_coco(name: str, paths: Callable[[], Tuple[str, str]], static: Dict) -> None:
    """Register a COCO dataset whose ``(json_file, image_root)`` are computed at load time."""

    def load() -> List[Dict[str, Any]]:
        json_file, image_root = paths()
        records, meta = load_coco_json(json_file, image_root, name)
        MetadataCatalog._fill(name, {**meta, "evaluator_type": "coco"})
        return records

    DatasetCatalog.register(name, load)
    MetadataCatalog._set_lazy(name, static)


def register_coco_instances(name: str, json_file: str, image_root: str) -> None:
    """Register a COCO instances JSON + image directory under ``name``.

    The file is read on the first ``DatasetCatalog.get(name)`` or ``MetadataCatalog.get(name)``.
    """
    json_file = os.path.abspath(os.path.expanduser(json_file))
    image_root = os.path.abspath(os.path.expanduser(image_root))
    _register_lazy_coco(
        name,
        lambda: (json_file, image_root),
        {"json_file": json_file, "image_root": image_root, "evaluator_type": "coco"},
    )


def parse_coco_name(name: Any) -> Tuple[str, str] | None:
    """``"path/to/instances.json:path/to/image_dir"`` -> ``(json_file, image_root)`` as written
    (not resolved); ``None`` for any other name. The split is at the last ``':'`` whose left
    side ends with ``.json`` (so the image directory may not contain ``".json:"``)."""
    if not isinstance(name, str):
        return None
    end = len(name)
    while True:
        i = name.rfind(":", 0, end)
        if i < 0:
            return None
        if len(name[:i]) > len(".json") and name[:i].endswith(".json") and i + 1 < len(name):
            return name[:i], name[i + 1 :]
        end = i


def _maybe_register_explicit(name: str) -> None:
    """Auto-register ``"path/to/instances.json:path/to/image_dir"`` names."""
    if not isinstance(name, str) or name in DatasetCatalog:
        return
    parsed = parse_coco_name(name)
    if parsed:
        register_coco_instances(name, *parsed)


def config_coco_datasets(cfg) -> List[Tuple[str, str, str, str]]:
    """The COCO datasets a config asks to register, as ``(name, json_file, image_root, key)``
    with absolute paths (relative ones are relative to the current directory) and ``key`` the
    config key that names them (for messages): every ``DATASETS.REGISTER`` triple, then every
    ``"instances.json:image_dir"`` name of ``DATASETS.TRAIN`` / ``DATASETS.TEST``.

    Raises:
        ValueError: a malformed ``DATASETS.REGISTER`` entry, or one name given two sets of files.
        FileNotFoundError: a JSON file or image directory that does not exist.
    """
    found: Dict[str, Tuple[str, str, str, str]] = {}

    def add(name: str, json_file: str, image_root: str, key: str) -> None:
        json_file = os.path.abspath(os.path.expanduser(json_file))
        image_root = os.path.abspath(os.path.expanduser(image_root))
        where = f"{key} ({name!r})"
        if not os.path.isfile(json_file):
            raise MissingFileError(
                f"{where}: COCO annotation file {json_file} does not exist",
                f"check the path (relative paths are relative to the current directory, "
                f"{os.getcwd()})",
            )
        if not os.path.isdir(image_root):
            raise MissingFileError(
                f"{where}: image directory {image_root} does not exist",
                f"check the path (relative paths are relative to the current directory, "
                f"{os.getcwd()})",
            )
        if name in found and found[name][1:3] != (json_file, image_root):
            raise ConfigError(
                f"{where}: dataset {name!r} is given twice with different files ({found[name][3]}:"
                f" {found[name][1]}, {found[name][2]}; {key}: {json_file}, {image_root})"
            )
        found.setdefault(name, (name, json_file, image_root, key))

    for i, entry in enumerate(cfg.DATASETS.get("REGISTER", ())):
        key = f"DATASETS.REGISTER[{i}]"
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 3
            or not all(isinstance(x, str) and x for x in entry)
        ):
            raise ConfigError(
                f"{key} must be [name, json_file, image_root] (three non-empty strings), got "
                f"{entry!r}; e.g. DATASETS.REGISTER [['my_train', 'ann/train.json', 'images/']]"
            )
        if parse_coco_name(entry[0]):
            raise ConfigError(
                f"{key}: name {entry[0]!r} has the form 'instances.json:image_dir', which names "
                "those files by itself; give the dataset a plain name"
            )
        add(*entry, key)
    for split in ("TRAIN", "TEST"):
        for name in cfg.DATASETS.get(split, ()):
            parsed = parse_coco_name(name)
            if parsed and name not in found:
                add(name, *parsed, f"DATASETS.{split}")
    return list(found.values())


def _registered_coco_files(name: str) -> Tuple[str, str] | None:
    """``(json_file, image_root)`` of a dataset registered by ``register_coco_instances``;
    ``None`` for the builtins and datasets registered with a function (read without loading)."""
    static = MetadataCatalog._lazy.get(name) or {}
    if "json_file" in static and "image_root" in static:
        return static["json_file"], static["image_root"]
    return None


#: :func:`register_coco_datasets`' ``registered_files`` answer for a name no catalog holds.
UNREGISTERED = object()


def register_coco_datasets(
    cfg,
    registered_files: Callable[[str], Any],
    register: Callable[[str, str, str], None],
    catalog: str = "",
) -> List[str]:
    """The registration loop both backends share: every dataset of
    :func:`config_coco_datasets` is registered with ``register(name, json_file, image_root)``
    unless a catalog already holds it with the same files; returns the names.

    ``registered_files(name)``: :data:`UNREGISTERED`, ``None`` (registered without COCO files:
    a builtin or a dataset registered in code) or the absolute ``(json_file, image_root)``.
    ``catalog`` names the catalog in messages.
    """
    names = []
    for name, json_file, image_root, key in config_coco_datasets(cfg):
        have = registered_files(name)
        if have is UNREGISTERED:
            register(name, json_file, image_root)
            logger.info("registered dataset %r: %s, images in %s", name, json_file, image_root)
        elif have is None:
            raise ConfigError(
                f"{key}: dataset name {name!r} is already taken by a builtin dataset or one "
                f"registered in code{catalog}; choose another name"
            )
        elif have != (json_file, image_root):
            raise ConfigError(
                f"{key}: dataset {name!r} is already registered{catalog} with other files "
                f"(json_file {have[0]}, image_root {have[1]}; now {json_file}, {image_root}); "
                f"choose another name, or DatasetCatalog.remove({name!r})"
            )
        names.append(name)
    return names


def register_config_datasets(cfg) -> List[str]:
    """Register the config's COCO datasets (:func:`config_coco_datasets`: ``DATASETS.REGISTER``
    and the ``"instances.json:image_dir"`` names of ``DATASETS.TRAIN`` / ``TEST``) in
    :data:`DatasetCatalog`; returns their names.

    Idempotent: a name already registered with the same files is left as is.

    Raises:
        ValueError: a name already registered otherwise (a builtin, a dataset registered with a
            function, or other files), or a malformed entry (see :func:`config_coco_datasets`).
        FileNotFoundError: a JSON file or image directory that does not exist.
    """

    def registered_files(name: str):
        return _registered_coco_files(name) if name in DatasetCatalog else UNREGISTERED

    with DatasetCatalog._lock:
        return register_coco_datasets(cfg, registered_files, register_coco_instances)


def check_class_count(
    dataset_names: Sequence[str],
    num_classes: int,
    key: str,
    thing_classes: Callable[[str], Sequence[str] | None],
) -> None:
    """Each dataset whose classes are known (``thing_classes(name)``, ``None`` when not yet)
    has ``num_classes`` of them; the error names ``key`` and the value to set. Both backends
    call it when the model is built, before any data pass."""
    for name in dataset_names:
        classes = thing_classes(name)
        if classes is not None and len(classes) != num_classes:
            shown = list(classes[:8]) + (["..."] if len(classes) > 8 else [])
            raise ConfigError(
                f"dataset {name!r} has {len(classes)} categories {shown}, but the model is built "
                f"for {num_classes} ({key} {num_classes}). Set {key} {len(classes)}, or use a "
                f"dataset with {num_classes} categories (a distilled student needs its teacher's "
                "categories too)"
            )


# --------------------------------------------------------------------------------------------
# builtins
# --------------------------------------------------------------------------------------------


def _coco_paths(split: str) -> Callable[[], Tuple[str, str]]:
    def paths() -> Tuple[str, str]:
        root = os.path.abspath(os.path.join(datasets_root(), "coco"))
        json_file = os.path.join(root, "annotations", f"instances_{split}2017.json")
        if not os.path.isfile(json_file):
            raise MissingFileError(
                f"Builtin dataset 'coco_2017_{split}' expects {json_file}, which does not exist. "
                "Set DETECTRON2_DATASETS to the directory that contains coco/ (currently "
                f"DETECTRON2_DATASETS={os.environ.get('DETECTRON2_DATASETS', '<unset>')!r}, "
                f"resolved from {os.getcwd()})."
            )
        return json_file, os.path.join(root, f"{split}2017")

    return paths


def _synthetic_generator(profile: str) -> Tuple[Callable[..., Dict[str, str]], Dict[str, Any]]:
    """The generator and its keyword arguments (read at call time) of a builtin profile."""
    from kd2.data import synthetic

    if profile == "crowded":
        return synthetic.generate_crowded_benchmark, SYNTHETIC_CROWDED_GENERATOR_KWARGS
    return synthetic.generate_synthetic_dataset, SYNTHETIC_GENERATOR_KWARGS


def _ensure_synthetic(root: str, profile: str = "default") -> None:
    """Generate the synthetic dataset of ``profile`` at ``root`` unless complete; safe across
    processes."""
    from kd2.data.synthetic import synthetic_dataset_exists

    if synthetic_dataset_exists(root):
        return
    generate, kwargs = _synthetic_generator(profile)
    logger.warning(
        "Synthetic dataset%s not found at %s; generating it now (arguments: %s) ...",
        "" if profile == "default" else f" ({profile} profile)",
        root,
        kwargs or "defaults",
    )
    if os.path.exists(root):  # a partial/interrupted generation: redo it in place
        generate(root, overwrite=True, **kwargs)
        return
    parent = os.path.dirname(root) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(root)}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp, overwrite=True, **kwargs)
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not synthetic_dataset_exists(root):
            raise


#: builtin synthetic profile -> (dataset name prefix, directory under ``$DETECTRON2_DATASETS``)
_SYNTHETIC_BUILTINS = {
    "default": ("synthetic", "kd2_synthetic"),
    "crowded": ("synthetic_crowded", "kd2_synthetic_crowded"),
}


def _synthetic_paths(split: str, profile: str = "default") -> Callable[[], Tuple[str, str]]:
    dirname = _SYNTHETIC_BUILTINS[profile][1]

    def paths() -> Tuple[str, str]:
        root = os.path.abspath(os.path.join(datasets_root(), dirname))
        _ensure_synthetic(root, profile)
        return (
            os.path.join(root, "annotations", f"instances_{split}.json"),
            os.path.join(root, split),
        )

    return paths


#: the labelled fraction of the builtin ``synthetic_train_labeled`` (``kd2.data.subsets``)
SYNTHETIC_LABELED_FRACTION = 0.25


def _semi_paths(role: str) -> Callable[[], Tuple[str, str]]:
    """The files of ``synthetic_train_labeled`` / ``synthetic_train_hidden``:
    :func:`kd2.data.subsets.hide_labels` of ``synthetic_train``, made on first use under
    ``$DETECTRON2_DATASETS/kd2_synthetic_semi``."""

    def paths() -> Tuple[str, str]:
        from kd2.data.subsets import hide_labels

        json_file, image_root = _synthetic_paths("train")()
        out = os.path.abspath(os.path.join(datasets_root(), "kd2_synthetic_semi"))
        split = hide_labels(json_file, image_root, out, keep=SYNTHETIC_LABELED_FRACTION)
        return split[role], image_root if role == "labeled" else split["unlabeled"]

    return paths


def _register_builtins() -> None:
    for role in ("labeled", "hidden"):
        name = f"synthetic_train_{role}"
        _register_lazy_coco(name, _semi_paths(role), {"evaluator_type": "coco"})
    for split in ("train", "val"):
        _register_lazy_coco(f"coco_2017_{split}", _coco_paths(split), {"evaluator_type": "coco"})
        for profile, (prefix, _) in _SYNTHETIC_BUILTINS.items():
            _register_lazy_coco(
                f"{prefix}_{split}", _synthetic_paths(split, profile), {"evaluator_type": "coco"}
            )


_register_builtins()
