"""Per-stage statistics: plain counters on the hot path, frozen snapshots for readers.

Workers only add to attributes of a :class:`StageCounters`; everything else (the run
report, Prometheus, the CLI) reads :class:`StageStats` snapshots built on demand. All
times are on Trio's clock, so a run under ``MockClock`` gives exact figures.

Durations and queue waits go into a fixed log-spaced histogram (about 15 buckets per
decade from 1 µs to 1000 s): bounded memory, a p99 within a few percent, and bucket
bounds that include Prometheus' usual 1 ms .. 10 s buckets so metrics export exactly.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping

import attrs

from .sizing import HIGH_UTILISATION, TARGET_UTILISATION, workers_needed
from .sizing import utilisation as _utilisation

_MANTISSAS = (1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 7.5, 8.0, 9.0)
#: Upper bounds (inclusive) of the histogram buckets; a last bucket takes the rest.
BOUNDS: tuple[float, ...] = (
    *(float(f"{m}e{e}") for e in range(-6, 3) for m in _MANTISSAS),
    1000.0,
)


class Histogram:
    """Counts of observations per bucket of :data:`BOUNDS`, with sum, min and max."""

    __slots__ = ("counts", "max", "min", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)
        self.sum = 0.0
        self.min = math.inf
        self.max = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BOUNDS, value)] += 1
        self.sum += value
        if value > self.max:
            self.max = value
        if value < self.min:
            self.min = value

    def observe_many(self, value: float, n: int) -> None:
        """``n`` observations of ``value`` at the cost of one: the runner observes a
        chunk of items with their mean duration."""
        self.counts[bisect_left(BOUNDS, value)] += n
        self.sum += value * n
        if value > self.max:
            self.max = value
        if value < self.min:
            self.min = value

    @property
    def count(self) -> int:
        """Observations so far (counted from the buckets when read: a worker records
        every item it finishes, and one addition less there is worth a sum here)."""
        return sum(self.counts)

    @property
    def mean(self) -> float:
        count = self.count
        return self.sum / count if count else 0.0

    def quantile(self, q: float) -> float:
        """An estimate of the q-quantile, interpolated inside its bucket, clamped to the
        observed min and max (so a constant duration comes back exactly)."""
        count = self.count
        if not count:
            return 0.0
        rank = q * count
        seen = 0
        for i, n in enumerate(self.counts):
            if n and seen + n >= rank:
                lo = BOUNDS[i - 1] if i > 0 else 0.0
                hi = BOUNDS[i] if i < len(BOUNDS) else self.max
                estimate = lo + (hi - lo) * ((rank - seen) / n)
                return min(max(estimate, self.min), self.max)
            seen += n
        return self.max

    def cumulative(self, bounds: tuple[float, ...]) -> list[tuple[float, int]]:
        """Cumulative counts at each of ``bounds`` (each must be one of :data:`BOUNDS`),
        plus +Inf: the shape of a Prometheus histogram."""
        out: list[tuple[float, int]] = []
        running = 0
        i = 0
        for b in bounds:
            j = BOUNDS.index(b) + 1
            running += sum(self.counts[i:j])
            i = j
            out.append((b, running))
        out.append((math.inf, self.count))
        return out


class StageCounters:
    """Mutable statistics of one stage during one run. Workers update them in place."""

    __slots__ = (
        "blocked_time",
        "busy_time",
        "busy_workers",
        "cancelled",
        "cpu_time",
        "dropped",
        "durations",
        "failed",
        "filtered",
        "inflight",
        "items_in",
        "items_out",
        "name",
        "ok",
        "passed",
        "retried",
        "throttled_time",
        "waits",
        "worker_time",
        "workers",
        "workers_peak",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.items_in = 0
        self.items_out = 0
        self.ok = 0
        self.failed = 0
        self.retried = 0
        self.dropped = 0
        self.filtered = 0
        self.cancelled = 0  # taken from a worker or a queue by a stop
        self.passed = 0  # Failed values from upstream, forwarded untouched
        self.inflight = 0
        self.busy_workers = 0
        self.workers = 0
        self.workers_peak = 0
        self.busy_time = 0.0
        self.blocked_time = 0.0
        self.throttled_time = 0.0  # waiting for a rate-limit token or a held breaker
        self.cpu_time = 0.0  # CPU seconds of thread-stage calls, in their threads
        # Sum of worker lifetimes: each worker subtracts its start time and adds its end
        # time, so "worker_time + workers * now" is exact at any moment, autoscaling or not.
        self.worker_time = 0.0
        self.durations = Histogram()
        self.waits = Histogram()

    def snapshot(
        self,
        now: float,
        elapsed: float,
        *,
        queue_depth: int = 0,
        breaker_state: str | None = None,
        oldest_inflight: float = 0.0,
        target_utilisation: float = TARGET_UTILISATION,
        final: bool = False,
    ) -> StageStats:
        worker_seconds = self.worker_time + self.workers * now
        done = self.ok + self.filtered + self.failed
        throughput = done / elapsed if elapsed > 0 else 0.0
        mean = self.durations.mean
        mean_workers = worker_seconds / elapsed if elapsed > 0 else float(self.workers)
        busy_fraction = self.busy_time / worker_seconds if worker_seconds > 0 else 0.0
        # Little's Law: L = λW, the workers busy on average. Measured as busy time over
        # elapsed time, which is λW counted in calls: right for batches too, whose λ in
        # items would overstate L by the batch size.
        load = self.busy_time / elapsed if elapsed > 0 else 0.0
        utilisation = _utilisation(load, mean_workers)
        recommended = workers_needed(load, target_utilisation) if done else 1
        return StageStats(
            name=self.name,
            items_in=self.items_in,
            items_out=self.items_out,
            ok=self.ok,
            failed=self.failed,
            retried=self.retried,
            dropped=self.dropped,
            filtered=self.filtered,
            cancelled=self.cancelled,
            passed=self.passed,
            inflight=self.inflight,
            queue_depth=queue_depth,
            workers=self.workers_peak if final else self.workers,
            busy_workers=self.busy_workers,
            mean_workers=mean_workers,
            duration_mean=mean,
            duration_p50=self.durations.quantile(0.5),
            duration_p99=self.durations.quantile(0.99),
            duration_max=self.durations.max,
            queue_wait_mean=self.waits.mean,
            queue_wait_p99=self.waits.quantile(0.99),
            busy_seconds=self.busy_time,
            busy_fraction=busy_fraction,
            blocked_seconds=self.blocked_time,
            throttled_seconds=self.throttled_time,
            cpu_seconds=self.cpu_time,
            throughput=throughput,
            load=load,
            utilisation=utilisation,
            recommended_workers=recommended,
            breaker_state=breaker_state,
            oldest_inflight_seconds=oldest_inflight,
        )


@attrs.frozen(kw_only=True)
class StageStats:
    """A frozen snapshot of one stage's statistics.

    Counts: ``items_in`` = ``ok`` + ``filtered`` + ``failed`` + ``dropped`` +
    ``cancelled`` (+ ``inflight`` while running), where ``cancelled`` counts the items a
    stop (fail-fast, a signal past its grace period, a cancellation, leaving ``stream()``
    or ``open()`` early) took from a worker or from the queue in front of the stage;
    ``items_out`` counts outputs emitted (a flat-mapping stage can emit
    more or fewer than it takes); ``retried`` counts retry attempts; ``passed`` counts
    :class:`~pipeflow.Failed` values from earlier stages forwarded untouched.

    Little's Law, from measured data: ``throughput`` λ (items finished per second),
    ``duration_mean`` W, ``load`` L = λW (workers busy on average), ``utilisation`` L/N,
    and ``recommended_workers`` = ⌈L / 0.7⌉, the pool size that runs this rate at 70%.
    ``workers`` is the current pool size while running, the largest it reached once the
    run is over. ``blocked_seconds`` is time workers spent waiting to hand outputs downstream:
    backpressure from a slower stage after this one. ``throttled_seconds`` is time
    spent waiting for a ``rate=`` token or a held circuit breaker; it is not counted as
    busy time nor in the durations, so a rate-limited stage is not mistaken for the
    bottleneck. ``cpu_seconds`` is CPU time spent in the calls of a plain-function stage
    run in threads, measured in those threads (0 for other stages): near
    ``busy_seconds``, the work is CPU-bound and the GIL lets one thread run it at a time.
    """

    name: str
    items_in: int
    items_out: int
    ok: int
    failed: int
    retried: int
    dropped: int
    filtered: int
    passed: int
    cancelled: int = 0
    inflight: int
    queue_depth: int
    workers: int
    busy_workers: int
    mean_workers: float
    duration_mean: float
    duration_p50: float
    duration_p99: float
    duration_max: float
    queue_wait_mean: float
    queue_wait_p99: float
    busy_seconds: float
    busy_fraction: float
    blocked_seconds: float
    throttled_seconds: float
    throughput: float
    load: float
    utilisation: float
    recommended_workers: int
    breaker_state: str | None = None
    #: Seconds the oldest item now in one of the stage's workers has been there: a stall
    #: shows as a number that keeps growing (0 when no item is in a worker).
    oldest_inflight_seconds: float = 0.0
    cpu_seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


_SEVERITY = {None: 0, "closed": 0, "half_open": 1, "open": 2}


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


@attrs.frozen(kw_only=True)
class StageSample:
    """One stage's figures for an exporter (Prometheus; yours for StatsD or a log line),
    from :meth:`Pipeline.samples`.

    The counts and times only go up over the pipeline's life: they add the finished runs
    to the runs in progress. ``duration_counts`` and ``wait_counts`` are histogram
    counts per bucket (log-spaced upper bounds from 1 µs to 1000 s, about 15 a decade,
    then one bucket for the rest), with their sums in seconds. The rest are gauges, now:
    summed over the runs in progress (``oldest_inflight_seconds`` the largest,
    ``breaker_state`` the most severe, ``stall_after_seconds`` the smallest, None when
    no run is in progress).
    """

    name: str
    ok: int = 0
    failed: int = 0
    retried: int = 0
    dropped: int = 0
    filtered: int = 0
    cancelled: int = 0
    blocked_seconds: float = 0.0
    throttled_seconds: float = 0.0
    duration_counts: tuple[int, ...] = (0,) * (len(BOUNDS) + 1)
    duration_sum: float = 0.0
    wait_counts: tuple[int, ...] = (0,) * (len(BOUNDS) + 1)
    wait_sum: float = 0.0
    inflight: int = 0
    queue_depth: int = 0
    workers: int = 0
    busy_workers: int = 0
    breaker_state: str | None = None
    oldest_inflight_seconds: float = 0.0
    stalled_workers: int = 0
    stall_after_seconds: float | None = None

    @classmethod
    def of(cls, c: StageCounters, *, throttled_now: float = 0.0, **gauges: object) -> StageSample:
        """The counts of ``c``, with ``gauges`` (live figures) as given; ``throttled_now``:
        the waits for a token or a breaker still going on (added to the counter only
        when they end: a long one would land in one scrape as more time than there was).
        """
        return cls(
            name=c.name,
            ok=c.ok,
            failed=c.failed,
            retried=c.retried,
            dropped=c.dropped,
            filtered=c.filtered,
            cancelled=c.cancelled,
            blocked_seconds=c.blocked_time,
            throttled_seconds=c.throttled_time + throttled_now,
            duration_counts=tuple(c.durations.counts),
            duration_sum=c.durations.sum,
            wait_counts=tuple(c.waits.counts),
            wait_sum=c.waits.sum,
            **gauges,  # type: ignore[arg-type]
        )

    def __add__(self, other: StageSample) -> StageSample:
        """Two runs of one stage (or the finished runs and one in progress) together."""
        limits = [x for x in (self.stall_after_seconds, other.stall_after_seconds) if x is not None]
        breaker = max(self.breaker_state, other.breaker_state, key=_SEVERITY.__getitem__)
        return StageSample(
            name=self.name,
            ok=self.ok + other.ok,
            failed=self.failed + other.failed,
            retried=self.retried + other.retried,
            dropped=self.dropped + other.dropped,
            filtered=self.filtered + other.filtered,
            cancelled=self.cancelled + other.cancelled,
            blocked_seconds=self.blocked_seconds + other.blocked_seconds,
            throttled_seconds=self.throttled_seconds + other.throttled_seconds,
            duration_counts=_add(self.duration_counts, other.duration_counts),
            duration_sum=self.duration_sum + other.duration_sum,
            wait_counts=_add(self.wait_counts, other.wait_counts),
            wait_sum=self.wait_sum + other.wait_sum,
            inflight=self.inflight + other.inflight,
            queue_depth=self.queue_depth + other.queue_depth,
            workers=self.workers + other.workers,
            busy_workers=self.busy_workers + other.busy_workers,
            breaker_state=breaker,
            oldest_inflight_seconds=max(
                self.oldest_inflight_seconds, other.oldest_inflight_seconds
            ),
            stalled_workers=self.stalled_workers + other.stalled_workers,
            stall_after_seconds=min(limits) if limits else None,
        )


def accumulate(totals: StageCounters, run: StageCounters) -> None:
    """Add a finished run's counters into a pipeline's running totals (for metrics,
    whose counters must only go up across runs)."""
    for field in (
        "items_in",
        "items_out",
        "ok",
        "failed",
        "retried",
        "dropped",
        "filtered",
        "cancelled",
    ):
        setattr(totals, field, getattr(totals, field) + getattr(run, field))
    totals.passed += run.passed
    totals.busy_time += run.busy_time
    totals.blocked_time += run.blocked_time
    totals.throttled_time += run.throttled_time
    totals.cpu_time += run.cpu_time
    for mine, theirs in ((totals.durations, run.durations), (totals.waits, run.waits)):
        for i, n in enumerate(theirs.counts):
            mine.counts[i] += n
        mine.sum += theirs.sum
        mine.max = max(mine.max, theirs.max)
        mine.min = min(mine.min, theirs.min)


#: A stage at least this busy (share of its worker time spent working) limits the rate:
#: above 80% utilisation queues grow non-linearly. Sizing aims lower (70%), so a stage
#: sized as advised is not named. Below it, what limits the pipeline is outside its
#: stages (the source, a rate limit or breaker, whoever reads the outputs).
BOTTLENECK_MIN_BUSY = HIGH_UTILISATION


def find_bottleneck(stats: Mapping[str, StageStats]) -> str | None:
    """The stage that limits throughput: the one whose workers are busiest, or None.

    Busy time excludes time blocked sending downstream and time throttled by a rate
    limit or a breaker, so a stage held up by a slow successor is not named; the
    successor is. A stage counts only if its workers are busy at least 80% of the time
    and work more than they wait to hand items on; when no stage does, the pipeline is
    limited by something outside its stages, and no stage is named. (``pipeflow run``
    and ``pipeflow graph`` say which, from the steady state of the run.)
    """
    best: str | None = None
    best_busy = BOTTLENECK_MIN_BUSY - 1e-9
    for name, s in stats.items():
        if s.busy_fraction >= best_busy and s.blocked_seconds <= s.busy_seconds:
            best, best_busy = name, s.busy_fraction
    return best
