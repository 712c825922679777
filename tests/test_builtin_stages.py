"""The built-in stages against real things: an HTTP server on 127.0.0.1 started by the
tests, SQLite files and JSON-lines files in tmp_path."""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from pipeflow import Pipeline, Retry, StageError, stage
from pipeflow._plugins import discover_stages
from pipeflow.stages import JsonLinesSink, SQLiteSink

httpx = pytest.importorskip(
    "httpx", reason="HttpFetch needs httpx: pip install 'pipeflow-trio[http]'"
)
h11 = pytest.importorskip("h11", reason="the test HTTP server needs h11 (installed with httpx)")

from pipeflow.stages import HttpFetch, HttpResult, HttpServerError, HttpStatusError  # noqa: E402

# -- a real HTTP server on 127.0.0.1 ------------------------------------------------------

Handler = Callable[[h11.Request, bytes], Awaitable[tuple[int, dict[str, str], bytes]]]


@attrs.define
class Server:
    """A tiny HTTP/1.1 server (h11 on trio.serve_tcp) whose routes the tests set."""

    base: str = ""
    routes: dict[str, Handler] = attrs.Factory(dict)
    hits: dict[str, int] = attrs.Factory(dict)
    connections: int = 0
    open_connections: int = 0

    def url(self, path: str) -> str:
        return self.base + path

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.open_connections += 1
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    if not data:
                        return
                elif isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    await self.respond(stream, conn, request, body)
                elif event is h11.PAUSED:
                    conn.start_next_cycle()
                else:
                    return
        except (h11.RemoteProtocolError, trio.BrokenResourceError):
            return
        finally:
            self.open_connections -= 1
            await trio.aclose_forcefully(stream)

    async def respond(
        self, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request, body: bytes
    ) -> None:
        path = request.target.decode().split("?", 1)[0]
        self.hits[path] = self.hits.get(path, 0) + 1
        handler = self.routes.get(path)
        if handler is None:
            status, headers, payload = 404, {}, b"not found"
        else:
            status, headers, payload = await handler(request, body)
        headers = {"content-length": str(len(payload)), **headers}
        out = conn.send(h11.Response(status_code=status, headers=list(headers.items())))
        out += conn.send(h11.Data(data=payload))
        out += conn.send(h11.EndOfMessage())
        await stream.send_all(out)


@pytest.fixture
async def server(nursery: trio.Nursery) -> Server:
    """A server on a free port of 127.0.0.1, for the test's lifetime (its nursery's)."""
    srv = Server()
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, srv.handle, 0, host="127.0.0.1")
    )
    host, port = listeners[0].socket.getsockname()[:2]
    srv.base = f"http://{host}:{port}"
    return srv


def text(body: str, status: int = 200, **headers: str) -> Handler:
    async def handler(request: h11.Request, _: bytes) -> tuple[int, dict[str, str], bytes]:
        return status, {"content-type": "text/plain; charset=utf-8", **headers}, body.encode()

    return handler


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: connecting is refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- HttpFetch ------------------------------------------------------------------------------


async def test_fetch_returns_plain_results(server: Server) -> None:
    """Each URL gives a frozen HttpResult with the URL asked for, status, headers, body."""
    server.routes["/hello"] = text("héllo", **{"x-answer": "42"})
    server.routes["/data"] = text('{"a": [1, 2]}')
    result = await Pipeline(HttpFetch(workers=2, ordered=True)).arun(
        [server.url("/hello"), server.url("/data")]
    )
    hello, data = result.outputs
    assert isinstance(hello, HttpResult)
    assert (server.url("/hello"), 200, "héllo", "42") == (
        hello.url,
        hello.status,
        hello.text,
        hello.headers["x-answer"],
    )
    assert hello.ok
    assert {"a": [1, 2]} == data.json()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        hello.status = 500  # type: ignore[misc]


async def test_one_client_per_worker_reuses_its_connection(server: Server) -> None:
    """Two workers fetching 20 URLs open two connections (one client each, kept alive),
    and close them when the run ends."""
    server.routes["/p"] = text("ok")
    result = await Pipeline(HttpFetch(workers=2)).arun([server.url("/p")] * 20)
    assert 20 == len(result.outputs)
    await trio.testing.wait_all_tasks_blocked()
    assert (2, 0) == (server.connections, server.open_connections)


async def test_5xx_is_retried_with_backoff(server: Server, autojump_clock: Any) -> None:
    """A 500 then a 503 then a 200: the item succeeds on its third attempt, after the
    backoff delays (1 s, then 2 s), and the retries are counted."""
    answers = iter([500, 503, 200])

    async def flaky(request: h11.Request, _: bytes) -> tuple[int, dict[str, str], bytes]:
        return next(answers), {}, b"body"

    server.routes["/flaky"] = flaky
    fetch = HttpFetch(retries=2, backoff=1.0)
    result = await Pipeline(fetch).arun([server.url("/flaky")])
    assert [200] == [r.status for r in result.outputs]
    assert 2 == result.stats["http_fetch"].retried
    assert 3.0 == result.elapsed


async def test_5xx_after_the_last_retry_fails_with_the_response(server: Server) -> None:
    """A server that keeps failing: the item fails with HttpServerError carrying the
    status and the body, after 1 + retries attempts."""
    server.routes["/down"] = text("database on fire", status=503)
    result = await Pipeline(HttpFetch(retries=2, backoff=0.001, errors="collect")).arun(
        [server.url("/down")]
    )
    (error,) = result.errors
    cause = error.__cause__
    assert isinstance(cause, HttpServerError)
    assert (503, "database on fire", 3) == (cause.status, cause.result.text, error.attempts)
    assert 3 == server.hits["/down"]


async def test_4xx_fails_at_once_without_retry(server: Server) -> None:
    """A 404 is not worth another attempt: one request, HttpStatusError, no retry."""
    fetch = HttpFetch(retries=3, errors="collect")
    result = await Pipeline(fetch).arun([server.url("/nowhere")])
    (error,) = result.errors
    assert isinstance(error.__cause__, HttpStatusError)
    assert not isinstance(error.__cause__, HttpServerError)
    assert (404, 1, 0) == (
        error.__cause__.status,
        server.hits["/nowhere"],
        result.stats["http_fetch"].retried,
    )
    assert f"HTTP 404 from {server.url('/nowhere')}" == str(error.__cause__)


async def test_raise_for_status_false_returns_4xx_results(server: Server) -> None:
    """With raise_for_status=False a 404 is an ordinary result to look at."""
    result = await Pipeline(HttpFetch(raise_for_status=False)).arun([server.url("/nowhere")])
    (page,) = result.outputs
    assert (404, False, "not found") == (page.status, page.ok, page.text)


async def test_timeout_bounds_each_attempt(server: Server, autojump_clock: Any) -> None:
    """A server that takes 60 s: each attempt is cut at timeout=2 s, retried once after
    0.5 s, then the item fails with TimeoutError at exactly 4.5 s."""

    async def slow(request: h11.Request, _: bytes) -> tuple[int, dict[str, str], bytes]:
        await trio.sleep(60)
        return 200, {}, b"late"

    server.routes["/slow"] = slow
    fetch = HttpFetch(timeout=2, retries=1, backoff=0.5, errors="collect")
    result = await Pipeline(fetch).arun([server.url("/slow")])
    (error,) = result.errors
    assert isinstance(error.__cause__, TimeoutError)
    assert (2, 4.5) == (error.attempts, result.elapsed)


async def test_transport_errors_are_retried(autojump_clock: Any) -> None:
    """Connection refused is a transport error: retried, then reported as httpx's own
    ConnectError."""
    url = f"http://127.0.0.1:{closed_port()}/"
    fetch = HttpFetch(retries=Retry(attempts=2, backoff=0.25, multiplier=1), errors="collect")
    result = await Pipeline(fetch).arun([url])
    (error,) = result.errors
    assert isinstance(error.__cause__, httpx.ConnectError)
    assert (3, 2, 0.5) == (error.attempts, result.stats["http_fetch"].retried, result.elapsed)


async def test_rate_limits_requests_across_workers(server: Server, autojump_clock: Any) -> None:
    """rate=10 with 5 workers: 5 requests take 0.4 s (one every 100 ms), not 0."""
    seen: list[float] = []

    async def stamp(request: h11.Request, _: bytes) -> tuple[int, dict[str, str], bytes]:
        seen.append(trio.current_time())
        return 200, {}, b""

    server.routes["/r"] = stamp
    t0 = trio.current_time()
    await Pipeline(HttpFetch(workers=5, rate=10)).arun([server.url("/r")] * 5)
    assert [0.0, 0.1, 0.2, 0.3, 0.4] == [round(t - t0, 9) for t in seen]


async def test_request_mappings_send_method_headers_and_body(server: Server) -> None:
    """A mapping item sends its method, headers, params and JSON body."""

    async def echo(request: h11.Request, body: bytes) -> tuple[int, dict[str, str], bytes]:
        headers = {k.decode(): v.decode() for k, v in request.headers}
        payload = {
            "method": request.method.decode(),
            "target": request.target.decode(),
            "token": headers.get("x-token"),
            "agent": headers.get("user-agent"),
            "body": json.loads(body),
        }
        return 200, {"content-type": "application/json"}, json.dumps(payload).encode()

    server.routes["/echo"] = echo
    item = {
        "url": server.url("/echo"),
        "method": "post",
        "headers": {"x-token": "t1"},
        "params": {"q": "a b"},
        "json": {"n": 1},
    }
    fetch = HttpFetch(headers={"user-agent": "pipeflow-test"})
    (page,) = (await Pipeline(fetch).arun([item])).outputs
    assert {
        "method": "POST",
        "target": "/echo?q=a+b",
        "token": "t1",
        "agent": "pipeflow-test",
        "body": {"n": 1},
    } == page.json()
    assert server.url("/echo") == page.url


async def test_a_bad_item_fails_naming_what_is_wrong() -> None:
    """An item that is neither a URL nor a request mapping fails with a message that
    says what an item must be."""
    with pytest.raises(StageError) as info:
        await Pipeline(HttpFetch()).arun([{"uri": "http://127.0.0.1/"}])
    assert isinstance(info.value.__cause__, ValueError)
    assert "a request mapping needs 'url'" in str(info.value.__cause__)
    assert "unknown keys ['uri']" in str(info.value.__cause__)


async def test_clients_are_closed_when_the_run_fails(server: Server) -> None:
    """A fail-fast failure cancels the workers; their clients still close, so the
    server sees every connection end."""
    server.routes["/ok"] = text("ok")
    urls = [server.url("/ok")] * 6 + [server.url("/missing")] + [server.url("/ok")] * 6
    with pytest.raises(StageError):
        await Pipeline(HttpFetch(workers=3)).arun(urls)
    await trio.testing.wait_all_tasks_blocked()
    assert server.connections >= 1
    assert 0 == server.open_connections


# -- SQLiteSink ----------------------------------------------------------------------------

SCHEMA = "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"


def rows_in(db: Path, table: str = "t") -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    finally:
        conn.close()


async def test_sqlite_sink_inserts_in_batched_transactions(tmp_path: Path) -> None:
    """250 rows with batch=100: three transactions of 100, 100 and 50 rows; every row
    stored; each output is the rows one transaction committed."""
    db = tmp_path / "t.db"
    sink = SQLiteSink(db, "t", ["id", "name"], batch=100, schema=SCHEMA)
    result = await Pipeline(sink).arun((i, f"n{i}") for i in range(250))
    assert [100, 100, 50] == sorted(result.outputs, reverse=True)
    assert [(i, f"n{i}") for i in range(250)] == rows_in(db)
    s = result.stats["sqlite_sink"]
    assert (250, 3) == (s.items_in, s.items_out)


async def test_sqlite_sink_takes_mappings_and_sequences(tmp_path: Path) -> None:
    """A row is a mapping by column name (extra keys ignored) or a sequence in column
    order."""
    db = tmp_path / "t.db"
    rows = [{"name": "a", "id": 1, "extra": True}, (2, "b"), [3, "c"]]
    await Pipeline(SQLiteSink(db, "t", ["id", "name"], schema=SCHEMA)).arun(rows)
    assert [(1, "a"), (2, "b"), (3, "c")] == rows_in(db)


async def test_a_bad_row_fails_its_whole_batch_and_nothing_of_it_is_stored(tmp_path: Path) -> None:
    """A duplicate key in the second batch rolls that whole transaction back; the other
    batches commit; the failure names the stage and carries the batch."""
    db = tmp_path / "t.db"
    rows = [(i, "x") for i in range(6)] + [(0, "duplicate")] + [(i, "y") for i in range(6, 9)]
    sink = SQLiteSink(db, "t", ["id", "name"], batch=3, schema=SCHEMA, errors="collect")
    result = await Pipeline(sink).arun(rows)
    (error,) = result.errors
    assert isinstance(error.__cause__, sqlite3.IntegrityError)
    assert ("sqlite_sink", [(0, "duplicate"), (6, "y"), (7, "y")]) == (error.stage, error.item)
    assert [0, 1, 2, 3, 4, 5, 8] == [r[0] for r in rows_in(db)]


async def test_a_row_missing_a_column_is_refused_clearly(tmp_path: Path) -> None:
    """A mapping without one of the columns fails before touching the database, naming
    the column."""
    db = tmp_path / "t.db"
    sink = SQLiteSink(db, "t", ["id", "name"], schema=SCHEMA)
    with pytest.raises(StageError) as info:
        await Pipeline(sink).arun([{"id": 1}])
    assert "has no value for column(s) ['name'] of 't'" in str(info.value.__cause__)
    assert [] == rows_in(db)


async def test_on_conflict_ignore_and_replace(tmp_path: Path) -> None:
    """on_conflict makes writes idempotent: 'ignore' keeps the first row, 'replace' the
    last."""
    rows = [(1, "first"), (1, "second")]
    for mode, expected in (("ignore", "first"), ("replace", "second")):
        db = tmp_path / f"{mode}.db"
        sink = SQLiteSink(db, "t", ["id", "name"], schema=SCHEMA, on_conflict=mode)  # type: ignore[arg-type]
        await Pipeline(sink).arun(rows)
        assert [(1, expected)] == rows_in(db)


async def test_several_writers_each_with_a_connection(tmp_path: Path) -> None:
    """Four writers with batches of 10 store 1,000 rows, all of them, in 100 transactions."""
    db = tmp_path / "t.db"
    sink = SQLiteSink(db, "t", ["id", "name"], batch=10, workers=4, schema=SCHEMA, wal=True)
    result = await Pipeline(sink).arun((i, "w") for i in range(1000))
    assert (1000, 100) == (sum(result.outputs), len(result.outputs))
    assert 4 == result.stats["sqlite_sink"].workers
    assert 1000 == len(rows_in(db))


async def test_batch_timeout_flushes_a_partial_batch(tmp_path: Path, autojump_clock: Any) -> None:
    """Rows that arrive in two groups 5 s apart, batch=100, batch_timeout=1: two
    transactions of 5 rows, not one at the end."""
    db = tmp_path / "t.db"

    async def rows() -> AsyncIterator[tuple[int, str]]:
        for i in range(10):
            if i == 5:
                await trio.sleep(5)
            yield (i, "r")

    sink = SQLiteSink(db, "t", ["id", "name"], batch=100, batch_timeout=1.0, schema=SCHEMA)
    result = await Pipeline(sink).arun(rows())
    assert [5, 5] == result.outputs
    assert 10 == len(rows_in(db))


async def test_a_transaction_over_tx_timeout_fails_with_timeout_error(tmp_path: Path) -> None:
    """While another connection holds the write lock, the sink's transaction waits at
    most tx_timeout, then fails with TimeoutError and writes nothing."""
    db = tmp_path / "t.db"
    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        blocker.execute(SCHEMA)
        blocker.execute("BEGIN IMMEDIATE")
        sink = SQLiteSink(db, "t", ["id", "name"], tx_timeout=0.2)
        with trio.fail_after(5), pytest.raises(StageError) as info:
            await Pipeline(sink).arun([(1, "a")])
        assert isinstance(info.value.__cause__, TimeoutError)
        assert "took over tx_timeout=0.2s" in str(info.value.__cause__)
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    assert [] == rows_in(db)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"columns": "id, name"}, "columns= must be a non-empty list of names, got 'id, name'"),
        ({"columns": ['na"me']}, "a column must be a non-empty name without"),
        ({"table": ""}, "table= must be a non-empty name"),
        ({"on_conflict": "merge"}, "on_conflict= must be 'abort', 'ignore' or 'replace'"),
        ({"tx_timeout": 0}, "tx_timeout= must be seconds > 0, got 0"),
    ],
)
def test_sqlite_sink_options_are_checked_when_built(kwargs: dict[str, Any], message: str) -> None:
    """Wrong arguments fail at construction, naming the stage and the argument."""
    args: dict[str, Any] = {"path": "x.db", "table": "t", "columns": ["id", "name"]} | kwargs
    with pytest.raises(ValueError, match="stage 'sqlite_sink'") as info:
        SQLiteSink(**args)
    assert message in str(info.value)


# -- JsonLinesSink -------------------------------------------------------------------------


async def test_jsonl_sink_appends_one_line_per_item(tmp_path: Path) -> None:
    """Each item becomes one line of JSON, appended after what the file held; the
    outputs are the items themselves; non-ASCII text stays readable."""
    out = tmp_path / "events.jsonl"
    out.write_text('{"old":true}\n', encoding="utf-8")
    items = [{"n": 1, "city": "Zürich"}, [1, 2], "plain", None]
    result = await Pipeline(JsonLinesSink(out)).arun(items)
    assert items == result.outputs
    lines = out.read_text(encoding="utf-8").splitlines()
    assert ['{"old":true}', '{"n":1,"city":"Zürich"}', "[1,2]", '"plain"', "null"] == lines


async def test_jsonl_sink_refuses_what_json_cannot_hold(tmp_path: Path) -> None:
    """An item JSON cannot represent fails with a TypeError naming its type and leaves
    no partial line; with errors='collect' the other items are written."""
    out = tmp_path / "events.jsonl"
    sink = JsonLinesSink(out, errors="collect")
    result = await Pipeline(sink).arun([{"a": 1}, {"b": {1, 2}}, {"c": 3}])
    (error,) = result.errors
    assert isinstance(error.__cause__, TypeError)
    assert str(error.__cause__).startswith("dict item is not JSON-serialisable: ")
    assert "set is not JSON serializable" in str(error.__cause__)
    assert ['{"a":1}', '{"c":3}'] == out.read_text(encoding="utf-8").splitlines()


async def test_jsonl_sink_default_converts_other_objects(tmp_path: Path) -> None:
    """default= converts objects JSON does not know, as in json.dumps."""
    out = tmp_path / "events.jsonl"
    sink = JsonLinesSink(out, default=sorted, sort_keys=True)
    await Pipeline(sink).arun([{"tags": {"b", "a"}, "id": 7}])
    assert ['{"id":7,"tags":["a","b"]}'] == out.read_text(encoding="utf-8").splitlines()


async def test_jsonl_sink_in_the_middle_of_a_pipeline(tmp_path: Path) -> None:
    """The sink passes its items on, so a stage can follow it."""
    out = tmp_path / "audit.jsonl"

    @stage
    async def count(item: dict[str, int]) -> int:
        return item["n"]

    result = await Pipeline(JsonLinesSink(out) | count).arun([{"n": 1}, {"n": 2}])
    assert [1, 2] == sorted(result.outputs)
    assert 2 == len(out.read_text(encoding="utf-8").splitlines())


# -- published as plugins ------------------------------------------------------------------

BUILTIN_PLUGINS = {
    "http_fetch": "pipeflow.stages.http:HttpFetch",
    "sqlite_sink": "pipeflow.stages.sqlite:SQLiteSink",
    "jsonl_sink": "pipeflow.stages.jsonl:JsonLinesSink",
}


def test_builtin_stages_are_published_as_plugins() -> None:
    """pipeflow's own stages are found through the entry-point group pipeflow.stages,
    like any third-party plugin."""
    found = discover_stages()
    if not set(BUILTIN_PLUGINS) <= set(found):
        pytest.skip(
            "pipeflow's entry points for its built-in stages are not installed yet "
            '(pyproject.toml [project.entry-points."pipeflow.stages"], then pip install -e .)'
        )
    assert BUILTIN_PLUGINS == {name: found[name].value for name in BUILTIN_PLUGINS}
    assert {"HttpFetch", "SQLiteSink", "JsonLinesSink"} == {
        found[name].load().__name__ for name in BUILTIN_PLUGINS
    }
