"""The verdict: what limits a pipeline's rate, and what to do about it.

One policy, used by every view (run summary, ``pipeflow graph`` of a report or of a live
endpoint, the HTML page and the dashboard):

- A stage **limits the rate** when its workers are busy :data:`LIMIT_UTILISATION` (80%)
  of their time or more: above that, queues grow non-linearly. Every stage at or above
  it is named (co-bottlenecks), busiest first.
- Sizing aims at :data:`~pipeflow.sizing.TARGET_UTILISATION` (70%), below the naming
  threshold, so a stage sized as advised is never named.
- When no stage is that busy, the limit is outside the stages, and the verdict says which
  one with its figure: a stage's rate limit or circuit breaker (its workers spent
  :data:`THROTTLED_LIMIT` or more of their time waiting for a token or a held breaker),
  the reader of the outputs (the last stage spent :data:`READER_LIMIT` or more of its
  time blocked handing outputs on), or else the source.

Figures are judged over a window (the steady state of a report, the last seconds of a
live run); the whole-run figure is given beside.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ..sizing import HIGH_UTILISATION, TARGET_UTILISATION, capacity, workers_needed
from .format import TIMES, fmt_duration, fmt_pct, fmt_rate

if TYPE_CHECKING:
    from .view import StageView

__all__ = [
    "LIMIT_UTILISATION",
    "READER_LIMIT",
    "THROTTLED_LIMIT",
    "Verdict",
    "judge",
    "steady_window",
]

#: A stage this busy (share of its worker time) limits the rate.
LIMIT_UTILISATION = HIGH_UTILISATION
#: A stage whose workers wait this share of their time for a rate token or a held
#: breaker is held back by that, not by its own work.
THROTTLED_LIMIT = 0.2
#: The last stage blocked this share of its time: whoever reads the outputs is slower.
READER_LIMIT = 0.5
#: A thread stage whose calls are on CPU this share of their time is CPU-bound.
CPU_BOUND = 0.7
#: A next limit this many times today's rate is too far to size for.
FAR = 10.0
#: Python code in threads using this many cores: the GIL is the limit.
GIL_CORES = 0.8


@attrs.frozen(kw_only=True)
class Verdict:
    """What limits the rate, with its figure, and what to do.

    ``kind`` is ``"stage"``, ``"rate_limit"``, ``"breaker"``, ``"reader"``, ``"source"``
    or ``"none"`` (nothing was measured); ``stage`` the stage concerned (None for the
    reader and the source); ``limits`` every stage at or above the naming threshold,
    busiest first; ``gain`` how much faster fixing the first limit alone would make the
    pipeline, at most (None when unknown); ``lines`` the verdict in sentences: the
    headline first, then advice, then the assumptions behind any prediction.
    """

    kind: str
    stage: str | None
    rate: float | None
    limits: tuple[str, ...] = ()
    gain: float | None = None
    headline: str = ""
    advice: tuple[str, ...] = ()
    assumptions: tuple[str, ...] = ()
    window: str | None = None
    sizes: Mapping[str, int] = attrs.field(factory=dict)
    predicted: float | None = None
    stalls: tuple[str, ...] = ()

    @property
    def lines(self) -> list[str]:
        out = [*self.stalls, self.headline, *self.advice]
        if self.assumptions:
            out.append("assuming " + "; ".join(self.assumptions) + ".")
        return [line for line in out if line]

    def text(self) -> str:
        return " ".join(self.lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "stage": self.stage,
            "rate": self.rate,
            "limits": list(self.limits),
            "gain": self.gain,
            "window": self.window,
            "headline": self.headline,
            "advice": list(self.advice),
            "assumptions": list(self.assumptions),
            "sizes": dict(self.sizes),
            "predicted": self.predicted,
            "stalls": list(self.stalls),
        }


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _pool(s: StageView) -> float:
    """N over the window: average workers alive, else the pool size."""
    if s.worker_seconds and s.seconds:
        return s.worker_seconds / s.seconds
    return float(s.pool_size() or 0)


def _capacity(s: StageView) -> float | None:
    """N / W per item: the most items per second the stage's pool gets through, with its
    own rate limit as a ceiling."""
    w = s.per_item
    n = _pool(s)
    most = capacity(n, w) if w and n else None
    rate = s.options.get("rate")
    if isinstance(rate, int | float) and not isinstance(rate, bool) and rate > 0:
        most = float(rate) if most is None else min(most, float(rate))
    return most


def _cpu_bound(s: StageView, process_cpu: float | None) -> bool:
    """A thread stage whose calls are mostly on CPU: their CPU time is most of their
    busy time, or (several threads taking turns on the GIL, or a machine short of CPU
    stretch each call) its threads use most of the CPU the whole process got, or at
    least 0.7 of a core."""
    if s.cpu_share is None or not s.seconds:
        return False
    cpu = s.cpu_seconds or 0.0
    cores = cpu / s.seconds
    if s.cpu_share >= CPU_BOUND or cores >= GIL_CORES - 0.1:
        return True
    return process_cpu is not None and cores >= 0.2 and cpu >= 0.6 * process_cpu


def _predicted(
    limits: Sequence[StageView], sizes: Mapping[str, int], next_limit: float | None
) -> float | None:
    """The rate the pipeline would reach with the stages sized as advised, if the source
    can offer it: the lowest of their new capacities and the next limit."""
    if not sizes:
        return None
    capacities = [
        capacity(sizes[s.name], s.per_item) for s in limits if s.name in sizes and s.per_item
    ]
    if next_limit is not None:
        capacities.append(next_limit)
    return min(capacities) if capacities else None


def _held(stages: Sequence[StageView]) -> list[str]:
    """What a window left out: stages that a breaker or a rate limit held over the whole
    run."""
    out = []
    for s in stages:
        share = s.throttled_fraction or 0.0
        if share < THROTTLED_LIMIT:
            continue
        what = "its circuit breaker" if s.options.get("breaker") else "its rate limit"
        failed = f"; {s.failed} items failed" if s.failed else ""
        out.append(
            f"Over the whole run, {what} held {s.name}'s workers for "
            f"{fmt_duration(s.throttled_seconds or 0.0)} ({fmt_pct(share)} of their time"
            f"{failed})."
        )
    return out


def _max_workers(s: StageView) -> int | None:
    return s.workers[1] if isinstance(s.workers, tuple) else None


def stall_lines(stages: Sequence[StageView]) -> list[str]:
    """One line per stage with stalled items now (live views): ``fetch: an item has
    been in a worker for 42 s (stall_after 5 s): stalled``."""
    out = []
    for s in stages:
        n = s.stalled_workers
        if n <= 0:
            continue
        oldest = fmt_duration(s.oldest_inflight or 0.0)
        limit = f" (stall_after {fmt_duration(s.stall_after)})" if s.stall_after else ""
        if n == 1:
            what = f"an item has been in a worker for {oldest}{limit}: stalled"
        else:
            what = f"{n} items stalled, the oldest in a worker for {oldest}{limit}"
        out.append(f"{s.name}: {what}; see what each worker is doing at /workers.")
    return out


def past_stall_lines(stalls: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per stalled item a run's live view saw (a report's ``stalls``):
    ``fetch: item 'x' was in a worker for at least 42 s (stall_after 5 s): stalled``."""
    out = []
    for r in stalls:
        seconds, limit = r.get("seconds"), r.get("stall_after")
        if not isinstance(seconds, int | float) or isinstance(seconds, bool):
            continue
        after = f" (stall_after {fmt_duration(limit)})" if isinstance(limit, int | float) else ""
        item = f" {r['item']}" if isinstance(r.get("item"), str) else ""
        out.append(
            f"{r.get('stage')}: item{item} was in a worker for at least "
            f"{fmt_duration(seconds)}{after}: stalled."
        )
    return out


def judge(
    stages: Sequence[StageView], *, stalls: Sequence[Mapping[str, Any]] = (), **kw: Any
) -> Verdict:
    """The verdict on measured ``stages`` (see :func:`_judge`), with a line first for
    each stage that has stalled items now, and for each of ``stalls`` (a report's)."""
    verdict = _judge(stages, **kw)
    lines = stall_lines(stages) + past_stall_lines(stalls)
    return attrs.evolve(verdict, stalls=tuple(lines)) if lines else verdict


def _judge(
    stages: Sequence[StageView],
    *,
    whole: Mapping[str, float] | None = None,
    window: str | None = None,
    target: float = TARGET_UTILISATION,
    autoscale: Mapping[str, str] | None = None,
    process_cpu: float | None = None,
    whole_stages: Sequence[StageView] = (),
) -> Verdict:
    """The verdict on measured ``stages`` (figures over one window).

    ``whole`` maps a stage to its whole-run utilisation, shown beside the window's when
    they differ; ``window`` says which window it is (``"steady state 2.0-14.0 s"``);
    ``autoscale`` maps an autoscaled stage to a sentence on how its pool settled;
    ``process_cpu`` is the CPU seconds the whole process used over the window (when
    known: it tells a thread stage starved of the GIL from one waiting on I/O);
    ``whole_stages`` the whole run's figures, when the window is a part of it.
    """
    measured = [s for s in stages if s.measured and s.utilisation is not None]
    if not measured:
        return Verdict(kind="none", stage=None, rate=None, headline="")
    last = stages[-1]
    rate = last.throughput
    whole = whole or {}
    autoscale = autoscale or {}
    when = f" ({window})" if window else ""

    def util_text(s: StageView) -> str:
        """``96% busy (56% over the whole run)``."""
        u = s.utilisation or 0.0
        text = f"{fmt_pct(u)} busy"
        w = whole.get(s.name)
        if w is not None and abs(w - u) >= 0.05:
            text += f" ({fmt_pct(w)} over the whole run)"
        return text

    limits = sorted(
        (s for s in measured if (s.utilisation or 0.0) >= LIMIT_UTILISATION - 1e-9),
        key=lambda s: -(s.utilisation or 0.0),
    )
    advice: list[str] = []
    assumptions: list[str] = []

    # Process-wide: Python code in threads holds the GIL, one thread at a time.
    cores = sum((s.cpu_seconds or 0.0) / s.seconds for s in measured if s.seconds)
    gil = cores >= GIL_CORES
    limits_cpu = any(
        _cpu_bound(s, process_cpu)
        for s in measured
        if (s.utilisation or 0.0) >= LIMIT_UTILISATION - 1e-9
    )
    if gil and not limits_cpu:
        advice.append(
            f"Thread stages ran Python on {cores:.2f} CPU cores: the GIL runs one thread "
            "at a time, so more threads will not go faster, and async stages wait for "
            'the GIL too (their W stretches); move CPU-bound work to run_in="process".'
        )

    if limits:
        b = limits[0]
        n = _pool(b)
        load = b.load or 0.0
        pool = f"{round(n)}" if n >= 10 or abs(n - round(n)) < 0.05 else f"{n:.1f}"
        headline = (
            f"{b.name} limits the rate{when}: {util_text(b)}. Little's Law: L = λW = "
            f"{fmt_rate(b.throughput or 0.0)} {TIMES} {fmt_duration(b.per_item or 0.0)} "
            f"per item = {load:.2f} of {pool} worker{'' if pool == '1' else 's'} busy on average."
        )
        others = [s for s in limits[1:]]
        if others:
            headline += " Also at the limit: " + ", ".join(
                f"{s.name} ({util_text(s)})" for s in others
            )
            headline += "."
        # The next limit: the slowest stage (or rate limit) not already at the limit.
        rest = [(s, _capacity(s)) for s in measured if s not in limits]
        known = [(s, c) for s, c in rest if c is not None and c > 0]
        nxt = min(known, key=lambda x: x[1], default=None)
        gain: float | None = None
        if b.throughput and nxt is not None:
            gain = nxt[1] / b.throughput
        cpu_bound = [s for s in limits if _cpu_bound(s, process_cpu)]
        for s in cpu_bound:
            used = (s.cpu_seconds or 0.0) / (s.seconds or 1.0)
            of_process = (
                f", {fmt_pct((s.cpu_seconds or 0.0) / process_cpu)} of the CPU the process got"
                if process_cpu
                else ""
            )
            advice.append(
                f"{s.name} is CPU-bound: its threads ran Python on {used:.2f} CPU cores"
                f"{of_process}: the GIL runs one thread at a time, so more threads will "
                'not help; run it with run_in="process" (or make the work release the GIL).'
            )
        sized: list[str] = []
        sizes: dict[str, int] = {}
        target_rate = nxt[1] if nxt is not None else None
        far = rate is not None and rate > 0 and (target_rate is None or target_rate > FAR * rate)
        if far and rate:
            # Nothing else is near: the gain is bounded by the source, which a run fed
            # as fast as possible does not measure. Size for twice today's rate.
            target_rate = 2 * rate
        for s in limits:
            w = s.per_item
            if not w:
                continue
            if s in cpu_bound:
                continue
            if target_rate is not None:
                need = workers_needed(target_rate * w, target)
            else:
                need = workers_needed(s.load or 0.0, target)
            top = _max_workers(s)
            extra = f" (its max is {top})" if top is not None and need > top else ""
            sized.append(f"{_plural(need, 'worker')} for {s.name}{extra}")
            sizes[s.name] = need
        if far and rate and sized:
            nothing = f"no other stage limits below {FAR:g}x today's rate" + (
                f" (next: {nxt[0].name} at {fmt_rate(nxt[1])})" if nxt is not None else ""
            )
            fixing = " and ".join(s.name for s in limits)
            most = _predicted(limits, sizes, nxt[1] if nxt is not None else None)
            upto = f" (up to {fmt_rate(most)} with every worker busy)" if most else ""
            advice.append(
                f"Fixing {fixing} pays: {nothing}. For twice today's rate "
                f"({fmt_rate(2 * rate)}) at {fmt_pct(target)} utilisation: {', '.join(sized)}"
                f"{upto}; for another rate, pipeflow size --rate R --latency W."
            )
        elif target_rate is not None and nxt is not None and rate:
            if gain is not None and gain < 1.15 and not others:
                advice.append(
                    f"Fixing {b.name} alone gains little ({gain:.2f}x at most): "
                    f"{nxt[0].name} limits next at {fmt_rate(nxt[1])}."
                )
            elif sized:
                advice.append(
                    f"At {fmt_pct(target)} utilisation, {', '.join(sized)} would keep up "
                    f"with the next limit, {nxt[0].name} at {fmt_rate(nxt[1])} "
                    f"({nxt[1] / rate:.2f}x today's {fmt_rate(rate)})."
                )
        elif sized:
            advice.append(
                f"At {fmt_pct(target)} utilisation this rate needs {', '.join(sized)}; "
                "for more, size for the rate you want (pipeflow size --rate R --latency W)."
            )
        if sized:
            ws = ", ".join(
                f"{s.name} {fmt_duration(s.per_item or 0.0)}/item at "
                f"{fmt_rate(s.throughput or 0.0)}"
                for s in limits
                if s not in cpu_bound and s.per_item
            )
            assumptions.append(f"each item keeps taking the W measured ({ws}) under more load")
            if target_rate is not None:
                assumptions.append(f"the source can offer {fmt_rate(target_rate)}")
            for s in limits:
                batch = s.options.get("batch")
                if batch and s.duration_mean and s.per_item:
                    per_call = s.duration_mean / s.per_item
                    assumptions.append(
                        f"{s.name}'s batches stay as full as measured "
                        f"({per_call:.3g} items per call of {fmt_duration(s.duration_mean)})"
                    )
            if gil or any((s.cpu_share or 0.0) >= 0.3 for s in limits):
                assumptions.append("the GIL is not what stretches W")
        for s in limits:
            if s.name in autoscale:
                advice.append(autoscale[s.name])
        advice += _held(whole_stages)
        return Verdict(
            kind="stage",
            stage=b.name,
            rate=rate,
            limits=tuple(s.name for s in limits),
            gain=gain,
            headline=headline,
            advice=tuple(advice),
            assumptions=tuple(assumptions),
            window=window,
            sizes=sizes,
            predicted=_predicted(limits, sizes, nxt[1] if nxt is not None else None),
        )

    busiest = max(measured, key=lambda s: s.utilisation or 0.0)
    calm = (
        f"no stage is {fmt_pct(LIMIT_UTILISATION)} busy (busiest: {busiest.name}, "
        f"{util_text(busiest)})"
    )
    throttled = sorted(
        (s for s in measured if (s.throttled_fraction or 0.0) >= THROTTLED_LIMIT),
        key=lambda s: -(s.throttled_fraction or 0.0),
    )
    if throttled:
        s = throttled[0]
        share = fmt_pct(s.throttled_fraction or 0.0)
        waited = fmt_duration(s.throttled_seconds or 0.0)
        option = s.options.get("rate")
        limit = float(option) if isinstance(option, int | float) else None
        by_rate = limit is not None and (s.throughput or 0.0) >= 0.9 * limit
        if by_rate or not s.options.get("breaker"):
            setting = f" (rate={limit:g}/s)" if limit is not None else ""
            headline = (
                f"The rate limit of {s.name}{setting} limits the rate{when}: "
                f"{fmt_rate(s.throughput or 0.0)}, its workers waited {waited} for tokens "
                f"({share} of their time); {calm}."
            )
            advice.append(
                "More workers will not go faster: raise rate= if the service behind it allows."
            )
            kind = "rate_limit"
        else:
            state = f" (now {s.breaker_state})" if s.breaker_state else ""
            headline = (
                f"The circuit breaker of {s.name} limits the rate{when}: it held its workers "
                f"{waited} ({share} of their time){state}; {calm}."
            )
            advice.append(
                f"What {s.name} calls is failing or refusing: see its failures "
                f"({s.failed or 0}); more workers will not help while the breaker is open."
            )
            kind = "breaker"
        return Verdict(
            kind=kind,
            stage=s.name,
            rate=rate,
            headline=headline,
            advice=tuple(advice),
            window=window,
        )
    blocked = last.blocked_fraction or 0.0
    if blocked >= READER_LIMIT:
        headline = (
            f"The reader of the outputs limits the rate{when}: {last.name} spent "
            f"{fmt_pct(blocked)} of its worker time blocked handing outputs over, at "
            f"{fmt_rate(last.rate_out or rate or 0.0)}; {calm}."
        )
        advice.append(
            "Read faster (stream() and open(outputs=True) readers), or give the outlet a "
            "buffer; more workers in the pipeline will not help."
        )
        return Verdict(
            kind="reader",
            stage=None,
            rate=rate,
            headline=headline,
            advice=tuple(advice),
            window=window,
        )
    first = stages[0]
    offered = first.rate_in if first.rate_in is not None else first.throughput
    headline = f"The source limits the rate{when}: it delivered {fmt_rate(offered or 0.0)}; {calm}."
    return Verdict(
        kind="source",
        stage=None,
        rate=rate,
        headline=headline,
        advice=tuple(advice),
        window=window,
    )


# -- the steady state ---------------------------------------------------------------------

_COUNTERS = (
    "done",
    "failed",
    "busy_seconds",
    "blocked_seconds",
    "throttled_seconds",
    "cpu_seconds",
    "worker_seconds",
)


@attrs.frozen(kw_only=True)
class Window:
    """The intervals of a report's time series that show the steady state: after
    ramp-up (and after autoscaled pools settled), without outages and the final drain.

    ``deltas`` maps a stage to its counters' increase over those intervals;
    ``seconds`` is their total length; ``autoscale`` a sentence per autoscaled stage.
    """

    start: float
    end: float
    seconds: float
    excluded: float
    deltas: Mapping[str, Mapping[str, float]]
    autoscale: Mapping[str, str]
    process_cpu: float | None = None

    @property
    def label(self) -> str:
        text = f"steady state {self.start:.1f}-{self.end:.1f} s"
        if self.excluded > 0:
            text += f", {fmt_duration(self.excluded)} of outages left out"
        return text


def _column(columns: Mapping[str, Any], field: str, n: int) -> list[float] | None:
    col = columns.get(field)
    if not isinstance(col, list) or len(col) != n:
        return None
    return [float(v) if isinstance(v, int | float) else 0.0 for v in col]


def steady_window(
    series: Mapping[str, Any] | None,
    order: Sequence[str],
    autoscaled: Mapping[str, tuple[int, int]],
    min_interval: float = 0.0,
) -> Window | None:
    """The steady state of a run from its time series, or None when the series is too
    short (or too old a report) to tell.

    An interval is steady when the pipeline's rate (items the last stage finished per
    second) is at least half its 90th percentile: that leaves out ramp-up, outages (a
    held breaker, a stalled dependency) and the drain at the end. Intervals before every
    autoscaled pool settled (stayed within 10% of the size it had at the end of the
    steady state) are left out too.
    """
    if not series or not order:
        return None
    t = series.get("t")
    stages = series.get("stages")
    if not isinstance(t, list) or not isinstance(stages, Mapping) or len(t) < 3:
        return None
    n = len(t)
    times = [float(x) for x in t]
    cols: dict[str, dict[str, list[float]]] = {}
    for name in order:
        columns = stages.get(name)
        if not isinstance(columns, Mapping):
            return None
        got = {f: _column(columns, f, n) for f in (*_COUNTERS, "workers")}
        if any(v is None for v in got.values()):
            return None
        cols[name] = {f: v for f, v in got.items() if v is not None}
    # Busy time is counted when a call ends: intervals much shorter than a call would
    # read 0% and 200% in turn. Keep samples at least min_interval apart.
    keep: list[int] = []
    last_t = 0.0
    for i, ti in enumerate(times):
        if ti - last_t >= min_interval - 1e-9 or i == n - 1:
            keep.append(i)
            last_t = ti
    if len(keep) < 3:
        return None
    cpu = series.get("process_cpu")
    process = (
        [float(cpu[i]) for i in keep]
        if isinstance(cpu, list) and len(cpu) == n and all(isinstance(v, int | float) for v in cpu)
        else None
    )
    times = [times[i] for i in keep]
    cols = {name: {f: [v[i] for i in keep] for f, v in c.items()} for name, c in cols.items()}
    n = len(times)
    last = cols[order[-1]]["done"]
    rates: list[float] = []
    prev_t, prev_done = 0.0, 0.0
    for i in range(n):
        dt = times[i] - prev_t
        rates.append((last[i] - prev_done) / dt if dt > 0 else 0.0)
        prev_t, prev_done = times[i], last[i]
    ranked = sorted(rates)
    p90 = ranked[min(n - 1, int(0.9 * n))]
    if p90 <= 0:
        return None
    gaps = [times[i] - (times[i - 1] if i > 0 else 0.0) for i in range(n)]
    typical = sorted(gaps)[n // 2]
    # A short last interval (the run ended just after a sample) is too short to judge.
    short = [g < 0.5 * typical for g in gaps]
    steady = [r >= 0.5 * p90 and not s for r, s in zip(rates, short, strict=True)]
    if not any(steady):
        return None
    first = steady.index(True)
    end = n - 1 - steady[::-1].index(True)
    sentences: dict[str, str] = {}
    for name, (low, high) in autoscaled.items():
        workers = cols.get(name, {}).get("workers")
        if not workers:
            continue
        # Settled: the pool size most of the steady part's second half had.
        half = [workers[i] for i in range(first, end + 1) if steady[i]]
        half = sorted(half[len(half) // 2 :])
        settled = half[len(half) // 2] if half else workers[end]
        margin = max(1.0, 0.1 * settled)
        since = next((i for i in range(end + 1) if abs(workers[i] - settled) <= margin), end)
        first = max(first, min(since + 1, end))
        peak = max(workers[: end + 1])
        at = times[since]
        text = (
            f"{name} (autoscaled {low}..{high}) settled at {_plural(round(settled), 'worker')} "
            f"after {at:.1f} s"
        )
        if peak >= high:
            hit = times[workers.index(peak)]
            text += f"; it hit its max of {high} at {hit:.1f} s: raise the max if it limits"
        else:
            text += f"; it never reached its max of {high}"
        sentences[name] = text + "."
    included = [i for i in range(first, end + 1) if steady[i]]
    if len(included) < 2:
        return None
    seconds = 0.0
    excluded = 0.0
    process_cpu = 0.0
    deltas: dict[str, dict[str, float]] = {name: dict.fromkeys(_COUNTERS, 0.0) for name in order}
    for i in range(first, end + 1):
        dt = times[i] - (times[i - 1] if i > 0 else 0.0)
        if not steady[i]:
            excluded += 0.0 if short[i] else dt
            continue
        seconds += dt
        if process is not None:
            process_cpu += process[i] - (process[i - 1] if i > 0 else 0.0)
        for name in order:
            c = cols[name]
            for f in _COUNTERS:
                deltas[name][f] += c[f][i] - (c[f][i - 1] if i > 0 else 0.0)
    start = times[first - 1] if first > 0 else 0.0
    return Window(
        start=start,
        end=times[end],
        seconds=seconds,
        excluded=excluded,
        deltas=deltas,
        autoscale=sentences,
        process_cpu=process_cpu if process is not None else None,
    )
