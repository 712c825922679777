"""The benchmarks still run: each one on a tiny input, so the scripts cannot rot.

No performance ratio is asserted here (a test machine is no benchmark machine); only
that every benchmark measures what it says and reports it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_io, bench_memory, bench_overhead, bench_process, run  # noqa: E402
from benchmarks._common import Row, format_table  # noqa: E402


def check_rows(rows: list[Row], benchmarks: list[str]) -> None:
    assert benchmarks == [r.benchmark for r in rows]
    for row in rows:
        assert math.isfinite(row.pipeflow)
        assert math.isfinite(row.ratio)
        if row.unit == "items/s":
            assert row.pipeflow > 0
            assert row.baseline is not None
            assert row.baseline > 0
    table = format_table(rows)
    for row in rows:
        assert row.workload in table


def test_overhead_runs():
    """The overhead benchmark streams its items through both pipelines."""
    rows = bench_overhead.measure(n=300, rounds=1)
    check_rows(rows, ["overhead"])
    assert 300 == rows[0].detail["items"]
    assert bench_overhead.WORKERS == rows[0].detail["buffer"]


def test_io_runs():
    """The I/O benchmark compares with hand-written and with the Little's Law bound."""
    rows = bench_io.measure(n=60, rounds=1)
    check_rows(rows, ["io", "io_bound"])
    assert 5000.0 == rows[1].baseline


def test_memory_runs():
    """The memory benchmark measures the peak RSS of fresh processes."""
    rows = bench_memory.measure(large=2_000, small=1_000)
    check_rows(rows, ["memory"])
    peaks = rows[0].detail["peak_mb"]
    assert peaks["pipeflow"]["2000"] > 1
    assert peaks["handwritten"]["1000"] > 1


def test_process_runs():
    """The process-worker benchmark runs its function in worker processes."""
    rows = bench_process.measure(items=4, rounds=1, seconds=0.001)
    check_rows(rows, ["process", "process_steady", "process_handwritten"])


def test_runner_writes_json(tmp_path, monkeypatch, capsys):
    """`run.py NAME --quick --json FILE` prints the table and writes the report."""
    monkeypatch.setattr(bench_overhead, "QUICK", {"n": 200, "rounds": 1})
    out = tmp_path / "results.json"
    assert 0 == run.main(["overhead", "--quick", "--json", str(out)])
    data = json.loads(out.read_text())
    assert ["overhead"] == [r["benchmark"] for r in data["rows"]]
    assert {} == data["errors"]
    assert data["machine"]["trio"]
    assert "overhead: 3 stages x 4 workers" in capsys.readouterr().out


def test_runner_rejects_unknown_names():
    """An unknown benchmark name is a usage error, not a silent no-op."""
    with pytest.raises(SystemExit):
        run.main(["no_such_benchmark"])
