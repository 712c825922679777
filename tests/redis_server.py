"""A real ``redis-server`` for the tests: started on a free 127.0.0.1 port in a temporary
directory, stopped (or crashed, or restarted) by its PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

BINARY = shutil.which("redis-server")


def add_jobs(client: Any, n: int, stream: str = "jobs") -> list[str]:
    """Append ``n`` entries ``{"n": i}`` to ``stream``; return their ids."""
    pipe = client.pipeline()
    for i in range(n):
        pipe.xadd(stream, {"n": str(i)})
    return list(pipe.execute())


def pending_ids(client: Any, stream: str = "jobs", group: str = "workers") -> set[str]:
    """The ids of the group's pending (delivered, not acked) entries."""
    return {p["message_id"] for p in client.xpending_range(stream, group, "-", "+", 10_000)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process. ``durable=True`` turns on the append-only file with an
    fsync per write, as docs/distributed.md recommends, so a crash loses nothing.
    ``extra`` arguments go last (``{port}`` in one is the server's port), and
    ``client_options`` to the tests' own redis-py client (a password, TLS)."""

    def __init__(
        self,
        directory: Path,
        *,
        durable: bool = False,
        extra: tuple[str, ...] = (),
        client_options: dict[str, Any] | None = None,
    ) -> None:
        assert BINARY is not None
        self.directory = directory
        self.port = free_port()
        #: How the tests' own client reaches it (a password, TLS).
        self.client_options = client_options or {}
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if durable else []
        persistence = persistence or ["--appendonly", "no"]
        self.argv = [
            BINARY,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            *persistence,
            "--dir",
            str(directory),
            *(arg.replace("{port}", str(self.port)) for arg in extra),
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        options = {"host": "127.0.0.1", "port": self.port, "decode_responses": True}
        return redis.Redis(**{**options, **self.client_options})

    def start(self, timeout: float = 10.0) -> None:
        log = (self.directory / "redis.log").open("ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.crash()  # not left running behind a failed test
                        tail = (self.directory / "redis.log").read_text()[-2000:]
                        raise RuntimeError(f"redis-server did not start: {tail}") from None
                    time.sleep(0.02)

    def _signal(self, sig: int) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        """Stop it cleanly (SIGTERM to its PID)."""
        self._signal(signal.SIGTERM)

    def crash(self) -> None:
        """Kill it as a crash would (SIGKILL to its PID): no shutdown, no final save."""
        self._signal(signal.SIGKILL)


@contextlib.contextmanager
def own_redis_server(directory: Path, *, durable: bool = False) -> Iterator[RedisServer]:
    """A server of a test's own, to freeze (SIGSTOP), crash or restart; thawed (if the
    test left it frozen) and stopped afterwards. Skips the test without redis-server."""
    if BINARY is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    server = RedisServer(directory, durable=durable)
    try:
        yield server
    finally:
        assert server.proc is not None
        if server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


async def eventually(check: Callable[[], bool]) -> None:
    """Wait until ``check()`` holds; it talks to Redis, so it runs in a thread."""
    while True:
        if await trio.to_thread.run_sync(check):
            return
        await trio.sleep(0.01)
