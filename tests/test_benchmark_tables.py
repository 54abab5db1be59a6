"""The gain tables (docs/benchmarks.md and every project README) are generated from the
committed per-run results."""

from __future__ import annotations

import importlib.util
import json

import pytest

from .helpers import REPO


def _gains_table():
    spec = importlib.util.spec_from_file_location(
        "kd2_gains_table", REPO / "benchmarks" / "gains_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gain_tables_match_the_results_json():
    assert _gains_table().main(["--check"]) == 0, (
        "a gain table is stale: run python benchmarks/gains_table.py --write"
    )


def test_every_project_readme_is_a_target_and_every_method_has_a_project():
    table = _gains_table()
    projects = {p.parent.name for p in (REPO / "projects").glob("*/README.md")}
    assert set(table.PROJECTS) == projects
    targets = {path for path, _ in table.targets()}
    assert str(REPO / "docs" / "benchmarks.md") in targets
    assert {str(REPO / "projects" / p / "README.md") for p in projects} <= targets
    methods = [m for ms in table.PROJECTS.values() for m in ms]
    assert len(methods) == len(set(methods))
    from kd2.losses import KD_METHOD_REGISTRY

    assert set(methods) == {name for name, _ in KD_METHOD_REGISTRY}


def test_a_project_table_holds_only_its_methods_rows(tmp_path, monkeypatch):
    table = _gains_table()
    pair = tmp_path / "fcos"
    pair.mkdir()
    records = {
        "teacher": {"kind": "teacher", "seed": 0, "bbox": {"AP": 30.0}, "methods": []},
        "student_seed0": {"kind": "student", "seed": 0, "bbox": {"AP": 10.0}, "methods": []},
        "pkd_seed0": {"kind": "distilled", "seed": 0, "bbox": {"AP": 12.0}, "methods": ["PKD"]},
        "gk_seed0": {"kind": "distilled", "seed": 0, "bbox": {"AP": 14.0}, "methods": ["GlobalKD"]},
    }
    for name, r in records.items():
        r.update(run=name, config=f"{name}.yaml", inherit_teacher=[], torch="x")
        (pair / f"{name}.json").write_text(json.dumps(r))
    monkeypatch.setattr(table, "RESULTS", str(tmp_path))
    rows = table.table(("PKD",))
    assert "`pkd_seed0`" in rows and "`gk_seed0`" not in rows
    assert "`pkd_seed0`" in table.table() and "`gk_seed0`" in table.table()
    assert "No run of these methods" in table.table(("LD",))


def test_rows_pair_seeds_and_compute_gain_and_gap(tmp_path, monkeypatch):
    table = _gains_table()
    pair = tmp_path / "fcos"
    pair.mkdir()

    def write(name, kind, seed, ap, config="c.yaml", **extra):
        record = {
            "run": name,
            "kind": kind,
            "seed": seed,
            "bbox": {"AP": ap},
            "config": config,
            "methods": ["PKD"] if kind == "distilled" else [],
            "inherit_teacher": [],
            "torch": "x",
            **extra,
        }
        (pair / f"{name}.json").write_text(json.dumps(record))

    write("teacher", "teacher", 0, 30.0)
    for seed, (s, d) in enumerate([(10.0, 12.0), (12.0, 13.0), (14.0, 18.0)]):
        write(f"student_seed{seed}", "student", seed, s)
        write(f"pkd_seed{seed}", "distilled", seed, d)
    monkeypatch.setattr(table, "RESULTS", str(tmp_path))
    (row,) = table.rows_for("fcos")
    assert row["per_seed"] == [2.0, 1.0, 4.0]
    assert row["gain"][0] == 7.0 / 3.0
    assert row["gap_closed"] == (43.0 / 3.0 - 12.0) / (30.0 - 12.0)
    assert row["own_teacher"] is None and row["pair_teacher"] == 30.0
    # 95 % paired t-interval: mean 7/3, sd 1.5275, t(0.975, 2) = 4.3027 -> ± 3.7947
    assert row["ci"] == pytest.approx((7.0 / 3.0 - 3.7947, 7.0 / 3.0 + 3.7947), abs=1e-3)
    assert table.verdict(row["ci"]) == "not distinguishable"
    assert table.verdict((0.1, 2.0)) == "helps" and table.verdict((-2.0, -0.1)) == "hurts"
    assert table.paired_t_interval([1.0]) is None and table.verdict(None) == "one seed"


def test_a_run_from_a_retrained_teacher_is_measured_against_that_teacher(tmp_path, monkeypatch):
    table = _gains_table()
    pair = tmp_path / "fcos"
    pair.mkdir()
    records = {
        "teacher": {"kind": "teacher", "seed": 0, "bbox": {"AP": 30.0}},
        "teacher_retrained": {"kind": "teacher", "seed": 0, "bbox": {"AP": 40.0}},
        "student_seed0": {"kind": "student", "seed": 0, "bbox": {"AP": 10.0}},
        "pkd_seed0": {
            "kind": "distilled", "seed": 0, "bbox": {"AP": 25.0}, "teacher": {"AP": 40.0}
        },
    }  # fmt: skip
    for name, r in records.items():
        r.update(run=name, config="c.yaml", methods=["PKD"], inherit_teacher=[], torch="x")
        (pair / f"{name}.json").write_text(json.dumps(r))
    monkeypatch.setattr(table, "RESULTS", str(tmp_path))
    (row,) = table.rows_for("fcos")
    assert row["pair_teacher"] == 30.0 and row["own_teacher"] == 40.0
    assert row["gap_closed"] == (25.0 - 10.0) / (40.0 - 10.0)
