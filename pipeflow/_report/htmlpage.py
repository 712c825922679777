"""A self-contained HTML page with inline SVG: no script, style sheet or font from elsewhere."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .format import fmt_count, fmt_duration, fmt_pct, fmt_rate, options_text
from .text import _title
from .view import GraphView, node_summary

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2rem;
color:#212121;max-width:1200px}
h1{font-size:1.4rem;margin-bottom:.2rem}h2{font-size:1.1rem;margin-top:2rem}
.sub{color:#616161;margin-top:0}.advice{background:#ffebee;border-left:4px solid #c62828;
padding:.6rem 1rem}.failure{background:#fff3e0;border-left:4px solid #ef6c00;padding:.6rem 1rem}
table{border-collapse:collapse;font-size:.9rem}th,td{padding:.3rem .7rem;text-align:right;
border-bottom:1px solid #e0e0e0}th:first-child,td:first-child{text-align:left}
tr.bottleneck td{color:#c62828;font-weight:600}.charts{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0}figcaption{font-size:.9rem;color:#424242}svg text{font-family:inherit}
"""


def _svg_graph(view: GraphView) -> str:
    box_w, box_h, gap, pad = 190, 92, 110, 20
    n = len(view.stages)
    end_w = 70
    width = pad * 2 + end_w * 2 + n * box_w + (n + 1) * gap
    height = box_h + pad * 2 + 24
    cy = pad + 24 + box_h / 2
    e = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height:.0f}" '
        f'width="100%" role="img" aria-label="stage graph of {e(view.pipeline)}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" '
        'markerWidth="8" markerHeight="8" orient="auto-start-reverse">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#616161"/></marker></defs>',
    ]
    x = pad
    parts.append(
        f'<text x="{x + end_w / 2}" y="{cy + 5:.0f}" text-anchor="middle" '
        f'font-size="14" fill="#424242">source</text>'
    )
    x += end_w
    edges = view.edges()
    for i, s in enumerate(view.stages):
        label = edges[i][2]
        parts.append(_svg_edge(x, x + gap, cy, label))
        x += gap
        mark = view.marks().get(s.name)
        is_b = mark is not None
        stroke, fill = ("#c62828", "#ffebee") if is_b else ("#546e7a", "#eceff1")
        top = cy - box_h / 2
        parts.append(
            f'<g class="stage" data-stage="{e(s.name)}"><rect x="{x}" y="{top:.0f}" '
            f'width="{box_w}" height="{box_h}" rx="8" fill="{fill}" stroke="{stroke}" '
            f'stroke-width="{3 if is_b else 1.5}"/>'
        )
        parts.append(
            f'<text x="{x + box_w / 2}" y="{top + 24:.0f}" text-anchor="middle" '
            f'font-size="15" font-weight="600">{e(s.name)}</text>'
        )
        for j, line in enumerate(node_summary(s)):
            parts.append(
                f'<text x="{x + box_w / 2}" y="{top + 46 + j * 18:.0f}" text-anchor="middle" '
                f'font-size="12" fill="#424242">{e(line)}</text>'
            )
        if is_b:
            parts.append(
                f'<text x="{x + box_w / 2}" y="{top - 8:.0f}" text-anchor="middle" '
                f'font-size="12" font-weight="600" fill="#c62828">{e(mark or "")}</text>'
            )
        parts.append("</g>")
        x += box_w
    parts.append(_svg_edge(x, x + gap, cy, edges[-1][2]))
    x += gap
    parts.append(
        f'<text x="{x + end_w / 2}" y="{cy + 5:.0f}" text-anchor="middle" '
        f'font-size="14" fill="#424242">outputs</text>'
    )
    parts.append("</svg>")
    return "\n".join(parts)


def _svg_edge(x0: float, x1: float, y: float, label: str) -> str:
    text = (
        f'<text class="edge-label" x="{(x0 + x1) / 2}" y="{y - 8:.0f}" text-anchor="middle" '
        f'font-size="12" fill="#1565c0">{html.escape(label)}</text>'
        if label
        else ""
    )
    return (
        f'<line x1="{x0 + 6}" y1="{y:.0f}" x2="{x1 - 6}" y2="{y:.0f}" stroke="#616161" '
        f'stroke-width="1.5" marker-end="url(#arrow)"/>{text}'
    )


def _nice_max(value: float) -> float:
    """A round axis maximum at or above ``value``: 1, 2, 2.5, 5 times 10^k."""
    if value <= 0:
        return 1.0
    exp = math.floor(math.log10(value))
    for m in (1, 2, 2.5, 5, 10):
        if m * 10**exp >= value:
            return float(m * 10**exp)
    return float(10 ** (exp + 1))  # pragma: no cover - the loop always returns


def svg_chart(
    t: Sequence[float], values: Sequence[float], *, title: str, unit: str = "items/s"
) -> str:
    """A line chart of ``values`` over ``t`` (seconds) as a standalone inline SVG."""
    w, h, left, right, top, bottom = 460, 180, 56, 14, 14, 34
    pw, ph = w - left - right, h - top - bottom
    t_max = max(t) if t else 1.0
    y_max = _nice_max(max(values, default=0.0))
    e = html.escape

    def px(ti: float) -> float:
        return left + (ti / t_max if t_max > 0 else 0.0) * pw

    def py(v: float) -> float:
        return top + ph - (v / y_max) * ph

    points = [(0.0, values[0] if values else 0.0)] if t and t[0] > 0 else []
    points += list(zip(t, values, strict=False))
    path = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in points)
    grid = []
    for k in range(5):
        v = y_max * k / 4
        y = py(v)
        grid.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{w - right}" y2="{y:.1f}" stroke="#eeeeee"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="10" '
            f'fill="#757575">{v:g}</text>'
        )
    x_labels = "".join(
        f'<text x="{px(tt):.1f}" y="{h - bottom + 16}" text-anchor="middle" font-size="10" '
        f'fill="#757575">{tt:g} s</text>'
        for tt in (0.0, round(t_max / 2, 1), round(t_max, 1))
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" '
        f'height="{h}" role="img" aria-label="{e(title)}">'
        + "".join(grid)
        + f'<line x1="{left}" y1="{top + ph}" x2="{w - right}" y2="{top + ph}" stroke="#9e9e9e"/>'
        + x_labels
        + f'<text x="{left - 44}" y="{top + ph / 2:.0f}" font-size="10" fill="#757575" '
        f'transform="rotate(-90 {left - 44} {top + ph / 2:.0f})" text-anchor="middle">'
        f"{e(unit)}</text>"
        + (
            f'<polyline fill="none" stroke="#1565c0" stroke-width="2" points="{path}"/>'
            if points
            else ""
        )
        + "</svg>"
    )


def _table(view: GraphView) -> str:
    e = html.escape
    cols = ["stage", "workers", "in", "done", "failed", "items/s", "util", "mean", "p99"]
    cols += ["queue wait", "blocked", "throttled", "CPU", "recommended"]
    marks = view.marks()
    rows = []
    for s in view.stages:

        def opt(v: float | None, f: Any) -> str:
            return f(v) if v is not None else "-"

        cells = [
            s.name,
            s.workers_label().removesuffix(" workers").removesuffix(" worker"),
            opt(s.items_in, fmt_count),
            opt(s.done, fmt_count),
            opt(s.failed, fmt_count),
            opt(s.throughput, lambda v: fmt_rate(v).removesuffix("/s")),
            opt(s.utilisation, fmt_pct),
            opt(s.duration_mean, fmt_duration),
            opt(s.duration_p99, fmt_duration),
            opt(s.queue_wait_mean, fmt_duration),
            opt(s.blocked_fraction, fmt_pct),
            opt(s.throttled_fraction, fmt_pct),
            opt(s.cpu_share, fmt_pct),
            opt(s.recommended_workers, str),
        ]
        cls = ' class="bottleneck"' if s.name in marks else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{e(c)}</th>" for c in cols)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _structure_table(view: GraphView) -> str:
    e = html.escape
    rows = []
    for s in view.stages:
        opts = ", ".join(options_text(s.options)) or "-"
        buffer = str(s.buffer) if s.buffer is not None else "-"
        rows.append(
            f"<tr><td>{e(s.name)}</td><td>{e(s.workers_label())}</td><td>{e(buffer)}</td>"
            f"<td>{e(opts)}</td></tr>"
        )
    return (
        "<table><thead><tr><th>stage</th><th>workers</th><th>buffer</th><th>options</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _html_section(view: GraphView, level: int) -> list[str]:
    e = html.escape
    h, h2 = f"h{level}", f"h{level + 1}"
    body = [f"<{h}>pipeflow · {e(view.pipeline)}</{h}>", f'<p class="sub">{e(_title(view))}</p>']
    if view.failure:
        body.append(f'<p class="failure">run failed: {e(view.failure)}</p>')
    v = view.verdict
    if v is not None and v.kind != "none":
        items = "".join(f"<li>{e(line)}</li>" for line in v.lines if line != v.headline)
        body.append(
            f'<div class="advice verdict" data-kind="{e(v.kind)}" '
            f'data-stage="{e(v.stage or "")}"><p><strong>{e(v.headline)}</strong></p>'
            + (f"<ul>{items}</ul>" if items else "")
            + "</div>"
        )
    body += [f"<{h2}>Stages</{h2}>", _svg_graph(view)]
    body.append(_table(view) if view.measured else _structure_table(view))
    charts = _charts(view)
    if charts:
        body += [f"<{h2}>Throughput over time</{h2}>", f'<div class="charts">{charts}</div>']
    elif view.measured:
        body.append('<p class="sub">No time series in this source.</p>')
    return body


def render_html_page(views: Sequence[GraphView]) -> str:
    """One self-contained page for one or more pipelines (see :func:`render_html`)."""
    e = html.escape
    title = ", ".join(v.pipeline for v in views)
    body: list[str] = []
    for view in views:
        body += _html_section(view, 1 if len(views) == 1 else 2)
    if len(views) > 1:
        body.insert(0, f"<h1>pipeflow · {e(title)}</h1>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>pipeflow · {e(title)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def render_html(view: GraphView) -> str:
    """A self-contained page: the stage graph with throughput on each edge, the table of
    figures, and a throughput-over-time chart per stage (from the report's time series).
    No external script, style sheet or font."""
    return render_html_page([view])


def _charts(view: GraphView) -> str:
    series = view.series
    if not series:
        return ""
    t = series.get("t")
    stages = series.get("stages")
    if not isinstance(t, list) or not t or not isinstance(stages, Mapping):
        return ""
    figures = []
    for s in view.stages:
        column = stages.get(s.name, {}).get("throughput") if isinstance(stages, Mapping) else None
        if not isinstance(column, list):
            continue
        values = [float(v) if isinstance(v, int | float) else 0.0 for v in column]
        caption = f"{s.name}: items finished per second"
        if values:
            caption += f" (peak {fmt_rate(max(values))})"
        figures.append(
            f'<figure data-stage="{html.escape(s.name)}">'
            + svg_chart(t, values, title=f"{s.name} throughput")
            + f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    return "".join(figures)
