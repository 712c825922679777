"""What travels with an item, and how a source learns that an item is done (acks)."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Protocol, cast


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


class KeyedSource(Protocol):
    """A source that acks its items by key (an id): it is told ``finished(key)`` (or
    ``finished_many(keys)``) once an item has wholly left the pipeline, and ``split``
    is set once an item became several (a flat-map), so that it counts their parts.
    Such a source hands its items over with ``_pipeflow_take_keyed(limit)`` -> (items,
    keys), and each item travels in a :class:`KeyedAckEnv`."""

    split: bool

    def finished(self, key: Any) -> None: ...
    def finished_many(self, keys: list[Any]) -> None: ...


class KeyedAckEnv(Env):
    """The envelope of a :class:`KeyedSource`'s item that is also its ack: one object
    per item rather than an envelope and an ack. ``ack`` is the envelope itself until
    the item is done, then ``None`` (so that no reference cycle outlives it); it travels
    on as the outputs' envelope, as any envelope does."""

    __slots__ = ("key", "left", "owner")

    def __init__(self, owner: KeyedSource, item: Any, key: Any) -> None:
        self.item = item
        self.seq = 0
        self.t = 0.0
        self.ack = self
        self.owner = owner
        self.key = key
        self.left = 1

    def add(self, n: int) -> None:
        """The item became ``n + 1`` items (a flat-mapping stage's children)."""
        self.left += n
        self.owner.split = True

    def done(self) -> None:
        """One of them left the pipeline; the last one tells the source."""
        self.left -= 1
        if self.left == 0:
            self.ack = None
            self.owner.finished(self.key)

    @staticmethod
    def __pipeflow_done_all__(acks: Sequence[Ack]) -> None:
        """``done()`` on each of ``acks`` (a batch's items): one source's keys handed
        over together; an ack of another kind by its ``done()``."""
        if set(map(type, acks)) == _KEYED:
            owners = set(map(_owner_of, acks))
            if len(owners) == 1:
                (only,) = owners
                if not only.split:
                    # The usual batch: one source's items, none split into several (so
                    # each is done with its one item), in C-level passes but for the
                    # cycles broken.
                    only.finished_many(list(map(_key_of, acks)))
                    for env in cast("Sequence[KeyedAckEnv]", acks):
                        env.ack = None
                    return
        owner: KeyedSource | None = None
        keys: list[Any] = []
        for ack in acks:
            if type(ack) is not KeyedAckEnv:
                ack.done()
                continue
            ack.left -= 1
            if ack.left == 0:
                ack.ack = None
                if ack.owner is not owner:
                    if owner is not None:
                        owner.finished_many(keys)
                    owner = ack.owner
                    keys = []
                keys.append(ack.key)
        if owner is not None:
            owner.finished_many(keys)


_KEYED = {KeyedAckEnv}
_owner_of = operator.attrgetter("owner")
_key_of = operator.attrgetter("key")


class KeyFailed:
    """An item whose key function raised: routed to a worker to fail there, by policy."""

    __slots__ = ("error", "item")

    def __init__(self, item: Any, error: Exception) -> None:
        self.item = item
        self.error = error
