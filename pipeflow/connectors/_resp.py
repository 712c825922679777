"""A small Redis client on Trio streams, with hiredis as the reply parser.

Only what the Redis connector needs: commands and pipelines of commands over a pool of
connections (TCP, TLS or a Unix socket), AUTH/SELECT/CLIENT SETNAME on connect, and the
URL forms redis-py takes. Everything is native Trio I/O, so cancellation takes effect at
once: a command cancelled (or timed out, or failed) half-way closes its connection,
whose replies would otherwise be out of step with the next command's.

Retrying is the caller's business (the connector retries on Trio's clock, with
backoff): this module raises :class:`RedisConnectionError` for anything that means "the
connection is gone or Redis does not answer", and returns error replies as
:class:`RedisError` values (raised by :meth:`Client.execute`).
"""

from __future__ import annotations

import math
import socket
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs
import hiredis
import trio

__all__ = ["Client", "Params", "RedisConnectionError", "RedisError", "parse_url", "refused"]

#: Bytes asked of the socket per read: a page of a big XREADGROUP reply at a time.
_READ_SIZE = 65536
#: A command may go this long (seconds) without an answer, beyond the time it blocks
#: by design (XREADGROUP BLOCK), before its connection is taken for dead.
_SOCKET_TIMEOUT = 10.0
_CONNECT_TIMEOUT = 5.0
#: A reply later than this (seconds, beyond a command's blocking time) is overdue.
_OVERDUE = 0.2


class RedisError(Exception):
    """Redis answered a command with an error (``WRONGTYPE ...``, ``NOGROUP ...``)."""


class RedisConnectionError(ConnectionError):
    """No connection to Redis, a lost one, or no answer in time: worth retrying."""


def refused(error: BaseException) -> bool:
    """Whether Redis refused a command as unknown (disabled or renamed, as managed Redis
    services do: ``rename-command X ""``), or as not allowed to this user (an ACL);
    also from a script (``EVAL``) calling one."""
    text = str(error)
    return "ERR unknown command" in text or "NOPERM" in text or "Unknown Redis command" in text


_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n", ""}


def _bool(value: str) -> bool:
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(value)


def _cert_reqs(value: str) -> ssl.VerifyMode:
    modes = {
        "none": ssl.CERT_NONE,
        "optional": ssl.CERT_OPTIONAL,
        "required": ssl.CERT_REQUIRED,
    }
    try:
        return modes[value.strip().lower()]
    except KeyError:
        raise ValueError(value) from None


def _positive(value: str) -> float:
    number = float(value)
    if not (number > 0 and math.isfinite(number)):
        raise ValueError(value)
    return number


def _count(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


def _ignored(value: str) -> str:
    return value


#: The query parameters of a Redis URL this client reads (redis-py's names), and how.
#: ``retry_on_timeout``, ``health_check_interval``, ``timeout`` and ``protocol`` are
#: accepted for URLs written for redis-py and have nothing to do here: the connector
#: retries every timeout, a dead connection is found by its next command (and the
#: command retried), and replies are read as RESP2.
URL_OPTIONS: dict[str, Any] = {
    "db": int,
    "username": str,
    "password": str,
    "socket_timeout": _positive,
    "socket_connect_timeout": _positive,
    "socket_keepalive": _bool,
    "max_connections": _count,
    "client_name": str,
    "ssl_check_hostname": _bool,
    "ssl_cert_reqs": _cert_reqs,
    "ssl_ca_certs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "retry_on_timeout": _ignored,
    "health_check_interval": _ignored,
    "timeout": _ignored,
    "protocol": _ignored,
}


@attrs.frozen(kw_only=True)
class Params:
    """Where and how to connect: what a Redis URL says."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a Unix socket
    tls: bool = False
    db: int = 0
    username: str | None = None
    password: str | None = None
    client_name: str | None = None
    socket_timeout: float = _SOCKET_TIMEOUT
    connect_timeout: float = _CONNECT_TIMEOUT
    keepalive: bool = False
    max_connections: int | None = None
    ssl_check_hostname: bool = True
    ssl_cert_reqs: ssl.VerifyMode = ssl.CERT_REQUIRED
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @property
    def where(self) -> str:
        """The server, for messages (never the password)."""
        if self.path is not None:
            return f"unix://{self.path}"
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ssl_ca_certs)
        context.check_hostname = self.ssl_check_hostname and self.ssl_cert_reqs != ssl.CERT_NONE
        context.verify_mode = self.ssl_cert_reqs
        if self.ssl_certfile is not None:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        return context


def parse_url(url: str) -> Params:
    """``redis://[[user]:password@]host[:port][/db][?option=value&...]``, ``rediss://``
    (TLS) or ``unix://[[user]:password@]/path/to/socket[?db=N&...]``, read as redis-py
    reads them. Raises ``ValueError`` naming what is wrong (never the password)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"the URL must start with redis://, rediss:// or unix://, got {parts.scheme!r}"
        )
    values: dict[str, Any] = {}
    for key, raw in parse_qsl(parts.query, keep_blank_values=True):
        convert = URL_OPTIONS.get(key)
        if convert is None:
            raise ValueError(f"unknown option {key!r} (known: {', '.join(sorted(URL_OPTIONS))})")
        try:
            value = convert(raw)
        except ValueError:
            shown = "***" if key == "password" else repr(raw)
            raise ValueError(f"{key}={shown} is not a valid {key}") from None
        if convert is not _ignored:
            values[key] = value
    # The netloc's user and password win over query parameters, as in redis-py.
    if parts.username:
        values["username"] = unquote(parts.username)
    if parts.password:
        values["password"] = unquote(parts.password)
    params: dict[str, Any] = {}
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs the socket's path: unix:///run/redis.sock")
        params["path"] = unquote(parts.path)
    else:
        params["tls"] = parts.scheme == "rediss"
        if parts.hostname:
            params["host"] = unquote(parts.hostname)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port is not None:
            if not 0 < port <= 65535:
                raise ValueError("the port must be 1..65535")
            params["port"] = port
        database = unquote(parts.path).strip("/")
        if database and "db" not in values:
            if not database.isdigit():
                raise ValueError("the database must be a number, like /0")
            params["db"] = int(database)
    renames = {"socket_connect_timeout": "connect_timeout", "socket_keepalive": "keepalive"}
    for key, value in values.items():
        params[renames.get(key, key)] = value
    return Params(**params)


def _pack(args: Sequence[Any]) -> bytes:
    pack: Callable[[tuple[Any, ...]], bytes] = hiredis.pack_command
    try:
        return pack(tuple(args))
    except UnicodeEncodeError:
        # A str read from Redis that was not UTF-8 (it reached us surrogate-escaped):
        # send back the very bytes it came as.
        return pack(
            tuple(a.encode("utf-8", "surrogateescape") if isinstance(a, str) else a for a in args)
        )


def _pack_many(commands: Sequence[Sequence[Any]]) -> bytes:
    """Several commands packed into one payload (a pipeline)."""
    pack: Callable[[tuple[Any, ...]], bytes] = hiredis.pack_command
    try:
        return b"".join([pack(tuple(command)) for command in commands])
    except UnicodeEncodeError:
        return b"".join([_pack(command) for command in commands])


class Connection:
    """One connection: a command goes out, its reply comes back, in step."""

    def __init__(self, stream: trio.abc.Stream, params: Params) -> None:
        self._stream = stream
        self._params = params
        # Replies decode as UTF-8; bytes that are not come through surrogate-escaped,
        # so that nothing is lost and a reader error never breaks the stream of replies.
        self._reader = hiredis.Reader(
            replyError=RedisError, encoding="utf-8", errors="surrogateescape"
        )
        #: Why Redis would not name this connection (CLIENT disabled), if it would not.
        self.unnamed: str | None = None

    async def request(self, payload: bytes, replies: int, within: float) -> list[Any]:
        """Send ``payload`` (packed commands) and read ``replies`` replies, in at most
        ``within`` seconds. Raises :class:`RedisConnectionError` if that fails; the
        connection is then unusable, and so it is if this is cancelled."""
        out: list[Any] = []
        reader = self._reader
        with trio.move_on_after(within) as scope:
            try:
                await self._stream.send_all(payload)
                while len(out) < replies:
                    reply = reader.gets()
                    if reply is False:
                        data = await self._stream.receive_some(_READ_SIZE)
                        if not data:
                            raise RedisConnectionError(
                                f"Redis at {self._params.where} closed the connection"
                            )
                        reader.feed(bytes(data))
                        continue
                    out.append(reply)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise RedisConnectionError(
                    f"connection to Redis at {self._params.where} lost: {_describe(exc)}"
                ) from exc
            except hiredis.ProtocolError as exc:
                raise RedisConnectionError(
                    f"Redis at {self._params.where} sent a reply that is not RESP: {exc}"
                ) from exc
        if scope.cancelled_caught:
            raise RedisConnectionError(
                f"Redis at {self._params.where} did not answer within {within:g}s"
            )
        return out

    async def aclose(self) -> None:
        """Close at once (no TLS goodbye): also fine when cancelled."""
        await trio.aclose_forcefully(self._stream)


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else None
    inner = cause if cause is not None else exc
    return f"{type(inner).__name__}: {inner}"


async def connect(params: Params, within: float | None = None) -> Connection:
    """A new connection, authenticated, on its database, named; or
    :class:`RedisConnectionError` (and :class:`RedisError` if Redis refused the
    password, the database or the name). All of it takes at most
    ``params.connect_timeout`` seconds, or ``within`` if that is shorter (what the
    caller's retrying has left)."""
    timeout = params.connect_timeout if within is None else min(params.connect_timeout, within)
    deadline = trio.current_time() + timeout
    stream: trio.abc.Stream | None = None
    step = "connect"  # what was under way, for the message if it fails or takes too long
    try:
        with trio.move_on_at(deadline) as scope:
            try:
                if params.path is not None:
                    stream = await trio.open_unix_socket(params.path)
                else:
                    tcp = await trio.open_tcp_stream(params.host, params.port)
                    stream = tcp
                    if params.keepalive:
                        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                    if params.tls:
                        step = "tls"
                        tls = trio.SSLStream(tcp, params.ssl_context(), server_hostname=params.host)
                        stream = tls
                        await tls.do_handshake()
            except (OSError, trio.BrokenResourceError) as exc:
                what = "the TLS handshake failed: " if step == "tls" else ""
                raise RedisConnectionError(
                    f"cannot connect to Redis at {params.where}: {what}{_describe(exc)}"
                ) from exc
        if scope.cancelled_caught or stream is None:
            if step == "tls":
                # A Redis without TLS takes the ClientHello for the start of a command
                # and waits for the rest: it never answers.
                raise RedisConnectionError(
                    f"cannot connect to Redis at {params.where}: the TLS handshake got no "
                    f"answer within {timeout:g}s (does the server speak TLS on that port? "
                    f"a Redis without TLS never answers one: use redis://)"
                )
            raise RedisConnectionError(
                f"cannot connect to Redis at {params.where}: no answer within {timeout:g}s"
            )
        conn = Connection(stream, params)
        hello: list[tuple[Any, ...]] = []
        if params.password is not None:
            if params.username is not None:
                hello.append(("AUTH", params.username, params.password))
            else:
                hello.append(("AUTH", params.password))
        if params.db:
            hello.append(("SELECT", params.db))
        if params.client_name:
            hello.append(("CLIENT", "SETNAME", params.client_name))
        if hello:
            payload = b"".join(_pack(c) for c in hello)
            left = max(deadline - trio.current_time(), 0.0)
            replies = await conn.request(payload, len(hello), left)
            for command, reply in zip(hello, replies, strict=True):
                if isinstance(reply, RedisError):
                    if command[0] == "CLIENT" and refused(reply):
                        # Only a name for CLIENT LIST: not worth failing over.
                        conn.unnamed = str(reply)
                        continue
                    raise RedisError(f"Redis at {params.where} refused {command[0]}: {reply}")
    except BaseException:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise
    return conn


class _ServerState:
    """What the clients of one process know about one Redis server's responsiveness."""

    __slots__ = ("overdue", "pending")

    def __init__(self) -> None:
        self.overdue = False  # a command was abandoned late, and no reply since
        self.pending: dict[object, float] = {}  # commands in flight: when each is late


_servers: dict[str, _ServerState] = {}


def _server_state(where: str) -> _ServerState:
    state = _servers.get(where)
    if state is None:
        state = _servers[where] = _ServerState()
    return state


class Client:
    """Commands to one Redis, over a pool of connections opened as needed.

    A command takes an idle connection (or opens one), and gives it back once its reply
    is in. A command cancelled or failed half-way closes its connection instead. So
    several tasks may run commands at once (a blocking read does not hold up an ack),
    each on its own connection::

        client = Client(parse_url("redis://127.0.0.1:6379/0"))
        try:
            await client.execute("XADD", "jobs", "*", "n", 1)
        finally:
            await client.aclose()
    """

    def __init__(self, params: Params, *, on_unnamed: Callable[[str], None] | None = None) -> None:
        self.params = params
        #: Called (with Redis's error) when Redis would not name a connection (CLIENT
        #: SETNAME disabled or not allowed): the next ones are not named.
        self._on_unnamed = on_unnamed
        self._idle: deque[Connection] = deque()
        self._limit = (
            trio.CapacityLimiter(params.max_connections)
            if params.max_connections is not None
            else None
        )
        self._closed = False
        self._server = _server_state(params.where)

    @property
    def overdue(self) -> bool:
        """True while Redis looks frozen or cut off, as seen by any client of this
        process talking to it: a command is waiting longer than Redis should take, or
        one was abandoned (cancelled, timed out) after that, and no reply has come
        since. Whoever must be prompt (a cancelled run's last acks) should not wait."""
        server = self._server
        if server.overdue:
            return True
        now = trio.current_time()
        return any(due < now for due in server.pending.values())

    async def execute(
        self, *args: Any, blocks_for: float = 0.0, connect_within: float | None = None
    ) -> Any:
        """Run one command; its reply (decoded str, int, list, None), or raise
        :class:`RedisError` for an error reply. ``blocks_for``: how long the command
        may wait in Redis by design (``BLOCK``), on top of the socket timeout;
        ``connect_within``: the most a new connection may take, if shorter than the
        URL's connect timeout."""
        (reply,) = await self._request(_pack(args), 1, blocks_for, connect_within)
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def execute_many(
        self,
        commands: Sequence[Sequence[Any]],
        *,
        blocks_for: float = 0.0,
        connect_within: float | None = None,
    ) -> list[Any]:
        """Run several commands in one round trip (a pipeline, not a transaction); their
        replies, error replies as :class:`RedisError` values in the list."""
        return await self._request(_pack_many(commands), len(commands), blocks_for, connect_within)

    async def execute_packed(
        self,
        payload: bytes,
        replies: int,
        *,
        blocks_for: float = 0.0,
        connect_within: float | None = None,
    ) -> list[Any]:
        """As :meth:`execute_many`, for ``replies`` commands already packed (RESP) into
        ``payload`` by the caller."""
        return await self._request(payload, replies, blocks_for, connect_within)

    async def _request(
        self, payload: bytes, replies: int, blocks_for: float, connect_within: float | None
    ) -> list[Any]:
        if self._closed:
            raise RedisConnectionError(f"the client of Redis at {self.params.where} is closed")
        if self._limit is not None:
            async with self._limit:
                return await self._on_a_connection(payload, replies, blocks_for, connect_within)
        return await self._on_a_connection(payload, replies, blocks_for, connect_within)

    async def _on_a_connection(
        self, payload: bytes, replies: int, blocks_for: float, connect_within: float | None
    ) -> list[Any]:
        started = trio.current_time()
        server = self._server
        token = object()
        server.pending[token] = started + blocks_for + _OVERDUE
        try:
            if self._idle:
                conn = self._idle.pop()
            else:
                conn = await connect(self.params, connect_within)
                if conn.unnamed is not None:
                    self.params = attrs.evolve(self.params, client_name=None)
                    if self._on_unnamed is not None:
                        self._on_unnamed(conn.unnamed)
            try:
                out = await conn.request(payload, replies, self.params.socket_timeout + blocks_for)
            except BaseException as exc:
                # Cancelled, timed out or broken half-way: replies may still be on their
                # way, so this connection can never be trusted again.
                if trio.current_time() - started > blocks_for + _OVERDUE:
                    server.overdue = True
                await conn.aclose()
                if isinstance(exc, RedisConnectionError):
                    # Redis went away (a restart): the idle connections went with it.
                    await self._close_idle()
                raise
        except RedisConnectionError as exc:
            exc.started = started  # type: ignore[attr-defined]  # (for the caller's retrying)
            raise
        finally:
            del server.pending[token]
        server.overdue = False
        if self._closed:
            await conn.aclose()
        else:
            self._idle.append(conn)
        return out

    async def aclose(self) -> None:
        """Close every idle connection at once (commands in flight close theirs as they
        end). Fine to call when cancelled."""
        self._closed = True
        await self._close_idle()

    async def _close_idle(self) -> None:
        while self._idle:
            await self._idle.pop().aclose()
