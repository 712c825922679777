"""The docs never rot: every ```python block in docs/*.md runs, and every relative link
in docs/*.md and README.md points at a file that exists.

Blocks of one file run in order in one fresh namespace (``__name__ == "__docs__"``), so a
later block can use what an earlier one defined. Blocks that must not run use another
fence: ```sh, ```text or ```pycon.
"""

from __future__ import annotations

import code
import inspect
import linecache
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOC_FILES = sorted(p.name for p in DOCS.glob("*.md"))
LINKED_FILES = [f"docs/{name}" for name in DOC_FILES] + ["README.md"]

# A fence opens with 3+ backticks or tildes (indented, e.g. inside a list item) and
# closes with at least as many of the same character and nothing else on the line.
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


class Block(NamedTuple):
    """A fenced block: its language, the line number of its first line of code (1-based),
    its code, and the 0-based indexes of its opening and closing fence lines."""

    lang: str
    line: int
    code: str
    opening: int
    closing: int


def code_blocks(text: str) -> list[Block]:
    """Every fenced block of ``text``, in order."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent = len(opening["indent"])
        fence = opening["fence"]
        closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        start = i + 1
        j = start
        while j < len(lines) and not closing.match(lines[j]):
            j += 1
        body = [line[indent:] if line[:indent].isspace() else line for line in lines[start:j]]
        blocks.append(Block(opening["info"].lower(), start + 1, "\n".join(body) + "\n", i, j))
        i = j + 1
    return blocks


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """The ```python blocks of a Markdown file as (first code line number, code)."""
    text = path.read_text(encoding="utf-8")
    return [(b.line, b.code) for b in code_blocks(text) if b.lang == "python"]


def test_code_blocks_finds_python_fences_only():
    """The block finder sees ```python blocks (indented ones too) and their line
    numbers, and leaves other fences alone, even ones that contain a fence."""
    text = "\n".join(
        [
            "# Title",  # 1
            "```python",  # 2
            "x = 1",  # 3
            "```",  # 4
            "````text",  # 5
            "```python",  # 6
            "not run",  # 7
            "```",  # 8
            "````",  # 9
            "1. A step:",  # 10
            "   ```python",  # 11
            "   y = x + 1",  # 12
            "   ```",  # 13
        ]
    )
    found = [(b.lang, b.line, b.code) for b in code_blocks(text) if b.lang == "python"]
    assert [("python", 3, "x = 1\n"), ("python", 12, "y = x + 1\n")] == found


@pytest.mark.parametrize("name", DOC_FILES)
def test_python_blocks_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```python block of the page runs, in order, in one namespace per page."""
    # Pages may write files (a SQLite database, a report): keep them out of the repo.
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for line, block in python_blocks(DOCS / name):
        filename = f"docs/{name}:{line}"
        # Lets a traceback show the failing line of the block, not "???".
        linecache.cache[filename] = (len(block), None, block.splitlines(True), filename)
        exec(compile(block, filename, "exec"), namespace)


class _Prompt(code.InteractiveConsole):
    """Python's interactive prompt, fed line by line, recording what it would print as
    an error instead of printing it."""

    def __init__(self) -> None:
        super().__init__({"__name__": "__console__"})
        self.errors: list[str] = []

    def showsyntaxerror(self, filename: str | None = None, **kwargs: object) -> None:
        self.errors.append(f"SyntaxError: {sys.exc_info()[1]}")

    def showtraceback(self) -> None:
        self.errors.append(f"{sys.exc_info()[0].__name__}: {sys.exc_info()[1]}")


def test_the_tutorial_pastes_into_the_prompt_twice_in_one_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ```python block of the tutorial, pasted into Python's interactive prompt
    one line at a time (a blank line inside a function or class body would end it
    there), runs without an error; and all of it runs again in the same folder (its
    files and database are already there)."""
    monkeypatch.chdir(tmp_path)
    for attempt in ("first", "second"):
        prompt = _Prompt()
        for line, block in python_blocks(DOCS / "tutorial.md"):
            for text in block.splitlines():
                prompt.push(text)
            prompt.push("")  # the Enter that ends a pasted block
            assert [] == prompt.errors, f"{attempt} run, docs/tutorial.md:{line}"


def test_the_tutorials_shell_section_runs(tmp_path: Path) -> None:
    """The tutorial's pages.py, saved as a file, and its shell commands, run in that
    folder: every command exits 0 and writes what it says."""
    blocks = code_blocks((DOCS / "tutorial.md").read_text(encoding="utf-8"))
    module = next(b for b in blocks if b.lang == "python" and b.code.startswith("# pages.py"))
    shell = next(b for b in blocks if b.lang == "sh" and "pipeflow run pages:" in b.code)
    (tmp_path / "pages.py").write_text(module.code, encoding="utf-8")
    # `python` and `pipeflow` are this environment's, as in an activated virtualenv.
    bins = [os.path.dirname(sys.executable), sysconfig.get_path("scripts")]
    env = {**os.environ, "PATH": os.pathsep.join([*bins, os.environ.get("PATH", "")])}
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", shell.code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert 0 == proc.returncode, proc.stdout + proc.stderr
    assert 200 == len((tmp_path / "urls.txt").read_text().splitlines())
    assert (tmp_path / "run.json").stat().st_size > 0
    assert "<html" in (tmp_path / "run.html").read_text(encoding="utf-8")
    assert "workers per instance" in proc.stdout


# [text](target) and ![alt](target), and reference definitions "[label]: target".
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
_CODE_SPAN = re.compile(r"(`+).+?\1", re.DOTALL)


def prose(text: str) -> str:
    """``text`` without its fenced blocks and code spans (links there are code)."""
    lines = text.splitlines()
    fenced = {n for b in code_blocks(text) for n in range(b.opening, b.closing + 1)}
    kept = "\n".join(line for n, line in enumerate(lines) if n not in fenced)
    return _CODE_SPAN.sub("", kept)


def relative_links(text: str) -> list[str]:
    """Link targets in ``text`` that point into the repository (not URLs or anchors)."""
    body = prose(text)
    targets = _INLINE_LINK.findall(body) + _REFERENCE.findall(body)
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#|//)", t, re.I)]


def test_relative_links_skips_urls_anchors_and_code():
    """Only repository paths count as relative links; code is not prose."""
    text = (
        "See [the design](design.md#why), [Trio](https://trio.readthedocs.io), "
        "[top](#top), ![a figure](img/flow.png) and `[not](a-link.md)`.\n"
        "```python\nx = y[0](z)  # [nor](this.md)\n```\n"
        "[ref]: ../README.md\n"
    )
    assert ["design.md#why", "img/flow.png", "../README.md"] == relative_links(text)


@pytest.mark.parametrize("name", LINKED_FILES)
def test_relative_links_resolve(name: str) -> None:
    """Every relative link of the page points at an existing file (anchors ignored)."""
    page = ROOT / name
    missing = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path and not (page.parent / path).exists():
            missing.append(target)
    assert [] == missing, f"{name} links to missing files: {missing}"


def test_reference_covers_the_public_api():
    """docs/reference.md has a section for every name in pipeflow.__all__, with the
    directive that puts its generated documentation there; a row for every stage option
    and every RunResult and StageStats field; and pipeflow.testing, whose helpers all
    have docstrings: a new public name without docs fails here."""
    import attrs

    import pipeflow
    import pipeflow.testing

    text = (DOCS / "reference.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#{2,4} `([\w.]+)`", text, re.MULTILINE))
    directives = set(re.findall(r"^::: ([\w.]+)$", text, re.MULTILINE))
    rows = set(re.findall(r"^\| `(\w+)`", text, re.MULTILINE))
    options = list(pipeflow._options.OPTION_NAMES)  # Stage(**options) takes these
    fields = [
        f.name
        for cls in (pipeflow.RunResult, pipeflow.StageStats, pipeflow.StageSample)
        for f in attrs.fields(cls)
    ]

    assert [] == [name for name in pipeflow.__all__ if name not in headings]
    assert [] == [name for name in pipeflow.__all__ if f"pipeflow.{name}" not in directives]
    assert [] == [name for name in options + fields if name not in rows]
    assert "pipeflow.testing" in directives
    undocumented = [
        name
        for name in pipeflow.testing.__all__
        if not inspect.getdoc(getattr(pipeflow.testing, name))
    ]
    assert [] == undocumented


def test_the_docs_site_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict` (mkdocs.yml: every page, the API reference generated from
    the docstrings by mkdocstrings) succeeds with no warning: no dead link, no broken
    cross-reference. The reference page has an entry, with its anchor, for every public
    name and every pipeflow.testing helper, and no reST role is left as raw text."""
    pytest.importorskip("mkdocs", reason='the docs site needs: pip install -e ".[docs]"')
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert 0 == proc.returncode, proc.stdout + proc.stderr

    import pipeflow
    import pipeflow.testing

    html = (site / "reference" / "index.html").read_text(encoding="utf-8")
    ids = [f"pipeflow.{name}" for name in pipeflow.__all__]
    ids += [f"pipeflow.testing.{name}" for name in pipeflow.testing.__all__]
    assert [] == [i for i in ids if f'id="{i}"' not in html]
    assert [] == re.findall(r":(?:class|func|meth|attr|exc|data):", html)
    # Links to the repository's own files (examples, benchmarks) reach a published copy.
    assert (site / "_repo" / "examples" / "scraper.py").is_file()
