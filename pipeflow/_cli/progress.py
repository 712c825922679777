"""The live progress view of ``run`` and ``demo``, and pipeflow's log lines above it."""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Mapping
from typing import TextIO

from .._report import Series, fmt_count, fmt_rate
from .._stats import StageStats, find_bottleneck
from .errors import one_line
from .graph import stdout_unicode


class Progress:
    """The live view on a terminal, plain periodic lines elsewhere, nothing if quiet."""

    LINE_EVERY = 5.0

    def __init__(self, out: TextIO, *, mode: str, title: str) -> None:
        self.out = out
        self.mode = mode  # "live", "lines" or "off"
        self.title = title
        self._drawn = 0
        self._lines: list[str] = []
        self._next_line = self.LINE_EVERY
        self._bar_full, self._bar_empty = ("█", "░") if stdout_unicode() else ("#", ".")

    def update(self, t: float, stats: Mapping[str, StageStats], series: Series) -> None:
        if self.mode == "live":
            self._lines = self._view(t, stats, series)
            self._draw()
        elif self.mode == "lines" and t >= self._next_line - 1e-9:
            self._next_line += self.LINE_EVERY
            self.out.write(self._plain(t, stats) + "\n")
            self.out.flush()

    def _done(self, stats: Mapping[str, StageStats]) -> int:
        last = list(stats.values())[-1]
        return last.ok + last.filtered + last.failed

    def _view(self, t: float, stats: Mapping[str, StageStats], series: Series) -> list[str]:
        done = self._done(stats)
        rate = done / t if t > 0 else 0.0
        head = f"{self.title} · {t:.1f} s · {fmt_count(done)} done · {fmt_rate(rate)}"
        width = max(len(n) for n in stats)
        bottleneck = find_bottleneck(stats)
        lines = [head]
        for name, s in stats.items():
            n = max(s.workers, 1)
            filled = round(12 * min(s.busy_workers / n, 1.0))
            bar = self._bar_full * filled + self._bar_empty * (12 - filled)
            recent = series.latest(name, "throughput")
            r = recent if recent is not None else s.throughput
            busy = f"{s.busy_workers}/{s.workers}"
            line = (
                f"  {name:<{width}} {bar} {busy:>5} busy · queue {s.queue_depth} · "
                f"out {fmt_count(s.items_out)} · {fmt_rate(r)}"
            )
            if s.failed:
                line += f" · failed {fmt_count(s.failed)}"
            if name == bottleneck:
                line += " ◀ busiest" if self._bar_full == "█" else " <- busiest"
            lines.append(line)
        return lines

    def _plain(self, t: float, stats: Mapping[str, StageStats]) -> str:
        done = self._done(stats)
        parts = [f"[{t:6.1f}s] {fmt_count(done)} done ({fmt_rate(done / t if t > 0 else 0)})"]
        for name, s in stats.items():
            parts.append(f"{name} {s.busy_workers}/{s.workers} busy, queue {s.queue_depth}")
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
