"""mkdocs hooks (``hooks:`` in mkdocs.yml): files of the repository outside ``docs/`` in the site.

The project READMEs (``projects/*/README.md``) and the benchmark figures
(``benchmarks/results/*.png``) join the site as they are, read from the repository — nothing is
copied into ``docs/``. Every page is written with links that are right in the repository
(``../projects/FRS/README.md`` from ``docs/methods.md``, ``../../docs/benchmarks.md`` from a
project README), so they work on a code host too; ``on_page_markdown`` rewrites each relative
link to the same file's place in the site. A link to a file that is not in the site is left as
it is, so ``mkdocs build --strict`` reports it.
"""

from __future__ import annotations

import glob
import os
import posixpath
import re

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: repository files outside docs/ that are part of the site, at their repository path
EXTRA = ("projects/*/README.md", "benchmarks/results/*.png")

#: an inline link or image target: ](target) or ](target "title")
LINK = re.compile(r"(\]\()([^)\s]+)((?:\s+\"[^\"]*\")?\))")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def on_files(files, config):
    for pattern in EXTRA:
        for path in sorted(glob.glob(os.path.join(ROOT, pattern))):
            src_uri = os.path.relpath(path, ROOT).replace(os.sep, "/")
            files.append(File(src_uri, ROOT, config["site_dir"], config["use_directory_urls"]))
    return files


def _repo_path(file) -> str:
    """The page's path in the repository (``docs/x.md``, ``projects/FRS/README.md``)."""
    return os.path.relpath(file.abs_src_path, ROOT).replace(os.sep, "/")


def _site_path(repo_path: str) -> str:
    """A repository path's place in the site: ``docs/`` is the site's root."""
    return repo_path[len("docs/") :] if repo_path.startswith("docs/") else repo_path


def rewrite_links(markdown: str, page_repo_path: str, exists) -> str:
    """Every relative link of a page, from its repository form to its site form."""
    page_dir = posixpath.dirname(page_repo_path)
    site_dir = posixpath.dirname(_site_path(page_repo_path))

    def link(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target):
            return m.group(0)
        path, sep, anchor = target.partition("#")
        repo_target = posixpath.normpath(posixpath.join(page_dir, path))
        site_target = _site_path(repo_target)
        if repo_target.startswith("..") or not exists(site_target):
            return m.group(0)  # not part of the site: mkdocs reports it
        new = posixpath.relpath(site_target, site_dir or ".")
        return f"{m.group(1)}{new}{sep}{anchor}{m.group(3)}"

    def line_links(line: str) -> str:
        # leave `code spans` alone
        out, last = [], 0
        for span in CODE_SPAN.finditer(line):
            out.append(LINK.sub(link, line[last : span.start()]))
            out.append(span.group(0))
            last = span.end()
        out.append(LINK.sub(link, line[last:]))
        return "".join(out)

    lines, fenced = [], False
    for line in markdown.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
            lines.append(line)
        else:
            lines.append(line if fenced else line_links(line))
    return "\n".join(lines)


def on_page_markdown(markdown, page, config, files):
    known = {f.src_uri for f in files}
    return rewrite_links(markdown, _repo_path(page.file), known.__contains__)
