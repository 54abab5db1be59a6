"""The documentation: the mkdocs site builds strictly, README.md is a short front door whose
links and methods table are sound, nothing links outside the repository, and the configuration
reference is the one generated from the schema."""

from __future__ import annotations

import importlib.util
import os
import posixpath
import re
import subprocess
import sys
import unicodedata

from .helpers import REPO

README = REPO / "README.md"
README_LIMIT = 12 * 1024

#: an inline link or image: [text](target) / ![alt](target "title")
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
#: a path into the shared directory beside the checkout, or one of its documents by name
OUTSIDE_TEXT = re.compile(r"\.\./shared/|shared/docs|algorithms\.md|methods-2026\.md")


def _markdown_files() -> list:
    files = [README, *sorted((REPO / "docs").rglob("*.md")), *sorted(REPO.glob("projects/**/*.md"))]
    return [f for f in files if ".venv" not in f.parts]


def _links(text: str) -> list[str]:
    """The link targets of a Markdown text, outside code blocks and code spans."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.extend(LINK.findall(CODE_SPAN.sub("", line)))
    return out


def _relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target)


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug, as mkdocs gives headings their anchors."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)
    return {_slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M)}


def _load(relpath: str, name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mkdocs_build_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    # the project READMEs are pages of the site
    assert (tmp_path / "site" / "projects" / "GlobalKD" / "index.html").is_file()


def test_readme_is_at_most_12_kb():
    size = README.stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail to docs/"


def test_no_markdown_file_refers_outside_the_repository():
    bad = []
    for path in _markdown_files():
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(REPO).as_posix()
        bad += [f"{rel}: mentions {m.group(0)!r}" for m in OUTSIDE_TEXT.finditer(text)]
        for target in filter(_relative, _links(text)):
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
            if resolved == ".." or resolved.startswith("../"):
                bad.append(f"{rel}: links outside the repository: {target}")
    assert not bad, "\n".join(bad)


def test_readme_links_resolve():
    bad = []
    for target in filter(_relative, _links(README.read_text(encoding="utf-8"))):
        path, _, anchor = target.partition("#")
        file = REPO / path
        if not file.exists():
            bad.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            bad.append(f"{target}: no heading with that anchor")
    assert not bad, "\n".join(bad)


def _readme_methods_table() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Methods\n", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return table


def test_readme_methods_table_is_one_table_linking_every_method_to_its_project():
    header, rule, *rows = _readme_methods_table()
    assert all(re.fullmatch(r":?-{3,}:?", c) for c in rule) and len(rule) == len(header)
    assert rows
    for row in rows:
        assert len(row) == len(header), row
        links = [t for t in _links("|".join(row)) if t.startswith("projects/")]
        assert links, f"no project link: {row}"
        for target in links:
            assert re.fullmatch(r"projects/[^/]+/README\.md", target), target
            assert (REPO / target).is_file(), target
    # one row per registered method
    from kd2.losses import KD_METHOD_REGISTRY

    column = header.index("`KD.METHODS`")
    named = [name for row in rows for name in re.findall(r"`([^`]+)`", row[column])]
    assert sorted(named) == sorted(name for name, _ in KD_METHOD_REGISTRY)


def test_configuration_reference_is_generated_from_the_schema():
    generator = _load("docs/gen_config_reference.py", "kd2_gen_config_reference")
    assert generator.main(["--check"]) == 0, (
        "docs/configuration.md is stale: run python docs/gen_config_reference.py --write"
    )
    # every key of the schema is on the page
    from kd2.config import get_cfg

    def leaves(node, prefix=""):
        for k, v in node.items():
            key = f"{prefix}{k}"
            yield from leaves(v, key + ".") if hasattr(v, "items") else [key]

    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = [k for k in leaves(get_cfg()) if f"| `{k}` |" not in page]
    assert not missing, missing


def test_methods_tables_are_generated_from_the_method_cards():
    generator = _load("docs/gen_methods_table.py", "kd2_gen_methods_table")
    assert generator.main(["--check"]) == 0, (
        "a methods table is stale: run python docs/gen_methods_table.py --write"
    )
