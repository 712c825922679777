"""A pipeline as drawn (:class:`GraphView`), from a pipeline's structure or a saved report."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from ..sizing import TARGET_UTILISATION, busy_workers, capacity, workers_needed
from .format import TIMES, fmt_duration, fmt_pct, fmt_rate, json_safe, workers_text
from .schema import (
    _check_series,
    _check_structure,
    _int,
    _invalid,
    _num,
    describe_pipeline,
)

if TYPE_CHECKING:
    from .._pipeline import Pipeline


# -- the view -----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class StageView:
    """One stage as drawn: its configuration and, when measured, what it did.

    Rates are items per second: ``rate_in`` into the stage, ``throughput`` λ finished,
    ``rate_out`` outputs leaving it. ``utilisation`` is L/N = λW/N; ``blocked_fraction``
    the share of worker time spent waiting to hand outputs downstream.
    """

    name: str
    workers: int | tuple[int, int] | None = None
    buffer: int | None = None
    options: Mapping[str, Any] = attrs.field(factory=dict)
    measured: bool = False
    workers_now: float | None = None
    items_in: int | None = None
    items_out: int | None = None
    failed: int | None = None
    rate_in: float | None = None
    throughput: float | None = None
    rate_out: float | None = None
    duration_mean: float | None = None
    duration_p99: float | None = None
    queue_wait_mean: float | None = None
    utilisation: float | None = None
    blocked_seconds: float | None = None
    blocked_fraction: float | None = None
    queue_depth: float | None = None
    busy_workers: float | None = None
    recommended_workers: int | None = None

    @property
    def load(self) -> float | None:
        """L = λW: workers busy on average."""
        if self.throughput is None or self.duration_mean is None:
            return None
        return busy_workers(self.throughput, self.duration_mean)

    def pool_size(self) -> int | None:
        """N: the workers measured (the largest pool reached), else configured."""
        if self.workers_now:
            return round(self.workers_now)
        if isinstance(self.workers, tuple):
            return self.workers[1]
        return self.workers

    def workers_label(self) -> str:
        if self.workers is not None:
            return workers_text(self.workers)
        if self.workers_now is not None:
            return workers_text(round(self.workers_now))
        return "? workers"

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self, recurse=False)
        d["options"] = dict(self.options)
        if isinstance(self.workers, tuple):
            d["workers"] = list(self.workers)
        d["load"] = self.load
        return d


@attrs.frozen(kw_only=True)
class GraphView:
    """A pipeline as drawn: its stages in order, and where the figures come from.

    ``origin`` is ``"pipeline"``, ``"report"`` or ``"metrics"``; ``bottleneck`` the stage
    that limits throughput (measured views only); ``series`` a report's time series.
    """

    pipeline: str
    origin: str
    target: str
    stages: tuple[StageView, ...]
    elapsed: float | None = None
    bottleneck: str | None = None
    status: str | None = None
    failure: str | None = None
    series: Mapping[str, Any] | None = None
    target_utilisation: float = TARGET_UTILISATION

    @property
    def measured(self) -> bool:
        return any(s.measured for s in self.stages)

    def stage(self, name: str) -> StageView | None:
        return next((s for s in self.stages if s.name == name), None)

    def edges(self) -> list[tuple[str, str, str]]:
        """``(from, to, label)`` for every edge: source → first stage → … → outputs.

        Measured views label edges with items per second; a structure view labels the
        edge into a stage with that stage's buffer (its input channel's capacity).
        """
        names = ["source", *(s.name for s in self.stages), "outputs"]
        labels: list[str] = []
        for s in self.stages:
            if s.rate_in is not None:
                labels.append(fmt_rate(s.rate_in))
            elif s.buffer is not None and not self.measured:
                labels.append(f"buffer {s.buffer}")
            else:
                labels.append("")
        last = self.stages[-1] if self.stages else None
        labels.append(fmt_rate(last.rate_out) if last and last.rate_out is not None else "")
        return [(names[i], names[i + 1], labels[i]) for i in range(len(labels))]

    def next_limit(self) -> tuple[StageView, float] | None:
        """The stage that would limit throughput once the bottleneck is fixed, and its
        capacity N/W (items per second with every worker busy)."""
        best: tuple[StageView, float] | None = None
        for s in self.stages:
            n = s.pool_size()
            if s.name == self.bottleneck or not n or not s.duration_mean:
                continue
            most = capacity(n, s.duration_mean)
            if best is None or most < best[1]:
                best = (s, most)
        return best

    @property
    def saturated(self) -> bool:
        """Whether the bottleneck is busy enough (50% or more) to be what limits the
        throughput; below that, the source does."""
        b = self.stage(self.bottleneck) if self.bottleneck else None
        return b is not None and (b.utilisation or 0.0) >= 0.5

    @property
    def bottleneck_label(self) -> str:
        return "bottleneck" if self.saturated else "busiest"

    def recommendation(self) -> str | None:
        """The bottleneck and its size by Little's Law, in a sentence or two, or None.

        Always: the workers that run the measured rate at the target utilisation. When
        the bottleneck is saturated (80% or more): also the workers it needs to keep up
        with the next limit, the slowest other stage's capacity N/W.
        """
        b = self.stage(self.bottleneck) if self.bottleneck else None
        if b is None or b.throughput is None or b.duration_mean is None:
            return None
        target = self.target_utilisation
        load = busy_workers(b.throughput, b.duration_mean)
        n = b.pool_size()
        recommended = b.recommended_workers
        if recommended is None:
            recommended = workers_needed(load, target)
        have = f"{n} worker{'s' if n != 1 else ''}" if n else "workers"
        util = f", {fmt_pct(b.utilisation)} utilised" if b.utilisation is not None else ""
        runs = "workers run" if recommended != 1 else "worker runs"
        text = (
            f"{self.bottleneck_label}: {b.name} ({have}{util})"
            + ("." if self.saturated else "; no stage is saturated: the source limits the rate.")
            + f" Little's Law: L = λW = {fmt_rate(b.throughput)} {TIMES} "
            f"{fmt_duration(b.duration_mean)} = {load:.2f} busy workers; {recommended} {runs} "
            f"this rate at {fmt_pct(target)} utilisation"
        )
        limit = self.next_limit()
        if limit is not None and (b.utilisation or 0.0) >= 0.8 and limit[1] > b.throughput * 1.1:
            other, most = limit
            need = workers_needed(busy_workers(most, b.duration_mean), target)
            text += (
                f"; at {fmt_pct(target)}, {need} worker{'s' if need != 1 else ''} keep up with "
                f"the next limit ({other.name}: {fmt_rate(most)})"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return json_safe(  # type: ignore[no-any-return]
            {
                "pipeline": self.pipeline,
                "origin": self.origin,
                "target": self.target,
                "status": self.status,
                "failure": self.failure,
                "elapsed": self.elapsed,
                "bottleneck": self.bottleneck,
                "recommendation": self.recommendation(),
                "stages": [s.to_dict() for s in self.stages],
                "edges": [{"from": a, "to": b, "label": lab} for a, b, lab in self.edges()],
            }
        )


def _structure_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    workers = d.get("workers")
    if isinstance(workers, list) and len(workers) == 2:
        workers = (int(workers[0]), int(workers[1]))
    elif not isinstance(workers, int):
        workers = None
    buffer = d.get("buffer")
    options = d.get("options")
    return {
        "workers": workers,
        "buffer": buffer if isinstance(buffer, int) else None,
        "options": dict(options) if isinstance(options, Mapping) else {},
    }


def view_from_pipeline(pipeline: Pipeline[Any, Any], target: str) -> GraphView:
    """The structure of ``pipeline``: stages, workers, buffers, options."""
    stages = tuple(
        StageView(name=d["name"], **_structure_fields(d))
        for d in describe_pipeline(pipeline)["stages"]
    )
    return GraphView(pipeline=pipeline.name, origin="pipeline", target=target, stages=stages)


def _check_figures(view: GraphView, where: str) -> GraphView:
    """``view``, once what is derived from its figures is known to be finite (each
    figure is, but L = λW or N/W may not be: 1e200 times 1e200)."""
    try:
        view.recommendation()
        derived = [(s.name, s.load, s.rate_in, s.rate_out) for s in view.stages]
    except (ArithmeticError, ValueError):
        raise _invalid(where, "its figures are too large to compute with") from None
    for name, *values in derived:
        if any(v is not None and not math.isfinite(v) for v in values):
            raise _invalid(where, f"stage {name!r}: its figures are too large to compute with")
    return view


def view_from_report(report: Mapping[str, Any], target: str) -> GraphView:
    """What a saved run did, stage by stage, with its bottleneck.

    Raises ReportError when a field it reads is not of its type (a figure that is not a
    finite number, a time series that is not lists of numbers)."""
    where = target
    elapsed = _num(report, "elapsed", where) or 0.0
    structure = report.get("structure")
    configured: dict[str, Mapping[str, Any]] = {}
    if isinstance(structure, Mapping) and isinstance(structure.get("stages"), list):
        configured = {
            s["name"]: s
            for s in structure["stages"]
            if isinstance(s, Mapping) and isinstance(s.get("name"), str)
        }
    for s in configured.values():
        _check_structure(s, where)
    series = report.get("series")
    if isinstance(series, Mapping):
        _check_series(series, where)
    stages: list[StageView] = []
    for d in report["stages"]:
        name = d["name"]
        context = f"stage {name!r}: "
        fields = _structure_fields(configured.get(name, {}))
        mean_workers = _num(d, "mean_workers", where, context)
        blocked = _num(d, "blocked_seconds", where, context)
        worker_seconds = (mean_workers or 0.0) * elapsed
        items_in = _int(d, "items_in", where, context)
        items_out = _int(d, "items_out", where, context)
        stages.append(
            StageView(
                name=name,
                **fields,
                measured=True,
                workers_now=_num(d, "workers", where, context),
                items_in=items_in,
                items_out=items_out,
                failed=_int(d, "failed", where, context),
                rate_in=items_in / elapsed if elapsed > 0 and items_in is not None else None,
                throughput=_num(d, "throughput", where, context),
                rate_out=items_out / elapsed if elapsed > 0 and items_out is not None else None,
                duration_mean=_num(d, "duration_mean", where, context),
                duration_p99=_num(d, "duration_p99", where, context),
                queue_wait_mean=_num(d, "queue_wait_mean", where, context),
                utilisation=_num(d, "utilisation", where, context),
                blocked_seconds=blocked,
                blocked_fraction=(blocked / worker_seconds)
                if blocked is not None and worker_seconds > 0
                else None,
                recommended_workers=_int(d, "recommended_workers", where, context),
            )
        )
    bottleneck = report.get("bottleneck")
    view = GraphView(
        pipeline=str(report.get("pipeline", "pipeline")),
        origin="report",
        target=target,
        stages=tuple(stages),
        elapsed=elapsed,
        bottleneck=bottleneck if isinstance(bottleneck, str) else None,
        status=report.get("status") if isinstance(report.get("status"), str) else None,
        failure=report.get("failure") if isinstance(report.get("failure"), str) else None,
        series=series if isinstance(series, Mapping) else None,
    )
    return _check_figures(view, where)


def node_summary(s: StageView) -> list[str]:
    lines = [s.workers_label()]
    if s.measured and s.utilisation is not None:
        lines.append(f"util {fmt_pct(s.utilisation)}")
    if s.measured and s.duration_p99 is not None:
        lines.append(f"p99 {fmt_duration(s.duration_p99)}")
    return lines
