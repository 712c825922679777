"""What a pipeline knows of the acking sources its runs read (Redis Streams), for metrics.

A source that has ``name`` and ``statistics()`` (returning ``acked``, ``reclaimed``,
``reconnects`` and ``pending``, plain numbers) is noted by the pipeline when a run
starts reading it; the metrics module reads the ledger at scrape time. Nothing here
imports Prometheus, and nothing runs per item.
"""

from __future__ import annotations

import threading
from typing import Any

import attrs

__all__ = ["SourceLedger", "SourceTotals"]

#: Source objects kept per name; older ones are folded into the totals (their counters
#: no longer move: a source object is read by one run at a time, in practice).
_KEEP = 8


@attrs.frozen(kw_only=True)
class SourceTotals:
    """One source name's figures: counters over every run so far, and pending now."""

    acked: int = 0
    reclaimed: int = 0
    reconnects: int = 0
    pending: int = 0

    def plus(self, stats: Any) -> SourceTotals:
        return SourceTotals(
            acked=self.acked + int(stats.acked),
            reclaimed=self.reclaimed + int(stats.reclaimed),
            reconnects=self.reconnects + int(stats.reconnects),
            pending=self.pending + int(stats.pending),
        )


def is_acking(source: object) -> bool:
    """Whether ``source`` is an acking source (it implements ``__pipeflow_open__``: see
    :class:`pipeflow.abc.AckingSource`)."""
    return hasattr(source, "__pipeflow_open__")


def has_statistics(source: object) -> bool:
    return is_acking(source) and callable(getattr(source, "statistics", None))


class SourceLedger:
    """The acking sources a pipeline's runs have read, by name (thread-safe: a scrape
    may come from another thread)."""

    def __init__(self) -> None:
        self._sources: dict[str, list[Any]] = {}
        self._retired: dict[str, SourceTotals] = {}
        self._lock = threading.Lock()

    def note(self, source: object) -> None:
        """A run is about to read ``source`` (ignored unless it has statistics)."""
        if not has_statistics(source):
            return
        name = str(getattr(source, "name", type(source).__name__))
        with self._lock:
            kept = self._sources.setdefault(name, [])
            if any(s is source for s in kept):
                return
            kept.append(source)
            while len(kept) > _KEEP:
                old = kept.pop(0)
                counters = attrs.evolve(SourceTotals().plus(old.statistics()), pending=0)
                self._retired[name] = self._retired.get(name, SourceTotals()).plus(counters)

    def totals(self) -> dict[str, SourceTotals]:
        """Each source name's figures now."""
        with self._lock:
            out: dict[str, SourceTotals] = {}
            for name, kept in self._sources.items():
                total = self._retired.get(name, SourceTotals())
                for source in kept:
                    total = total.plus(source.statistics())
                out[name] = total
            return out
