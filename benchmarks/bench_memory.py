"""Memory: streaming is bounded. Peak RSS for 1,000,000 items vs 10,000 items through
3 identity stages (4 workers each) with ``collect=False``.

Each case runs in a fresh interpreter (``python -m benchmarks.bench_memory --child ...``)
that reports its own peak resident set size (VmHWM from /proc/self/status; ru_maxrss
where /proc is missing), so no case inherits another's heap. The hand-written pipeline
is measured the same way, for reference. Target: pipeflow's peak grows by <= 20 MB from
10,000 to 1,000,000 items.

    python benchmarks/bench_memory.py [--quick] [--json FILE]
"""

from __future__ import annotations

import concurrent.futures
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from benchmarks._common import ROOT, Row, bench_main, handwritten, progress

STAGES = 3
WORKERS = 4
TARGET_MB = 20.0


def peak_rss_kb() -> int:
    """This process's peak resident set size, in KiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss


def child(kind: str, n: int) -> dict[str, float]:
    """One case, in this (fresh) process: stream ``n`` items, return the peak RSS."""
    # Import both sides whatever the case, so the baselines carry the same modules.
    from benchmarks.bench_overhead import identity, make_pipeline

    t0 = time.perf_counter()
    if kind == "pipeflow":
        result = make_pipeline(STAGES, WORKERS).run(range(n), collect=False)
        assert result.stats[f"identity_{STAGES}"].items_out == n
    else:
        trio.run(
            lambda: handwritten(range(n), identity, stages=STAGES, workers=WORKERS, buffer=WORKERS)
        )
    return {"peak_kb": peak_rss_kb(), "seconds": time.perf_counter() - t0}


def run_child(kind: str, n: int) -> dict[str, float]:
    """Run one case in a fresh interpreter and read its report."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_memory", "--child", kind, str(n)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory case {kind} n={n} failed:\n{proc.stderr}")
    data: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return data


def measure(large: int = 1_000_000, small: int = 10_000) -> list[Row]:
    """Peak RSS of pipeflow and hand-written at ``small`` and ``large`` items; one row
    whose figure is pipeflow's growth in MB."""
    cases = [(kind, n) for n in (small, large) for kind in ("pipeflow", "handwritten")]
    progress(f"memory: {len(cases)} fresh processes, {small:,} and {large:,} items, 2 at a time")
    # Each case is a process of its own, and peak RSS does not depend on what else runs
    # on the machine, so two cases at a time are as exact and twice as quick.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case: run_child(*case), cases))
    peaks: dict[str, dict[int, dict[str, float]]] = {"pipeflow": {}, "handwritten": {}}
    for (kind, n), result in zip(cases, results, strict=True):
        peaks[kind][n] = result

    def mb(kind: str, n: int) -> float:
        return peaks[kind][n]["peak_kb"] / 1024

    growth = mb("pipeflow", large) - mb("pipeflow", small)
    return [
        Row(
            benchmark="memory",
            workload=f"memory: peak RSS growth, {small:,} -> {large:,} items",
            unit="MB",
            pipeflow=growth,
            baseline=mb("handwritten", large) - mb("handwritten", small),
            ratio=growth,
            target=("<=", TARGET_MB),
            pipeflow_note=f"(peak {mb('pipeflow', large):.1f} MB)",
            baseline_note=f"(peak {mb('handwritten', large):.1f} MB)",
            detail={
                "peak_mb": {kind: {str(n): mb(kind, n) for n in (small, large)} for kind in peaks},
                # Wall time per case, two cases sharing the machine at a time.
                "seconds": {
                    kind: {str(n): v["seconds"] for n, v in runs.items()}
                    for kind, runs in peaks.items()
                },
            },
        )
    ]


#: Arguments of a short smoke run (``--quick``).
QUICK = {"large": 100_000, "small": 10_000}


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        print(json.dumps(child(argv[1], int(argv[2]))))
        return 0
    return bench_main(__doc__, measure, QUICK, argv)


if __name__ == "__main__":
    sys.exit(main())
