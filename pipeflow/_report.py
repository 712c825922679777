"""Run reports and pictures of a pipeline.

One picture, three origins, five renderings. A :class:`GraphView` describes a pipeline's
stages in order, with what is known about each:

- from a :class:`~pipeflow.Pipeline` (:func:`view_from_pipeline`): the structure only —
  workers, buffers and options;
- from a saved run report (:func:`view_from_report`): measured throughput, utilisation,
  p99, time blocked downstream, the bottleneck and a Little's Law sizing;
- from two scrapes of a live metrics endpoint (:func:`views_from_scrapes`): the same
  figures over the interval between the scrapes.

It renders as a terminal drawing (:func:`render_text`), JSON, Graphviz DOT, Mermaid, or a
self-contained HTML page with inline SVG (:func:`render_html`).

A run report (what ``pipeflow run --report FILE`` writes) is JSON: the run's
``RunResult.to_dict()`` plus ``format``/``version``, ``target``, ``status``
(``completed``, ``failed`` or ``interrupted``), ``failure``, the pipeline's
``structure``, and ``series``, a per-second time series sampled by :class:`Series`.
"""

from __future__ import annotations

import html
import json
import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ._errors import short_repr
from ._stats import TARGET_UTILISATION, StageCounters, StageStats

if TYPE_CHECKING:
    from ._pipeline import Pipeline
    from ._stage import Stage

REPORT_FORMAT = "pipeflow-report"
REPORT_VERSION = 1
#: What the time series keeps per stage, once per sample.
SERIES_FIELDS = ("items_out", "throughput", "queue_depth", "busy_workers")

#: The metric names of the observability contract (DESIGN.md, "Observability").
METRIC_PREFIX = "pipeflow_stage_"
#: The multiplication sign (written as an escape: it looks like the letter x in source).
TIMES = "\u00d7"


class ReportError(ValueError):
    """A file or a scrape that is not what pipeflow can draw; the message says why."""


# -- formatting ---------------------------------------------------------------------------


def fmt_count(n: int | float) -> str:
    """``1234`` → ``1,234``."""
    return f"{round(n):,}"


def fmt_rate(per_second: float) -> str:
    """Items per second with as many digits as matter: ``1,234/s``, ``98.5/s``, ``0.25/s``."""
    x = per_second
    if x >= 1000:
        return f"{x:,.0f}/s"
    if x >= 100:
        return f"{x:.0f}/s"
    if x >= 10:
        return f"{x:.1f}/s"
    return f"{x:.2f}/s"


def fmt_duration(seconds: float) -> str:
    """``0.0123`` → ``12.3 ms``; ``75`` → ``1m 15s``."""
    s = seconds
    if s <= 0:
        return "0 s"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    if s < 60:
        return f"{s:.3g} s"
    minutes, rest = divmod(round(s), 60)
    if minutes < 60:
        return f"{minutes}m {rest:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def fmt_pct(fraction: float) -> str:
    return f"{fraction:.0%}"


def workers_text(workers: int | tuple[int, int]) -> str:
    """``16`` → ``16 workers``; ``(2, 8)`` → ``2..8 workers``."""
    if isinstance(workers, tuple):
        return f"{workers[0]}..{workers[1]} workers"
    return f"{workers} worker{'s' if workers != 1 else ''}"


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None, so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


# -- structure ----------------------------------------------------------------------------


def describe_stage(st: Stage[Any, Any]) -> dict[str, Any]:
    """A stage's structure as plain data: name, kind, workers, buffer and the options
    that differ from the defaults."""
    o = st.options
    options: dict[str, Any] = {}
    if o.ordered:
        options["ordered"] = True
    if o.key is not None:
        options["key"] = getattr(o.key, "__name__", repr(o.key))
    if o.timeout is not None:
        options["timeout"] = o.timeout
    if o.retries is not None:
        options["retries"] = o.retries.attempts
    if o.errors != "fail_fast":
        options["errors"] = o.errors
    if o.max_failures is not None:
        options["max_failures"] = o.max_failures
    if o.rate is not None:
        options["rate"] = o.rate
    if o.burst is not None:
        options["burst"] = o.burst
    if o.batch is not None:
        options["batch"] = o.batch
    if o.batch_timeout is not None:
        options["batch_timeout"] = o.batch_timeout
    if o.resource is not None:
        options["resource"] = getattr(o.resource, "__name__", "yes")
    if o.breaker is not None:
        options["breaker"] = True
    if o.dead_letter is not None:
        options["dead_letter"] = getattr(o.dead_letter, "__name__", None) or getattr(
            o.dead_letter, "name", "yes"
        )
    return {
        "name": o.name,
        "kind": o.kind,
        "run_in": o.run_in,
        "workers": list(o.workers) if isinstance(o.workers, tuple) else o.workers,
        "buffer": o.buffer_size,
        "options": options,
    }


def describe_pipeline(pipeline: Pipeline[Any, Any]) -> dict[str, Any]:
    """A pipeline's structure as plain data: its name and each stage's description."""
    return {"pipeline": pipeline.name, "stages": [describe_stage(s) for s in pipeline.stages]}


def options_text(options: Mapping[str, Any]) -> list[str]:
    """Stage options as short phrases for a drawing: ``ordered``, ``timeout 10 s``, …"""
    out: list[str] = []
    for key, value in options.items():
        if value is True:
            out.append(key)
        elif key in ("timeout", "batch_timeout"):
            out.append(f"{key} {fmt_duration(float(value))}")
        elif key == "rate":
            out.append(f"rate {fmt_rate(float(value))}")
        elif key == "errors":
            out.append(f"errors={value}")
        else:
            out.append(f"{key} {value}")
    return out


# -- the time series ----------------------------------------------------------------------


class Series:
    """Per-stage samples taken during a run, for the report and its charts.

    Each :meth:`sample` records, per stage, ``items_out`` (outputs so far),
    ``throughput`` (items finished per second since the previous sample),
    ``queue_depth`` and ``busy_workers`` (at that moment), at time ``t`` (seconds since
    the run started).
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.t: list[float] = []
        self.stages: dict[str, dict[str, list[float]]] = {}
        self._last_t = 0.0
        self._last_done: dict[str, int] = {}

    def sample(self, t: float, stats: Mapping[str, StageStats]) -> None:
        dt = t - self._last_t
        if dt <= 0:
            return
        self.t.append(round(t, 6))
        for name, s in stats.items():
            columns = self.stages.setdefault(name, {f: [] for f in SERIES_FIELDS})
            done = s.ok + s.filtered + s.failed
            rate = (done - self._last_done.get(name, 0)) / dt
            self._last_done[name] = done
            columns["items_out"].append(s.items_out)
            columns["throughput"].append(round(rate, 6))
            columns["queue_depth"].append(s.queue_depth)
            columns["busy_workers"].append(s.busy_workers)
        self._last_t = t

    def latest(self, stage: str, field: str) -> float | None:
        """The last value sampled for ``stage``, or None before the first sample."""
        column = self.stages.get(stage, {}).get(field)
        return column[-1] if column else None

    def to_dict(self) -> dict[str, Any]:
        return {"interval": self.interval, "t": list(self.t), "stages": self.stages}


def build_report(
    *,
    target: str,
    status: str,
    result: Mapping[str, Any],
    structure: Mapping[str, Any],
    series: Series,
    failure: str | None = None,
    signal: str | None = None,
    stats_at: float | None = None,
) -> dict[str, Any]:
    """The run report: ``result`` (a ``RunResult.to_dict()``) with what the CLI adds.

    ``stats_at`` is None when the statistics are the run's final ones; otherwise the
    run raised without them and they are the last sample, taken ``stats_at`` seconds in.
    """
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "target": target,
        "status": status,
        "failure": failure,
        "signal": signal,
        "stats_at": stats_at,
    }
    report.update(result)
    report["structure"] = dict(structure)
    report["series"] = series.to_dict()
    return json_safe(report)  # type: ignore[no-any-return]


def result_dict_from_stats(
    pipeline: str,
    stats: Mapping[str, StageStats],
    elapsed: float,
    bottleneck: str | None,
    stage_names: Sequence[str] = (),
) -> dict[str, Any]:
    """What ``RunResult.to_dict()`` holds, rebuilt from a snapshot (for a run that raised
    before it could return its result). Stages missing from ``stats`` (no snapshot was
    taken yet) appear with zero counts."""
    if not stats:
        stats = {n: StageCounters(n).snapshot(0.0, 0.0) for n in stage_names}
    return {
        "pipeline": pipeline,
        "elapsed": elapsed,
        "bottleneck": bottleneck,
        "errors": [],
        "stages": [s.to_dict() for s in stats.values()],
    }


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
        return self.throughput * self.duration_mean

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
            capacity = n / s.duration_mean
            if best is None or capacity < best[1]:
                best = (s, capacity)
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
        load = b.throughput * b.duration_mean
        n = b.pool_size()
        recommended = b.recommended_workers
        if recommended is None:
            recommended = max(1, math.ceil(load / target - 1e-9))
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
            other, capacity = limit
            need = max(1, math.ceil(capacity * b.duration_mean / target - 1e-9))
            text += (
                f"; at {fmt_pct(target)}, {need} worker{'s' if need != 1 else ''} keep up with "
                f"the next limit ({other.name}: {fmt_rate(capacity)})"
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


def _invalid(where: str, what: str) -> ReportError:
    return ReportError(f"{where} is not a valid pipeflow run report: {what}")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _num(d: Mapping[str, Any], key: str, where: str, context: str = "") -> float | None:
    """``d[key]`` as a float, None when absent or null; ReportError when it is not a
    finite number."""
    v = d.get(key)
    if v is None:
        return None
    if not _is_number(v):
        raise _invalid(where, f"{context}{key} is {short_repr(v)}, not a number")
    return float(v)


def _int(d: Mapping[str, Any], key: str, where: str, context: str = "") -> int | None:
    """``d[key]`` as an int (``3.0`` too), None when absent or null; else ReportError."""
    v = d.get(key)
    if v is None:
        return None
    if not (_is_number(v) and float(v).is_integer()):
        raise _invalid(where, f"{context}{key} is {short_repr(v)}, not a whole number")
    return int(v)


def _check_structure(d: Mapping[str, Any], where: str) -> None:
    """A report's stage structure holds what :func:`_structure_fields` and
    :func:`options_text` can read."""
    context = f"structure of stage {short_repr(d.get('name'))}: "
    workers = d.get("workers")
    if not (
        workers is None
        or (isinstance(workers, int) and not isinstance(workers, bool))
        or (
            isinstance(workers, list)
            and len(workers) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) for w in workers)
        )
    ):
        raise _invalid(where, f"{context}workers is {short_repr(workers)}, not N or [MIN, MAX]")
    _int(d, "buffer", where, context)
    options = d.get("options")
    if options is None:
        return
    if not isinstance(options, Mapping):
        raise _invalid(where, f"{context}options is {short_repr(options)}, not a mapping")
    for key in ("timeout", "batch_timeout", "rate"):
        if options.get(key, True) is not True:
            _num(options, key, where, f"{context}option ")


def _check_series(series: Mapping[str, Any], where: str) -> None:
    """A report's time series holds lists of numbers: times, and columns per stage."""
    t = series.get("t")
    if t is not None and not (isinstance(t, list) and all(_is_number(x) for x in t)):
        raise _invalid(where, f"series t is {short_repr(t)}, not a list of numbers")
    stages = series.get("stages")
    if stages is None:
        return
    if not isinstance(stages, Mapping):
        raise _invalid(where, f"series stages is {short_repr(stages)}, not a mapping")
    for name, columns in stages.items():
        if not isinstance(columns, Mapping):
            raise _invalid(
                where, f"series of stage {name!r} is {short_repr(columns)}, not a mapping"
            )
        for field, column in columns.items():
            # null entries are tolerated: a writer may store a non-finite sample as null.
            if not (isinstance(column, list) and all(v is None or _is_number(v) for v in column)):
                raise _invalid(
                    where,
                    f"series {field} of stage {name!r} is {short_repr(column)}, "
                    "not a list of numbers",
                )


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


def load_report(text: str, where: str) -> dict[str, Any]:
    """Parse a run report (or a bare ``RunResult.to_dict()``); ReportError if it is not."""

    def not_finite(token: str) -> float:
        raise _invalid(where, f"it holds {token}, not a number")

    def finite(token: str) -> float:
        value = float(token)
        return value if math.isfinite(value) else not_finite(token)

    try:
        # Python's json reads NaN, Infinity and 1e999; a report never holds them.
        data: Any = json.loads(text, parse_constant=not_finite, parse_float=finite)
    except json.JSONDecodeError as exc:
        raise ReportError(f"{where} is not JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise ReportError(f"{where} is not a pipeflow run report (nested too deeply)") from None
    stages = data.get("stages") if isinstance(data, dict) else None
    if not (
        isinstance(stages, list)
        and stages
        and all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in stages)
    ):
        raise ReportError(f"{where} is not a pipeflow run report (no list of stages)")
    report: dict[str, Any] = data
    return report


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


# -- live metrics -------------------------------------------------------------------------


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

    scrape: Scrape = {}
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise ReportError(f"not a Prometheus text exposition ({exc})") from None
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
    before: Scrape, after: Scrape, seconds: float, target: str
) -> list[GraphView]:
    """One view per pipeline: rates over the ``seconds`` between two scrapes.

    λ is the change of ``items_total`` (ok + filtered + failed) per second, W the mean
    of the duration histogram over the interval, utilisation λW/N with N the workers
    gauge, and the bottleneck the most utilised stage.
    """
    views: list[GraphView] = []
    for pipeline, stages in after.items():
        earlier = before.get(pipeline, {})
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
            # λ and W come from windows that do not line up exactly (a scrape happens
            # while items are in flight), so λW/N can read a little above 1: clamp it.
            util = min(lam * mean / n, 1.0) if mean is not None and n > 0 else None
            blocked = now.blocked_seconds - was.blocked_seconds
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
                    recommended_workers=max(1, math.ceil(lam * mean / TARGET_UTILISATION - 1e-9))
                    if mean is not None and lam > 0
                    else None,
                )
            )
        busiest = max(out, key=lambda s: s.utilisation or 0.0, default=None)
        bottleneck = (
            busiest.name if busiest is not None and (busiest.utilisation or 0) > 0 else None
        )
        views.append(
            GraphView(
                pipeline=pipeline,
                origin="metrics",
                target=target,
                stages=tuple(out),
                elapsed=seconds,
                bottleneck=bottleneck,
            )
        )
    return views


# -- text ---------------------------------------------------------------------------------

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
        if s.items_out is not None:
            counts.append(f"out {fmt_count(s.items_out)}")
        if s.failed:
            counts.append(f"failed {fmt_count(s.failed)}")
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
        done = view.stages[-1].items_out if view.stages else None
        status = view.status or "finished"
        parts.append(f"report {view.target}")
        if view.elapsed is not None:
            parts.append(f"{status} in {fmt_duration(view.elapsed)}")
        if done is not None:
            parts.append(f"{fmt_count(done)} outputs")
    else:
        parts.append(f"live from {view.target}")
        if view.elapsed is not None:
            parts.append(f"rates over {fmt_duration(view.elapsed)}")
    return " · ".join(parts)


def render_text(view: GraphView, *, unicode: bool = True, color: bool = False) -> str:
    """The chain drawn top to bottom: a box per stage, edges labelled with items per
    second (or buffers), the bottleneck marked and sized."""
    ch = _UNICODE if unicode else _ASCII
    mark = f" ◀ {view.bottleneck_label}" if unicode else f" <- {view.bottleneck_label}"
    bodies = [_stage_lines(s) for s in view.stages]
    headers = [s.name + (mark if s.name == view.bottleneck else "") for s in view.stages]
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
        hi, lo = (red, reset) if s.name == view.bottleneck else ("", "")
        top = f"{ch['tl']}{ch['h']} {header} "
        out.append(f"  {hi}{top}{ch['h'] * (width + 3 - len(top))}{ch['tr']}{lo}")
        for line in body:
            out.append(f"  {hi}{ch['v']}{lo} {line:<{width}} {hi}{ch['v']}{lo}")
        out.append(f"  {hi}{ch['bl']}{ch['h'] * (width + 2)}{ch['br']}{lo}")
    edge(edges[-1][2])
    out.append("  outputs")
    advice = view.recommendation()
    if advice:
        if not unicode:
            advice = advice.replace("λ", "lambda*").replace(TIMES, "x")
        out += ["", *textwrap.wrap(advice, 96, subsequent_indent="  ", break_on_hyphens=False)]
    elif view.measured and view.bottleneck is None:
        out += ["", "no bottleneck: no stage limited the rate (the source did)"]
    return "\n".join(out) + "\n"


# -- json, dot, mermaid -------------------------------------------------------------------


def render_json(view: GraphView) -> str:
    return json.dumps(view.to_dict(), indent=2, ensure_ascii=False) + "\n"


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _node_summary(s: StageView) -> list[str]:
    lines = [s.workers_label()]
    if s.measured and s.utilisation is not None:
        lines.append(f"util {fmt_pct(s.utilisation)}")
    if s.measured and s.duration_p99 is not None:
        lines.append(f"p99 {fmt_duration(s.duration_p99)}")
    return lines


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
        label = "\n".join([s.name, *_node_summary(s)])
        attrs_ = f"label={_dot_quote(label)}"
        if s.name == view.bottleneck:
            attrs_ += f', color="#c62828", penwidth=2, xlabel="{view.bottleneck_label}"'
        out.append(f"  {_dot_quote(s.name)} [{attrs_}];")
    for a, b, label in view.edges():
        qa = a if a in ("source", "outputs") else _dot_quote(a)
        qb = b if b in ("source", "outputs") else _dot_quote(b)
        out.append(f"  {qa} -> {qb}" + (f" [label={_dot_quote(label)}]" if label else "") + ";")
    out.append("}")
    return "\n".join(out) + "\n"


def _mermaid_text(text: str) -> str:
    return html.escape(text, quote=True).replace("&quot;", "#quot;")


def render_mermaid(view: GraphView) -> str:
    """A Mermaid flowchart (paste into Markdown inside a ```mermaid fence)."""
    ids = {s.name: f"s{i}" for i, s in enumerate(view.stages)}
    ids["source"], ids["outputs"] = "source", "outputs"
    out = ["flowchart LR", '    source(["source"])']
    for s in view.stages:
        label = "<br/>".join(_mermaid_text(x) for x in [s.name, *_node_summary(s)])
        out.append(f'    {ids[s.name]}["{label}"]')
    out.append('    outputs(["outputs"])')
    for a, b, label in view.edges():
        arrow = f'-->|"{_mermaid_text(label)}"|' if label else "-->"
        out.append(f"    {ids[a]} {arrow} {ids[b]}")
    if view.bottleneck in ids:
        out.append("    classDef bottleneck fill:#ffebee,stroke:#c62828,stroke-width:2px")
        out.append(f"    class {ids[view.bottleneck or '']} bottleneck")
    return "\n".join(out) + "\n"


# -- html ---------------------------------------------------------------------------------

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
        is_b = s.name == view.bottleneck
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
        for j, line in enumerate(_node_summary(s)):
            parts.append(
                f'<text x="{x + box_w / 2}" y="{top + 46 + j * 18:.0f}" text-anchor="middle" '
                f'font-size="12" fill="#424242">{e(line)}</text>'
            )
        if is_b:
            parts.append(
                f'<text x="{x + box_w / 2}" y="{top - 8:.0f}" text-anchor="middle" '
                f'font-size="12" font-weight="600" fill="#c62828">{view.bottleneck_label}</text>'
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
    cols = ["stage", "workers", "in", "out", "failed", "items/s", "util", "mean", "p99"]
    cols += ["queue wait", "blocked", "recommended"]
    rows = []
    for s in view.stages:

        def opt(v: float | None, f: Any) -> str:
            return f(v) if v is not None else "-"

        cells = [
            s.name,
            s.workers_label().removesuffix(" workers").removesuffix(" worker"),
            opt(s.items_in, fmt_count),
            opt(s.items_out, fmt_count),
            opt(s.failed, fmt_count),
            opt(s.throughput, lambda v: fmt_rate(v).removesuffix("/s")),
            opt(s.utilisation, fmt_pct),
            opt(s.duration_mean, fmt_duration),
            opt(s.duration_p99, fmt_duration),
            opt(s.queue_wait_mean, fmt_duration),
            opt(s.blocked_fraction, fmt_pct),
            opt(s.recommended_workers, str),
        ]
        cls = ' class="bottleneck"' if s.name == view.bottleneck else ""
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
    advice = view.recommendation()
    if advice:
        body.append(f'<p class="advice">{e(advice)}</p>')
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


RENDERERS = {
    "json": render_json,
    "dot": render_dot,
    "mermaid": render_mermaid,
    "html": render_html,
}


def render(view: GraphView, fmt: str, *, unicode: bool = True, color: bool = False) -> str:
    """``view`` in format ``fmt``: ``text``, ``json``, ``dot``, ``mermaid`` or ``html``."""
    if fmt == "text":
        return render_text(view, unicode=unicode, color=color)
    return RENDERERS[fmt](view)


def render_many(views: Iterable[GraphView], fmt: str, **kw: Any) -> str:
    """Several pipelines (one metrics endpoint can serve more than one)."""
    views = list(views)
    if len(views) == 1:
        return render(views[0], fmt, **kw)
    if fmt == "json":
        return json.dumps([v.to_dict() for v in views], indent=2, ensure_ascii=False) + "\n"
    if fmt == "html":
        return render_html_page(views)
    return "\n".join(render(v, fmt, **kw) for v in views)
