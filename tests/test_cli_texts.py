"""Small texts of the CLI that said something wrong at the edges: ``pipeflow size`` with a
tiny share, ``pipeflow graph`` comparing two different pipelines."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing

from pipeflow import Pipeline, stage
from pipeflow._cli import main
from pipeflow._report import TIMES
from tests.test_verdict import report_of


def test_size_shows_a_small_target_utilisation_with_its_digits(capsys):
    """--target-utilisation 0.001 is 0.1%, divided by 0.001 (not "400 / 0 = 400,000"),
    and the pool is 0.1% busy, not 0%."""
    argv = ["size", "--rate", "5000", "--latency", "80ms", "--target-utilisation", "0.001"]
    assert 0 == main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert "at 0.1% target utilisation: 400 / 0.001 = 400,000" == lines[1]
    assert "at 5,000/s they are 0.1% busy" == lines[4]


def test_size_shows_a_small_headroom_with_its_digits(capsys):
    """--headroom 0.0001 is 0.01%, a factor of 1.0001: not "0% headroom: 400 x 1" as it was."""
    argv = ["size", "--rate", "5000", "--latency", "80ms", "--headroom", "0.0001"]
    assert 0 == main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert f"with 0.01% headroom: 400 {TIMES} 1.0001 = 400.04" == lines[1]


def test_comparing_two_different_pipelines_says_so(tmp_path, capsys):
    """Comparing a report with one of another pipeline: a note says they differ, and the
    advice for a stage the second lacks says it has no such stage, in plain words."""

    @stage(workers=8)
    async def fetch(x):
        await trio.sleep(0.05)
        return x

    @stage(workers=2)
    async def parse(x):
        await trio.sleep(0.25)
        return x

    @stage(workers=2)
    async def check(x):
        await trio.sleep(0.01)
        return x

    async def both() -> dict[str, Any]:
        before = await report_of(Pipeline(fetch | parse, name="pages"), range(80))
        (tmp_path / "before.json").write_text(json.dumps(before))
        after = await report_of(Pipeline(check, name="checks"), range(50))
        (tmp_path / "after.json").write_text(json.dumps(after))
        return before

    before = trio.run(both, clock=trio.testing.MockClock(autojump_threshold=0))
    assert 0 == main(["graph", str(tmp_path / "before.json"), str(tmp_path / "after.json")])
    out = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert (
        "note: these are two different pipelines, 'pages' and 'checks': stages are "
        "compared by name." in out
    )
    assert "the second parse has no stage" not in out
    assert before["bottleneck"] == "parse"
    assert "; in the second, it has no stage parse." in out
