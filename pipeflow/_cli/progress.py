"""The live progress view of ``run`` and ``demo``, and pipeflow's log lines above it."""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from .._report import Series, fmt_count, fmt_duration, fmt_rate
from .._report.verdict import LIMIT_UTILISATION
from .._stats import StageStats
from .errors import one_line
from .graph import stdout_unicode

if TYPE_CHECKING:
    from .. import WorkerStatus

_STALL_FIELDS = ("stage", "worker", "item", "seconds", "stall_after")


class Progress:
    """The live view on a terminal, plain periodic lines elsewhere, nothing if quiet."""

    LINE_EVERY = 5.0
    #: Seconds the live figures average over.
    WINDOW = 3.0
    #: Stalled workers listed under the stages, at most.
    STALLED_ROWS = 5

    def __init__(self, out: TextIO, *, mode: str, title: str) -> None:
        self.out = out
        self.mode = mode  # "live", "lines" or "off"
        self.title = title
        self._drawn = 0
        self._history: list[tuple[float, dict[str, tuple[float, float, float]]]] = []
        self._lines: list[str] = []
        self._next_line = self.LINE_EVERY
        self._bar_full, self._bar_empty = ("█", "░") if stdout_unicode() else ("#", ".")
        self._stalled: dict[tuple[str, int, str | None], WorkerStatus] = {}

    def stalls(self) -> list[dict[str, Any]]:
        """Every stalled item seen, with the longest time it was seen in its worker:
        the report's ``stalls``."""
        return [
            {k: v for k, v in w.to_dict().items() if k in _STALL_FIELDS}
            for w in self._stalled.values()
        ]

    def update(
        self,
        t: float,
        stats: Mapping[str, StageStats],
        series: Series,
        workers: Sequence[WorkerStatus] | None = None,
    ) -> None:
        self._record(t, stats)
        for w in workers or ():
            if w.stalled:
                # The longest each stalled item was seen in its worker, for the report.
                self._stalled[(w.stage, w.worker, w.item)] = w
        if self.mode == "live":
            self._lines = self._view(t, stats, series) + self._stalls(workers or ())
            self._draw()
        elif self.mode == "lines" and t >= self._next_line - 1e-9:
            self._next_line += self.LINE_EVERY
            self.out.write(self._plain(t, stats) + "\n")
            self.out.flush()

    def _done(self, stats: Mapping[str, StageStats]) -> int:
        last = list(stats.values())[-1]
        return last.ok + last.filtered + last.failed

    def _record(self, t: float, stats: Mapping[str, StageStats]) -> None:
        # Worker-seconds alive so far: mean_workers is averaged over the run's elapsed
        # time, which t (taken by the watcher) follows within a tick.
        now = {
            n: (s.busy_seconds, s.throttled_seconds, s.mean_workers * t) for n, s in stats.items()
        }
        self._history.append((t, now))
        while len(self._history) > 2 and self._history[1][0] <= t - self.WINDOW:
            self._history.pop(0)

    def _window(self, t: float, stats: Mapping[str, StageStats]) -> dict[str, tuple[float, ...]]:
        """Per stage over the last few seconds: workers busy on average (throttled waits
        are not busy time), workers throttled on average, and utilisation (busy over the
        workers alive on average then: a pool that shrinks as the run drains is not
        "at the limit")."""
        t0, then = self._history[0] if self._history else (t, {})
        dt = t - t0
        out: dict[str, tuple[float, ...]] = {}
        for name, s in stats.items():
            busy0, thr0, alive0 = then.get(name, (0.0, 0.0, 0.0))
            pool = float(max(s.workers, 1))
            if dt > 0:
                busy = (s.busy_seconds - busy0) / dt
                throttled = (s.throttled_seconds - thr0) / dt
                alive = (s.mean_workers * t - alive0) / dt
                pool = max(alive, 1.0) if alive > 0 else pool
            else:
                busy, throttled = 0.0, 0.0
            # A call's busy time is counted when it ends: clamp to the pool.
            busy = min(busy, pool)
            out[name] = (busy, throttled, busy / pool)
        return out

    def _view(self, t: float, stats: Mapping[str, StageStats], series: Series) -> list[str]:
        done = self._done(stats)
        rate = done / t if t > 0 else 0.0
        head = f"{self.title} · {t:.1f} s · {fmt_count(done)} items done · {fmt_rate(rate)}"
        width = max(len(n) for n in stats)
        window = self._window(t, stats)
        lines = [head]
        for name, s in stats.items():
            busy, throttled, util = window[name]
            filled = round(12 * min(util, 1.0))
            bar = self._bar_full * filled + self._bar_empty * (12 - filled)
            recent = series.latest(name, "throughput")
            r = recent if recent is not None else s.throughput
            line = (
                f"  {name:<{width}} {bar} {busy:4.1f}/{s.workers} busy · queue {s.queue_depth} · "
                f"done {fmt_count(s.ok + s.filtered + s.failed)} · {fmt_rate(r)}"
            )
            if throttled >= 0.05:
                line += f" · {throttled:.1f} throttled"
            if s.failed:
                line += f" · failed {fmt_count(s.failed)}"
            if util >= LIMIT_UTILISATION:
                line += " ◀ at the limit" if self._bar_full == "█" else " <- at the limit"
            lines.append(line)
        return lines

    def _stalls(self, workers: Sequence[WorkerStatus]) -> list[str]:
        """A line per stalled worker (at most :data:`STALLED_ROWS`), under the stages."""
        stalled = sorted((w for w in workers if w.stalled), key=lambda w: -w.seconds)
        mark = "⚠" if self._bar_full == "█" else "!"
        lines = [
            f"  {mark} {w.stage}[{w.worker}] on {w.item} for {fmt_duration(w.seconds)}: "
            f"stalled (stall_after {fmt_duration(w.stall_after)})"
            for w in stalled[: self.STALLED_ROWS]
        ]
        if len(stalled) > self.STALLED_ROWS:
            lines.append(f"  {mark} … and {len(stalled) - self.STALLED_ROWS} more stalled")
        return lines

    def _plain(self, t: float, stats: Mapping[str, StageStats]) -> str:
        done = self._done(stats)
        parts = [f"[{t:6.1f}s] {fmt_count(done)} done ({fmt_rate(done / t if t > 0 else 0)})"]
        window = self._window(t, stats)
        for name, s in stats.items():
            busy = window[name][0]
            parts.append(f"{name} {busy:.1f}/{s.workers} busy, queue {s.queue_depth}")
        return " | ".join(parts)

    def _draw(self) -> None:
        cols = shutil.get_terminal_size().columns
        buf = []
        if self._drawn:
            buf.append(f"\x1b[{self._drawn}F")
        else:
            buf.append("\x1b[?25l")  # hide the cursor while the view is live
        for line in self._lines:
            buf.append("\x1b[2K" + line[: cols - 1] + "\n")
        buf.append("\x1b[J")
        self._drawn = len(self._lines)
        self.out.write("".join(buf))
        self.out.flush()

    def clear(self) -> None:
        """Erase the live view (before a log line is printed above it)."""
        if self.mode == "live" and self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self.out.flush()
            self._drawn = 0

    def redraw(self) -> None:
        if self.mode == "live" and self._lines:
            self._draw()

    def close(self) -> None:
        if self.mode == "live":
            self.clear()
            self.out.write("\x1b[?25h")
            self.out.flush()


class LogHandler(logging.Handler):
    """pipeflow's events on stderr, printed above the live view."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = f"{record.levelname.lower()}: {one_line(record.getMessage())}\n"
            self.progress.clear()
            sys.stderr.write(line)
            sys.stderr.flush()
            self.progress.redraw()
        except Exception:
            self.handleError(record)
