"""The package stays in small pieces: no function of kd2/ is longer than 80 lines (split it by
the steps it already has, named after them). The import layers are checked by ``lint-imports``
in ``make test`` (docs/architecture.md)."""

from __future__ import annotations

import ast

from .helpers import REPO

MAX_FUNCTION_LINES = 80


def test_no_function_of_kd2_is_longer_than_80_lines():
    long = []
    for path in sorted((REPO / "kd2").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    rel = path.relative_to(REPO)
                    long.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)
