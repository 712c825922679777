"""The live dashboard at ``/`` of the metrics endpoint: served by a running pipeline,
self-contained, and drawn in a real headless Chromium (skipped only when Chromium is not
installed; CI installs Debian's ``chromium``)."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

from pipeflow import Pipeline, stage

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@stage(workers=8)
async def fetch(x):
    await trio.sleep(0.005)
    return x


@stage(workers=2)
async def slow(x):
    await trio.sleep(0.05)  # 2 workers x 50 ms: at most 40 items/s
    return x


@stage(batch=10)
async def store(rows):
    return len(rows)


def get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.headers["Content-Type"], r.read().decode()


async def serve_while(check: Any, seconds_first: float = 3.5) -> Any:
    """Run fetch | slow | store with a metrics endpoint on a free port; once it has run
    ``seconds_first`` seconds, call ``check(base_url)`` in a thread, then stop the run."""
    done = trio.Event()

    async def endless():
        i = 0
        while not done.is_set():
            yield i
            i += 1
            await trio.lowlevel.checkpoint()

    pipeline = Pipeline(fetch | slow | store, name="shop")
    outcome: dict[str, Any] = {}

    async def drive() -> None:
        # The endpoint sets an attribute, not an event, once it listens.
        while getattr(pipeline, "metrics_address", None) is None:  # noqa: ASYNC110
            await trio.sleep(0.01)
        await trio.sleep(seconds_first)
        host, port = pipeline.metrics_address
        try:
            outcome["value"] = await trio.to_thread.run_sync(check, f"http://{host}:{port}")
        finally:
            done.set()

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drive)
            await pipeline.arun(endless(), metrics_port=0, collect=False)
    return outcome["value"]


async def test_the_endpoint_serves_a_self_contained_page_and_its_figures():
    """``/`` is one HTML page with nothing loaded from elsewhere; ``/dashboard.json`` has
    each stage's figures over the last seconds and the verdict: ``slow`` limits the rate;
    ``store`` counts items, not batches."""

    def check(base: str) -> tuple[str, str, dict[str, Any]]:
        kind, page = get(base + "/")
        _, body = get(base + "/dashboard.json")
        return kind, page, json.loads(body)

    kind, page, snap = await serve_while(check)
    assert kind.startswith("text/html")
    assert page.startswith("<!DOCTYPE html>")
    # Self-contained: no script, style, image or font from anywhere else.
    assert [] == re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page)
    assert "@import" not in page
    (p,) = snap["pipelines"]
    assert "shop" == p["pipeline"]
    assert ["fetch", "slow", "store"] == [s["name"] for s in p["stages"]]
    assert "stage" == p["verdict"]["kind"]
    assert "slow" == p["verdict"]["stage"]
    slow_now = next(s for s in p["stages"] if s["name"] == "slow")
    assert 25 < slow_now["throughput"] < 45
    store_now = next(s for s in p["stages"] if s["name"] == "store")
    assert store_now["throughput"] == pytest.approx(slow_now["throughput"], rel=0.35)
    assert {"throughput", "queue_depth", "busy", "blocked", "throttled", "failed"} == set(
        p["history"]["stages"]["slow"]
    )
    assert len(p["history"]["t"]) >= 2


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
async def test_chromium_draws_the_stages_and_the_bottleneck(tmp_path: Path):
    """Loaded in headless Chromium from a running pipeline, the page shows every stage in
    its graph and table, and the verdict naming ``slow``; a screenshot is taken."""
    shot = tmp_path / "dashboard.png"

    def check(base: str) -> str:
        import subprocess

        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        args += ["--virtual-time-budget=3000", "--window-size=1280,1500"]
        subprocess.run([*args, f"--screenshot={shot}", base + "/"], capture_output=True, timeout=90)
        proc = subprocess.run(
            [*args, "--dump-dom", base + "/"], capture_output=True, text=True, timeout=90
        )
        return proc.stdout

    dom = await serve_while(check)
    for name in ("fetch", "slow", "store"):
        assert '<g class="stage' in dom
        assert f'data-stage="{name}"' in dom
    assert re.search(r'class="verdict stage" data-kind="stage" data-stage="slow"', dom)
    assert "slow limits the rate" in dom
    assert '<g class="stage limit" data-stage="slow">' in dom
    assert shot.stat().st_size > 10_000


def test_graph_watch_writes_a_page_that_refreshes(tmp_path: Path):
    """``pipeflow graph URL --watch -o page.html`` writes the dashboard to a file that
    reloads itself while the run goes on."""

    async def run() -> None:
        def check(base: str) -> None:
            import subprocess
            import sys

            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pipeflow",
                    "graph",
                    base + "/metrics",
                    "--watch",
                    "--interval",
                    "0.5",
                    "-o",
                    str(tmp_path / "page.html"),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                import time

                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    page = tmp_path / "page.html"
                    if page.exists() and "slow limits the rate" in page.read_text():
                        break
                    time.sleep(0.2)
            finally:
                proc.terminate()
                proc.wait(timeout=10)

        await serve_while(check, seconds_first=0.5)

    trio.run(run)
    page = (tmp_path / "page.html").read_text()
    assert '<meta http-equiv="refresh" content="2">' in page
    assert "slow limits the rate" in page


async def test_graph_of_the_dashboard_address_reads_the_metrics_beside_it():
    """`pipeflow graph http://HOST:PORT/` (the address of the page a user has open) draws
    the pipeline from the metrics the same endpoint serves at /metrics."""
    import subprocess
    import sys

    def check(base: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeflow", "graph", base + "/", "--interval", "0.5"],
            capture_output=True,
            text=True,
            timeout=60,
        )

    proc = await serve_while(check, seconds_first=0.5)
    assert 0 == proc.returncode, proc.stderr
    assert "is the live dashboard; reading http://127.0.0.1:" in proc.stderr
    assert "pipeline 'shop' · live from http://127.0.0.1:" in proc.stdout
