"""``SQLiteSink``: rows into a SQLite table, in batches, one transaction per batch.

sqlite3 blocks, so each transaction runs in a worker thread (``trio.to_thread``) while the
event loop goes on; each worker keeps its own connection for its lifetime. Batching is
the point: a transaction per row costs a disk sync per row, a transaction per batch of
1,000 rows costs one.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeAlias

import trio

from .._options import ErrorPolicy
from .._policies import CircuitBreaker, Retry
from .._stage import Stage

__all__ = ["Row", "SQLiteSink"]

#: A row: a mapping from column name to value, or a sequence in the order of the columns.
Row: TypeAlias = Mapping[str, Any] | Sequence[Any]

OnConflict = Literal["abort", "ignore", "replace"]
_VERB = {"abort": "INSERT", "ignore": "INSERT OR IGNORE", "replace": "INSERT OR REPLACE"}


def _quote(identifier: object, what: str, stage: str) -> str:
    if not isinstance(identifier, str) or not identifier or '"' in identifier or "\0" in identifier:
        msg = f"stage {stage!r}: {what} must be a non-empty name without '\"', got {identifier!r}"
        raise ValueError(msg)
    return f'"{identifier}"'


class SQLiteSink(Stage[Row, int]):
    """Insert rows into a SQLite table in batched transactions.

    Rows are mappings (column name → value) or sequences in the order of ``columns``.
    The stage gathers up to ``batch`` rows (or what arrived within ``batch_timeout``
    seconds) and inserts them with one ``executemany`` in one transaction; each output
    is the number of rows that transaction committed, so ``sum(result.outputs)`` is
    the number of rows stored and ``len(result.outputs)`` the number of transactions::

        sink = SQLiteSink("pages.db", "pages", ["url", "title"], batch=100)
        Pipeline(fetch | parse | sink).run(urls)

    A transaction either commits every row of its batch or none: a bad row (a missing
    column, a constraint violation) fails the whole batch, which the ``errors=`` policy
    then handles (the failed item is the list of rows). Each worker opens its own
    connection (``workers=`` writers; SQLite lets one write at a time, the others wait
    up to ``tx_timeout``) and runs ``schema`` (SQL, e.g. ``CREATE TABLE IF NOT EXISTS``)
    once when it opens. A transaction that takes longer than ``tx_timeout`` seconds is
    interrupted and rolled back, and fails with ``TimeoutError``. ``on_conflict``
    chooses ``INSERT``, ``INSERT OR IGNORE`` or ``INSERT OR REPLACE`` (idempotent
    writes for at-least-once sources); ``wal=True`` switches the database to
    write-ahead logging, so readers do not block the writers.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        table: str,
        columns: Sequence[str],
        *,
        batch: int = 100,
        batch_timeout: float | None = 1.0,
        workers: int = 1,
        schema: str | None = None,
        on_conflict: OnConflict = "abort",
        tx_timeout: float = 5.0,
        wal: bool = False,
        name: str | None = None,
        buffer: int | None = None,
        retries: int | Retry = 0,
        errors: ErrorPolicy = "fail_fast",
        max_failures: int | float | None = None,
        breaker: CircuitBreaker | None = None,
        dead_letter: Callable[[Any], Any] | Stage[Any, Any] | None = None,
    ) -> None:
        super().__init__(
            workers=workers,
            buffer=buffer,
            name="sqlite_sink" if name is None else name,
            retries=retries,
            errors=errors,
            max_failures=max_failures,
            batch=batch,
            batch_timeout=batch_timeout,
            breaker=breaker,
            dead_letter=dead_letter,
        )
        stage = self.name
        if isinstance(columns, str) or not columns:
            msg = f"stage {stage!r}: columns= must be a non-empty list of names, got {columns!r}"
            raise ValueError(msg)
        if on_conflict not in _VERB:
            msg = (
                f"stage {stage!r}: on_conflict= must be 'abort', 'ignore' or 'replace', "
                f"got {on_conflict!r}"
            )
            raise ValueError(msg)
        if not (isinstance(tx_timeout, int | float) and tx_timeout > 0):
            msg = f"stage {stage!r}: tx_timeout= must be seconds > 0, got {tx_timeout!r}"
            raise ValueError(msg)
        self.path = os.fspath(path)
        self.table = table
        self.columns = tuple(columns)
        self.schema = schema
        self.on_conflict = on_conflict
        self.tx_timeout = float(tx_timeout)
        self.wal = wal
        self._setup_lock = trio.Lock()
        names = ", ".join(_quote(c, "a column", stage) for c in self.columns)
        marks = ", ".join("?" for _ in self.columns)
        self.sql = (
            f"{_VERB[on_conflict]} INTO {_quote(table, 'table=', stage)} ({names}) VALUES ({marks})"
        )

    # -- per worker ---------------------------------------------------------------------

    async def open_worker(self) -> sqlite3.Connection:
        """This worker's connection, opened (and the schema applied) in a thread."""
        # One worker at a time: SQLite can answer "database is locked" at once, without
        # waiting, to connections that change the journal mode or the schema together.
        async with self._setup_lock:
            return await trio.to_thread.run_sync(self._connect, thread_name=self._thread_name)

    async def close_worker(self, resource: sqlite3.Connection) -> None:
        await trio.to_thread.run_sync(resource.close, thread_name=self._thread_name)

    @property
    def _thread_name(self) -> str:
        return f"pipeflow:{self.name}:sqlite"

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are begun and ended here, explicitly.
        # check_same_thread=False: the connection moves between trio's worker threads,
        # but only one of them uses it at a time (its worker awaits each call).
        conn = sqlite3.connect(
            self.path, timeout=self.tx_timeout, isolation_level=None, check_same_thread=False
        )
        deadline = time.monotonic() + self.tx_timeout
        try:
            while True:
                try:
                    if self.wal:
                        conn.execute("PRAGMA journal_mode=WAL")
                    if self.schema:
                        conn.executescript(self.schema)
                    return conn
                except sqlite3.OperationalError as exc:
                    # Another process doing the same: try again, up to tx_timeout.
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
        except BaseException:
            conn.close()
            raise

    # -- per batch ----------------------------------------------------------------------

    async def process(  # type: ignore[override]  # the batch and resource variant
        self, rows: list[Row], conn: sqlite3.Connection
    ) -> int:
        """Insert one batch of rows in one transaction; return how many were committed."""
        values = [self._values(row) for row in rows]
        # Not abandoned on cancel: the thread owns the connection until it returns, and
        # tx_timeout bounds how long that can take.
        return await trio.to_thread.run_sync(
            self._insert, conn, values, thread_name=self._thread_name
        )

    def _values(self, row: object) -> Sequence[Any]:
        columns = self.columns
        if isinstance(row, Mapping):
            missing = [c for c in columns if c not in row]
            if missing:
                msg = f"row {row!r} has no value for column(s) {missing} of {self.table!r}"
                raise ValueError(msg)
            return tuple(row[c] for c in columns)
        if isinstance(row, Sequence) and not isinstance(row, str | bytes):
            if len(row) != len(columns):
                msg = (
                    f"row {row!r} has {len(row)} values for the {len(columns)} columns "
                    f"{list(columns)} of {self.table!r}"
                )
                raise ValueError(msg)
            return row
        msg = f"a row must be a mapping or a sequence of {len(columns)} values, got {row!r}"
        raise TypeError(msg)

    def _insert(self, conn: sqlite3.Connection, values: list[Sequence[Any]]) -> int:
        deadline = time.monotonic() + self.tx_timeout
        # SQLite calls this every 1,000 VM steps; a true result aborts the statement.
        conn.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(self.sql, values)
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self._rollback(conn)
            if time.monotonic() > deadline:
                msg = f"transaction of {len(values)} rows took over tx_timeout={self.tx_timeout:g}s"
                raise TimeoutError(msg) from exc
            raise
        except BaseException:
            self._rollback(conn)
            raise
        finally:
            conn.set_progress_handler(None, 0)
        return len(values)

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        conn.set_progress_handler(None, 0)
        if conn.in_transaction:
            conn.execute("ROLLBACK")
