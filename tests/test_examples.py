"""Examples are tests: each example's main() runs here on small inputs, offline."""

from __future__ import annotations

import functools
import importlib
import sqlite3
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio

from pipeflow import Pipeline

ROOT = Path(__file__).resolve().parent.parent


def load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as ``examples.<name>`` (worker processes import it
    by that name too, so the repository root must be on sys.path)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"examples.{name}")


def needs(*modules: str) -> None:
    for module in modules:
        pytest.importorskip(module, reason=f"this example needs {module} (the 'examples' extra)")


# -- the scraper -------------------------------------------------------------------------


def test_scraper_scrapes_the_local_site_and_reports_failures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """20 good pages are stored; the 404, the 500 (after its retries) and the slow page
    (over a 0.3 s timeout) are reported at the end, with the bottleneck."""
    needs("httpx")
    scraper = load("scraper")
    result = scraper.main(["--pages", "20", "--timeout", "0.3", "--rate", "1000"])
    assert 20 == sum(result.outputs)
    failures = {e.item.rsplit("/", 1)[1]: e for e in result.errors}
    assert {"missing", "broken", "slow"} == set(failures)
    assert 404 == failures["missing"].__cause__.status
    assert (500, 3) == (failures["broken"].__cause__.status, failures["broken"].attempts)
    assert isinstance(failures["slow"].__cause__, TimeoutError)
    assert (23, 3) == (result.stats["fetch"].items_in, result.stats["fetch"].failed)
    out = capsys.readouterr().out
    assert "scraped 20 pages in " in out
    assert f"bottleneck: {result.bottleneck or 'none'}" in out  # no rate limit to speak of
    assert "3 failed:" in out
    assert "20 rows in table pages" in out


def test_scraper_reads_urls_from_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--urls reads one URL per line (blank lines and comments skipped) and keeps the
    database given with --db; unreachable URLs are collected failures, not a crash."""
    needs("httpx")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    urls = tmp_path / "urls.txt"
    urls.write_text(f"# two dead links\nhttp://127.0.0.1:{port}/a\n\nhttp://127.0.0.1:{port}/b\n")
    db = tmp_path / "pages.db"
    scraper = load("scraper")
    result = scraper.main(["--urls", str(urls), "--db", str(db), "--timeout", "2"])
    assert [f"http://127.0.0.1:{port}/a", f"http://127.0.0.1:{port}/b"] == sorted(
        e.item for e in result.errors
    )
    assert all(type(e.__cause__).__name__ == "ConnectError" for e in result.errors)
    assert db.exists()
    assert "0 rows in table pages of " + str(db) in capsys.readouterr().out


def test_scraper_watch_sees_the_pipeline_while_it_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """main(argv, watch=...) runs watch(pipeline) beside the run (how `pipeflow demo`
    shows live progress): it can read live statistics, and is cancelled at the end.
    With more URLs than the rate allows, the report names the rate limit."""
    needs("httpx")
    scraper = load("scraper")
    seen: list[int] = []

    async def watch(pipeline: Pipeline[Any, Any]) -> None:
        while True:
            stats = pipeline.current_stats()
            if stats is not None:
                seen.append(stats["fetch"].items_in)
            await trio.sleep(0.05)

    # 40 requests/s: well below what even a loaded 2-core machine fetches and parses
    # (about 60 pages/s), so the rate limit, not the CPU, is what holds fetch back.
    result = scraper.main(["--pages", "100", "--rate", "40"], watch=watch)
    assert seen
    assert 0 < max(seen) <= 103
    assert result.bottleneck is None
    assert "bottleneck: the rate limit of fetch (" in capsys.readouterr().out


# -- the batch writer and telemetry -----------------------------------------------------


def test_batch_writer_writes_every_event_in_few_transactions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """3,040 events are all stored, in batches of at most 1,000 rows (full ones during
    the burst, small ones flushed by the 100 ms timer during the trickle): a small
    fraction of one transaction per row, even on a loaded machine."""
    batch_writer = load("batch_writer")
    result = batch_writer.main(["--events", "3000", "--trickle", "40", "--compare", "20"])
    assert 3040 == sum(result.outputs)
    assert max(result.outputs) <= 1000
    assert len(result.outputs) <= 3040 / 20
    out = capsys.readouterr().out
    assert "3,040 rows in table events" in out
    assert "fewer than one per row" in out
    assert "one transaction per row: " in out


def test_batch_writer_keeps_the_database_it_is_given(tmp_path: Path) -> None:
    """--db keeps the database: the rows are there after main() returns."""
    batch_writer = load("batch_writer")
    db = tmp_path / "events.db"
    batch_writer.main(["--events", "500", "--trickle", "0", "--compare", "0", "--db", str(db)])
    conn = sqlite3.connect(db)
    try:
        assert (500,) == conn.execute("SELECT COUNT(*) FROM events").fetchone()
    finally:
        conn.close()


def test_telemetry_drops_and_counts_what_does_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bursts larger than the pipeline holds: offer() drops the excess and counts it;
    every accepted event is written; nothing is lost without a count."""
    telemetry = load("telemetry")
    out = tmp_path / "events.jsonl"
    result = telemetry.main(["--bursts", "3", "--size", "1000", "--gap", "0.05", "--out", str(out)])
    enrich, ship = result.stats["enrich"], result.stats["ship"]
    assert 3000 == enrich.items_in
    assert 0 < enrich.dropped < 3000
    accepted = enrich.items_in - enrich.dropped
    assert accepted == ship.items_out == len(out.read_text(encoding="utf-8").splitlines())
    assert f"dropped {enrich.dropped:,}" in capsys.readouterr().out


# -- the image service -------------------------------------------------------------------


def test_image_service_demo(capsys: pytest.CaptureFixture[str]) -> None:
    """--demo serves on a free port, posts until it is told 429, and every accepted job
    finishes."""
    needs("httpx", "hypercorn")
    image_service = load("image_service")
    summary = image_service.main(["--demo", "--workers", "1"])
    assert summary is not None
    assert summary["rejected"] >= 1
    assert summary["accepted"] == summary["done"] >= 1
    assert "rejected (429)" in capsys.readouterr().out


async def test_image_service_answers_202_or_429_and_jobs_finish(nursery: trio.Nursery) -> None:
    """On a free loopback port: POST /jobs answers 202 with a job id until the queue is
    full, then 429; every accepted job reaches 'done' and its thumbnail fits the size
    asked for; an image that cannot be read ends 'failed'; unknown ids are 404."""
    needs("httpx", "hypercorn")
    import httpx

    image_service = load("image_service")
    serve = functools.partial(image_service.serve, port=0, workers=1, queue=2, job_timeout=30)
    base = await nursery.start(serve)
    assert base.startswith("http://127.0.0.1:")
    image = image_service.sample_image(96, 64)
    accepted: list[str] = []
    codes: list[int] = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def post() -> None:
            r = await client.post("/jobs?size=24", content=image)
            codes.append(r.status_code)
            if r.status_code == 202:
                body = r.json()
                assert ("queued", f"/status/{body['id']}") == (body["status"], body["status_url"])
                accepted.append(body["id"])
            else:
                assert 429 == r.status_code
                assert "1" == r.headers["retry-after"]

        with trio.fail_after(20):
            while 429 not in codes:
                async with trio.open_nursery() as burst:
                    for _ in range(6):
                        burst.start_soon(post)
        assert {202, 429} == set(codes)

        async def wait_done(job_id: str) -> dict[str, Any]:
            while True:
                status = (await client.get(f"/status/{job_id}")).json()
                if status["status"] != "queued":
                    return status
                await trio.sleep(0.02)

        with trio.fail_after(30):
            finished = [await wait_done(job_id) for job_id in accepted]
        assert {"done"} == {s["status"] for s in finished}
        assert {(24, 16)} == {(s["width"], s["height"]) for s in finished}
        thumb = await client.get(f"/result/{accepted[0]}")
        assert 200 == thumb.status_code
        assert thumb.headers["content-type"] in ("image/png", "image/x-portable-pixmap")

        r = await client.post("/jobs", content=b"not an image")
        assert 202 == r.status_code
        with trio.fail_after(30):
            bad = await wait_done(r.json()["id"])
        assert "failed" == bad["status"]
        assert bad["error"]

        assert 404 == (await client.get("/status/no-such-job")).status_code
        assert 404 == (await client.get("/result/no-such-job")).status_code


def test_pure_python_resize_keeps_the_aspect_ratio() -> None:
    """Without Pillow the service resizes PPM images itself: a 96x64 image fits in
    24x24 as 24x16, and a uniform colour stays that colour."""
    image_service = load("image_service")
    ppm = image_service.make_ppm(96, 64, bytes((10, 20, 30)) * (96 * 64))
    data, w, h = image_service.resize_ppm(ppm, 24)
    assert (24, 16) == (w, h)
    assert (24, 16, bytes((10, 20, 30)) * (24 * 16)) == image_service.read_ppm(data)
    with pytest.raises(ValueError, match="not a binary PPM"):
        image_service.read_ppm(b"GIF89a")
