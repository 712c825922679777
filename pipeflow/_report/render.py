"""One entry point for every format: ``text``, ``json``, ``dot``, ``mermaid``, ``html``."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from .dot import render_dot
from .htmlpage import render_html, render_html_page
from .mermaid import render_mermaid
from .text import render_text
from .view import GraphView


def render_json(view: GraphView) -> str:
    return json.dumps(view.to_dict(), indent=2, ensure_ascii=False) + "\n"


RENDERERS = {
    "json": render_json,
    "dot": render_dot,
    "mermaid": render_mermaid,
    "html": render_html,
}


def render(view: GraphView, fmt: str, *, unicode: bool = True, color: bool = False) -> str:
    """``view`` in format ``fmt``: ``text``, ``json``, ``dot``, ``mermaid`` or ``html``."""
    if fmt == "text":
        return render_text(view, unicode=unicode, color=color)
    return RENDERERS[fmt](view)


def render_many(views: Iterable[GraphView], fmt: str, **kw: Any) -> str:
    """Several pipelines (one metrics endpoint can serve more than one)."""
    views = list(views)
    if len(views) == 1:
        return render(views[0], fmt, **kw)
    if fmt == "json":
        return json.dumps([v.to_dict() for v in views], indent=2, ensure_ascii=False) + "\n"
    if fmt == "html":
        return render_html_page(views)
    return "\n".join(render(v, fmt, **kw) for v in views)
