"""The end-of-run summary table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._report import GraphView, fmt_count, fmt_duration, fmt_pct, fmt_rate, view_from_report
from .._report.text import verdict_lines
from .graph import stdout_unicode


def summary(report: Mapping[str, Any], report_path: str | None = None) -> str:
    """The end-of-run summary: totals, a table per stage, the bottleneck and its size."""
    stats_at = report.get("stats_at")
    if stats_at == 0:
        # The run raised before a first sample: there are no counts to show.
        elapsed = report.get("elapsed") or 0.0
        return (
            f"{report.get('status', 'failed')} after {fmt_duration(elapsed)}, before its "
            f"statistics were first sampled" + (f"\nreport: {report_path}" if report_path else "")
        )
    view = view_from_report(report, report_path or "")
    head, table = summary_table(view, str(report.get("status", "completed")))
    out = [head, "", *table]
    if isinstance(stats_at, int | float):
        out += [
            "",
            "note: the run stopped without its final statistics: these are from "
            f"{fmt_duration(stats_at)} in",
        ]
    if report.get("status") != "failed":  # a failed run's story is its failure
        out += verdict_lines(view, unicode=stdout_unicode())
    if report_path:
        out += [f"report: {report_path}"]
    return "\n".join(out)


def summary_table(view: GraphView, status: str) -> tuple[str, list[str]]:
    """The totals line and the table of stages, as ``pipeflow run`` and ``pipeflow demo``
    print them at the end: items (not batches), failures, rate, utilisation, p99, time
    blocked sending downstream and throttled (rate limit or breaker)."""
    stages = view.stages
    first, last = stages[0], stages[-1]
    failed = sum(s.failed or 0 for s in stages)
    # Items a stop took from a worker or a queue (DESIGN's accounting): shown when there
    # are any, so that a stage's in = done + cancelled (+ dropped) adds up.
    cancelled = sum(s.cancelled or 0 for s in stages)
    elapsed = view.elapsed or 0.0
    done = (last.done or 0) - (last.failed or 0)
    head = (
        f"{status} in {fmt_duration(elapsed)}: "
        f"{fmt_count(first.items_in or 0)} items in, {fmt_count(done)} through, "
        f"{fmt_count(failed)} failed"
    )
    if cancelled:
        head += f", {fmt_count(cancelled)} cancelled"
    if elapsed > 0:
        head += f"; {fmt_rate(last.throughput or 0.0).removesuffix('/s')} items/s"
    cols = ["stage", "workers", "in", "done", "failed"]
    cols += ["cancelled"] if cancelled else []
    cols += ["items/s", "util", "p99", "blocked", "throttled"]
    rows = [cols]
    for s in stages:
        rows.append(
            [
                s.name,
                str(round(s.workers_now)) if s.workers_now else s.workers_label().split(" ")[0],
                fmt_count(s.items_in or 0),
                fmt_count(s.done or 0),
                fmt_count(s.failed or 0),
                *([fmt_count(s.cancelled or 0)] if cancelled else []),
                fmt_rate(s.throughput or 0.0).removesuffix("/s"),
                fmt_pct(s.utilisation or 0.0),
                fmt_duration(s.duration_p99 or 0.0),
                fmt_pct(s.blocked_fraction or 0.0),
                fmt_pct(s.throttled_fraction or 0.0),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    table = [
        "  "
        + "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r)
        ).rstrip()
        for r in rows
    ]
    return head, table
