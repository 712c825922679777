"""A pipeline as drawn (:class:`GraphView`), from a pipeline's structure or a saved report."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ..sizing import TARGET_UTILISATION, busy_workers
from .format import fmt_duration, fmt_pct, fmt_rate, json_safe, workers_text
from .schema import (
    _check_series,
    _check_structure,
    _int,
    _invalid,
    _num,
    describe_pipeline,
)
from .verdict import Verdict, Window, judge, steady_window

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
    cancelled: int | None = None  # taken in, then cut off by a stop (a report's own)
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
    # Raw figures over ``seconds`` (the run, or a window of it): what the verdict reads.
    kind: str | None = None
    run_in: str | None = None
    seconds: float | None = None
    done: float | None = None
    busy_seconds: float | None = None
    throttled_seconds: float | None = None
    worker_seconds: float | None = None
    cpu_seconds: float | None = None
    breaker_state: str | None = None
    # Live views only: the oldest item in a worker, and workers on an item for longer
    # than the stage's stall_after.
    oldest_inflight: float | None = None
    stalled_workers: int = 0
    stall_after: float | None = None

    @property
    def load(self) -> float | None:
        """L: workers busy on average. Busy seconds per second when measured (right for
        a batch stage, whose W is per call and λ per item), else λW."""
        if self.busy_seconds is not None and self.seconds:
            return self.busy_seconds / self.seconds
        if self.throughput is None or self.duration_mean is None:
            return None
        return busy_workers(self.throughput, self.duration_mean)

    @property
    def per_item(self) -> float | None:
        """Worker-seconds per item finished: W per item (a batch call's W shared by its
        items)."""
        load = self.load
        if load is None or not self.throughput:
            return self.duration_mean
        return load / self.throughput

    @property
    def throttled_fraction(self) -> float | None:
        """Share of worker time spent waiting for a rate token or a held breaker."""
        if self.throttled_seconds is None or not self.worker_seconds:
            return None
        # Figures from two clocks' worth of rounding, or an old report whose counters
        # took a wait in when it ended: never more than all of their time.
        return min(self.throttled_seconds / self.worker_seconds, 1.0)

    @property
    def cpu_share(self) -> float | None:
        """Share of a thread stage's busy time spent on CPU in its threads."""
        if self.run_in != "thread" or self.kind not in ("sync", "syncgen"):
            return None
        if not self.cpu_seconds or not self.busy_seconds:
            return None
        return min(self.cpu_seconds / self.busy_seconds, 1.0)

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
        d["per_item"] = self.per_item
        d["throttled_fraction"] = self.throttled_fraction
        d["cpu_share"] = self.cpu_share
        return d


@attrs.frozen(kw_only=True)
class GraphView:
    """A pipeline as drawn: its stages in order, and where the figures come from.

    ``origin`` is ``"pipeline"``, ``"report"`` or ``"metrics"``; ``bottleneck`` the stage
    that limits throughput (measured views only); ``series`` a report's time series;
    ``verdict`` what limits the rate and what to do (measured views only).
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
    verdict: Verdict | None = None

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

    @property
    def bottleneck_label(self) -> str:
        return "limits the rate"

    def marks(self) -> dict[str, str]:
        """Stage name → how the drawing marks it: the stages that limit the rate, or the
        stage whose rate limit or breaker does."""
        v = self.verdict
        if v is None:
            return {}
        if v.kind == "stage":
            return dict.fromkeys(v.limits, "limits the rate")
        if v.kind == "rate_limit" and v.stage:
            return {v.stage: "its rate limit limits the rate"}
        if v.kind == "breaker" and v.stage:
            return {v.stage: "its breaker limits the rate"}
        return {}

    def recommendation(self) -> str | None:
        """The verdict in sentences (see :mod:`pipeflow._report.verdict`), or None when
        nothing was measured."""
        if self.verdict is None or self.verdict.kind == "none":
            return None
        return self.verdict.text()

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
                "verdict": self.verdict.to_dict() if self.verdict is not None else None,
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
    kind, run_in = d.get("kind"), d.get("run_in")
    return {
        "workers": workers,
        "buffer": buffer if isinstance(buffer, int) else None,
        "options": dict(options) if isinstance(options, Mapping) else {},
        "kind": kind if isinstance(kind, str) else None,
        "run_in": run_in if isinstance(run_in, str) else None,
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
        done = sum(_int(d, k, where, context) or 0 for k in ("ok", "filtered", "failed"))
        breaker_state = d.get("breaker_state")
        stages.append(
            StageView(
                name=name,
                **fields,
                measured=True,
                workers_now=_num(d, "workers", where, context),
                items_in=items_in,
                items_out=items_out,
                failed=_int(d, "failed", where, context),
                cancelled=_int(d, "cancelled", where, context),
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
                seconds=elapsed,
                done=done,
                busy_seconds=_num(d, "busy_seconds", where, context),
                throttled_seconds=_num(d, "throttled_seconds", where, context),
                worker_seconds=worker_seconds,
                cpu_seconds=_num(d, "cpu_seconds", where, context),
                breaker_state=breaker_state if isinstance(breaker_state, str) else None,
            )
        )
    stalls = report.get("stalls")
    records = [r for r in stalls if isinstance(r, Mapping)] if isinstance(stalls, list) else []
    verdict = verdict_of(stages, series if isinstance(series, Mapping) else None, stalls=records)
    bottleneck = report.get("bottleneck")
    if verdict is not None and verdict.kind != "none":
        bottleneck = verdict.stage if verdict.kind == "stage" else None
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
        verdict=verdict,
    )
    return _check_figures(view, where)


def window_view(s: StageView, deltas: Mapping[str, float], seconds: float) -> StageView:
    """``s`` with its figures over a window: ``deltas`` of its counters over ``seconds``."""
    done = deltas["done"]
    busy = deltas["busy_seconds"]
    workers = deltas["worker_seconds"]
    return attrs.evolve(
        s,
        seconds=seconds,
        done=done,
        throughput=done / seconds,
        rate_in=done / seconds,
        rate_out=None,
        # Calls are counted when they end: a window's edges can add one; clamp.
        utilisation=min(busy / workers, 1.0) if workers > 0 else 0.0,
        blocked_seconds=deltas["blocked_seconds"],
        blocked_fraction=deltas["blocked_seconds"] / workers if workers > 0 else None,
        busy_seconds=min(busy, workers),
        throttled_seconds=min(deltas["throttled_seconds"], workers),
        worker_seconds=workers,
        cpu_seconds=deltas["cpu_seconds"],
        workers_now=workers / seconds,
    )


def verdict_of(
    stages: list[StageView],
    series: Mapping[str, Any] | None,
    window: str | None = None,
    *,
    stalls: Sequence[Mapping[str, Any]] = (),
) -> Verdict | None:
    """The verdict on a run's stages: from the steady state of ``series`` when it shows
    one (whole-run utilisation beside), else from the figures as they are; ``stalls``
    the stalled items the run's live view saw."""
    if not stages or not any(s.measured for s in stages):
        return None
    autoscaled = {s.name: s.workers for s in stages if isinstance(s.workers, tuple)}
    steady: Window | None = None
    try:
        longest = max((s.duration_mean or 0.0) for s in stages)
        steady = steady_window(
            series, [s.name for s in stages], autoscaled, min_interval=5 * longest
        )
    except (ArithmeticError, ValueError):
        steady = None
    if steady is None or steady.seconds <= 0:
        cpu = series.get("process_cpu") if series else None
        process_cpu = float(cpu[-1]) if isinstance(cpu, list) and cpu else None
        return judge(stages, window=window, process_cpu=process_cpu, stalls=stalls)
    windowed = [window_view(s, steady.deltas[s.name], steady.seconds) for s in stages]
    whole = {s.name: s.utilisation for s in stages if s.utilisation is not None}
    return judge(
        windowed,
        whole=whole,
        window=steady.label,
        autoscale=steady.autoscale,
        process_cpu=steady.process_cpu,
        whole_stages=stages,
        stalls=stalls,
    )


def node_summary(s: StageView) -> list[str]:
    lines = [s.workers_label()]
    if s.measured and s.utilisation is not None:
        lines.append(f"util {fmt_pct(s.utilisation)}")
    if s.measured and s.duration_p99 is not None:
        lines.append(f"p99 {fmt_duration(s.duration_p99)}")
    return lines
