"""What a connector author implements: an acking source.

Most sources are plain iterables, async iterables or Trio receive channels, and need
nothing from this module. A source that must know when each item is *done* (a message
queue that acks, such as Redis Streams in :mod:`pipeflow.connectors.redis`) implements
:class:`AckingSource`: the pipeline opens it with the number of items the run can hold,
and gets ``(item, ack)`` pairs; pipeflow calls ``ack.done()`` once the item has left
the pipeline (through the outlet, filtered, skipped, collected or dead-lettered), and
``ack.add(n)`` when the item became ``n + 1`` items (a flat-map's children, or an
``errors="embed"`` failure that goes on *and* to a dead-letter sink). A fail-fast
failure, and a stop that takes the item from a worker or a queue (it is then listed in
``RunResult.unfinished``), never call ``done()``: the source must deliver such items
again (at-least-once).

A minimal acking source::

    import contextlib

    class ListSource:
        def __init__(self, items):
            self.items = items
            self.acked = []

        @contextlib.asynccontextmanager
        async def __pipeflow_open__(self, *, capacity):
            async def pairs():
                for item in self.items:
                    yield item, ItemAck(self.acked, item)

            yield pairs()

    class ItemAck:
        def __init__(self, acked, item):
            self.acked, self.item, self.pending = acked, item, 1

        def add(self, n):
            self.pending += n

        def done(self):
            self.pending -= 1
            if self.pending == 0:
                self.acked.append(self.item)

A source should keep no more than ``capacity`` items un-acked at once: with that many,
the run is full and no ack can come until it takes more (backpressure across machines).

A source that reads items in pages (a message queue) may also give its iterator an
``async def __pipeflow_take__(self, limit)`` returning up to ``limit`` pairs (waiting
for the first; ``[]`` at the end): the run then takes them a chunk at a time instead of
one ``__anext__`` per item, which costs less per item. ``limit`` is the room in front of
the first stage, whose buffer holds at least 64 items after an acking source (unless
the stage sets ``buffer=``), and ``capacity`` counts them.

An ack class may also offer a static ``__pipeflow_done_all__(acks)`` that does what
``done()`` on each of ``acks`` would, in one call (its own acks settled together, any
other ack in the list by its ``done()``): the run then settles a batch's items with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from ._run.envelope import Ack as Ack

__all__ = ["Ack", "AckingSource"]


@runtime_checkable
class AckingSource(Protocol):
    """A source whose items are acked once done: see the module's documentation."""

    def __pipeflow_open__(
        self, *, capacity: int
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[tuple[Any, Ack | None]]]:
        """Open the source for one run that holds at most ``capacity`` items at once;
        the context manager yields an async iterator of ``(item, ack)`` pairs, and is
        left once every item it gave has been acked or the run has stopped."""
        ...
