"""Mermaid flowcharts."""

from __future__ import annotations

import html

from .view import GraphView, node_summary


def _mermaid_text(text: str) -> str:
    return html.escape(text, quote=True).replace("&quot;", "#quot;")


def render_mermaid(view: GraphView) -> str:
    """A Mermaid flowchart (paste into Markdown inside a ```mermaid fence)."""
    ids = {s.name: f"s{i}" for i, s in enumerate(view.stages)}
    ids["source"], ids["outputs"] = "source", "outputs"
    out = ["flowchart LR", '    source(["source"])']
    for s in view.stages:
        label = "<br/>".join(_mermaid_text(x) for x in [s.name, *node_summary(s)])
        out.append(f'    {ids[s.name]}["{label}"]')
    out.append('    outputs(["outputs"])')
    for a, b, label in view.edges():
        arrow = f'-->|"{_mermaid_text(label)}"|' if label else "-->"
        out.append(f"    {ids[a]} {arrow} {ids[b]}")
    marked = [ids[name] for name in view.marks() if name in ids]
    if marked:
        out.append("    classDef bottleneck fill:#ffebee,stroke:#c62828,stroke-width:2px")
        out.append(f"    class {','.join(marked)} bottleneck")
    return "\n".join(out) + "\n"
