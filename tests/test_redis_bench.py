"""benchmarks/bench_fleet.py still runs (on a tiny stream, one member of each kind): no
figure is asserted here, only that both kinds of member drain the stream and that the
report has its rows."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("redis", reason="the benchmark fills its stream with redis-py")
pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


def test_the_fleet_benchmark_runs():
    """A member of each kind drains 100 entries; every row has its figures."""
    from benchmarks import bench_fleet

    rows = bench_fleet.measure(entries=100, rounds=1, fleets=(1,))
    assert [
        "fleet, 1 member, member CPU per entry",
        "fleet, 1 member, entries/s",
        "fleet, 1 member, Redis CPU per entry",
        "fleet, 1 member without Redis, CPU per entry",
    ] == [r.workload for r in rows]
    for row in rows:
        assert math.isfinite(row.pipeflow)
        assert row.pipeflow >= 0
    assert ("<=", 1.5) == rows[0].target
    # Redis's CPU is measured finely enough for a small run: both sides read more than
    # nothing, so their ratio is a figure (it once read 0 from /proc's 10 ms ticks and
    # printed a ratio of 1e10).
    redis_row = rows[2]
    assert redis_row.pipeflow > 0
    assert redis_row.baseline is not None
    assert redis_row.baseline > 0
    assert math.isfinite(redis_row.ratio)


def test_the_hand_written_member_packing_as_the_sink_writes_the_same():
    """The hand-written member that packs its XADDs itself (``hand-written-packed``, a
    baseline measured by hand) drains the stream and writes what the other one writes."""
    from benchmarks import bench_fleet

    server = bench_fleet._Server()
    try:
        for kind in ("hand-written", "hand-written-packed"):
            bench_fleet._fleet(server, 50, kind, 1)  # (raises unless all written and acked)
            jobs = {entry_id for entry_id, _ in server.client.xrange(bench_fleet.STREAM)}
            results = [fields for _, fields in server.client.xrange(bench_fleet.RESULTS)]
            assert jobs == {fields["source_id"] for fields in results}
            assert all(set(fields) == {"n", "square", "source_id"} for fields in results)
            assert all(int(f["square"]) == int(f["n"]) ** 2 for f in results)
    finally:
        server.stop()
