"""The end-of-run summary table."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from typing import Any

from .._report import fmt_count, fmt_duration, fmt_pct, fmt_rate, view_from_report


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
    stages = view.stages
    first, last = stages[0], stages[-1]
    failed = sum(s.failed or 0 for s in stages)
    elapsed = view.elapsed or 0.0
    done = last.items_out or 0
    head = (
        f"{report.get('status', 'completed')} in {fmt_duration(elapsed)}: "
        f"{fmt_count(first.items_in or 0)} items in, {fmt_count(done)} out, "
        f"{fmt_count(failed)} failed"
    )
    if elapsed > 0:
        head += f"; {fmt_rate(last.throughput or 0.0).removesuffix('/s')} items/s"
    cols = ["stage", "workers", "in", "out", "failed", "items/s", "util", "p99", "blocked"]
    rows = [cols]
    for s in stages:
        rows.append(
            [
                s.name,
                str(round(s.workers_now)) if s.workers_now else s.workers_label().split(" ")[0],
                fmt_count(s.items_in or 0),
                fmt_count(s.items_out or 0),
                fmt_count(s.failed or 0),
                fmt_rate(s.throughput or 0.0).removesuffix("/s"),
                fmt_pct(s.utilisation or 0.0),
                fmt_duration(s.duration_p99 or 0.0),
                fmt_pct(s.blocked_fraction or 0.0),
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
    out = [head, "", *table]
    if isinstance(stats_at, int | float):
        out += [
            "",
            "note: the run stopped without its final statistics: these are from "
            f"{fmt_duration(stats_at)} in",
        ]
    advice = view.recommendation()
    if advice:
        out += ["", *textwrap.wrap(advice, 96, subsequent_indent="  ", break_on_hyphens=False)]
    if report_path:
        out += [f"report: {report_path}"]
    return "\n".join(out)
