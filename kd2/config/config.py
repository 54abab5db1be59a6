"""Loading configs: ``get_cfg``, and merges whose errors name the closest valid key."""

from __future__ import annotations

import difflib
import math
import os
import re
from typing import Any, Dict, List, Sequence, Tuple

import yaml
from fvcore.common.config import CfgNode as _FvCfgNode

from kd2.losses import KD_METHOD_REGISTRY
from kd2.utils.errors import ConfigError, MissingFileError, UnknownNameError

__all__ = [
    "CfgNode",
    "base_chain",
    "closest_name",
    "explain_merge_error",
    "get_cfg",
    "method_node_name",
    "validate_kd_methods",
    "validate_values",
]


def _all_keys(node: _FvCfgNode, prefix: str = "") -> List[str]:
    keys = []
    for k, v in node.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, _FvCfgNode):
            keys.extend(_all_keys(v, full + "."))
    return keys


def closest_name(name: str, candidates: Sequence[str]) -> str:
    """The candidate most similar to ``name`` (``""`` when there are none)."""
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.0)
    return match[0] if match else ""


def _resolve_base(base: str, child: str) -> str:
    """fvcore's rule: ``~`` expanded, else relative to the file that names the base."""
    if base.startswith("~"):
        base = os.path.expanduser(base)
    if not base.startswith(("/", "https://", "http://")):
        base = os.path.join(os.path.dirname(child), base)
    return os.path.normpath(base) if not base.startswith(("https://", "http://")) else base


def _load_yaml(path: str, allow_unsafe: bool) -> Any:
    with open(path) as f:
        try:
            return yaml.safe_load(f)
        except yaml.constructor.ConstructorError:
            if not allow_unsafe:
                raise
            f.seek(0)
            return yaml.unsafe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(
                f"config file {path!r} is not valid YAML ({' '.join(str(e).split())})",
                "fix the line it names (indentation, a missing ':' or quote)",
            ) from None


_TYPE_MISMATCH = re.compile(
    r"Type mismatch \((?P<want><class '\w+'>) vs\. (?P<got><class '\w+'>)\) with values "
    r"\((?P<old>.*) vs\. (?P<new>.*)\) for config key: (?P<key>[\w.]+)",
    re.S,
)


def explain_merge_error(err: Exception, cfg: _FvCfgNode, where: str) -> Exception:
    """The :class:`~kd2.utils.errors.ConfigError` a yacs/fvcore merge error means, or ``err``.

    Shared by kd2's :class:`CfgNode` and the Detectron2 configs (``kd2.d2.merge_config``):
    an unknown key names the closest valid one; a value of the wrong type names the key, both
    types and, for a string where a tuple or list is expected (YAML flow style
    ``{MIN_SIZE_TRAIN: (512,)}`` cuts the value at the comma, and YAML has no tuples), says to
    write a list.

    Args:
        err: what the merge raised.
        cfg: the config merged into (its keys are the candidates).
        where: appended to the key in the message, e.g. ``" in my.yaml"``.
    """
    msg = str(err.args[0]) if err.args else str(err)
    # yacs says "Non-existent config key: A.B.C" (files) or "Non-existent key: A.B.C" (lists)
    if isinstance(err, (KeyError, AssertionError)) and msg.startswith("Non-existent"):
        key = msg.split(":", 1)[1].strip()
        best = closest_name(key, _all_keys(cfg))
        return UnknownNameError(
            f"unknown config key {key!r}{where}",
            f"did you mean {best!r}?" if best else "see the configuration reference",
        )
    m = _TYPE_MISMATCH.search(msg) if isinstance(err, ValueError) else None
    if m:
        key, want, got = m["key"], m["want"][8:-2], m["got"][8:-2]
        fix = f"give a {want} like the default {m['old']}"
        if want in ("tuple", "list") and got == "str":
            leaf = key.rsplit(".", 1)[-1]
            fix = (
                f"write a YAML list, e.g. `{leaf}: [512]` (YAML has no tuples; inside a flow "
                "mapping `{...}` a comma ends the value, so `(512,)` arrives cut)"
            )
        return ConfigError(f"config key {key}{where} expects a {want}, got {m['new']!r}", fix)
    return err


def base_chain(cfg_filename: str, allow_unsafe: bool = False) -> List[Tuple[str, Dict]]:
    """Every file of ``cfg_filename``'s ``_BASE_`` tree with its raw yaml, in merge order
    (bases first, ``cfg_filename`` last; a list-valued ``_BASE_`` is merged in list order).

    Raises ``ValueError`` naming the files of a cyclic chain (``a.yaml -> b.yaml -> a.yaml``;
    fvcore itself would recurse until ``RecursionError``) and ``FileNotFoundError`` naming a
    missing base and the file that names it. ``http(s)://`` bases are not followed."""
    chain: List[Tuple[str, Dict]] = []

    def walk(path: str, stack: List[Tuple[str, str]]) -> None:
        real = os.path.realpath(path)
        seen = [r for r, _ in stack]
        if real in seen:
            cycle = [p for _, p in stack[seen.index(real) :]] + [path]
            raise ConfigError(
                f"cyclic _BASE_ chain: {' -> '.join(cycle)}", "remove one of these _BASE_ links"
            )
        data = _load_yaml(path, allow_unsafe)
        data = data if isinstance(data, dict) else {}
        bases = data.get("_BASE_") or []
        for base in bases if isinstance(bases, list) else [bases]:
            resolved = _resolve_base(str(base), path)
            if resolved.startswith(("https://", "http://")):
                continue
            if not os.path.isfile(resolved):
                raise MissingFileError(
                    f"_BASE_ {base!r} of config file {path!r} does not exist ({resolved!r})",
                    "a _BASE_ path is relative to the file that names it",
                )
            walk(resolved, stack + [(real, path)])
        chain.append((path, data))

    walk(cfg_filename, [])
    return chain


class CfgNode(_FvCfgNode):
    """fvcore's ``CfgNode`` (``_BASE_`` inheritance) whose unknown-key errors suggest a fix."""

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        if not os.path.isfile(cfg_filename):
            raise MissingFileError(
                f"config file {cfg_filename!r} does not exist", "check the path and its spelling"
            )
        chain = base_chain(cfg_filename, allow_unsafe=allow_unsafe)  # a cycle: named, not hit
        lr_batch = self._lr_batch_after([data.get("SOLVER") or {} for _, data in chain])
        try:
            super().merge_from_file(cfg_filename, allow_unsafe=allow_unsafe)
        except (KeyError, AssertionError, ValueError) as e:
            raise explain_merge_error(e, self, f" in {cfg_filename}") from None
        self._set_lr_batch(lr_batch)
        self.validate()

    def merge_from_list(self, cfg_list: list) -> None:
        if len(cfg_list) % 2:
            raise ConfigError(
                f"overrides must be KEY VALUE pairs, got an odd number of items: {cfg_list}",
                "give a value after every key",
            )
        solver = {
            k.split(".", 1)[1]: v
            for k, v in zip(cfg_list[::2], cfg_list[1::2])
            if k.startswith("SOLVER.")
        }
        try:
            super().merge_from_list(cfg_list)
        except (KeyError, AssertionError, ValueError) as e:
            raise explain_merge_error(e, self, " in the command-line overrides") from None
        self._set_lr_batch(self._lr_batch_after([solver], literal=True))
        self.validate()

    def _lr_batch_after(self, solver_nodes: List[Dict], literal: bool = False) -> int | None:
        """``SOLVER.BASE_LR_BATCH_SIZE`` after merging ``solver_nodes`` (raw ``SOLVER`` dicts in
        merge order): an explicit value, else the IMS_PER_BATCH in effect where BASE_LR is set;
        ``None`` = unchanged (or a schema without the key)."""
        if "SOLVER" not in self or "BASE_LR_BATCH_SIZE" not in self.SOLVER:
            return None
        batch, ref = self.SOLVER.IMS_PER_BATCH, None
        for node in solver_nodes:
            if "IMS_PER_BATCH" in node:
                batch = node["IMS_PER_BATCH"]
            if "BASE_LR_BATCH_SIZE" in node:
                ref = node["BASE_LR_BATCH_SIZE"]
            elif "BASE_LR" in node:
                ref = batch
        if ref is not None and literal:  # command-line values are strings
            import ast

            ref = ast.literal_eval(ref) if isinstance(ref, str) else ref
        return None if ref is None else int(ref)

    def _set_lr_batch(self, ref: int | None) -> None:
        if ref is not None:
            self.SOLVER.BASE_LR_BATCH_SIZE = ref

    def validate(self) -> None:
        validate_kd_methods(self)


def validate_kd_methods(cfg) -> None:
    """Check ``KD.METHODS`` names against the registry (an unknown one names the closest)."""
    if "KD" not in cfg:
        return

    known = sorted(name for name, _ in KD_METHOD_REGISTRY)
    for name in cfg.KD.METHODS:
        if name not in known:
            best = closest_name(name, known)
            raise UnknownNameError(
                f"unknown KD method {name!r} in KD.METHODS",
                f"did you mean {best!r}? Registered methods: {known}",
            )


def method_node_name(method: str) -> str:
    """The ``cfg.KD`` sub-node that holds a method's options: ``"DeFeat"`` -> ``"DEFEAT"``."""
    return method.upper()


def get_cfg() -> CfgNode:
    """A fresh copy of kd2's default config."""
    from .defaults import _C

    cfg = CfgNode(_C.clone())
    cfg.KD.TEACHERS.set_new_allowed(True)  # a copy does not keep the flag
    return cfg


# KD keys that are temperatures (finite > 0); DeFeat's T_POS / T_NEG are its two temperatures.
_TEMPERATURE_KEYS = frozenset(
    {"TEMPERATURE", "TAU", "T_POS", "T_NEG", "REG_TEMPERATURE", "CLS_TEMPERATURE"}
)
# A negative value is the documented sentinel "the paper's value for the detector".
_NEGATIVE_SENTINEL_KEYS = frozenset(
    {
        "KD.FRS.WEIGHT_FEAT",
        "KD.FRS.WEIGHT_CLS",
        "KD.CWD.WEIGHT",
        "KD.PKD.WEIGHT",
        "KD.FGD.TEMPERATURE",
        "KD.CROSSKD.SPLIT",
        "KD.CROSSKD.CLS_WEIGHT",
        "KD.CROSSKD.REG_WEIGHT",
        "KD.CROSSKD.BOX_WEIGHT",
    }
)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(cfg, key: str, rule: str, hint: str = "") -> None:
    """``rule``: ``"> 0"`` / ``">= 0"`` (finite numbers) or ``"finite"``; missing keys pass."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    value = node
    if not _is_number(value):
        raise ConfigError(f"{key} must be a number{hint}, got {value!r}", "give a number")
    ok = math.isfinite(value) and (rule == "finite" or (value > 0 if rule == "> 0" else value >= 0))
    if not ok:
        what = "finite" if rule == "finite" else rule
        if isinstance(value, float) and rule != "finite":
            what = f"a finite number {rule}"
        raise ConfigError(
            f"{key} must be {what}{hint}, got {value!r}", "change it in the config or the overrides"
        )


def _check_architecture(cfg) -> None:
    """``MODEL.BACKEND transformers`` builds ``DETR`` and only it (kd2's own schema)."""
    model = cfg.get("MODEL") if isinstance(cfg, dict) else None
    if not isinstance(model, dict) or "HF" not in model:  # a Detectron2 config
        return
    backend, arch = model.get("BACKEND"), model.get("META_ARCHITECTURE")
    if backend == "transformers" and arch != "DETR":
        raise ConfigError(
            f"MODEL.BACKEND transformers builds DETR-family detectors, but "
            f"MODEL.META_ARCHITECTURE is {arch!r}",
            "set MODEL.META_ARCHITECTURE DETR and name the model in MODEL.HF.MODEL_TYPE",
        )
    if backend == "torchvision" and arch == "DETR":
        raise ConfigError(
            "MODEL.META_ARCHITECTURE DETR is a transformers model, but MODEL.BACKEND is "
            "torchvision",
            "set MODEL.BACKEND transformers",
        )


def validate_values(cfg) -> None:
    """Refuse values that cannot train: each error names the key and its valid range.

    ``SOLVER.MAX_ITER`` / ``IMS_PER_BATCH`` / ``BASE_LR`` / ``GAMMA`` > 0;
    ``SOLVER.CHECKPOINT_PERIOD`` / ``WARMUP_ITERS`` / ``MOMENTUM`` / ``WEIGHT_DECAY``,
    ``TEST.EVAL_PERIOD`` and ``KD.WARMUP_ITERS`` >= 0; every KD loss weight (a key under
    ``KD.<METHOD>`` whose name contains ``WEIGHT``, except the ``WEIGHTS`` paths) finite and
    >= 0 — the sentinel keys (``KD.FRS.WEIGHT_FEAT`` / ``WEIGHT_CLS``, ``KD.CWD.WEIGHT``,
    ``KD.PKD.WEIGHT``, ``KD.FGD.TEMPERATURE``) may be negative (= the paper's value for the
    detector) but must be finite; every temperature (``TEMPERATURE``, ``TAU``, DeFeat's ``T_POS``
    / ``T_NEG``) finite and > 0. Keys the config does not have are skipped (Detectron2 configs).
    """
    _check_architecture(cfg)
    for key in ("SOLVER.MAX_ITER", "SOLVER.IMS_PER_BATCH", "SOLVER.BASE_LR", "SOLVER.GAMMA"):
        _check(cfg, key, "> 0")
    for key in (
        "SOLVER.CHECKPOINT_PERIOD",
        "SOLVER.WARMUP_ITERS",
        "SOLVER.MOMENTUM",
        "SOLVER.WEIGHT_DECAY",
        "TEST.EVAL_PERIOD",
        "KD.WARMUP_ITERS",
    ):
        _check(cfg, key, ">= 0")
    kd = cfg.get("KD") if isinstance(cfg, dict) else None
    if not isinstance(kd, dict):
        return

    def walk(node, prefix: str) -> None:
        for name, value in node.items():
            key = f"{prefix}.{name}"
            if isinstance(value, dict):
                walk(value, key)
            elif key in _NEGATIVE_SENTINEL_KEYS:
                _check(cfg, key, "finite", " (< 0 = the paper's value for the detector)")
            elif name in _TEMPERATURE_KEYS:
                _check(cfg, key, "> 0")
            elif "WEIGHT" in name and name != "WEIGHTS" and _is_number(value):
                _check(cfg, key, ">= 0")

    for name, node in kd.items():
        if isinstance(node, dict):
            walk(node, f"KD.{name}")


#: ``MODEL.BACKEND`` values.
BACKENDS = ("torchvision", "detectron2", "transformers")

#: The key holding ``K`` (the number of classes) for each ``MODEL.META_ARCHITECTURE`` of kd2's
#: own (torchvision-backend) schema.
NUM_CLASSES_KEYS = {
    "FasterRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "RetinaNet": "MODEL.RETINANET.NUM_CLASSES",
    "FCOS": "MODEL.FCOS.NUM_CLASSES",
    "SSD": "MODEL.SSD.NUM_CLASSES",
    "GFL": "MODEL.GFL.NUM_CLASSES",
    "DETR": "MODEL.HF.NUM_CLASSES",
}


def num_classes_of(cfg) -> int:
    """``K``, the number of foreground classes of the configured ``MODEL.META_ARCHITECTURE``
    (read from its :data:`NUM_CLASSES_KEYS` key)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch not in NUM_CLASSES_KEYS:
        raise ConfigError(
            f"MODEL.META_ARCHITECTURE={arch!r} is not an architecture of kd2's own schema",
            f"use one of {', '.join(NUM_CLASSES_KEYS)}",
        )
    node = cfg
    for part in NUM_CLASSES_KEYS[arch].split("."):
        node = node[part]
    return int(node)


def config_backend(config_file: str, opts=()) -> str:
    """``MODEL.BACKEND`` from the overrides, the file or its ``_BASE_`` chain; else detectron2
    (Detectron2 yaml configs do not set it). Raises ``ValueError`` for an unknown backend (with
    the valid ones) or a cyclic ``_BASE_`` chain (with its files), ``FileNotFoundError`` for a
    missing base."""
    backend, source = None, None
    for key, value in zip(opts[::2], opts[1::2]):
        if key == "MODEL.BACKEND":
            backend, source = value, "the command-line overrides"
    if backend is None:
        # merge order: bases first; the last file that sets it wins
        for path, data in reversed(base_chain(config_file)):
            value = (data.get("MODEL") or {}).get("BACKEND")
            if value:
                backend, source = value, path
                break
    if backend is None:
        return "detectron2"
    if backend not in BACKENDS:
        best = difflib.get_close_matches(str(backend), BACKENDS, n=1, cutoff=0.0)
        raise UnknownNameError(
            f"unknown MODEL.BACKEND {backend!r} (in {source})",
            f"valid backends: {', '.join(BACKENDS)}; did you mean {best[0]!r}?",
        )
    return backend
