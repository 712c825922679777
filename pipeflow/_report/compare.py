"""``pipeflow graph before.json after.json``: a run beside the run it was advised from.

Per stage: workers, rate and utilisation before and after; for the pipeline: the rate
before and after, and, when the first run's verdict sized stages, whether the second
followed the advice and how close its rate came to the prediction.
"""

from __future__ import annotations

import textwrap
from typing import Any

from .format import fmt_pct, fmt_rate, json_safe
from .view import GraphView

__all__ = ["compare", "render_comparison"]

#: A prediction within this share of the measured rate is "as predicted".
TOLERANCE = 0.15


def _rate(view: GraphView) -> float | None:
    """The pipeline's rate: items the last stage finished per second (steady state
    when the verdict judged one)."""
    if view.verdict is not None and view.verdict.rate is not None:
        return view.verdict.rate
    return view.stages[-1].throughput if view.stages else None


def compare(before: GraphView, after: GraphView) -> dict[str, Any]:
    """The comparison as plain data (what ``--format json`` prints)."""
    rate0, rate1 = _rate(before), _rate(after)
    stages = []
    for s1 in after.stages:
        s0 = before.stage(s1.name)
        stages.append(
            {
                "name": s1.name,
                "workers": [s0.pool_size() if s0 else None, s1.pool_size()],
                "throughput": [s0.throughput if s0 else None, s1.throughput],
                "utilisation": [s0.utilisation if s0 else None, s1.utilisation],
            }
        )
    v0 = before.verdict
    advice: dict[str, Any] | None = None
    if v0 is not None and v0.sizes:
        followed = {
            name: (after.stage(name).pool_size() if after.stage(name) else None)  # type: ignore[union-attr]
            for name in v0.sizes
        }
        ok = all(n is not None and n >= v0.sizes[name] for name, n in followed.items())
        advice = {
            "sizes": dict(v0.sizes),
            "after": followed,
            "followed": ok,
            "predicted": v0.predicted,
            "error": (rate1 / v0.predicted - 1) if ok and v0.predicted and rate1 else None,
        }
    return json_safe(  # type: ignore[no-any-return]
        {
            "before": {
                "target": before.target,
                "rate": rate0,
                "verdict": v0.text() if v0 else None,
            },
            "after": {
                "target": after.target,
                "rate": rate1,
                "verdict": after.verdict.text() if after.verdict else None,
            },
            "gain": rate1 / rate0 if rate0 and rate1 is not None else None,
            "stages": stages,
            "advice": advice,
        }
    )


def render_comparison(before: GraphView, after: GraphView) -> str:
    """The comparison as text: a table of stages, the rates, and how the advice did."""
    c = compare(before, after)
    rows = [["stage", "workers", "items/s", "util"]]

    def pair(values: list[Any], fmt: Any) -> str:
        return " → ".join(fmt(v) if v is not None else "-" for v in values)

    for s in c["stages"]:
        rows.append(
            [
                s["name"],
                pair(s["workers"], str),
                pair(s["throughput"], fmt_rate),
                pair(s["utilisation"], fmt_pct),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    table = [
        "  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows
    ]
    r0, r1 = c["before"]["rate"], c["after"]["rate"]
    head = f"{before.target} → {after.target}"
    if r0 is not None and r1 is not None:
        head += f": {fmt_rate(r0)} → {fmt_rate(r1)}"
        if c["gain"] is not None:
            head += f" ({c['gain']:.2f}x)"
    out = [head, "", *table, ""]
    if before.pipeline != after.pipeline:
        out += textwrap.wrap(
            f"note: these are two different pipelines, {before.pipeline!r} and "
            f"{after.pipeline!r}: stages are compared by name.",
            96,
            subsequent_indent="  ",
        )
    a = c["advice"]
    if a is not None:
        sizes = ", ".join(f"{n} workers for {name}" for name, n in a["sizes"].items())
        if not a["followed"]:
            have = "; ".join(
                f"{name} has {n} worker{'s' if n != 1 else ''}"
                if n is not None
                else f"it has no stage {name}"
                for name, n in a["after"].items()
            )
            out += textwrap.wrap(
                f"advice not followed: the first run advised {sizes}; in the second, {have}.",
                96,
                subsequent_indent="  ",
            )
        elif a["predicted"] is not None and r1 is not None:
            err = a["error"]
            verdict = "as predicted" if err is not None and abs(err) <= TOLERANCE else "off"
            out += textwrap.wrap(
                f"advice followed ({sizes}): predicted {fmt_rate(a['predicted'])}, measured "
                f"{fmt_rate(r1)} ({err:+.0%}: {verdict}).",
                96,
                subsequent_indent="  ",
            )
            if verdict == "off":
                out.append(
                    "  the prediction assumed what the first verdict says it assumed; the "
                    "second run's verdict says what limits it now."
                )
    if after.verdict is not None and after.verdict.kind != "none":
        out += textwrap.wrap(
            f"now: {after.verdict.headline}", 96, subsequent_indent="  ", break_on_hyphens=False
        )
    return "\n".join(out) + "\n"
