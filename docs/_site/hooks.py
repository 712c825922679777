r"""MkDocs hooks for the docs site.

Links out of docs/. The pages link to files of the repository outside docs/
(``../examples/scraper.py``, ``../benchmarks/bench_io.py``): on GitHub and in an editor
those links work as they are. For the site, each such file is published as a plain-text
copy under ``_repo/`` (a folder as a listing of its files) and the link is pointed at
it, so the built site has no dead link.

The API reference. docs/reference.md gives each public name a heading of its own (so
that it reads well as a plain Markdown file, and its anchors work from every page),
followed by a ``::: pipeflow.Name`` directive. On the site, mkdocstrings' heading for the
object, with its signature, takes the place of the hand-written one, at the same level
and under the same anchor.

Tables. In a Markdown table, GitHub needs ``\|`` for a ``|`` inside a code span;
Python-Markdown shows the backslash, so it is dropped there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

_ROOT = Path(__file__).resolve().parents[2]
# [text](../path) where path is a file or folder of the repository outside docs/.
_LINK = re.compile(r"(\]\()\.\./((?:examples|benchmarks)/[^)#\s]*)")


def _published(relative: str) -> str:
    """Where the site keeps its copy of the repository's ``relative`` (a file, or a
    folder's listing); Markdown files get ``.txt`` so that they are not pages."""
    path = relative.rstrip("/")
    if (_ROOT / path).is_dir():
        return f"_repo/{path}/index.html"
    return f"_repo/{path}.txt" if path.endswith(".md") else f"_repo/{path}"


def _listing(folder: Path, names: list[str]) -> str:
    items = "".join(f'<li><a href="{n}">{n.removesuffix(".txt")}</a></li>' for n in names)
    title = folder.relative_to(_ROOT).as_posix()
    return f"<!doctype html><title>{title}/</title><h1>{title}/</h1><ul>{items}</ul>\n"


def on_files(files: Files, config: Any) -> Files:
    """Publish a copy of every repository file that a page links to, and of every
    file of a folder that a page links to, with a listing of the folder."""
    docs = Path(config["docs_dir"])
    wanted = {
        match.group(2).rstrip("/")
        for page in docs.glob("*.md")
        for match in _LINK.finditer(page.read_text(encoding="utf-8"))
    }
    sources: set[Path] = set()
    for relative in sorted(wanted):
        source = _ROOT / relative
        if source.is_dir():
            inside = sorted(
                f for f in source.rglob("*") if f.is_file() and "__pycache__" not in f.parts
            )
            sources.update(inside)
            names = [Path(_published(f.relative_to(_ROOT).as_posix())).name for f in inside]
            content = _listing(source, names)
            files.append(File.generated(config, _published(relative), content=content))
        elif source.is_file():
            sources.add(source)
    for source in sorted(sources):
        content = source.read_text(encoding="utf-8")
        uri = _published(source.relative_to(_ROOT).as_posix())
        files.append(File.generated(config, uri, content=content))
    return files


# A hand-written heading for an object, then (after blank lines) its directive and
# optionally an options block.
_HEADING = re.compile(
    r"^(?P<anchor><a id=\"[^\"]+\"></a>\n)?(?P<level>#{2,5}) `(?P<name>[\w.]+)`\n\n"
    r"(?P<directive>::: [\w.]+\n)(?P<options>    options:\n)?",
    re.MULTILINE,
)
_CODE_IN_TABLE_ROW = re.compile(r"`[^`\n]*\\\|[^`\n]*`")


def _object_heading(match: re.Match[str]) -> str:
    level = len(match["level"])
    anchor = match["anchor"] or f'<a id="{match["name"].lower().replace(".", "")}"></a>\n'
    return (
        f"{anchor}\n{match['directive']}    options:\n"
        f"      show_root_heading: true\n      heading_level: {level}\n"
    )


def _unescape_pipes(line: str) -> str:
    if not line.startswith("|"):
        return line
    return _CODE_IN_TABLE_ROW.sub(lambda m: m.group(0).replace("\\|", "|"), line)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Point ``../examples/...`` and ``../benchmarks/...`` links at the published
    copies; let mkdocstrings head the reference's objects; unescape ``\\|`` in tables."""
    markdown = _LINK.sub(lambda m: m.group(1) + _published(m.group(2)), markdown)
    if page.file.src_uri == "reference.md":
        markdown = _HEADING.sub(_object_heading, markdown)
    return "\n".join(_unescape_pipes(line) for line in markdown.split("\n"))
