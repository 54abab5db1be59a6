"""``docs/adding_a_method.md`` followed as written: its loss module and schema node run as they
stand on the page, the method trains a step on a one-stage and a two-stage student, and its
function gives the hand-computed value. The toy is unregistered afterwards."""

from __future__ import annotations

import importlib.util
import re
import types

import pytest
import torch
import yaml
from fvcore.common.config import CfgNode

from kd2.losses import KD_METHOD_REGISTRY
from kd2.tv.build import build_detector

from .helpers import REPO, batch, kd_cfg

PAGE = REPO / "docs" / "adding_a_method.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture()
def toy_method():
    """The page's loss module, executed as a module; its class unregistered after the test."""
    module = types.ModuleType("kd2_docs_l1hint")
    exec(compile(_blocks("python")[0], str(PAGE), "exec"), module.__dict__)  # noqa: S102
    try:
        yield module
    finally:
        KD_METHOD_REGISTRY._obj_map.pop("L1Hint", None)


def _with_schema_node(cfg):
    """The page's schema block, run against ``cfg`` as it runs against ``_C`` in defaults.py."""
    exec(compile(_blocks("python")[1], str(PAGE), "exec"), {"_C": cfg, "CN": CfgNode})  # noqa: S102
    return cfg


def test_the_toy_function_gives_the_hand_computed_value(toy_method):
    s = [torch.ones(1, 2, 2, 2), torch.full((1, 2, 1, 1), 3.0)]
    t = [torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 1, 1)]
    assert toy_method.l1_hint_loss(s, t).item() == pytest.approx(1.0 + 2.0)


@pytest.mark.parametrize("arch", ["RetinaNet", "FasterRCNN"])
def test_the_toy_method_trains_a_step_as_the_page_says(tmp_path, toy_method, arch):
    config = yaml.safe_load(_blocks("yaml")[0])
    assert (REPO / "configs" / "synthetic" / config["_BASE_"]).is_file()
    cfg = _with_schema_node(kd_cfg(tmp_path, arch, methods=config["KD"]["METHODS"]))
    cfg.KD.L1HINT.WEIGHT = float(config["KD"]["L1HINT"]["WEIGHT"])
    model = build_detector(cfg).train()
    assert type(model.kd_methods["L1Hint"]).__name__ == "L1Hint"
    images, targets = batch(arch, with_empty=False)
    losses = model(images, targets)
    assert losses["loss_kd_l1hint"].item() > 0
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None for p in model.kd_methods["L1Hint"].parameters())


def test_the_toy_card_holds_and_gives_its_table_row(toy_method, monkeypatch):
    from kd2.config import get_cfg
    from kd2.losses import FAMILIES
    from kd2.modeling import distiller
    from tests.losses.test_method_cards import family_mismatch

    # the schema node of step 2, as if written into kd2/config/defaults.py
    monkeypatch.setattr(distiller, "get_cfg", lambda: _with_schema_node(get_cfg()))

    for family in FAMILIES:
        assert family_mismatch(family) == ([], []), family
    spec = importlib.util.spec_from_file_location("gen_methods", REPO / "docs/gen_methods_table.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    rows = [r for r in generator.readme_table().splitlines() if "`L1Hint`" in r]
    assert rows and "[Baselines](projects/Baselines/README.md)" in rows[0]
