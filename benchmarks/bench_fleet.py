"""A fleet on Redis Streams: 1, 2 and 4 members against a hand-written consumer.

Every member drains one stream of jobs through one consumer group, works on each entry
(``square = n * n``, in an ``async def`` stage), appends the result to a results stream
and acknowledges the job. Both sides have the same shape: 100 entries per
``XREADGROUP``, the ``XADD``s pipelined 100 at a time, every entry acked. The pipeflow
member is ``RedisStreamSource(count=100) -> work (8 workers) -> RedisStreamSink(batch=100,
workers=2)``, what ``pipeflow run --source redis://...`` runs, acking each entry once its
item has left the pipeline (``XACK`` batched by the source); the hand-written member is
the minimal loop a careful programmer writes with the same client (``XREADGROUP COUNT
100``, then the ``XADD``s and one ``XACK`` in one round trip, nothing in flight).

Each member is a fresh process (``--member``) that imports everything, freezes what it
loaded (``gc.freeze()``, as ``pipeflow run`` does), says it is ready and starts on a
signal, so start-up is not timed; it reports its own CPU seconds
(``time.process_time()``). A redis-server of its own (no persistence) runs on a free
127.0.0.1 port; its CPU is what it reports of itself (``INFO cpu``, in microseconds).
Figures: entries/s of the fleet (entries / the span from the first start to the last
end), CPU per entry of the members (their CPU seconds summed / entries: what one member
spends per entry), and of Redis.
A last row runs one member of each kind without Redis (the pages decoded in memory,
the XADDs packed and not sent): what pipeflow's own machinery costs per entry, the
part of the gap that is not the client. Targets: pipeflow's CPU per entry at most 1.5x
the hand-written loop's, and 4 members
at least 3x one member's rate where the machine has the cores for it (4 members and
Redis: 6 or more).

    python benchmarks/bench_fleet.py [--quick] [--json FILE] [--check]
"""

from __future__ import annotations

import functools
import gc
import json
import math
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

QUICK = {"entries": 2_000, "rounds": 1}
FLEETS = (1, 2, 4)
KINDS = ("hand-written", "pipeflow")
#: Cores below which 4 members (and Redis) cannot run side by side.
CORES_FOR_4 = 6
STREAM, GROUP, RESULTS = "jobs", "bench", "results"
#: Entries per XREADGROUP, and per pipelined batch of XADDs, on both sides.
COUNT = 100


# -- the members (subprocesses) --------------------------------------------------------------


async def _pipeflow_member(url: str, consumer: str) -> int:
    from pipeflow import Pipeline, stage
    from pipeflow.connectors.redis import Entry, RedisStreamSink, RedisStreamSource

    @stage(workers=8)
    async def work(entry: Entry) -> Entry:
        n = int(entry.fields["n"])
        return entry.with_fields(n=n, square=n * n)

    sink = RedisStreamSink(url, RESULTS, workers=2, batch=COUNT, batch_timeout=0.01)
    source = RedisStreamSource(
        url, STREAM, group=GROUP, consumer=consumer, drain=True, claim_idle=60.0, count=COUNT
    )
    result = await Pipeline(work | sink, name="fleet").arun(source, collect=False)
    return result.stats["work"].items_in


async def _hand_member(url: str, consumer: str) -> int:
    from pipeflow.connectors._resp import Client, parse_url

    client = Client(parse_url(url))
    done = 0
    try:
        while True:
            reply = await client.execute(
                "XREADGROUP", "GROUP", GROUP, consumer, "COUNT", COUNT, "STREAMS", STREAM, ">"
            )
            if not reply:
                return done  # drained (no member of this benchmark crashes)
            commands: list[tuple[Any, ...]] = []
            ids = []
            for entry_id, flat in reply[0][1]:
                fields = dict(zip(flat[::2], flat[1::2], strict=True))
                n = int(fields["n"])
                commands.append(
                    ("XADD", RESULTS, "*", "n", n, "square", n * n, "source_id", entry_id)
                )
                ids.append(entry_id)
            commands.append(("XACK", STREAM, GROUP, *ids))
            await client.execute_many(commands)
            done += len(ids)
    finally:
        await client.aclose()


async def _hand_packed_member(url: str, consumer: str) -> int:
    """The hand-written member packing its XADDs as pipeflow's sink does (RESP length
    prefixes from a table, one join per page) rather than with ``hiredis.pack_command``:
    not what a user of a Redis client writes, but the baseline without that handicap
    (``--member URL NAME hand-written-packed``; not in the default runs)."""
    from pipeflow.connectors._resp import Client, _pack_many, parse_url

    prefixes = [f"${n}" for n in range(1024)]
    head = f"*9\r\n$4\r\nXADD\r\n{prefixes[len(RESULTS)]}\r\n{RESULTS}\r\n$1\r\n*\r\n$1\r\nn"
    client = Client(parse_url(url))
    done = 0
    try:
        while True:
            reply = await client.execute(
                "XREADGROUP", "GROUP", GROUP, consumer, "COUNT", COUNT, "STREAMS", STREAM, ">"
            )
            if not reply:
                return done
            parts: list[str] = []
            ids = []
            for entry_id, flat in reply[0][1]:
                fields = dict(zip(flat[::2], flat[1::2], strict=True))
                n = int(fields["n"])
                a, b = str(n), str(n * n)
                parts += (head, prefixes[len(a)], a, "$6\r\nsquare", prefixes[len(b)], b)
                parts += ("$9\r\nsource_id", prefixes[len(entry_id)], entry_id)
                ids.append(entry_id)
            parts.append("")
            payload = "\r\n".join(parts).encode() + _pack_many([("XACK", STREAM, GROUP, *ids)])
            await client.execute_packed(payload, len(ids) + 1)
            done += len(ids)
    finally:
        await client.aclose()


MEMBERS = {
    "pipeflow": _pipeflow_member,
    "hand-written": _hand_member,
    "hand-written-packed": _hand_packed_member,
}


# -- the same members without Redis: where the gap is ------------------------------------------


def _replies(entries: int) -> list[list[Any]]:
    """What XREADGROUP COUNT 100 would answer, page by page, as hiredis decodes it."""
    flat = [[f"{i}-0", ["n", str(i), "payload", "x" * 64]] for i in range(entries)]
    return [flat[i : i + COUNT] for i in range(0, entries, COUNT)]


async def _pipeflow_no_io(pages: list[list[Any]]) -> int:
    """The pipeflow member with Redis taken out: an acking source handing over decoded
    pages a chunk at a time (as RedisStreamSource does), the same stage, and the same
    batched sink building and packing its XADDs without sending them."""
    import contextlib

    import trio

    from pipeflow import Pipeline, stage
    from pipeflow.connectors.redis import Entry, RedisStreamSink, _fields_dict

    acked: list[str] = []

    class Pages:
        """The pages, handed over as RedisStreamSource hands its entries to the run:
        a chunk of entries with their ids, acked by id (``finished_many``)."""

        def __init__(self) -> None:
            self.pages = iter(pages)
            self.buffer: list[Any] = []
            self.split = False  # (no stage here splits an entry)

        async def _pipeflow_take_keyed(self, limit: int) -> tuple[list[Entry], list[str]]:
            await trio.lowlevel.checkpoint()
            if not self.buffer:
                self.buffer = list(next(self.pages, []))
            entries = [
                Entry(entry_id, _fields_dict(fields)) for entry_id, fields in self.buffer[:limit]
            ]
            del self.buffer[:limit]
            return entries, [entry.id for entry in entries]

        def finished(self, entry_id: str) -> None:
            acked.append(entry_id)

        def finished_many(self, ids: list[str]) -> None:
            acked.extend(ids)

        def __aiter__(self) -> Pages:
            return self

        async def __anext__(self) -> Any:  # pragma: no cover - the run takes chunks
            raise StopAsyncIteration

    class Source:
        @contextlib.asynccontextmanager
        async def __pipeflow_open__(self, *, capacity: int) -> Any:
            yield Pages()

    class PackingSink(RedisStreamSink):
        async def open_worker(self) -> Any:
            return None

        async def close_worker(self, resource: Any) -> None:
            pass

        async def process(self, item: Any, resource: Any = None) -> Any:
            return len(self._payload(item))  # what the sink sends, not sent

    @stage(workers=8)
    async def work(entry: Entry) -> Entry:
        n = int(entry.fields["n"])
        return entry.with_fields(n=n, square=n * n)

    sink = PackingSink("redis://127.0.0.1:1/0", RESULTS, workers=2, batch=COUNT, batch_timeout=0.01)
    await Pipeline(work | sink, name="fleet").arun(Source(), collect=False)
    return len(acked)


async def _hand_no_io(pages: list[list[Any]]) -> int:
    """The hand-written member with Redis taken out: the same decoding, work and packing."""
    import trio

    from pipeflow.connectors._resp import _pack_many

    done = 0
    for page in pages:
        commands: list[tuple[Any, ...]] = []
        ids = []
        for entry_id, flat in page:
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            n = int(fields["n"])
            commands.append(("XADD", RESULTS, "*", "n", n, "square", n * n, "source_id", entry_id))
            ids.append(entry_id)
        commands.append(("XACK", STREAM, GROUP, *ids))
        _pack_many(commands)
        done += len(ids)
        await trio.lowlevel.checkpoint()
    return done


NO_IO = {"pipeflow": _pipeflow_no_io, "hand-written": _hand_no_io}


def member(url: str, consumer: str, kind: str) -> None:
    """Drain the stream as ``consumer``; print start, end, entries and CPU seconds.
    ``kind`` ``"no-io:pipeflow:N"`` (or ``no-io:hand-written:N``) runs the member
    without Redis, on N entries made in memory."""
    import trio

    import pipeflow.connectors.redis  # noqa: F401 - imported before the clock starts

    if kind.startswith("no-io:"):
        _, which, n_entries = kind.split(":")
        # The pages are made before the clock starts, as Redis would have them ready.
        run: Any = functools.partial(NO_IO[which], _replies(int(n_entries)))
    else:
        run = functools.partial(MEMBERS[kind], url, consumer)
    # As `pipeflow run` does before its run: what is loaded is frozen, so full
    # collections do not walk it (both kinds, so the comparison stays fair).
    gc.freeze()
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    cpu0, start = time.process_time(), time.time()
    n = trio.run(run)
    end, cpu = time.time(), time.process_time() - cpu0
    print(json.dumps({"start": start, "end": end, "entries": n, "cpu": cpu}), flush=True)


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

        self.dir = tempfile.mkdtemp(prefix="bench-fleet-")
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

    def cpu_seconds(self) -> float:
        """Redis's own user + system CPU seconds so far (``INFO cpu``: microseconds;
        ``/proc`` counts in ticks of 10 ms, which a small run's Redis work falls under)."""
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def fill(self, entries: int) -> None:
        self.client.flushall()
        pipe = self.client.pipeline(transaction=False)
        for i in range(entries):
            pipe.xadd(STREAM, {"n": str(i), "payload": "x" * 64})
            if i % 1000 == 999:
                pipe.execute()
        pipe.execute()
        self.client.xgroup_create(STREAM, GROUP, "0")

    def stop(self) -> None:
        self.client.close()
        os.kill(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _fleet(server: _Server, entries: int, kind: str, members: int) -> dict[str, float]:
    """One run: ``members`` processes of ``kind`` drain ``entries``."""
    server.fill(entries)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--member", server.url, f"m{i}", kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(members)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a benchmark member did not start")
        redis_cpu = server.cpu_seconds()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        reports = []
        for p in procs:
            out, _ = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"a benchmark member failed (exit {p.returncode})")
            reports.append(json.loads(out.strip().splitlines()[-1]))
        redis_cpu = server.cpu_seconds() - redis_cpu
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    done = sum(r["entries"] for r in reports)
    written = server.client.xlen(RESULTS)
    pending = server.client.xpending(STREAM, GROUP)["pending"]
    if done != entries or written != entries or pending:
        msg = f"{kind} x{members}: {done}/{entries} processed, {written} written, {pending} pending"
        raise RuntimeError(msg)
    span = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    return {
        "rate": entries / span,
        "cpu_us": 1e6 * sum(r["cpu"] for r in reports) / entries,
        "redis_cpu_us": 1e6 * redis_cpu / entries,
    }


def _no_io(entries: int, kind: str) -> float:
    """CPU microseconds per entry of one member of ``kind`` run without Redis."""
    argv = [sys.executable, __file__, "--member", "-", "-", f"no-io:{kind}:{entries}"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("a benchmark member did not start")
        out, _ = proc.communicate("go\n", timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"a benchmark member (no Redis) failed (exit {proc.returncode})")
    report = json.loads(out.strip().splitlines()[-1])
    if report["entries"] != entries:
        raise RuntimeError(f"{kind} without Redis: {report['entries']}/{entries} entries")
    return float(1e6 * report["cpu"] / entries)


def measure(entries: int = 20_000, rounds: int = 3, fleets: tuple[int, ...] = FLEETS) -> list[Row]:
    server = _Server()
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    no_io: dict[str, list[float]] = {}
    cases = [(kind, members) for members in fleets for kind in KINDS]
    try:
        for r in range(rounds):
            for kind, members in cases if r % 2 == 0 else cases[::-1]:
                progress(f"fleet: round {r + 1}, {kind}, {members} member(s)")
                runs.setdefault((kind, members), []).append(_fleet(server, entries, kind, members))
            for kind in KINDS if r % 2 == 0 else KINDS[::-1]:
                progress(f"fleet: round {r + 1}, {kind}, 1 member without Redis")
                no_io.setdefault(kind, []).append(_no_io(entries, kind))
    finally:
        server.stop()

    def fig(kind: str, members: int, what: str) -> float:
        return median([run[what] for run in runs[(kind, members)]])

    cores = os.cpu_count() or 1
    detail: dict[str, Any] = {
        "entries": entries,
        "rounds": rounds,
        "cores": cores,
        "runs": {f"{kind} x{members}": values for (kind, members), values in runs.items()},
        "no_io_cpu_us": no_io,
    }
    rows = []
    for members in fleets:
        label = f"{members} member{'s' if members > 1 else ''}"
        pf_cpu, hand_cpu = (
            fig("pipeflow", members, "cpu_us"),
            fig("hand-written", members, "cpu_us"),
        )
        rows.append(
            Row(
                benchmark="fleet",
                workload=f"fleet, {label}, member CPU per entry",
                unit="us",
                pipeflow=pf_cpu,
                baseline=hand_cpu,
                ratio=pf_cpu / hand_cpu,
                target=("<=", 1.5),
                detail=detail,
            )
        )
        pf_rate, hand_rate = fig("pipeflow", members, "rate"), fig("hand-written", members, "rate")
        rows.append(
            Row(
                benchmark="fleet",
                workload=f"fleet, {label}, entries/s",
                unit="items/s",
                pipeflow=pf_rate,
                baseline=hand_rate,
                ratio=pf_rate / hand_rate,
                detail=detail,
            )
        )
        pf_redis = fig("pipeflow", members, "redis_cpu_us")
        hand_redis = fig("hand-written", members, "redis_cpu_us")
        rows.append(
            Row(
                benchmark="fleet",
                workload=f"fleet, {label}, Redis CPU per entry",
                unit="us",
                pipeflow=pf_redis,
                baseline=hand_redis,
                ratio=pf_redis / hand_redis if hand_redis > 0 else math.nan,
                detail=detail,
            )
        )
    # Where the gap is: the same two members with Redis taken out (decoded pages in
    # memory, the XADDs packed and not sent). What pipeflow spends here is its own cost.
    pf_floor, hand_floor = median(no_io["pipeflow"]), median(no_io["hand-written"])
    rows.append(
        Row(
            benchmark="fleet",
            workload="fleet, 1 member without Redis, CPU per entry",
            unit="us",
            pipeflow=pf_floor,
            baseline=hand_floor,
            ratio=pf_floor / hand_floor,
            detail=detail,
        )
    )
    most = max(fleets)
    for kind in KINDS if most > 1 else ():
        one, four = fig(kind, 1, "rate"), fig(kind, most, "rate")
        scales = kind == "pipeflow" and most == 4 and cores >= CORES_FOR_4
        rows.append(
            Row(
                benchmark="fleet",
                workload=f"fleet, {kind}, {most} members vs 1, entries/s",
                unit="items/s",
                pipeflow=four,
                baseline=one,
                ratio=four / one,
                target=(">=", 3.0) if scales else None,
                baseline_label="1 member",
                pipeflow_note="" if cores >= CORES_FOR_4 else f"({_cores_note(cores)})",
                detail=detail,
            )
        )
    return rows


def _cores_note(cores: int) -> str:
    """What the machine limits, beside the scaling figures when it has too few cores."""
    return f"{cores} cores: 4 members + Redis need {CORES_FOR_4}, so this measures the machine"


def main(argv: list[str] | None = None) -> int:
    code = bench_main(__doc__, measure, QUICK, argv)
    cores = os.cpu_count() or 1
    if cores < CORES_FOR_4:
        print(
            f"note: {cores} cores: 1, 2 and 4 members (and Redis) share them, so the "
            f"entries/s of 2 and 4 members show what the machine gives, not how a fleet "
            f"scales; the 4-vs-1 target needs {CORES_FOR_4} or more cores. CPU per entry "
            f"is per member and stays comparable."
        )
    return code


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--member":
        member(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(main())
