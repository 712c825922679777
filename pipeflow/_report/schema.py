"""The run report's schema: what ``pipeflow run --report`` writes, and reading it back.

A run report is JSON: the run's ``RunResult.to_dict()`` plus ``format``/``version``,
``target``, ``status`` (``completed``, ``failed`` or ``interrupted``), ``failure``, the
pipeline's ``structure``, and ``series``, a per-second time series sampled by
:class:`Series`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._errors import short_repr
from .._sources import is_acking
from .._stats import StageCounters, StageStats
from .format import json_safe

if TYPE_CHECKING:
    from .._pipeline import Pipeline
    from .._stage import Stage


REPORT_FORMAT = "pipeflow-report"
REPORT_VERSION = 1
#: What the time series keeps per stage, once per sample.
SERIES_FIELDS = (
    "items_out",
    "throughput",
    "queue_depth",
    "busy_workers",
    # Cumulative counters, so that any window of the run can be judged on its own (the
    # verdict's steady state): items finished, failed, worker-seconds spent busy, blocked
    # sending downstream, throttled, on CPU (thread stages), and alive; and the pool size.
    "done",
    "failed",
    "busy_seconds",
    "blocked_seconds",
    "throttled_seconds",
    "cpu_seconds",
    "worker_seconds",
    "workers",
)


class ReportError(ValueError):
    """A file or a scrape that is not what pipeflow can draw; the message says why."""


# -- structure ----------------------------------------------------------------------------


def describe_stage(st: Stage[Any, Any], *, after_acking_source: bool = False) -> dict[str, Any]:
    """A stage's structure as plain data: name, kind, workers, buffer and the options
    that differ from the defaults. ``after_acking_source``: the stage is the first
    behind an acking source, which gives it a larger default buffer."""
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
        "buffer": o.input_buffer(after_acking_source=after_acking_source),
        "options": options,
    }


def describe_pipeline(pipeline: Pipeline[Any, Any], *, source: object = None) -> dict[str, Any]:
    """A pipeline's structure as plain data: its name and each stage's description, with
    the buffers a run over ``source`` (when given) gives its stages."""
    acking = is_acking(source)
    return {
        "pipeline": pipeline.name,
        "stages": [
            describe_stage(s, after_acking_source=acking and i == 0)
            for i, s in enumerate(pipeline.stages)
        ],
    }


# -- the time series ----------------------------------------------------------------------


class Series:
    """Per-stage samples taken during a run, for the report and its charts.

    Each :meth:`sample` records, per stage, ``items_out`` (outputs so far),
    ``throughput`` (items finished per second since the previous sample),
    ``queue_depth`` and ``busy_workers`` (at that moment), at time ``t`` (seconds since
    the run started); and cumulative counters (``done``, ``failed``, ``busy_seconds``,
    ``blocked_seconds``, ``throttled_seconds``, ``cpu_seconds``, ``worker_seconds``) from
    which the verdict judges any window of the run, with ``workers``, the pool size.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.t: list[float] = []
        self.stages: dict[str, dict[str, list[float]]] = {}
        self._last_t = 0.0
        self._last_done: dict[str, int] = {}
        self._before: tuple[float, dict[str, int]] = (0.0, {})
        #: CPU seconds the process used since the run started, per sample (when given).
        self.process_cpu: list[float] = []

    def sample(
        self, t: float, stats: Mapping[str, StageStats], process_cpu: float | None = None
    ) -> None:
        dt = t - self._last_t
        if dt <= 0 and self.t and abs(t - self.t[-1]) < 1e-6:
            # The run's final statistics at the time of the last sample: they replace it
            # (a call that ended at that very moment must count).
            self.t.pop()
            if len(self.process_cpu) > len(self.t):
                self.process_cpu.pop()
            for columns in self.stages.values():
                for column in columns.values():
                    if len(column) > len(self.t):
                        column.pop()
            self._last_t, self._last_done = self._before
            dt = t - self._last_t
        if dt <= 0:
            return
        self._before = (self._last_t, dict(self._last_done))
        self.t.append(round(t, 6))
        if process_cpu is not None:
            self.process_cpu.append(round(process_cpu, 6))
        for name, s in stats.items():
            columns = self.stages.setdefault(name, {f: [] for f in SERIES_FIELDS})
            done = s.ok + s.filtered + s.failed
            rate = (done - self._last_done.get(name, 0)) / dt
            self._last_done[name] = done
            columns["items_out"].append(s.items_out)
            columns["throughput"].append(round(rate, 6))
            columns["queue_depth"].append(s.queue_depth)
            columns["busy_workers"].append(s.busy_workers)
            columns["done"].append(done)
            columns["failed"].append(s.failed)
            columns["busy_seconds"].append(round(s.busy_seconds, 6))
            columns["blocked_seconds"].append(round(s.blocked_seconds, 6))
            columns["throttled_seconds"].append(round(s.throttled_seconds, 6))
            columns["cpu_seconds"].append(round(s.cpu_seconds, 6))
            columns["worker_seconds"].append(round(s.mean_workers * t, 6))
            columns["workers"].append(s.workers)
        self._last_t = t

    def latest(self, stage: str, field: str) -> float | None:
        """The last value sampled for ``stage``, or None before the first sample."""
        column = self.stages.get(stage, {}).get(field)
        return column[-1] if column else None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"interval": self.interval, "t": list(self.t), "stages": self.stages}
        if self.process_cpu and len(self.process_cpu) == len(self.t):
            d["process_cpu"] = list(self.process_cpu)
        return d


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
    stalls: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The run report: ``result`` (a ``RunResult.to_dict()``) with what the CLI adds.

    ``stats_at`` is None when the statistics are the run's final ones; otherwise the
    run raised without them and they are the last sample, taken ``stats_at`` seconds in.
    ``stalls``: the stalled items the live view saw (``stage``, ``worker``, ``item``,
    ``seconds`` at least, ``stall_after``), for the verdict.
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
    report["stalls"] = [dict(s) for s in stalls]
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
    if v < 0:
        raise _invalid(where, f"{context}{key} is {short_repr(v)}, not a number >= 0")
    return float(v)


def _int(d: Mapping[str, Any], key: str, where: str, context: str = "") -> int | None:
    """``d[key]`` as an int (``3.0`` too), None when absent or null; else ReportError."""
    v = d.get(key)
    if v is None:
        return None
    if not (_is_number(v) and float(v).is_integer() and v >= 0):
        raise _invalid(where, f"{context}{key} is {short_repr(v)}, not a whole number >= 0")
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
