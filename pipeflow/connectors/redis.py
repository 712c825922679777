"""Redis Streams: one pipeline as a fleet of processes, with nothing lost.

Every process of the fleet runs the same pipeline over a :class:`RedisStreamSource` with
the same stream and group and its own consumer name; Redis hands each entry to one of
them. An entry is acknowledged (``XACK``) only once its item has left the pipeline —
through the last stage, filtered out, skipped or collected as a failure, or
dead-lettered — so a crashed process loses nothing: its entries stay pending, and
another process reclaims them after ``claim_idle`` seconds (``XAUTOCLAIM``). Delivery is
at-least-once; :class:`RedisStreamSink` writes each output with the id of the entry it
came from (``source_id``) so that whoever reads the results can drop duplicates::

    from pipeflow import Pipeline, stage
    from pipeflow.connectors.redis import Entry, RedisStreamSink, RedisStreamSource

    @stage(workers=16)
    async def work(entry: Entry) -> Entry:
        return entry.with_fields(result=await compute(entry.fields["n"]))

    source = RedisStreamSource("redis://127.0.0.1:6379/0", "jobs", group="workers")
    Pipeline(work | RedisStreamSink("redis://127.0.0.1:6379/0", "results")).run(source)

The connector talks to Redis over native Trio I/O (a small client with the ``hiredis``
reply parser), so cancelling a run takes effect at once, even while Redis does not
answer: a command cancelled half-way drops its connection. Reads block for at most
``block`` seconds at a time. Connection errors (a Redis restart) are retried with
exponential backoff until Redis has been unreachable for ``retry_for`` seconds, logged
(``redis_unavailable``, ``redis_reconnected``), then raised as :class:`RedisUnavailable`.

Log events: ``redis_group_created``, ``redis_entries_claimed``, ``redis_entries_released``,
``redis_consumer_removed``, ``redis_unavailable``, ``redis_reconnected``,
``redis_ack_failed``, ``redis_heartbeat_failed``, ``redis_entries_unfinished`` (a run
that ended well left entries unfinished: handed back), ``redis_command_unavailable`` (a command
disabled on the server that the connector can do without: said once),
``redis_consumer_in_use`` (another process seems to read as this consumer).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import operator
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs
import trio

try:
    from ._resp import (
        URL_OPTIONS,
        Client,
        RedisConnectionError,
        RedisError,
        _pack_many,
        parse_url,
        refused,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "pipeflow.connectors.redis needs hiredis (the Redis reply parser): "
        "pip install 'pipeflow-trio[redis]'"
    ) from exc

from .._errors import short_repr
from .._log import get_logger
from .._stage import Stage
from ..abc import Ack

__all__ = [
    "RedisStreamSource",
    "RedisStreamSink",
    "Entry",
    "RedisUnavailable",
    "ConsumerGroupLost",
    "RedisError",
    "SourceStatistics",
]

#: Ids per XACK / XCLAIM command: big enough to amortise a round trip, small enough
#: not to stall Redis (each is O(n)).
_CHUNK = 1000
#: The acker waits this long (seconds) for more finished entries before an XACK.
_ACK_GATHER = 0.001
#: While the source keeps reading, finished entries wait up to this long (seconds) for
#: the next read to take their XACK along (one round trip for both) before the acker
#: sends it on its own; not at all once the reader waits (for room, for new entries).
_ACK_LATEST = 0.1
#: At most this often (seconds) the source trims its stream when ``maxlen`` is set.
_TRIM_EVERY = 1.0
#: On leaving, the source spends at most this long acking what it finished.
_FINAL_ACK_TIMEOUT = 5.0
#: ... and at most this long when the run was cancelled: the user asked for a prompt
#: stop, and a Redis that answers at all answers well within it.
_CANCELLED_CLOSE_TIMEOUT = 0.25
#: Once the run ended well, the source waits at most this long (seconds) for entries
#: it gave that are still not finished (no runner path should leave one: a safety net),
#: then leaves them pending in Redis, handed back for another member.
_SETTLE_LIMIT = 10.0
#: How often a draining source checks whether other consumers have finished.
_DRAIN_POLL = 0.05
#: How long the source, on leaving, retries its last acks if Redis is unreachable.
_CLOSE_PATIENCE = 1.0
#: A consumer of the group with nothing pending and idle for this many ``claim_idle``
#: periods (or ``block`` periods, if longer) is taken for dead (a killed member) and
#: removed from the group.
_FORGET_AFTER = 5
#: What goes when Redis refuses the commands that find and remove dead consumers.
_NO_SWEEP = (
    "dead members' consumers are not removed from the group, and a consumer name used "
    "by two members is not noticed"
)
#: A consumer of this source's name that Redis heard from less than this long ago
#: (seconds, or 2 x block if longer) when the source starts is taken for another
#: member under the same name (a member that is reading is heard from every block).
_IN_USE_IDLE = 1.0
#: Backoff between reconnection attempts: first delay and cap, in seconds.
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 2.0
#: A connect attempt may take at least this long (seconds; at most the URL's connect
#: timeout), however little is left of ``retry_for``: a shorter one would fail a TLS
#: handshake on a busy machine, and hide why the earlier attempts failed.
_LAST_ATTEMPT = 1.0
_SCHEMES = ("redis", "rediss", "unix")


class RedisUnavailable(ConnectionError):
    """Redis did not answer for ``retry_for`` seconds: the run stops with this error."""


class ConsumerGroupLost(RuntimeError):
    """The stream or its consumer group vanished while a source was reading it (deleted,
    or Redis restarted without persistence): its pending entries are gone with it."""


class Entry:
    """One entry of a Redis stream: its ``id`` (``"1700000000000-0"``) and its ``fields``.

    Entries are the items a :class:`RedisStreamSource` feeds into a pipeline. Return
    ``entry.with_fields(...)`` from a stage to keep the id travelling, so that a
    :class:`RedisStreamSink` writes it as ``source_id`` and readers can drop
    duplicates::

        @stage
        async def work(entry: Entry) -> Entry:
            return entry.with_fields(total=int(entry.fields["a"]) + int(entry.fields["b"]))

    Entries compare equal when their ids and fields are, hash by id, and are immutable:
    ``id`` and ``fields`` cannot be set (``AttributeError``); treat ``fields`` as
    read-only too (``with_fields`` makes a new entry).
    """

    # A plain slotted class (not attrs): an entry is made for every item read, and again
    # by every with_fields(), and this one is made in half the instructions of attrs'
    # frozen one. The public attributes are read-only properties over the slots.
    __slots__ = ("__weakref__", "_fields", "_id")  # (weak references, as attrs' had)
    __match_args__ = ("id", "fields")

    def __init__(self, id: str, fields: dict[str, str] | None = None) -> None:
        self._id = id
        self._fields = {} if fields is None else fields

    if TYPE_CHECKING:

        @property
        def id(self) -> str:
            """The entry's id in its stream, ``"<milliseconds>-<sequence>"``."""

        @property
        def fields(self) -> dict[str, str]:
            """The entry's fields (names and values, ``str``)."""

    else:  # read by C-level getters: a quarter fewer instructions than a Python one
        id = property(
            operator.attrgetter("_id"),
            doc='The entry\'s id in its stream, ``"<milliseconds>-<sequence>"``.',
        )
        fields = property(
            operator.attrgetter("_fields"), doc="The entry's fields (names and values, ``str``)."
        )

    def __repr__(self) -> str:
        return f"Entry(id={self._id!r}, fields={self._fields!r})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not Entry:
            return NotImplemented
        return self._id == other._id and self._fields == other._fields

    def __hash__(self) -> int:
        return hash(self._id)

    def with_fields(self, fields: Mapping[str, object] | None = None, /, **more: object) -> Entry:
        """A new entry with the same ``id`` and these fields (values turned into ``str``)."""
        if fields:
            merged: dict[str, Any] = {str(key): str(value) for key, value in fields.items()}
            for key, value in more.items():  # keyword names are str already
                merged[key] = value if type(value) is str else str(value)
        else:
            merged = more  # a dict of our own (the call's keywords): filled in place
            for key in more:
                # (str() of a str is that str, and no dearer than checking its type.)
                merged[key] = str(more[key])
        # Made without a call to __init__: a tenth of this method's instructions.
        entry = _new(Entry)
        entry._id = self._id
        entry._fields = merged
        return entry

    def json(self) -> Any:
        """The value a :class:`RedisStreamSink` wrote as JSON in the field ``data``."""
        try:
            data = self._fields["data"]
        except KeyError:
            msg = f"entry {self._id} has no field 'data' (its fields: {sorted(self._fields)})"
            raise KeyError(msg) from None
        return json.loads(data)


_flat = itertools.chain.from_iterable
_new = object.__new__
_first = operator.itemgetter(0)


def _entries(raw: list[Any]) -> list[Entry]:
    """The entries of a reply, ``[[id, [k1, v1, ...]], ...]`` (none deleted: nil
    fields). Each is made without a call to ``__init__`` (``object.__new__`` and its two
    slots, in this loop): a third of what making one costs by calling the class."""
    entries: list[Entry] = []
    add = entries.append
    for entry_id, f in raw:
        entry = _new(Entry)
        entry._id = entry_id
        # (Entries of two fields, the usual shape of a job, have their dict made here.)
        entry._fields = {f[0]: f[1], f[2]: f[3]} if len(f) == 4 else _fields_dict(f)
        add(entry)
    return entries


def _fields_dict(flat: list[str]) -> dict[str, str]:
    """An entry's fields as Redis sends them, ``[k1, v1, k2, v2, ...]``, as a dict.
    Entries of one to three fields are written out: ``dict(zip(...))`` costs three
    calls, more than the rest of reading an entry."""
    n = len(flat)
    if n == 2:
        return {flat[0]: flat[1]}
    if n == 4:
        return {flat[0]: flat[1], flat[2]: flat[3]}
    if n == 6:
        return {flat[0]: flat[1], flat[2]: flat[3], flat[4]: flat[5]}
    pairs = iter(flat)
    return dict(zip(pairs, pairs, strict=True))


# -- talking to Redis from Trio ------------------------------------------------------------


def _redact(url: str) -> str:
    """The URL without its password (in the netloc or as ``?password=``), fit for
    messages and logs."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        userinfo, _, host = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        if ":" in userinfo:
            parts = parts._replace(netloc=f"{user}:***@{host}")
    if parts.query:
        query = [
            (k, "***" if k.lower() == "password" else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


def _check_url(url: object, who: str, *, whole: bool = True) -> str:
    if not isinstance(url, str):
        raise TypeError(f"{who}: url must be a str such as 'redis://127.0.0.1:6379/0', got {url!r}")
    if urlsplit(url).scheme not in _SCHEMES:
        msg = f"{who}: url must start with redis://, rediss:// or unix://, got {_redact(url)!r}"
        raise ValueError(msg)
    try:
        if whole:
            parse_url(url)
    except ValueError as exc:
        raise ValueError(f"{who}: {exc} in {_redact(url)!r}") from None
    return url


#: Commands whose second word says what they do.
_CONTAINERS = frozenset({"XGROUP", "XINFO", "CLIENT"})

#: Per server (host:port, or a socket's path), set when one of this run's connections
#: to it finds it unreachable (and replaced by a fresh one).
_OUTAGES: trio.lowlevel.RunVar[dict[str, trio.Event]] = trio.lowlevel.RunVar("pipeflow_outages")


def _outages() -> dict[str, trio.Event]:
    try:
        return _OUTAGES.get()
    except LookupError:
        outages: dict[str, trio.Event] = {}
        _OUTAGES.set(outages)
        return outages


def _outage(server: str) -> trio.Event:
    """The event set when a connection of this run next finds ``server`` unreachable."""
    outages = _outages()
    event = outages.get(server)
    if event is None:
        event = outages[server] = trio.Event()
    return event


def _pairs(flat: Sequence[Any]) -> dict[str, Any]:
    """``[k1, v1, k2, v2, ...]`` (a RESP2 map) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


class _Conn:
    """Commands to one Redis from Trio, retried while Redis is unreachable: connection
    errors are retried with exponential backoff until Redis has been unreachable for
    ``retry_for`` seconds, then :class:`RedisUnavailable` is raised. Several tasks may
    run commands at once (each on a connection of its own); a cancelled command drops
    its connection at once.

    An outage is counted once, however many tasks were retrying through it: it begins
    with the first command that fails (when that attempt began), and ends with the
    first that succeeds after it (one ``reconnects``)."""

    def __init__(
        self,
        url: str,
        *,
        stream: str,
        retry_for: float,
        client_name: str | None = None,
        log: Any,
    ) -> None:
        self.url = url
        self.stream = stream
        self.retry_for = retry_for
        self.log = log
        #: How many times Redis came back after being unreachable.
        self.reconnects = 0
        self.counts: _Counts | None = None  # the source's, where there is one
        #: When the outage under way began (the start of the first attempt that
        #: failed), or None while Redis answers.
        self.down_since: float | None = None
        #: When the last outage ended: an attempt begun before that and failing after
        #: it belongs to that outage, not to a new one.
        self._up_at = -math.inf
        params = parse_url(url)
        if client_name is not None and params.client_name is None:
            params = attrs.evolve(params, client_name=client_name)
        self.client = Client(params, on_unnamed=self._unnamed)
        #: Commands Redis refused that the connector can do without (said once each).
        self.degraded: set[str] = set()
        #: The server, whatever the database: what an outage is shared by.
        self.server = params.path or f"{params.host}:{params.port}"

    async def call(
        self,
        *command: Any,
        patience: float | None = None,
        blocks_for: float = 0.0,
        what: str | None = None,
    ) -> Any:
        """The reply to ``command``, retried while Redis is unreachable (until it has
        been for ``retry_for`` seconds, or for ``patience`` seconds of this call's own
        attempts if given). ``what`` names it in messages (by default its first word,
        two for a container command like ``XGROUP CREATE``)."""
        if what is None:
            what = command[0] if command[0] not in _CONTAINERS else " ".join(command[:2])
        return await self._retrying(
            what, patience, self.client.execute, *command, blocks_for=blocks_for
        )

    async def call_many(
        self,
        what: str,
        commands: Sequence[Sequence[Any]],
        *,
        patience: float | None = None,
        blocks_for: float = 0.0,
    ) -> list[Any]:
        """The replies to ``commands``, sent in one round trip, retried as a whole while
        Redis is unreachable; an error reply raises the first one."""
        return await self.call_packed(
            what, _pack_many(commands), len(commands), patience=patience, blocks_for=blocks_for
        )

    async def call_packed(
        self,
        what: str,
        payload: bytes,
        count: int,
        *,
        patience: float | None = None,
        blocks_for: float = 0.0,
    ) -> list[Any]:
        """As :meth:`call_many`, for ``count`` commands already packed into ``payload``."""
        replies: list[Any] = await self._retrying(
            what, patience, self.client.execute_packed, payload, count, blocks_for=blocks_for
        )
        if RedisError in map(type, replies):  # (the reader makes them of this very class)
            raise self._translate(next(r for r in replies if isinstance(r, RedisError)), what)
        return replies

    async def _retrying(
        self, what: str, patience: float | None, fn: Callable[..., Any], *args: Any, **kw: Any
    ) -> Any:
        limit = self.retry_for if patience is None else patience
        first_failure: float | None = None  # when this call's first failed attempt began
        attempt = 0
        delay = _BACKOFF_FIRST
        within = max(limit, _LAST_ATTEMPT)
        while True:
            if first_failure is not None or (patience is None and self.down_since is not None):
                # A new connection may take what is left of the time Redis may be
                # unreachable (at least one short attempt), not a whole connect timeout.
                since = self._since(first_failure, patience)
                assert since is not None
                within = max(since + limit - trio.current_time(), _LAST_ATTEMPT)
            try:
                result = await fn(*args, connect_within=within, **kw)
            except RedisConnectionError as exc:
                # (The client says when the attempt began: a connect may take seconds.)
                started: float | None = getattr(exc, "started", None)
                if started is None:
                    started = trio.current_time()
                attempt += 1
                if first_failure is None:
                    first_failure = started
                if self.down_since is None and started >= self._up_at:
                    self.down_since = started  # an outage begins
                    _outage(self.server).set()  # (a source waiting for room should know)
                    _outages()[self.server] = trio.Event()
                now = trio.current_time()
                since = self._since(first_failure, patience)
                assert since is not None
                if now >= since + limit:
                    spent = f" for {now - since:.1f}s" if now - since >= 0.05 else ""
                    tries = f"{attempt} attempt{'s' if attempt > 1 else ''}"
                    if patience is None:
                        tries += f", retry_for={limit:g}"
                    msg = (
                        f"Redis at {_redact(self.url)} did not answer{spent} ({tries}) "
                        f"during {what} on stream {self.stream!r}: {exc}"
                    )
                    raise RedisUnavailable(msg) from exc
                self.log.warning(
                    "redis_unavailable",
                    command=what,
                    attempt=attempt,
                    retry_in=round(delay, 3),
                    error=str(exc),
                )
                await trio.sleep(min(delay, since + limit - now))
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            except RedisError as exc:
                raise self._translate(exc, what) from None
            if self.down_since is not None:
                # The first answer since the outage began: one reconnection, however
                # many tasks were retrying.
                self.down_since = None
                self._up_at = trio.current_time()
                self.reconnects += 1
                if self.counts is not None:
                    self.counts.reconnects += 1
                self.log.info("redis_reconnected", command=what, attempts=attempt + 1)
            return result

    def _since(self, first_failure: float | None, patience: float | None) -> float | None:
        """Since when Redis has been unreachable, as far as a call's deadline goes: the
        outage's start (a call with its own patience: its own first failure)."""
        if patience is not None or self.down_since is None:
            return first_failure
        if first_failure is None:
            return self.down_since
        return min(first_failure, self.down_since)

    async def watch(self) -> None:
        """Background task: when another client of this process finds this Redis
        unreachable (a sink's ``XADD``) while this connection has nothing to send (a
        source waiting for room), ask it ourselves: so ``retry_for`` runs from then,
        and a Redis gone for good fails the run in time."""
        while True:
            await _outage(self.server).wait()
            if self.down_since is None:
                await self.call("PING")

    def _translate(self, exc: RedisError, what: str) -> Exception:
        if refused(exc):
            refusal = RedisError(
                f"Redis at {_redact(self.url)} refused {what}, which pipeflow needs to "
                f"deliver entries of stream {self.stream!r}: {exc}. Is {what.split()[0]} "
                f"disabled or renamed on this server (managed Redis services do this), or "
                f"not allowed to this user? See docs/distributed.md."
            )
            refusal.__cause__ = exc
            refusal.reply = exc  # type: ignore[attr-defined]  # (what Redis said)
            return refusal
        if str(exc).startswith("NOGROUP"):
            msg = (
                f"stream {self.stream!r} or its consumer group is gone from Redis at "
                f"{_redact(self.url)} ({exc}); its pending entries went with it. "
                f"Was Redis restarted without persistence? See docs/distributed.md."
            )
            lost = ConsumerGroupLost(msg)
            lost.__cause__ = exc
            return lost
        return exc

    def degrade(self, command: str, error: BaseException, consequence: str) -> None:
        """Redis refused ``command``, which the connector can do without: say so (once
        per command), and what goes without it."""
        if command not in self.degraded:
            self.degraded.add(command)
            self.log.warning(
                "redis_command_unavailable",
                command=command,
                consequence=consequence,
                error=_reply_of(error),
            )

    def _unnamed(self, error: str) -> None:
        self.degrade(
            "CLIENT SETNAME",
            RedisError(error),
            "the connections are not named (CLIENT LIST shows no client_name)",
        )

    async def aclose(self) -> None:
        """Close the connections at once (fine when cancelled)."""
        await self.client.aclose()


def _reply_of(error: BaseException) -> str:
    """What Redis answered, for an error the connector made from its answer."""
    return str(getattr(error, "reply", error))


def _client_name(consumer: str) -> str:
    """CLIENT SETNAME takes printable ASCII without spaces; a consumer name may be any
    string, so anything else becomes ``_``."""
    return "pipeflow:" + "".join(ch if 33 <= ord(ch) <= 126 else "_" for ch in consumer)


_sources_in_process = itertools.count(1)


def _consumer_default() -> str:
    """``host-pid``, and ``host-pid-N`` for the N-th source of one process, so that two
    sources in one process never take each other's entries for their own."""
    n = next(_sources_in_process)
    base = f"{socket.gethostname()}-{os.getpid()}"
    return base if n == 1 else f"{base}-{n}"


def _stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


async def _trim_finished(conn: _Conn, stream: str, maxlen: int, patience: float | None) -> int:
    """Trim ``stream`` towards ``maxlen`` entries, deleting only entries that every
    consumer group of the stream has already acknowledged. Returns how many went."""
    length: int = await conn.call("XLEN", stream, patience=patience)
    excess = length - maxlen
    if excess <= 0:
        return 0
    count = min(excess, 10 * _CHUNK)
    oldest: Any = await conn.call("XRANGE", stream, "-", "+", "COUNT", count, patience=patience)
    if not oldest:
        return 0
    ms, seq = _stream_id(oldest[-1][0])
    cut = (ms, seq + 1)  # XTRIM MINID keeps ids >= cut
    groups: Any = await conn.call("XINFO", "GROUPS", stream, patience=patience)
    for flat in groups:
        group = _pairs(flat)
        # Not yet delivered to this group: everything after its last-delivered id.
        ms, seq = _stream_id(group["last-delivered-id"])
        cut = min(cut, (ms, seq + 1))
        if group["pending"]:
            summary: Any = await conn.call("XPENDING", stream, group["name"], patience=patience)
            if summary[1] is not None:
                cut = min(cut, _stream_id(summary[1]))
    if cut <= (0, 0):
        return 0
    trimmed: int = await conn.call(
        "XTRIM", stream, "MINID", f"{cut[0]}-{cut[1]}", patience=patience
    )
    return trimmed


#: Delete a consumer from a group only if it has no pending entry (deleting it would
#: drop them), in one step: an entry delivered to it meanwhile cannot be lost.
_DELETE_IF_IDLE = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
    return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"""


async def _leave_group(
    conn: _Conn, stream: str, group: str, consumer: str, patience: float | None
) -> bool:
    """Delete ``consumer`` from ``group`` if it has no pending entry; whether it went."""
    gone: int = await conn.call(
        "EVAL",
        _DELETE_IF_IDLE,
        1,
        stream,
        group,
        consumer,
        patience=patience,
        what="XGROUP DELCONSUMER",
    )
    return gone >= 0


# -- the source ----------------------------------------------------------------------------


def _check_positive(who: str, option: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{who}: {option}= must be a number of seconds > 0, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{who}: {option}= must be a finite number > 0, got {value!r}")


def _check_count(who: str, option: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{who}: {option}= must be an int >= 1 or None, got {value!r}")
    if value < 1:
        raise ValueError(f"{who}: {option}= must be an int >= 1 or None, got {value!r}")


def _check_name(who: str, option: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{who}: {option}= must be a non-empty str, got {value!r}")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@attrs.frozen(kw_only=True)
class SourceStatistics:
    """What a :class:`RedisStreamSource` has done, over all its runs so far
    (``source.statistics()``); its metrics are read from these."""

    #: Entries acknowledged (``XACK``): done with, by this consumer.
    acked: int
    #: Entries taken over from other consumers that left them idle (``XAUTOCLAIM``).
    reclaimed: int
    #: Times Redis came back after being unreachable: one per outage the source saw,
    #: however many of its tasks were retrying through it.
    reconnects: int
    #: Entries read and not yet acknowledged, now (in the pipeline, or waiting for it).
    pending: int


@attrs.define
class _Counts:
    acked: int = 0
    reclaimed: int = 0
    reconnects: int = 0


class RedisStreamSource:
    """A pipeline source that reads a Redis stream as one consumer of a consumer group.

    Pass it to ``Pipeline.run``/``arun``/``stream`` like any source; the items are
    :class:`Entry` values. Start the same pipeline in more processes, on more machines,
    with the same ``stream`` and ``group``: they share the work::

        source = RedisStreamSource("redis://127.0.0.1:6379/0", "jobs", group="workers",
                                   consumer="host-a", claim_idle=30.0, drain=False)
        Pipeline(work | RedisStreamSink("redis://127.0.0.1:6379/0", "results")).run(source)

    - The group is created (with the stream, ``MKSTREAM``) if missing, at ``start_id``
      (``"0"``: the whole stream; ``"$"``: only entries added from now on).
    - A consumer first re-reads its own pending entries (a restart under the same
      ``consumer`` name), then takes entries idle for more than ``claim_idle`` seconds
      from other consumers (crashed ones: ``XAUTOCLAIM``), then new entries.
    - An entry is acknowledged only once its item has left the pipeline (all of its
      children, for a flat-mapping stage): through the last stage, filtered, skipped,
      collected or dead-lettered. A fail-fast failure leaves it pending, to be retried.
    - The consumer holds no more un-acknowledged entries than the pipeline can hold
      (its first stage's buffer of 64 included, unless that stage sets ``buffer=``).
      While it works on an entry it keeps it fresh, so only the entries of a consumer
      that stopped are reclaimed.
    - ``drain=True`` ends the source once the stream has nothing new and the group
      nothing pending (batch jobs, tests); otherwise it waits for entries forever.
    - ``maxlen`` trims the stream towards that many entries, deleting only entries
      that every group reading it has acknowledged.

    ``consumer`` defaults to ``"{hostname}-{pid}"``. ``block`` is the longest one read
    waits (cancellation waits for it); ``count`` caps the entries per read.
    ``retry_for`` is how long Redis may be unreachable before the run fails.

    Iterated directly (``async for entry in source``), it acknowledges each entry when
    the loop asks for the next one.
    """

    def __init__(
        self,
        url: str,
        stream: str,
        *,
        group: str,
        consumer: str | None = None,
        claim_idle: float = 30.0,
        drain: bool = False,
        block: float = 0.5,
        count: int | None = None,
        maxlen: int | None = None,
        start_id: str = "0",
        retry_for: float = 30.0,
    ) -> None:
        who = "RedisStreamSource"
        self.url = _check_url(url, who)
        self.stream = _check_name(who, "stream", stream)
        self.group = _check_name(who, "group", group)
        self.consumer = (
            _consumer_default() if consumer is None else _check_name(who, "consumer", consumer)
        )
        _check_positive(who, "claim_idle", claim_idle)
        _check_positive(who, "block", block)
        _check_positive(who, "retry_for", retry_for)
        _check_count(who, "count", count)
        _check_count(who, "maxlen", maxlen)
        if not isinstance(drain, bool):
            raise TypeError(f"{who}: drain= must be True or False, got {drain!r}")
        self.start_id = _check_name(who, "start_id", start_id)
        self.claim_idle = float(claim_idle)
        self.drain = drain
        self.block = float(block)
        self.count = count
        self.maxlen = maxlen
        self.retry_for = float(retry_for)
        self._counts = _Counts()
        self._open_consumers: set[_Consumer] = set()

    @property
    def name(self) -> str:
        """The stream's name: the ``source`` label of the source's metrics."""
        return self.stream

    def statistics(self) -> SourceStatistics:
        """Counts of what this source did, over all its runs (plain numbers, cheap)."""
        c = self._counts
        pending = sum(len(consumer.held) for consumer in self._open_consumers)
        return SourceStatistics(
            acked=c.acked, reclaimed=c.reclaimed, reconnects=c.reconnects, pending=pending
        )

    @classmethod
    def from_url(cls, url: str) -> RedisStreamSource:
        """A source from one URL, the form the CLI takes (``--source``)::

            redis://HOST:PORT/DB?stream=jobs&group=workers&consumer=NAME&claim_idle=30&drain=1

        ``stream`` and ``group`` are required; ``consumer``, ``claim_idle``, ``drain``,
        ``block``, ``count``, ``maxlen``, ``start_id`` and ``retry_for`` are optional, as
        in the constructor. Other query parameters are the connection's, with the names
        redis-py gives them (``password``, ``socket_timeout``, ``ssl_ca_certs``, …).
        """
        who = "RedisStreamSource.from_url"
        _check_url(url, who, whole=False)
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port is not None and not 0 < port <= 65535:
            msg = f"{who}: the port in {_redact(url)!r} must be 1..65535"
            raise ValueError(msg)
        database = parts.path.strip("/")
        if parts.scheme != "unix" and database and not database.isdigit():
            msg = f"{who}: the database in {_redact(url)!r} must be a number, like /0"
            raise ValueError(msg)
        ours: dict[str, str] = {}
        rest: list[tuple[str, str]] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in _URL_OPTIONS:
                ours[key] = value
            elif key in URL_OPTIONS:
                rest.append((key, value))
            else:
                known = ", ".join(sorted({*_URL_OPTIONS, *URL_OPTIONS}))
                msg = f"{who}: unknown option {key!r} in {_redact(url)!r} (known: {known})"
                raise ValueError(msg)
        missing = [k for k in ("stream", "group") if not ours.get(k)]
        if missing:
            msg = (
                f"{who}: {_redact(url)!r} lacks {' and '.join(missing)}; "
                f"use e.g. redis://127.0.0.1:6379/0?stream=jobs&group=workers"
            )
            raise ValueError(msg)
        kwargs: dict[str, Any] = {}
        for key, value in ours.items():
            if key in ("stream", "group"):
                continue
            convert = _URL_OPTIONS[key]
            try:
                kwargs[key] = convert(value)
            except ValueError:
                msg = f"{who}: {key}={value!r} in {_redact(url)!r} is not a valid {key}"
                raise ValueError(msg) from None
        base = urlunsplit(parts._replace(query=urlencode(rest)))
        return cls(base, ours["stream"], group=ours["group"], **kwargs)

    def __repr__(self) -> str:
        return (
            f"RedisStreamSource({_redact(self.url)!r}, {self.stream!r}, group={self.group!r}, "
            f"consumer={self.consumer!r}, drain={self.drain!r})"
        )

    # -- the runner's hook -----------------------------------------------------------------

    def __pipeflow_open__(
        self, *, capacity: int
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[tuple[Entry, _EntryAck]]]:
        """Called by the runner: (entry, ack) pairs, at most ``capacity`` un-acked."""
        return self._open(capacity)

    def _connect(self) -> _Conn:
        log = get_logger(stream=self.stream, group=self.group, consumer=self.consumer)
        conn = _Conn(
            self.url,
            stream=self.stream,
            retry_for=self.retry_for,
            client_name=_client_name(self.consumer),
            log=log,
        )
        conn.counts = self._counts
        return conn

    @contextlib.asynccontextmanager
    async def _open(self, capacity: int) -> AsyncIterator[AsyncIterator[tuple[Entry, _EntryAck]]]:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"{self!r}: capacity must be an int >= 1, got {capacity!r}")
        # A reader, an acker and a heartbeat may each be in a command at once (each on
        # a connection of its own).
        conn = self._connect()
        consumer = _Consumer(self, conn, capacity)
        task = f"pipeflow:redis:{self.stream}"
        try:
            await consumer.create_group()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(consumer.acker, name=f"{task}:ack")
                    nursery.start_soon(consumer.heartbeat, name=f"{task}:heartbeat")
                    nursery.start_soon(conn.watch, name=f"{task}:watch")
                    try:
                        yield consumer
                        # The run ended well: wait for the acks of its last items (a
                        # stream's reader acks outputs as it takes them).
                        await consumer.settle()
                    finally:
                        nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # One failure (or the run's cancellation) is what the caller should see,
                # not a group wrapping it.
                leaves = list(_leaves(group))
                # (Several tasks that gave up on an unreachable Redis together: the
                # first says it.)
                if len(leaves) == 1 or all(type(e) is RedisUnavailable for e in leaves):
                    raise leaves[0] from None
                raise
        finally:
            # Whatever ends the run, ack what did finish: those entries are done.
            await _close(consumer)

    # -- direct iteration ------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Entry]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Entry]:
        conn = self._connect()
        consumer = _Consumer(self, conn, capacity=1)
        # While the loop's body works on an entry, none of this generator's code runs:
        # the heartbeat that keeps the entry from being taken over runs as a system
        # task, for exactly as long as this generator (its finally cancels it).
        beating = trio.CancelScope()

        async def heartbeat() -> None:
            with beating:
                try:
                    await consumer.heartbeat()
                except Exception as exc:  # Redis gone: the next read will say so
                    consumer.log.warning("redis_heartbeat_failed", error=repr(exc))

        try:
            await consumer.create_group()
            consumer.inline_acks = True  # no acker task: acks go out before each read
            trio.lowlevel.spawn_system_task(heartbeat, name=f"pipeflow:redis:{self.stream}:beat")
            async for entry, ack in consumer:
                yield entry
                # The loop asked for the next entry: the body is done with this one.
                ack.done()
        finally:
            beating.cancel()
            await _close(consumer)


async def _close(consumer: _Consumer) -> None:
    """Ack what finished, hand back what did not, leave the group, close the connections.

    A run that ends on its own (or on a signal, in its grace period) takes up to
    ``_FINAL_ACK_TIMEOUT`` for that, and a cancellation meanwhile (the grace period
    running out, a second Ctrl+C) stops it at once. A run that was cancelled gets
    ``_CANCELLED_CLOSE_TIMEOUT``: plenty for a Redis that answers, and a prompt stop
    for one that does not (a frozen server, a partition).
    """
    try:
        if trio.current_effective_deadline() == -math.inf:  # cancelled
            if consumer.conn.client.overdue:
                # A command (this source's, or a sink's to the same Redis) is kept
                # waiting, or was abandoned so: Redis does not answer now, and a
                # cancelled run must not wait for it.
                if consumer.held:
                    consumer.log.warning(
                        "redis_ack_failed",
                        entries=len(consumer.to_ack),
                        error="Redis did not answer in time; left without acking",
                    )
                return
            with trio.CancelScope(shield=True), trio.move_on_after(_CANCELLED_CLOSE_TIMEOUT):
                await consumer.close()
        else:
            with trio.move_on_after(_FINAL_ACK_TIMEOUT):
                await consumer.close()
    finally:
        consumer.source._open_consumers.discard(consumer)
        with trio.CancelScope(shield=True):
            await consumer.conn.aclose()


def _parse_bool(value: str) -> bool:
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(value)


_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "stream": str,
    "group": str,
    "consumer": str,
    "claim_idle": float,
    "drain": _parse_bool,
    "block": float,
    "count": int,
    "maxlen": int,
    "start_id": str,
    "retry_for": float,
}


def _leaves(group: BaseExceptionGroup[Any]) -> Iterable[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


class _EntryAck:
    """The acknowledgement travelling with one entry's item through the pipeline."""

    __slots__ = ("_consumer", "_id", "_left")

    def __init__(self, consumer: _Consumer, entry_id: str) -> None:
        self._consumer = consumer
        self._id = entry_id
        self._left = 1

    def add(self, n: int) -> None:
        """The item became ``n + 1`` items (a flat-mapping stage's children)."""
        self._left += n
        self._consumer.split = True

    def done(self) -> None:
        """One of them left the pipeline; the last one acks the entry."""
        self._left -= 1
        if self._left == 0:
            self._consumer.finished(self._id)

    @staticmethod
    def __pipeflow_done_all__(acks: Sequence[Ack]) -> None:
        """``done()`` on each of ``acks`` (a batch's items), their finished entries
        handed to their consumer together; an ack of another kind by its ``done()``."""
        if set(map(type, acks)) == _ENTRY_ACKS:
            consumers = set(map(_consumer_of, acks))
            if len(consumers) == 1:
                (only,) = consumers
                if not only.split:
                    # The usual batch: one consumer's entries, none split into several
                    # items (so each is done with its one item), in C-level passes.
                    only.finished_many(list(map(_id_of, acks)))
                    return
        consumer: _Consumer | None = None
        ids: list[str] = []
        for ack in acks:
            if type(ack) is not _EntryAck:
                ack.done()
                continue
            ack._left -= 1
            if ack._left == 0:
                if ack._consumer is not consumer:
                    if consumer is not None:
                        consumer.finished_many(ids)
                    consumer = ack._consumer
                    ids = []
                ids.append(ack._id)
        if consumer is not None:
            consumer.finished_many(ids)


_ENTRY_ACKS = {_EntryAck}
_consumer_of = operator.attrgetter("_consumer")
_id_of = operator.attrgetter("_id")


class _Consumer:
    """One open source: what it holds, and how it reads, reclaims and acks.

    ``held`` is every entry delivered to this consumer and not yet acknowledged in Redis
    (waiting to enter the pipeline, in it, or finished and waiting for its XACK); it
    never exceeds ``capacity``, which is how backpressure crosses machines.
    """

    def __init__(self, source: RedisStreamSource, conn: _Conn, capacity: int) -> None:
        self.source = source
        source._open_consumers.add(self)  # until _close(): its pending entries count
        self.conn = conn
        self.capacity = capacity
        self.log = conn.log
        self.held: set[str] = set()
        self.buffer: list[Entry] = []  # read, not yet handed over (a page at most)
        self.to_ack: list[str] = []
        self._ack_wanted = trio.Event()
        #: Set while the reader waits rather than reads (see _waits): the acker sends
        #: what finished then, rather than leave it for the next read.
        self._acks_due = trio.Event()
        self._reader_waits = True
        self._short = True  # the last read of new entries got fewer than it asked for
        self._room = trio.Event()
        self._own_cursor: str | None = "0"  # own pending entries first, from the start
        self._reconnects = 0
        self._claim_cursor = "0-0"
        self._next_claim = -math.inf
        self._claim_every = source.claim_idle / 2
        self._next_sweep = -math.inf
        self._claim_idle_ms = max(1, round(source.claim_idle * 1000))
        self._block_ms = max(1, round(source.block * 1000))  # BLOCK 0 would wait forever
        self._next_trim = -math.inf
        self._trimmed = True  # nothing acked, nothing to trim
        self._acking = 0  # XACKs in flight
        self._ended = False
        self.joined = False
        self.inline_acks = False
        #: Whether an entry's item became several (a flat-map): acks count their parts.
        self.split = False
        #: Dead consumers this one removed from the group.
        self.removed = 0
        self._said_in_use = False

    async def create_group(self) -> None:
        s = self.source
        try:
            await self.conn.call("XGROUP", "CREATE", s.stream, s.group, s.start_id, "MKSTREAM")
        except RedisError as exc:
            if refused(exc):
                await self._group_exists(exc)
            elif not str(exc).startswith("BUSYGROUP"):
                raise
        else:
            self.log.info("redis_group_created", start_id=s.start_id)
        self.joined = True
        await self._check_name_in_use()

    async def _check_name_in_use(self) -> None:
        """Warn if a consumer of this name was active a moment ago: another member
        started with the same ``consumer=``, most likely (see :meth:`_name_in_use`)."""
        s = self.source
        try:
            consumers: Any = await self.conn.call("XINFO", "CONSUMERS", s.stream, s.group)
        except RedisError as exc:
            if not refused(exc):
                raise
            self._next_sweep = math.inf  # (the sweep needs it too)
            self.conn.degrade("XINFO CONSUMERS", exc, _NO_SWEEP)
            return
        recent_ms = 1000 * max(_IN_USE_IDLE, 2 * s.block)
        for flat in consumers:
            info = _pairs(flat)
            if info["name"] == s.consumer and int(info["idle"]) < recent_ms:
                self._name_in_use(int(info["idle"]), int(info["pending"]))

    def _name_in_use(self, idle_ms: int, pending: int) -> None:
        """Two members given one ``consumer=`` each take the other's pending entries
        for their own (a restarted member's, to be read again): duplicates, and a slow
        one's entries done twice. Said once per run."""
        if self._said_in_use:
            return
        self._said_in_use = True
        s = self.source
        self.log.warning(
            "redis_consumer_in_use",
            idle=round(idle_ms / 1000, 1),
            pending=pending,
            hint=(
                f"another process seems to read group {s.group!r} as consumer "
                f"{s.consumer!r} too: each takes the other's entries for its own (entries "
                f"done twice). Give each member its own consumer=, or leave it out "
                f"(host-pid). A member restarted in place at once may see this too."
            ),
        )

    async def _group_exists(self, refusal: RedisError) -> None:
        """XGROUP is disabled: fine if whoever runs Redis made the group; else say so."""
        s = self.source
        try:
            await self.conn.call("XPENDING", s.stream, s.group)
        except ConsumerGroupLost:
            msg = (
                f"stream {s.stream!r} has no consumer group {s.group!r} in Redis at "
                f"{_redact(s.url)}, and pipeflow cannot make it (XGROUP CREATE: "
                f"{_reply_of(refusal)}). Make it where "
                f"XGROUP is allowed (XGROUP CREATE {s.stream} {s.group} 0 MKSTREAM)."
            )
            raise RedisError(msg) from refusal
        self.conn.degrade(
            "XGROUP CREATE",
            refusal,
            "the group exists: reading it; members cannot leave it (XGROUP DELCONSUMER)",
        )

    # -- reading ---------------------------------------------------------------------------

    def __aiter__(self) -> _Consumer:
        return self

    async def __anext__(self) -> tuple[Entry, _EntryAck]:
        if not await self._ready():
            raise StopAsyncIteration
        entry = self.buffer.pop(0)
        return entry, _EntryAck(self, entry._id)

    async def __pipeflow_take__(self, limit: int) -> list[tuple[Entry, _EntryAck]]:
        """Up to ``limit`` (entry, ack) pairs, waiting for the first; ``[]`` at the end.
        The runner takes the entries this way (a chunk per hand-over) rather than
        one ``__anext__`` each."""
        if not await self._ready():
            return []
        buffer = self._page(limit)
        # The pairs made in C-level passes (no Python loop per entry).
        return list(zip(buffer, map(_EntryAck, repeat(self), map(_id_of, buffer)), strict=True))

    async def _pipeflow_take_keyed(self, limit: int) -> tuple[list[Entry], list[str]]:
        """As :meth:`__pipeflow_take__`, the entries with their ids (the keys the run
        acks them by: :meth:`finished`) rather than an ack object each; ``[]`` at the
        end. pipeflow's runner takes them this way (see ``KeyedAckEnv``)."""
        if not await self._ready():
            return [], []
        buffer = self._page(limit)
        return buffer, list(map(_id_of, buffer))

    def _page(self, limit: int) -> list[Entry]:
        """Up to ``limit`` of the entries read, taken off the front of the buffer."""
        buffer = self.buffer
        if limit >= len(buffer):
            self.buffer = []
        else:
            self.buffer = buffer[limit:]
            del buffer[limit:]
        return buffer

    async def _ready(self) -> bool:
        """Until an entry waits in ``buffer`` (True), or the source has ended (False)."""
        while True:
            if self.inline_acks and self.to_ack:
                await self.flush()
            if self.buffer:
                return True
            if self._ended:
                self._waits()
                return False
            # Finished entries not yet acked make room too: the read acks them first,
            # in the same round trip.
            room = self.capacity - len(self.held) + len(self.to_ack)
            if room <= 0 or (2 * room < self.capacity and self._acking):
                # Full, or nearly and room is coming (an XACK on its way): one read of
                # many entries after it costs far less than many small ones.
                self._room = trio.Event()
                self._waits()
                await self._room.wait()
                continue
            self._reads()
            got = await self._fetch()
            if got is None:
                self._room = trio.Event()
                self._waits()
                await self._room.wait()
                continue
            if got:
                self.buffer.extend(got)
                continue
            if not self.source.drain:
                continue  # that read waited up to `block` for news: cancellation point
            # Draining, and nothing new: end once no other consumer holds entries (or
            # they were reclaimed from a dead one). Our own are in flight in this run,
            # which keeps the source open until they are acked (see _open); waiting
            # for them here would deadlock a batch stage that flushes at the end.
            self._waits()
            if await self._nothing_left_to_take():
                self._ended = True
                return False
            else:
                # Another consumer holds entries: poll often enough to end promptly (the
                # claims happen in _fetch, when due).
                await trio.sleep(min(self.source.block, _DRAIN_POLL))

    async def _fetch(self) -> list[Entry] | None:
        """Entries read (own pending ones first, then reclaimed, then new ones); None
        if there is no room after all (the acker took the finished ones meanwhile)."""
        s = self.source
        room = self.capacity - len(self.held)  # without acking what finished
        if room <= 0:
            if not self.to_ack or self._own_cursor is not None:
                # Nothing to ack here, or our own pending entries come first (they are
                # read without acking): wait for the acker's XACK.
                return None
            # Only finished entries make room: the read of new ones acks them first.
            return await self._read_new(0)
        n = room if s.count is None else min(room, s.count)
        if self.conn.reconnects != self._reconnects:
            # A read whose answer was lost still delivered its entries to us: find them
            # in our own pending list rather than wait claim_idle for them.
            self._reconnects = self.conn.reconnects
            self._own_cursor = "0"
        while self._own_cursor is not None:
            raw = await self._read(self._own_cursor, n, block=None)
            if not raw:
                self._own_cursor = None
                break
            self._own_cursor = raw[-1][0]
            accepted = self._accept(raw)
            if accepted:
                return accepted
            # Every entry of this page is already in flight here: read on, rather than
            # report "nothing new" (which would end a draining source early).
        now = trio.current_time()
        if now >= self._next_claim:
            reply: Any = await self.conn.call(
                "XAUTOCLAIM",
                s.stream,
                s.group,
                s.consumer,
                self._claim_idle_ms,
                self._claim_cursor,
                "COUNT",
                n,
            )
            cursor, raw = reply[0], reply[1]  # (and the ids deleted meanwhile: gone)
            self._claim_cursor = cursor
            if cursor == "0-0":  # scanned the whole pending list: rest a while
                self._next_claim = now + self._claim_every
                if now >= self._next_sweep:
                    self._next_sweep = now + s.claim_idle
                    await self._remove_dead_consumers(len(raw))
            claimed = self._accept(raw)
            s._counts.reclaimed += len(claimed)
            if claimed:
                self.log.info("redis_entries_claimed", count=len(claimed), first=claimed[0].id)
                return claimed
        return await self._read_new(room)

    async def _read_new(self, room: int) -> list[Entry]:
        """New entries, as many as there is ``room`` for once what finished is acked
        (in the same round trip)."""
        s = self.source
        ids = self._take_acks()
        n = room + len(ids)
        n = n if s.count is None else min(n, s.count)
        # Draining, a read need not wait: an empty answer is what ends the source.
        block = None if s.drain else self._block_ms
        if block is not None and self._short:
            # The last read found fewer entries than it asked for: this one may well
            # wait for news (up to block), so the acker should not wait for it.
            self._waits()
        raw = await self._read(">", n, block=block, acks=ids)
        self._short = len(raw) < n
        # New entries were never delivered before, so none is held here already, and
        # none is a deleted one (nil fields): taken in one step each.
        self.held.update(map(_first, raw))
        return _entries(raw)

    async def _read(
        self, start: str, n: int, *, block: int | None, acks: list[str] | None = None
    ) -> list[Any]:
        s = self.source
        read: list[Any] = ["XREADGROUP", "GROUP", s.group, s.consumer, "COUNT", n]
        if block is not None:
            read += ["BLOCK", block]
        read += ["STREAMS", s.stream, start]
        blocks_for = 0.0 if block is None else block / 1000
        ids = acks or []
        if not ids:
            reply: Any = await self.conn.call(*read, blocks_for=blocks_for)
        else:
            # Ack what finished and read more, in one round trip (XACK goes first).
            try:
                _, reply = await self.conn.call_many(
                    "XACK+XREADGROUP",
                    [["XACK", s.stream, s.group, *ids], read],
                    blocks_for=blocks_for,
                )
            except BaseException:
                self.to_ack[:0] = ids
                raise
            self._acked(ids)
        if not reply:
            return []
        entries: list[Any] = reply[0][1]
        return entries

    def _accept(self, raw: list[Any]) -> list[Entry]:
        entries = []
        held = self.held
        for entry_id, fields in raw:
            if entry_id in held:
                continue  # already ours and on its way (a reclaim of our own slow entry)
            held.add(entry_id)
            if not fields:
                # Deleted from the stream while pending (trimmed): nothing left to do.
                # (Redis answers nil fields; no real entry has none.)
                self.finished(entry_id)
                continue
            entries.append(Entry(entry_id, _fields_dict(fields)))
        return entries

    async def _remove_dead_consumers(self, claimed: int = 0) -> None:
        """Remove from the group every other consumer that holds nothing and has not
        been heard of for ``_FORGET_AFTER`` claim_idle periods: members that were
        killed, whose entries were reclaimed (a live member reads, or refreshes what it
        holds, far more often). Without this, every killed ``host-pid`` consumer would
        stay in ``XINFO CONSUMERS`` for ever. The check for nothing pending and the
        removal are one step in Redis, so no entry can be lost to it.

        Our own consumer in the list holds no more than this run does (``claimed``: just
        taken over, not yet counted), unless another process reads under our name."""
        s = self.source
        # A live member's idle time stays under its block (a read) and claim_idle / 3
        # (the heartbeat over what it holds): both far below this.
        limit_ms = _FORGET_AFTER * max(s.claim_idle, s.block) * 1000
        try:
            consumers: Any = await self.conn.call("XINFO", "CONSUMERS", s.stream, s.group)
        except RedisError as exc:
            if not refused(exc):
                raise
            self._next_sweep = math.inf  # not again
            self.conn.degrade("XINFO CONSUMERS", exc, _NO_SWEEP)
            return
        for flat in consumers:
            info = _pairs(flat)
            name, idle = info["name"], int(info["idle"])
            if name == s.consumer:
                pending = int(info["pending"])
                # (A read whose reply was lost, on a reconnection, is ours but not held.)
                if pending > len(self.held) + claimed and not self.conn.reconnects:
                    self._name_in_use(idle, pending)
                continue
            if int(info["pending"]) or idle < limit_ms:
                continue
            try:
                gone = await _leave_group(self.conn, s.stream, s.group, name, None)
            except RedisError as exc:
                if not refused(exc):
                    raise
                self._next_sweep = math.inf
                self.conn.degrade("XGROUP DELCONSUMER", exc, _NO_SWEEP)
                return
            if gone:
                self.removed += 1
                self.log.info("redis_consumer_removed", removed=name, idle=round(idle / 1000, 1))

    async def _nothing_left_to_take(self) -> bool:
        """No entry of the group is pending with another consumer, and every entry
        pending with us is one this run holds (in flight, to be acked)."""
        s = self.source
        summary: Any = await self.conn.call("XPENDING", s.stream, s.group)
        own = others = 0
        for name, pending in summary[3] or ():
            if name == s.consumer:
                own += int(pending)
            else:
                others += int(pending)
        if others:
            return False
        if own > len(self.held):
            # Entries were delivered to us by a read whose answer was lost: take them.
            self._own_cursor = "0"
            return False
        return True

    async def settle(self) -> None:
        """Until every entry this consumer took is acked in Redis (the run ended well,
        and the last items' acks are on their way).

        Once every item has left the pipeline, the entries still held and not finished
        never will be: the wait for them ends after ``_SETTLE_LIMIT`` seconds, with a warning
        (``redis_entries_unfinished``). They stay pending in Redis, and close() hands
        them back, so that another member (or the next run) takes them at once:
        at-least-once, nothing lost. Finished entries whose XACK is under way are waited
        for regardless (the acker gives up on an unreachable Redis after
        ``retry_for``); the run's cancellation (a second signal, the grace period
        running out) ends the wait at once, as ever."""
        self._waits()  # (no read will take them along)
        # (Entries read but never sent in, when a signal stopped the input, will not
        # be: close() hands them back.)
        limit = _SETTLE_LIMIT
        deadline = trio.current_time() + limit
        while len(self.held) > len(self.buffer):
            now = trio.current_time()
            if now >= deadline and not self.to_ack and not self._acking:
                self.log.warning(
                    "redis_entries_unfinished",
                    entries=len(self.held),
                    waited=limit,
                    hint=(
                        "the run ended without finishing these entries: they stay "
                        "pending, handed back for another member (or the next run) to "
                        "take"
                    ),
                )
                return
            self._room = trio.Event()
            wake = now + self.source.block
            with trio.move_on_at(wake if now >= deadline else min(wake, deadline)):
                await self._room.wait()

    # -- acknowledging -----------------------------------------------------------------------

    def finished(self, entry_id: str) -> None:
        """An entry's item has wholly left the pipeline: ack it soon (cheap, synchronous)."""
        self.to_ack.append(entry_id)
        self._ack_wanted.set()
        if 2 * len(self.to_ack) >= self.capacity:
            self._room.set()  # a reader waiting for room can read now, acking these

    def finished_many(self, ids: list[str]) -> None:
        """As :meth:`finished`, for several entries at once."""
        self.to_ack += ids
        self._ack_wanted.set()
        if 2 * len(self.to_ack) >= self.capacity:
            self._room.set()

    def _take_acks(self) -> list[str]:
        """Up to a chunk of finished ids, taken for one XACK (given back if it fails)."""
        ids = self.to_ack[:_CHUNK]
        del self.to_ack[: len(ids)]
        return ids

    def _acked(self, ids: list[str]) -> None:
        self.held.difference_update(ids)
        self.source._counts.acked += len(ids)
        self._trimmed = False
        self._room.set()

    def _waits(self) -> None:
        """The reader is about to wait (for room, for news, for others to finish), not
        to read: finished entries should not wait for its next read."""
        self._reader_waits = True
        self._acks_due.set()

    def _reads(self) -> None:
        """The reader is reading again: its reads take the finished entries' XACK along."""
        if self._reader_waits:
            self._reader_waits = False
            self._acks_due = trio.Event()

    async def acker(self) -> None:
        """Background task: XACK finished entries in batches, as they come. While the
        reader keeps reading, each read takes what finished along (``XACK`` and
        ``XREADGROUP`` in one round trip): the acker sends what is left after
        ``_ACK_LATEST`` at the latest, and at once when the reader waits instead."""
        while True:
            await self._ack_wanted.wait()
            if not self._reader_waits:
                with trio.move_on_after(_ACK_LATEST):
                    await self._acks_due.wait()
            # Let the items finishing at the same moment join this XACK.
            await trio.sleep(_ACK_GATHER)
            self._ack_wanted = trio.Event()
            await self.flush()

    async def flush(self, *, patience: float | None = None) -> None:
        s = self.source
        while self.to_ack:
            ids = self._take_acks()
            self._acking += 1
            try:
                await self.conn.call("XACK", s.stream, s.group, *ids, patience=patience)
            except BaseException:
                self.to_ack[:0] = ids  # still to ack (XACK twice is harmless)
                raise
            finally:
                self._acking -= 1
            self._acked(ids)
        if s.maxlen is not None and trio.current_time() >= self._next_trim:
            await self.trim(patience)

    async def trim(self, patience: float | None) -> None:
        s = self.source
        assert s.maxlen is not None
        self._next_trim = trio.current_time() + _TRIM_EVERY
        self._trimmed = False
        try:
            await _trim_finished(self.conn, s.stream, s.maxlen, patience)
        except RedisError as exc:
            if not refused(exc):
                raise
            self._next_trim = math.inf  # not again
            command = str(exc).partition(" refused ")[2].partition(",")[0] or "XTRIM"
            consequence = f"the stream is not trimmed (maxlen={s.maxlen})"
            self.conn.degrade(command, exc, consequence)
        self._trimmed = True

    async def close(self) -> None:
        """On the way out: ack what did finish, and leave the group if nothing of ours is
        pending (so restarts under new names do not pile up consumers in the group)."""
        # Redis unreachable now (the run is likely failing for it): one attempt each,
        # not another round of retries.
        patience = _CLOSE_PATIENCE if self.conn.down_since is None else 0.0
        try:
            if self.to_ack:
                await self.flush(patience=patience)
            if self.source.maxlen is not None and not self._trimmed:
                # The last trim was cut short (the run ended meanwhile), or acks came
                # after it: trim once more, so a batch job leaves its stream trimmed.
                await self.trim(patience)
            if self.held and self.joined:
                await self._release(sorted(self.held), patience)
            if self.joined and not self.held:
                s = self.source
                try:
                    await _leave_group(self.conn, s.stream, s.group, s.consumer, patience)
                except RedisError as exc:
                    if not refused(exc):
                        raise
                    consequence = "this member's consumer stays in the group"
                    self.conn.degrade("XGROUP DELCONSUMER", exc, consequence)
        except (RedisUnavailable, RedisError) as exc:
            # Unacked entries stay pending and will be delivered again: at-least-once.
            self.log.warning("redis_ack_failed", entries=len(self.to_ack), error=repr(exc))

    async def _release(self, ids: list[str], patience: float) -> None:
        """Entries this consumer got but will not finish (the run stopped): make them
        look idle for ``claim_idle`` already, so that another consumer reclaims them at
        once instead of ``claim_idle`` seconds from now."""
        s = self.source
        for i in range(0, len(ids), _CHUNK):
            await self.conn.call(
                "XCLAIM",
                s.stream,
                s.group,
                s.consumer,
                0,
                *ids[i : i + _CHUNK],
                "IDLE",
                self._claim_idle_ms,
                "JUSTID",
                patience=patience,
            )
        self.log.info("redis_entries_released", count=len(ids), first=ids[0])

    async def heartbeat(self) -> None:
        """Background task: keep the entries this consumer holds from looking idle, so
        that only a stopped consumer's entries are reclaimed by others (XCLAIM JUSTID
        resets their idle time without counting a delivery)."""
        s = self.source
        while True:
            await trio.sleep(s.claim_idle / 3)
            held = list(self.held)
            for i in range(0, len(held), _CHUNK):
                await self.conn.call(
                    "XCLAIM", s.stream, s.group, s.consumer, 0, *held[i : i + _CHUNK], "JUSTID"
                )


# -- the sink ------------------------------------------------------------------------------


#: RESP's length prefix of a string of each length up to 1,023 (``"$5"``), for the
#: sink's packing: a lookup instead of a formatting per argument.
_LENGTH_PREFIXES = [f"${n}" for n in range(1024)]
#: A sink remembers this many field names with their length prefix, at most.
_NAMES_KEPT = 1024


def _names_of(items: list[Any], known: dict[str, str]) -> dict[str, str] | None:
    """The field names of ``items`` (entries) not in ``known``, each with its RESP length
    prefix; None if an item is not an :class:`Entry`. TypeError for a name that is not
    a str, IndexError for one too long for the table."""
    new: dict[str, str] = {}
    for item in items:
        if type(item) is not Entry:
            return None
        for name in item._fields:
            if name not in known and name not in new:
                if type(name) is not str:
                    raise TypeError(name)
                new[name] = f"{_LENGTH_PREFIXES[len(name)]}\r\n{name}"
    return new


def _fields_of(item: object) -> dict[str, str]:
    if isinstance(item, Entry):
        return {**item.fields, "source_id": item.id}
    if isinstance(item, Mapping):
        if not item:
            msg = "RedisStreamSink: cannot append an empty mapping (an entry needs a field)"
            raise ValueError(msg)
        return {str(k): str(v) for k, v in item.items()}
    try:
        return {"data": json.dumps(item)}
    except (TypeError, ValueError) as exc:
        msg = (
            f"RedisStreamSink: cannot write {short_repr(item)}: not a mapping and not "
            f"JSON-serialisable ({exc}); return a dict or an Entry from the stage before"
        )
        raise TypeError(msg) from exc


class RedisStreamSink(Stage[Any, Any]):
    """A stage that appends each item to a Redis stream and outputs the new entry's id.

    A mapping becomes the entry's fields (values turned into ``str``); an :class:`Entry`
    keeps its fields and adds its id as ``source_id`` (so readers can drop duplicates:
    delivery is at-least-once); anything else is one field ``data`` holding its JSON.
    ``maxlen`` caps the stream's length (``approximate=True``: ``MAXLEN ~``, cheaper).
    Each worker has its own connection; connection errors are retried for up to
    ``retry_for`` seconds. Takes the usual stage options (``workers=``, ``errors=``, …);
    with ``batch=N`` each call appends up to N entries in one round trip and outputs
    the list of their ids, several times faster::

        Pipeline(work | RedisStreamSink("redis://127.0.0.1:6379/0", "results", workers=4))
        Pipeline(work | RedisStreamSink(url, "results", batch=100, batch_timeout=0.05))
    """

    def __init__(
        self,
        url: str,
        stream: str,
        *,
        maxlen: int | None = None,
        approximate: bool = True,
        retry_for: float = 30.0,
        **options: Any,
    ) -> None:
        who = "RedisStreamSink"
        self.url = _check_url(url, who)
        self.stream = _check_name(who, "stream", stream)
        _check_count(who, "maxlen", maxlen)
        _check_positive(who, "retry_for", retry_for)
        if not isinstance(approximate, bool):
            raise TypeError(f"{who}: approximate= must be True or False, got {approximate!r}")
        self.maxlen = maxlen
        self.approximate = approximate
        self.retry_for = float(retry_for)
        #: Field names written so far, each with its RESP length prefix (for packing).
        self._names: dict[str, str] = {}
        if options.get("batch") is not None and options.get("buffer") is None:
            # Room for a whole batch in front of the stage: with the default (a slot per
            # worker) the batcher would take a few items per scheduler round.
            options = {**options, "buffer": options["batch"]}
        super().__init__(**options)

    def _connect(self) -> _Conn:
        return _Conn(
            self.url,
            stream=self.stream,
            retry_for=self.retry_for,
            log=get_logger(stage=self.name, stream=self.stream),
        )

    async def open_worker(self) -> _Conn:
        """Each worker keeps its own connection for its lifetime."""
        return self._connect()

    async def close_worker(self, resource: Any) -> None:
        await resource.aclose()

    async def process(self, item: Any, resource: Any = None) -> Any:
        """Append ``item`` to the stream; return the new entry's id (with ``batch=``, a
        list of items in one round trip, and the list of their ids)."""
        batched = self.options.batch is not None and isinstance(item, list)
        items = item if batched else [item]
        payload = self._payload(items)
        conn: _Conn = resource if resource is not None else self._connect()
        try:
            ids = await conn.call_packed("XADD", payload, len(items))
        finally:
            if resource is None:
                with trio.CancelScope(shield=True):
                    await conn.aclose()
        return ids if batched else ids[0]

    def _head(self) -> list[Any]:
        head: list[Any] = ["XADD", self.stream]
        if self.maxlen is not None:
            head += ["MAXLEN", "~" if self.approximate else "=", self.maxlen]
        head.append("*")
        return head

    def _payload(self, items: list[Any]) -> bytes:
        """The ``XADD`` of each item, packed (RESP) into one payload."""
        try:
            payload = self._pack_entries(items)
        except (TypeError, IndexError):
            payload = None  # a field that is not a str, or a long one: hiredis packs it
        return payload if payload is not None else _pack_many(self._commands(items))

    def _pack_entries(self, items: list[Any]) -> bytes | None:
        """The usual batch, entries of short ASCII fields (what a stage after a
        RedisStreamSource returns), packed here; None for any other. hiredis's
        ``pack_command`` formats each argument's length with ``sprintf``: this takes
        less than half the instructions, the prefixes coming from a table. Raises
        TypeError for a field that is not a str, IndexError for one of
        ``len(_LENGTH_PREFIXES)`` characters or more."""
        names = self._names
        try:
            return self._pack_known(items, names)
        except KeyError:
            pass
        # Field names not seen yet: this batch's, learnt in one pass (with their length
        # prefixes), then one more packing. (Learning one name per packing would make a
        # batch of new names cost its length squared.)
        new = _names_of(items, names)
        if new is None:
            return None
        if len(names) + len(new) > _NAMES_KEPT:
            # (Names made up per entry: the memory stays bounded.) The batch's own names
            # are learnt again, those it shares with earlier batches too.
            names.clear()
            new = _names_of(items, names)
            if new is None or len(new) > _NAMES_KEPT:
                return None  # more than a sink keeps: packed by hiredis, as any other
        names.update(new)
        return self._pack_known(items, names)

    def _pack_known(self, items: list[Any], names: dict[str, str]) -> bytes | None:
        """As :meth:`_pack_entries`, or KeyError for a field name not in ``names``."""
        lengths = _LENGTH_PREFIXES
        head = self._head()
        tail = "\r\n".join([f"{lengths[len(a)]}\r\n{a}" for a in map(str, head)])
        heads: dict[int, str] = {}  # the command's head by its number of fields
        parts: list[str] = []
        add = parts.append
        for item in items:
            if type(item) is not Entry:
                return None
            fields = item._fields
            if "source_id" in fields:
                return None
            n = len(fields)
            start = heads.get(n)
            if start is None:
                start = heads[n] = f"*{len(head) + 2 * n + 2}\r\n{tail}"
            entry_id = item._id
            # Entries of one to three fields are written out: the loop over a dict's
            # items costs more than the rest of packing one.
            if n == 2:  # (the most usual: in one step)
                (k1, v1), (k2, v2) = fields.items()
                parts += (
                    start,
                    names[k1],
                    lengths[len(v1)],
                    v1,
                    names[k2],
                    lengths[len(v2)],
                    v2,
                    "$9\r\nsource_id",
                    lengths[len(entry_id)],
                    entry_id,
                )
                continue
            if n == 1:
                ((k1, v1),) = fields.items()
                parts += (start, names[k1], lengths[len(v1)], v1)
            elif n == 3:
                (k1, v1), (k2, v2), (k3, v3) = fields.items()
                parts += (start, names[k1], lengths[len(v1)], v1, names[k2], lengths[len(v2)], v2)
                parts += (names[k3], lengths[len(v3)], v3)
            else:
                add(start)
                for key, value in fields.items():
                    parts += (names[key], lengths[len(value)], value)
            parts += ("$9\r\nsource_id", lengths[len(entry_id)], entry_id)
        add("")  # (every part ends with CRLF)
        # The join takes str only (TypeError); a length is the byte count in ASCII.
        text = "\r\n".join(parts)
        return text.encode() if text.isascii() else None

    def _commands(self, items: list[Any]) -> list[Sequence[Any]]:
        """The ``XADD`` of each item (checked and converted as the class says)."""
        head = self._head()
        commands: list[Sequence[Any]] = []
        for item in items:
            if type(item) is Entry and "source_id" not in item._fields:
                # The usual item (what a stage after a RedisStreamSource returns): its
                # fields as they are, and its id; a tuple, which the packing takes as
                # it is (a list would be copied into one).
                commands.append((*head, *_flat(item._fields.items()), "source_id", item._id))
                continue
            command = head.copy()
            for pair in _fields_of(item).items():
                command += pair
            commands.append(command)
        return commands
