"""Redis Streams: entries/s through ``RedisStreamSource -> identity -> RedisStreamSink``,
in one process and in two (a fleet sharing one consumer group), per sink shape.

A redis-server of its own (no persistence) runs on a free 127.0.0.1 port and is stopped
by its PID. Each member is a fresh process (``--member``) that imports everything, says
it is ready, and starts on a signal, so start-up is not timed; the figure is entries /
(last member's end - first member's start). ``benchmarks/bench_fleet.py`` compares a
fleet with a hand-written consumer.

    python benchmarks/bench_redis.py [--quick] [--json FILE]
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import Row, bench_main, median, progress

QUICK = {"entries": 3_000, "rounds": 1}

#: The pipelines measured: the identity stage's workers, and the sink's options, one
#: XADD per entry or a batch of XADDs per round trip.
STAGE_WORKERS = 8
SINKS: dict[str, dict[str, Any]] = {
    "per-entry sink x8": {"workers": 8},
    "batched sink x2, batch=100": {"workers": 2, "batch": 100, "batch_timeout": 0.02},
}


# -- one member of the fleet (a subprocess) ----------------------------------------------------


def member(url: str, consumer: str, shape: str) -> None:
    """Run the pipeline as ``consumer`` until the stream is drained; print timings."""
    import trio

    from pipeflow import Pipeline, stage
    from pipeflow.connectors.redis import Entry, RedisStreamSink, RedisStreamSource

    @stage(workers=STAGE_WORKERS)
    async def identity(entry: Entry) -> Entry:
        return entry

    source = RedisStreamSource(
        url, "jobs", group="bench", consumer=consumer, drain=True, claim_idle=60.0
    )
    pipeline = Pipeline(identity | RedisStreamSink(url, "results", **SINKS[shape]))
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    start = time.time()
    result = trio.run(pipeline.arun, source)  # type: ignore[arg-type]
    end = time.time()
    n = result.stats["identity"].items_in
    report = {"start": start, "end": end, "entries": n}
    print(json.dumps(report), flush=True)


# -- the orchestration -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        import redis

        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", self.dir]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port, decode_responses=True)
        for _ in range(500):
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.01)

    def fill(self, entries: int) -> None:
        self.client.flushall()
        pipe = self.client.pipeline(transaction=False)
        for i in range(entries):
            pipe.xadd("jobs", {"n": str(i), "payload": "x" * 64})
            if i % 1000 == 999:
                pipe.execute()
        pipe.execute()

    def stop(self) -> None:
        self.client.close()
        os.kill(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _fleet(server: _Server, entries: int, shape: str, processes: int) -> float:
    """entries/s of ``processes`` members draining ``entries``."""
    server.fill(entries)
    members = [
        subprocess.Popen(
            [sys.executable, __file__, "--member", server.url, f"m{i}", shape],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    try:
        for m in members:
            assert m.stdout is not None
            if m.stdout.readline().strip() != "ready":
                raise RuntimeError("a benchmark member did not start")
        for m in members:
            assert m.stdin is not None
            m.stdin.write("go\n")
            m.stdin.flush()
        reports = []
        for m in members:
            out, _ = m.communicate(timeout=600)
            if m.returncode != 0:
                raise RuntimeError(f"a benchmark member failed (exit {m.returncode})")
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for m in members:
            if m.poll() is None:
                m.kill()
                m.wait()
    done = sum(r["entries"] for r in reports)
    if done < entries or server.client.xpending("jobs", "bench")["pending"]:
        raise RuntimeError(f"only {done} of {entries} entries processed")
    span = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    return entries / span


def measure(entries: int = 20_000, rounds: int = 3) -> list[Row]:
    server = _Server()
    rates: dict[tuple[str, int], list[float]] = {}
    try:
        for r in range(rounds):
            for shape in SINKS:
                for processes in (1, 2) if r % 2 == 0 else (2, 1):
                    progress(f"redis: round {r + 1}, {shape}, {processes} process(es)")
                    rate = _fleet(server, entries, shape, processes)
                    rates.setdefault((shape, processes), []).append(rate)
    finally:
        server.stop()

    detail: dict[str, Any] = {"entries": entries, "rounds": rounds, "rates": {}}
    for (shape, processes), values in rates.items():
        detail["rates"][f"{shape}, {processes} process(es)"] = values
    rows = []
    for shape in SINKS:
        one, two = median(rates[(shape, 1)]), median(rates[(shape, 2)])
        for processes, pf in ((1, one), (2, two)):
            rows.append(
                Row(
                    benchmark="redis",
                    workload=f"redis, {shape}, {processes} process{'es' if processes > 1 else ''}",
                    unit="items/s",
                    pipeflow=pf,
                    baseline=None,
                    ratio=1.0,
                    baseline_label="",
                    detail=detail,
                )
            )
        rows.append(
            Row(
                benchmark="redis",
                workload=f"redis, {shape}, 2 processes vs 1",
                unit="items/s",
                pipeflow=two,
                baseline=one,
                ratio=two / one,
                baseline_label="1 process",
                detail=detail,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__, measure, QUICK, argv)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--member":
        member(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(main())
