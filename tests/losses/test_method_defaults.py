"""A method's defaults are written once, in the config schema (``kd2/config/defaults.py``):
``from_config`` reads every setting from the node the backends hand it (no fallback literal of
its own), the Detectron2 config carries the same node, and the plain-class API's ``__init__``
keyword defaults, where they exist, equal the schema's."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import textwrap

import pytest

from kd2.config import get_cfg, method_node_name
from kd2.losses import KD_METHOD_REGISTRY

HAS_D2 = importlib.util.find_spec("detectron2") is not None
METHODS = sorted(name for name, _ in KD_METHOD_REGISTRY)


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _from_config(cls) -> ast.FunctionDef:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.from_config)))
    return tree.body[0]


@pytest.mark.parametrize("name", METHODS)
def test_from_config_reads_the_schema_node_and_nothing_else(name):
    cls = KD_METHOD_REGISTRY.get(name)
    node = getattr(get_cfg().KD, method_node_name(name))
    fn = _from_config(cls)
    read = {
        n.attr
        for n in ast.walk(fn)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "node"
    }
    assert read, f"{name}.from_config reads no setting of its node"
    assert read <= set(node), f"{name} reads {sorted(read - set(node))}, not in the schema"
    fallbacks = [
        ast.unparse(n)
        for n in ast.walk(fn)
        if isinstance(n, ast.Call)
        and getattr(n.func, "id", None) in ("getattr", "cfg_get")
        and n.args
        and isinstance(n.args[0], ast.Name)
        and n.args[0].id == "node"
    ]
    assert not fallbacks, f"{name}.from_config writes its own defaults: {fallbacks}"


@pytest.mark.parametrize("name", METHODS)
def test_init_keyword_defaults_equal_the_schema(name):
    cls = KD_METHOD_REGISTRY.get(name)
    node = getattr(get_cfg().KD, method_node_name(name))
    params = inspect.signature(cls.__init__).parameters
    for key in node:
        p = params.get(key.lower())
        if p is not None and p.default is not inspect.Parameter.empty:
            assert _plain(node[key]) == _plain(p.default), (name, key, node[key], p.default)


@pytest.mark.skipif(not HAS_D2, reason="detectron2 is not installed (see README)")
def test_the_detectron2_config_has_the_same_method_defaults():
    from detectron2.config import get_cfg as d2_get_cfg

    from kd2.d2 import add_kd_config

    d2 = d2_get_cfg()
    add_kd_config(d2)
    ours = get_cfg()
    for name in METHODS:
        key = method_node_name(name)
        assert d2.KD[key] == ours.KD[key], name
