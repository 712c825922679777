"""The terminal drawing of a :class:`GraphView`."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from .format import TIMES, fmt_count, fmt_duration, fmt_pct, fmt_rate, options_text
from .view import GraphView, StageView

_UNICODE = {"h": "─", "v": "│", "tl": "┌", "tr": "┐", "bl": "└", "br": "┘", "arrow": "▼"}
_ASCII = {"h": "-", "v": "|", "tl": "+", "tr": "+", "bl": "+", "br": "+", "arrow": "v"}


def _stage_lines(s: StageView) -> list[str]:
    head = [s.workers_label()]
    if s.buffer is not None and s.measured:  # a structure view shows it on the edge
        head.append(f"buffer {s.buffer}")
    lines = [" · ".join(head + options_text(s.options))]
    if s.measured:
        counts = []
        if s.items_in is not None:
            counts.append(f"in {fmt_count(s.items_in)}")
        if s.done is not None and s.items_out is not None:  # (live views: in only)
            counts.append(f"done {fmt_count(s.done)}")
        if s.items_out is not None and (s.done is None or s.items_out != s.done):
            # A batch stage emits one output per batch, a flat-mapping stage any number.
            counts.append(f"{fmt_count(s.items_out)} outputs")
        if s.failed:
            counts.append(f"failed {fmt_count(s.failed)}")
        if s.cancelled:  # cut off by a stop: in = done + cancelled
            counts.append(f"cancelled {fmt_count(s.cancelled)}")
        if counts:
            lines.append(" · ".join(counts))
        perf = []
        if s.throughput is not None:
            perf.append(fmt_rate(s.throughput))
        if s.utilisation is not None:
            perf.append(f"util {fmt_pct(s.utilisation)}")
        if s.duration_mean is not None:
            perf.append(f"mean {fmt_duration(s.duration_mean)}")
        if s.duration_p99 is not None:
            perf.append(f"p99 {fmt_duration(s.duration_p99)}")
        if perf:
            lines.append(" · ".join(perf))
        extra = []
        if s.queue_wait_mean is not None:
            extra.append(f"queue wait {fmt_duration(s.queue_wait_mean)}")
        if s.blocked_fraction is not None:
            extra.append(f"blocked {fmt_pct(s.blocked_fraction)}")
        if s.throttled_seconds:
            what = "breaker/rate" if s.options.get("breaker") else "throttled"
            share = s.throttled_fraction
            extra.append(
                f"{what} {fmt_duration(s.throttled_seconds)}"
                + (f" ({fmt_pct(share)})" if share is not None else "")
            )
        if s.breaker_state and s.breaker_state != "closed":
            extra.append(f"breaker {s.breaker_state}")
        if s.cpu_share is not None:
            extra.append(f"CPU {fmt_pct(s.cpu_share)} of busy time")
        if s.queue_depth is not None and s.busy_workers is not None:
            extra.append(f"now {s.busy_workers:.0f} busy, {s.queue_depth:.0f} queued")
        if extra:
            lines.append(" · ".join(extra))
    return lines


def _title(view: GraphView) -> str:
    parts = [f"pipeline {view.pipeline!r}"]
    if view.origin == "pipeline":
        parts.append(f"structure of {view.target}")
    elif view.origin == "report":
        last = view.stages[-1] if view.stages else None
        # Through: what the last stage finished without failing (as the summary says).
        done = (
            last.done - (last.failed or 0) if last is not None and last.done is not None else None
        )
        status = view.status or "finished"
        parts.append(f"report {view.target}")
        if view.elapsed is not None:
            parts.append(f"{status} in {fmt_duration(view.elapsed)}")
        if done is not None:
            parts.append(f"{fmt_count(done)} item{'s' if done != 1 else ''} through")
    else:
        parts.append(f"live from {view.target}")
        if view.elapsed is not None:
            parts.append(f"rates over {fmt_duration(view.elapsed)}")
    return " · ".join(parts)


def render_text(view: GraphView, *, unicode: bool = True, color: bool = False) -> str:
    """The chain drawn top to bottom: a box per stage, edges labelled with items per
    second (or buffers), the bottleneck marked and sized."""
    ch = _UNICODE if unicode else _ASCII
    arrow = " ◀ " if unicode else " <- "
    marks = view.marks()
    bodies = [_stage_lines(s) for s in view.stages]
    headers = [s.name + (arrow + marks[s.name] if s.name in marks else "") for s in view.stages]
    width = max(
        [len(line) for body in bodies for line in body] + [len(h) + 2 for h in headers] + [20]
    )
    red, reset = ("\x1b[1;31m", "\x1b[0m") if color else ("", "")
    out = [_title(view), ""]
    if view.failure:
        out[-1:] = [f"run failed: {view.failure}", ""]
    edges = view.edges()

    def edge(label: str) -> None:
        out.append(f"    {ch['v']}  {label}".rstrip())
        out.append(f"    {ch['arrow']}")

    out.append("  source")
    for i, (s, body, header) in enumerate(zip(view.stages, bodies, headers, strict=True)):
        edge(edges[i][2])
        hi, lo = (red, reset) if s.name in marks else ("", "")
        top = f"{ch['tl']}{ch['h']} {header} "
        out.append(f"  {hi}{top}{ch['h'] * (width + 3 - len(top))}{ch['tr']}{lo}")
        for line in body:
            out.append(f"  {hi}{ch['v']}{lo} {line:<{width}} {hi}{ch['v']}{lo}")
        out.append(f"  {hi}{ch['bl']}{ch['h'] * (width + 2)}{ch['br']}{lo}")
    edge(edges[-1][2])
    out.append("  outputs")
    out += verdict_lines(view, unicode=unicode)
    return "\n".join(out) + "\n"


def verdict_lines(view: GraphView, *, unicode: bool = True, width: int = 96) -> list[str]:
    """The verdict as wrapped lines, a blank line first; none when nothing was measured."""
    v = view.verdict
    if v is None or v.kind == "none":
        return []
    out = [""]
    for i, sentence in enumerate(v.lines):
        if not unicode:
            sentence = sentence.replace("λ", "lambda*").replace(TIMES, "x")
        prefix = "verdict: " if i == 0 else "  "
        out += textwrap.wrap(
            prefix + sentence, width, subsequent_indent="    ", break_on_hyphens=False
        )
    return out


#: Workers listed one by one at most (the stalled ones and the longest in their state
#: first); the rest are counted per stage.
WORKER_ROWS = 12


def worker_lines(workers: Sequence[Mapping[str, Any]], *, limit: int = WORKER_ROWS) -> list[str]:
    """What each worker is doing (``WorkerStatus.to_dict()`` rows, as ``/workers``
    serves them): one line per stage counting its workers by state, then the stalled
    workers and those longest in their state, one line each."""
    if not workers:
        return []
    by_stage: dict[str, dict[str, int]] = {}
    for w in workers:
        states = by_stage.setdefault(str(w.get("stage")), {})
        state = str(w.get("state"))
        states[state] = states.get(state, 0) + 1
    width = max(len(name) for name in by_stage)
    lines = ["workers now:"]
    for name, states in by_stage.items():
        counts = ", ".join(f"{n} {state}" for state, n in states.items())
        lines.append(f"  {name:<{width}}  {counts}")
    ranked = sorted(
        (w for w in workers if w.get("state") != "waiting" or w.get("stalled")),
        key=lambda w: (not w.get("stalled"), -float(w.get("seconds") or 0.0)),
    )
    for w in ranked[:limit]:
        who = f"{w.get('stage')}[{w.get('worker')}]"
        line = (
            f"  {who:<{width + 4}}  {w.get('state')} {fmt_duration(float(w.get('seconds') or 0.0))}"
        )
        if w.get("item") is not None:
            line += f"  {w['item']}"
        if w.get("stalled"):
            line += f"  STALLED (stall_after {fmt_duration(float(w.get('stall_after') or 0.0))})"
        lines.append(line)
    if len(ranked) > limit:
        lines.append(f"  … and {len(ranked) - limit} more")
    return lines
