"""Generated sections of hand-written pages: text between two HTML-comment markers, rewritten by
a generator (``--write``) and compared by the tests (``--check``) — the configuration reference,
the methods tables, the gain tables."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence

__all__ = ["replace_between", "sync_generated"]

#: ``(path, ((begin marker, end marker, generated text), ...))``
Target = tuple[str, Sequence[tuple[str, str, str]]]


def replace_between(page: str, begin: str, end: str, text: str) -> str | None:
    """``page`` with what lies between ``begin`` and ``end`` replaced by ``text`` (on lines of
    its own); ``None`` when a marker is missing."""
    if begin not in page or end not in page:
        return None
    head, rest = page.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{text.rstrip(chr(10))}\n{end}{tail}"


def sync_generated(targets: Iterable[Target], *, check: bool, root: str, remedy: str) -> int:
    """Write every target's sections (or, with ``check``, only compare them); returns the exit
    status: 1 when a marker is missing or, with ``check``, a page differs (``remedy``: the
    command that regenerates them, named in the message)."""
    stale = []
    for path, sections in targets:
        rel = os.path.relpath(path, root)
        with open(path, encoding="utf-8") as f:
            old = f.read()
        new = old
        for begin, end, text in sections:
            new = replace_between(new, begin, end, text)
            if new is None:
                print(f"{rel} has no {begin} ... {end} markers", file=sys.stderr)
                return 1
        if new == old:
            continue
        if check:
            stale.append(rel)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
    if stale:
        print(f"generated sections are stale in: {', '.join(stale)} ({remedy})", file=sys.stderr)
        return 1
    return 0
