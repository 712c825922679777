"""What travels with an item, and how a source learns that an item is done (acks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class Ack(Protocol):
    """Completion tracking for sources that must know when an item is done (acks).

    ``add(n)`` says one item became ``n + 1`` (a flat-map's children); ``done()`` says
    one of them has left the pipeline: through the outlet, filtered, skipped, collected
    or dead-lettered. A fail-fast failure, or a stop that takes the item from a worker
    or a queue (it is then *unfinished*), does not call ``done()``.
    """

    def add(self, n: int) -> None: ...
    def done(self) -> None: ...


class CountedAck:
    """One ack that stands for several pending parts, and acks ``inner`` when the last
    part is done: a batch's items (done together once the batch's outputs are done), or
    a source entry's flat-map children."""

    __slots__ = ("inner", "pending")

    def __init__(self, inner: Sequence[Ack]) -> None:
        self.inner = inner
        self.pending = 1

    def add(self, n: int) -> None:
        self.pending += n

    def done(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            done_all(self.inner)


def done_all(acks: Sequence[Ack]) -> None:
    """``done()`` on each of ``acks``: in one call where their class offers one (a static
    ``__pipeflow_done_all__(acks)``, see :mod:`pipeflow.abc`), else one by one."""
    if acks:
        bulk = getattr(type(acks[0]), "__pipeflow_done_all__", None)
        if bulk is not None:
            bulk(acks)
            return
    for ack in acks:
        ack.done()


class Env:
    """An item on its way through the pipeline, with what the runner needs to know."""

    __slots__ = ("ack", "item", "seq", "t")

    def __init__(self, item: Any, ack: Ack | None = None) -> None:
        self.item = item
        self.seq = 0  # position on the edge it travels (stamped by Edge), for ordering
        self.t = 0.0  # when it entered that edge (stamped by Edge), for queue wait
        self.ack = ack

    def weight(self, batched: bool) -> int:
        """How many source items this envelope stands for (a batch counts its items)."""
        return len(self.item) if batched and type(self.item) is list else 1


class KeyFailed:
    """An item whose key function raised: routed to a worker to fail there, by policy."""

    __slots__ = ("error", "item")

    def __init__(self, item: Any, error: Exception) -> None:
        self.item = item
        self.error = error
