"""Loading configs: ``get_cfg``, and merges whose errors name the closest valid key."""

from __future__ import annotations

import difflib
import os
from typing import List, Sequence

from fvcore.common.config import CfgNode as _FvCfgNode

__all__ = ["CfgNode", "get_cfg", "method_node_name"]


def _all_keys(node: _FvCfgNode, prefix: str = "") -> List[str]:
    keys = []
    for k, v in node.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, _FvCfgNode):
            keys.extend(_all_keys(v, full + "."))
    return keys


def _closest(name: str, candidates: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.0)
    return match[0] if match else ""


class CfgNode(_FvCfgNode):
    """fvcore's ``CfgNode`` (``_BASE_`` inheritance) whose unknown-key errors suggest a fix."""

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        if not os.path.isfile(cfg_filename):
            raise FileNotFoundError(f"config file {cfg_filename!r} does not exist")
        try:
            super().merge_from_file(cfg_filename, allow_unsafe=allow_unsafe)
        except (KeyError, AssertionError) as e:
            raise self._unknown_key_error(e, f" in {cfg_filename}") from None
        self.validate()

    def merge_from_list(self, cfg_list: list) -> None:
        if len(cfg_list) % 2:
            raise ValueError(
                f"overrides must be KEY VALUE pairs, got an odd number of items: {cfg_list}"
            )
        try:
            super().merge_from_list(cfg_list)
        except (KeyError, AssertionError) as e:
            raise self._unknown_key_error(e, " in the command-line overrides") from None
        self.validate()

    def _unknown_key_error(self, err: Exception, where: str) -> Exception:
        msg = str(err.args[0]) if err.args else str(err)
        # yacs says "Non-existent config key: A.B.C" (files) or "Non-existent key: A.B.C" (lists)
        if not msg.startswith("Non-existent"):
            return err
        key = msg.split(":", 1)[1].strip()
        best = _closest(key, _all_keys(self))
        hint = f"; did you mean {best!r}?" if best else ""
        return KeyError(f"unknown config key {key!r}{where}{hint}")

    def validate(self) -> None:
        """Check ``KD.METHODS`` names against the registry (an unknown one names the closest)."""
        if "KD" not in self:
            return
        from kd2.losses import KD_METHOD_REGISTRY

        known = sorted(name for name, _ in KD_METHOD_REGISTRY)
        for name in self.KD.METHODS:
            if name not in known:
                best = _closest(name, known)
                raise KeyError(
                    f"unknown KD method {name!r} in KD.METHODS; did you mean {best!r}? "
                    f"Registered methods: {known}"
                )


def method_node_name(method: str) -> str:
    """The ``cfg.KD`` sub-node that holds a method's options: ``"DeFeat"`` -> ``"DEFEAT"``."""
    return method.upper()


def get_cfg() -> CfgNode:
    """A fresh copy of kd2's default config."""
    from .defaults import _C

    return CfgNode(_C.clone())
