"""A Griffe extension for the docs site: pipeflow's docstrings are written in reST
(``code``, :class:`Name` roles, ``::`` literal blocks, ``>>>`` examples) and
mkdocstrings renders Markdown, so each docstring is translated when it is loaded.

- a role becomes a code span, linked (through mkdocs-autorefs) to the API reference
  when it names a public object documented there: a name of ``pipeflow`` or one of its
  documented members;
- a paragraph ending in ``::`` ends in ``:``, and the indented block after it becomes
  a fenced Python block;
- a run of ``>>>`` lines (and their output) becomes a fenced ``pycon`` block.

``code`` needs nothing: a double-backtick span is code in Markdown too. The sources
are not changed; only what the site shows.
"""

from __future__ import annotations

import inspect
import re
import textwrap
from typing import Any

import griffe

import pipeflow

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|exc|data|mod|obj):`(~?)([\w.]+)(?:\(\))?`")


def _documented(obj: object) -> bool:
    return bool(inspect.getdoc(obj))


def _target(name: str, context: str | None) -> str | None:
    """The reference's identifier for ``name`` as written in a docstring of the
    public class ``context`` (None outside one), as ``[identifier]``; None when the
    reference does not document it."""
    name = name.removeprefix("pipeflow.")
    head, _, rest = name.partition(".")
    if head in pipeflow.__all__:
        obj: Any = getattr(pipeflow, head)
        for part in filter(None, rest.split(".")):
            if part.startswith("_") or not hasattr(obj, part):
                return None
            obj = getattr(obj, part)
        return f"[pipeflow.{name}]" if _documented(obj) else None
    if context is not None and "." not in name:
        member = getattr(getattr(pipeflow, context), name, None)
        if member is not None and not name.startswith("_") and _documented(member):
            return f"[pipeflow.{context}.{name}]"
    return None


def _roles(text: str, context: str | None) -> str:
    def replace(match: re.Match[str]) -> str:
        short, name = match.group(1), match.group(2)
        shown = name.rsplit(".", 1)[-1] if short else name.removeprefix("pipeflow.")
        target = _target(name, context)
        return f"[`{shown}`]{target}" if target else f"`{shown}`"

    return _ROLE.sub(replace, text)


def _blocks(text: str) -> str:
    """``::`` literal blocks and ``>>>`` examples as fenced blocks."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}```pycon")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            out.append(f"{indent}```")
            continue
        if line.rstrip().endswith("::") and not line.lstrip().startswith(".."):
            stripped = line.rstrip()[:-2].rstrip()
            out.append(stripped + ":" if stripped else "")
            i += 1
            while i < len(lines) and not lines[i].strip():
                i += 1
            base = len(line) - len(line.lstrip())
            body: list[str] = []
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > base
            ):
                body.append(lines[i])
                i += 1
            if not body:  # the block is not indented (a slip): take the next paragraph
                while i < len(lines) and lines[i].strip():
                    body.append(lines[i])
                    i += 1
            while body and not body[-1].strip():
                body.pop()
            out += ["", " " * base + "```python"]
            out += [" " * base + b for b in textwrap.dedent("\n".join(body)).splitlines()]
            out += [" " * base + "```", ""]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Translates every loaded docstring from reST to Markdown (see the module)."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        owner = obj if obj.is_class else obj.parent
        context = owner.name if owner is not None and owner.name in pipeflow.__all__ else None
        obj.docstring.value = _blocks(_roles(obj.docstring.value, context))
