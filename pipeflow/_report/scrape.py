"""Reading a live metrics endpoint: pipeflow's samples out of a Prometheus exposition,
and views of the rates between two scrapes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from prometheus_client.metrics_core import Metric

from ..sizing import busy_workers, utilisation, workers_needed
from .schema import ReportError
from .verdict import judge
from .view import GraphView, StageView, _structure_fields

_BREAKER_STATES = {0.0: "closed", 1.0: "half_open", 2.0: "open"}


def _configured(structure: Mapping[str, Any] | None, breaker: bool) -> dict[str, Any]:
    """A stage's configured fields (workers, options, kind) when its structure is known;
    a breaker gauge says it has a breaker either way."""
    fields = _structure_fields(structure) if structure is not None else {"options": {}}
    if breaker:
        fields["options"] = {**fields["options"], "breaker": True}
    return fields


#: The metric names of the observability contract (DESIGN.md, "Observability").
METRIC_PREFIX = "pipeflow_stage_"
#: The multiplication sign (written as an escape: it looks like the letter x in source).


@attrs.define
class _Histogram:
    buckets: dict[float, float] = attrs.field(factory=dict)  # le → cumulative count
    sum: float = 0.0
    count: float = 0.0

    def minus(self, earlier: _Histogram | None) -> _Histogram:
        if earlier is None:
            return self
        return _Histogram(
            {le: n - earlier.buckets.get(le, 0.0) for le, n in self.buckets.items()},
            self.sum - earlier.sum,
            self.count - earlier.count,
        )

    def quantile(self, q: float) -> float | None:
        """Linear interpolation inside the bucket, as PromQL's histogram_quantile does."""
        if self.count <= 0 or not self.buckets:
            return None
        rank = q * self.count
        lower, below = 0.0, 0.0
        for le in sorted(self.buckets):
            n = self.buckets[le]
            if n >= rank:
                if math.isinf(le):
                    return lower
                inside = n - below
                return lower + (le - lower) * ((rank - below) / inside if inside else 0.0)
            lower, below = le, n
        return lower


@attrs.define
class StageSample:
    """One stage's metrics in one scrape."""

    inflight: float = 0.0
    queue_depth: float = 0.0
    workers: float = 0.0
    busy_workers: float = 0.0
    blocked_seconds: float = 0.0
    throttled_seconds: float = 0.0
    breaker: float | None = None
    oldest_inflight: float = 0.0
    stalled: float = 0.0
    stall_after: float | None = None
    outcomes: dict[str, float] = attrs.field(factory=dict)
    duration: _Histogram = attrs.field(factory=_Histogram)
    queue_wait: _Histogram = attrs.field(factory=_Histogram)

    def count(self, *outcomes: str) -> float:
        return sum(self.outcomes.get(o, 0.0) for o in outcomes)


#: One scrape: pipeline name → stage name → its sample, stages in exposition order.
Scrape = dict[str, dict[str, StageSample]]


def parse_exposition(text: str) -> Scrape:
    """Read pipeflow's metrics out of a Prometheus text exposition.

    Raises ReportError when the text does not parse or holds no pipeflow metric.
    """
    from prometheus_client.parser import text_string_to_metric_families

    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise ReportError(f"not a Prometheus text exposition ({exc})") from None
    return scrape_families(families)


def scrape_families(families: Iterable[Metric]) -> Scrape:
    """pipeflow's metrics out of metric families: parsed from a text exposition, or
    straight from ``registry.collect()`` (what the endpoint's dashboard does once a
    second, without writing and parsing text). ReportError if there are none."""
    scrape: Scrape = {}
    for family in families:
        for sample in family.samples:
            name = sample.name
            if not name.startswith(METRIC_PREFIX):
                continue
            labels = sample.labels
            pipeline, stage = labels.get("pipeline"), labels.get("stage")
            if pipeline is None or stage is None:
                continue
            s = scrape.setdefault(pipeline, {}).setdefault(stage, StageSample())
            _apply(s, name.removeprefix(METRIC_PREFIX), labels, float(sample.value))
    if not scrape:
        raise ReportError("no pipeflow_stage_* metrics found")
    return scrape


def _apply(s: StageSample, name: str, labels: Mapping[str, str], value: float) -> None:
    if name == "inflight":
        s.inflight = value
    elif name == "queue_depth":
        s.queue_depth = value
    elif name == "workers":
        s.workers = value
    elif name == "workers_busy":
        s.busy_workers = value
    elif name == "blocked_seconds_total":
        s.blocked_seconds = value
    elif name == "throttled_seconds_total":
        s.throttled_seconds = value
    elif name == "breaker_state":
        s.breaker = value
    elif name == "oldest_inflight_seconds":
        s.oldest_inflight = value
    elif name == "stalled_workers":
        s.stalled = value
    elif name == "stall_after_seconds":
        s.stall_after = value
    elif name == "items_total":
        s.outcomes[labels.get("outcome", "ok")] = value
    else:
        for prefix, hist in (
            ("duration_seconds", s.duration),
            ("queue_wait_seconds", s.queue_wait),
        ):
            if name == f"{prefix}_bucket":
                hist.buckets[float(labels.get("le", "+Inf"))] = value
            elif name == f"{prefix}_sum":
                hist.sum = value
            elif name == f"{prefix}_count":
                hist.count = value


def views_from_scrapes(
    before: Scrape,
    after: Scrape,
    seconds: float,
    target: str,
    *,
    structures: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[GraphView]:
    """One view per pipeline: rates over the ``seconds`` between two scrapes.

    λ is the change of ``items_total`` (ok + filtered + failed) per second, W the mean
    of the duration histogram over the interval, utilisation λW/N with N the workers
    gauge, and the verdict (see :mod:`.verdict`) on those figures. ``structures`` maps
    a pipeline to its structure (``describe_pipeline``), when known: the verdict then
    knows each stage's options.
    """
    views: list[GraphView] = []
    for pipeline, stages in after.items():
        earlier = before.get(pipeline, {})
        structure = (structures or {}).get(pipeline, {})
        configured = {
            d["name"]: d
            for d in structure.get("stages", [])
            if isinstance(d, Mapping) and isinstance(d.get("name"), str)
        }
        out: list[StageView] = []
        for name, now in stages.items():
            was = earlier.get(name, StageSample())
            dt = seconds if seconds > 0 else math.inf
            done = now.count("ok", "filtered", "failed") - was.count("ok", "filtered", "failed")
            arrived = done + now.count("dropped") - was.count("dropped")
            lam = max(done, 0.0) / dt
            window = now.duration.minus(was.duration)
            hist = window if window.count > 0 else now.duration
            mean = hist.sum / hist.count if hist.count > 0 else None
            p99 = hist.quantile(0.99)
            waits = now.queue_wait.minus(was.queue_wait)
            waits = waits if waits.count > 0 else now.queue_wait
            n = now.workers
            # L: seconds of work finished per second (right for batch stages, whose
            # histogram counts calls while items_total counts items). A scrape happens
            # while items are in flight, so L/N can read a little above 1: clamp it.
            load = max(window.sum, 0.0) / dt if window.count > 0 else (0.0 if lam == 0 else None)
            if load is None and mean is not None:
                load = busy_workers(lam, mean)
            util = min(utilisation(load, n), 1.0) if load is not None and n > 0 else None
            blocked = now.blocked_seconds - was.blocked_seconds
            throttled = now.throttled_seconds - was.throttled_seconds
            out.append(
                StageView(
                    name=name,
                    measured=True,
                    workers_now=n,
                    items_in=round(now.count("ok", "filtered", "failed", "dropped") + now.inflight),
                    failed=round(now.count("failed")),
                    rate_in=max(arrived, 0.0) / dt,
                    throughput=lam,
                    rate_out=(now.count("ok") - was.count("ok")) / dt,
                    duration_mean=mean,
                    duration_p99=p99,
                    queue_wait_mean=waits.sum / waits.count if waits.count > 0 else None,
                    utilisation=util,
                    blocked_seconds=now.blocked_seconds,
                    blocked_fraction=blocked / dt / n if n > 0 else None,
                    queue_depth=now.queue_depth,
                    busy_workers=now.busy_workers,
                    recommended_workers=workers_needed(load)
                    if load is not None and lam > 0
                    else None,
                    **_configured(configured.get(name), now.breaker is not None),
                    seconds=dt,
                    done=max(done, 0.0),
                    busy_seconds=min(load, n) * dt if load is not None else None,
                    throttled_seconds=min(max(throttled, 0.0), n * dt),
                    worker_seconds=n * dt,
                    breaker_state=_BREAKER_STATES.get(now.breaker)
                    if now.breaker is not None
                    else None,
                    oldest_inflight=now.oldest_inflight,
                    stalled_workers=round(now.stalled),
                    stall_after=now.stall_after,
                )
            )
        verdict = judge(out, window=f"last {seconds:.3g} s")
        views.append(
            GraphView(
                pipeline=pipeline,
                origin="metrics",
                target=target,
                stages=tuple(out),
                elapsed=seconds,
                bottleneck=verdict.stage if verdict.kind == "stage" else None,
                verdict=verdict,
            )
        )
    return views
