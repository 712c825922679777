"""``JsonLinesSink``: append each item to a file as one line of JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import IO, Any

import trio

from .._options import ErrorPolicy
from .._stage import Stage

__all__ = ["JsonLinesSink"]


class JsonLinesSink(Stage[Any, Any]):
    """Append each item to a file as one line of JSON, flushed as it is written.

    One writer (a single worker) keeps the file open for the run and appends to it, so
    lines never interleave and a file that already exists is extended, not replaced.
    Each item is serialised before anything is written: an item that JSON cannot
    represent fails with a ``TypeError`` naming its type and leaves no partial line
    (``default=`` converts such objects, as in ``json.dumps``). The output is the item
    itself, so the sink can sit in the middle of a pipeline too::

        Pipeline(enrich | JsonLinesSink("events.jsonl")).run(events)

    Writes happen in a worker thread (a disk can stall); ``fsync=True`` also asks the
    operating system to put each line on disk before the item counts as done.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        default: Callable[[Any], Any] | None = None,
        ensure_ascii: bool = False,
        sort_keys: bool = False,
        fsync: bool = False,
        name: str | None = None,
        buffer: int | None = None,
        errors: ErrorPolicy = "fail_fast",
        max_failures: int | float | None = None,
        dead_letter: Callable[[Any], Any] | Stage[Any, Any] | None = None,
    ) -> None:
        super().__init__(
            workers=1,
            buffer=buffer,
            name="jsonl_sink" if name is None else name,
            errors=errors,
            max_failures=max_failures,
            dead_letter=dead_letter,
        )
        self.path = os.fspath(path)
        self.default = default
        self.ensure_ascii = ensure_ascii
        self.sort_keys = sort_keys
        self.fsync = fsync

    @property
    def _thread_name(self) -> str:
        return f"pipeflow:{self.name}:jsonl"

    async def open_worker(self) -> IO[str]:
        """The file, opened for appending (in a thread: opening can block too)."""
        return await trio.to_thread.run_sync(self._open, thread_name=self._thread_name)

    def _open(self) -> IO[str]:
        return open(self.path, "a", encoding="utf-8")  # closed in close_worker

    async def close_worker(self, resource: IO[str]) -> None:
        await trio.to_thread.run_sync(resource.close, thread_name=self._thread_name)

    async def process(self, item: Any, file: IO[str]) -> Any:  # type: ignore[override]
        """Write ``item`` as one line of JSON and flush it; return the item."""
        try:
            line = json.dumps(
                item,
                default=self.default,
                ensure_ascii=self.ensure_ascii,
                sort_keys=self.sort_keys,
                separators=(",", ":"),
            )
        except (TypeError, ValueError) as exc:
            msg = f"{type(item).__name__} item is not JSON-serialisable: {exc}"
            raise TypeError(msg) from exc
        await trio.to_thread.run_sync(self._write, file, line, thread_name=self._thread_name)
        return item

    def _write(self, file: IO[str], line: str) -> None:
        file.write(line + "\n")
        file.flush()
        if self.fsync:
            os.fsync(file.fileno())
