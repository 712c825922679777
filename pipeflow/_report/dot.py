"""Graphviz DOT."""

from __future__ import annotations

from .view import GraphView, node_summary


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_dot(view: GraphView) -> str:
    """Graphviz DOT: ``pipeflow graph app:pipeline --format dot | dot -Tsvg > p.svg``."""
    out = [
        f"digraph {_dot_quote(view.pipeline)} {{",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded", fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=10];',
        '  source [shape=plaintext, label="source"];',
        '  outputs [shape=plaintext, label="outputs"];',
    ]
    for s in view.stages:
        label = "\n".join([s.name, *node_summary(s)])
        attrs_ = f"label={_dot_quote(label)}"
        mark = view.marks().get(s.name)
        if mark:
            attrs_ += f', color="#c62828", penwidth=2, xlabel={_dot_quote(mark)}'
        out.append(f"  {_dot_quote(s.name)} [{attrs_}];")
    for a, b, label in view.edges():
        qa = a if a in ("source", "outputs") else _dot_quote(a)
        qb = b if b in ("source", "outputs") else _dot_quote(b)
        out.append(f"  {qa} -> {qb}" + (f" [label={_dot_quote(label)}]" if label else "") + ";")
    out.append("}")
    return "\n".join(out) + "\n"
