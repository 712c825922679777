"""structlog events: names, levels and fields as a user sees them through
``structlog.testing.capture_logs()``, and silence for a program that configures nothing."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import structlog
import trio
import trio.testing
from structlog.testing import capture_logs

from pipeflow import CircuitBreaker, Pipeline, Retry, StageError, stage


@pytest.fixture(autouse=True)
def _structlog_defaults():
    """capture_logs() leaves structlog marked as configured; start and end each test
    with an unconfigured structlog, as a fresh program has."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@stage(workers=2)
async def halve(x):
    await trio.sleep(0.5)
    return x // 2


@stage
async def odd_only(x):
    if x % 2:
        yield x


def events(logs, name):
    return [e for e in logs if e["event"] == name]


async def test_run_started_and_run_finished_with_counts(autojump_clock):
    """A run logs run_started (its stages) and run_finished (elapsed time, whether it
    failed, and per-stage items in / out / failed), bound with the pipeline's name."""
    with capture_logs() as logs:
        await Pipeline(halve | odd_only, name="etl").arun(range(8))
    assert ["run_started", "run_finished"] == [e["event"] for e in logs]
    assert {
        "event": "run_started",
        "log_level": "info",
        "pipeline": "etl",
        "stages": ["halve", "odd_only"],
    } == logs[0]
    assert {
        "event": "run_finished",
        "log_level": "info",
        "pipeline": "etl",
        "elapsed": 2.0,
        "failed": False,
        "counts": {
            "halve": {"items_in": 8, "items_out": 8, "failed": 0, "cancelled": 0},
            "odd_only": {"items_in": 8, "items_out": 4, "failed": 0, "cancelled": 0},
        },
    } == logs[1]


async def test_a_fail_fast_failure_logs_stage_failed_at_error_level(autojump_clock):
    """stage_failed names the stage, the item's repr, the error and the policy; the run
    then finishes with failed=True."""

    @stage
    async def picky(x):
        if x == "b":
            raise ValueError("no b")
        return x

    with capture_logs() as logs, pytest.raises(StageError):
        await Pipeline(picky, name="p").arun(["a", "b", "c"])
    assert [
        {
            "event": "stage_failed",
            "log_level": "error",
            "pipeline": "p",
            "stage": "picky",
            "item": "'b'",
            "error": "ValueError('no b')",
            "attempts": 1,
            "policy": "fail_fast",
        }
    ] == events(logs, "stage_failed")
    assert [True] == [e["failed"] for e in events(logs, "run_finished")]


async def test_skipped_failures_are_warnings_with_a_short_item_repr(autojump_clock):
    """Under errors="skip" each failure is a warning; a huge item is shown abridged."""

    @stage(errors="skip")
    async def refuse(x):
        raise KeyError(len(x))

    with capture_logs() as logs:
        result = await Pipeline(refuse, name="p").arun(["x" * 10_000])
    assert 1 == result.stats["refuse"].failed
    [failed] = events(logs, "stage_failed")
    assert ("warning", "skip", "KeyError(10000)") == (
        failed["log_level"],
        failed["policy"],
        failed["error"],
    )
    assert "'" + "x" * 27 + "..." + "x" * 28 + "'" == failed["item"]


async def test_item_retried_counts_attempts(autojump_clock):
    """Each retry logs item_retried with the attempt that failed, the error and the
    delay before the next one; the final failure reports every attempt."""

    @stage(retries=Retry(attempts=2, backoff=0.5), errors="collect")
    async def flaky(x):
        raise ConnectionError(f"down {x}")

    with capture_logs() as logs:
        result = await Pipeline(flaky, name="p").arun([7])
    assert [
        {
            "event": "item_retried",
            "log_level": "info",
            "pipeline": "p",
            "stage": "flaky",
            "item": "7",
            "attempt": 1,
            "error": "ConnectionError('down 7')",
            "delay": 0.5,
        },
        {
            "event": "item_retried",
            "log_level": "info",
            "pipeline": "p",
            "stage": "flaky",
            "item": "7",
            "attempt": 2,
            "error": "ConnectionError('down 7')",
            "delay": 1.0,
        },
    ] == events(logs, "item_retried")
    assert [3] == [e["attempts"] for e in events(logs, "stage_failed")]
    assert 1 == len(result.errors)


async def test_breaker_state_changes_are_logged(autojump_clock):
    """breaker_state_changed follows the breaker: closed -> open, then after the
    cooldown open -> half_open, and a good probe half_open -> closed."""
    healthy = False
    breaker = CircuitBreaker(failure_rate=1.0, window=2, min_calls=2, cooldown=10.0)

    @stage(breaker=breaker, errors="skip")
    async def remote(x):
        if not healthy:
            raise ConnectionError(x)
        return x

    with capture_logs() as logs:
        async with Pipeline(remote, name="p").open() as flow:
            await flow.send(1)
            await flow.send(2)
            await trio.testing.wait_all_tasks_blocked()
            healthy = True
            await flow.send(3)
    assert [
        ("p", "remote", "closed", "open"),
        ("p", "remote", "open", "half_open"),
        ("p", "remote", "half_open", "closed"),
    ] == [
        (e["pipeline"], e["stage"], e["old"], e["new"])
        for e in events(logs, "breaker_state_changed")
    ]
    assert {"warning"} == {e["log_level"] for e in events(logs, "breaker_state_changed")}


async def test_error_budget_exceeded_is_logged(autojump_clock):
    """A stage over its error budget logs error_budget_exceeded before the run stops."""

    @stage(errors="skip", max_failures=1)
    async def broken(x):
        raise ValueError(x)

    with capture_logs() as logs, pytest.raises(StageError):
        await Pipeline(broken, name="p").arun(range(5))
    assert [
        {
            "event": "error_budget_exceeded",
            "log_level": "error",
            "pipeline": "p",
            "stage": "broken",
            "failed": 2,
            "items_in": 2,
            "max_failures": 1,
            "scope": "stage",
        }
    ] == events(logs, "error_budget_exceeded")


def test_unconfigured_logging_goes_to_the_pipeflow_stdlib_logger(caplog):
    """Without structlog configured, events are records of the stdlib logger "pipeflow"
    (rendered key=value), so logging.basicConfig(level=INFO) or a handler shows them."""
    caplog.set_level(logging.INFO, logger="pipeflow")
    Pipeline(odd_only, name="p").run(range(3))
    records = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert 2 == len(records)
    assert ("pipeflow", logging.INFO, "event='run_started' pipeline='p' stages=['odd_only']") == (
        records[0]
    )
    assert ("pipeflow", logging.INFO, True) == (
        records[1][0],
        records[1][1],
        records[1][2].startswith("event='run_finished' pipeline='p' elapsed="),
    )


PROGRAM = textwrap.dedent(
    """
    from pipeflow import Pipeline, stage

    @stage(workers=2)
    async def double(x):
        return 2 * x

    @stage(errors="skip")
    async def no_sevens(x):
        if x == 14:
            raise ValueError(x)
        return x

    result = Pipeline(double | no_sevens, name="quiet").run(range(10))
    assert 9 == len(result.outputs)
    """
)


def run_program(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )


def test_a_program_that_configures_no_logging_is_not_flooded():
    """A program that configures nothing prints nothing on stdout; only the skipped
    failure (a warning) reaches stderr, through logging's last-resort handler."""
    proc = run_program(PROGRAM)
    assert "" == proc.stdout
    assert [
        "event='stage_failed' pipeline='quiet' stage='no_sevens' item='14' "
        "error='ValueError(14)' attempts=1 policy='skip'"
    ] == proc.stderr.splitlines()


def test_logging_basic_config_at_info_shows_every_event():
    """logging.basicConfig(level=logging.INFO) is enough to see pipeflow's events."""
    proc = run_program("import logging\nlogging.basicConfig(level=logging.INFO)\n" + PROGRAM)
    assert "" == proc.stdout
    names = [line.split("event='")[1].split("'")[0] for line in proc.stderr.splitlines()]
    assert ["run_started", "stage_failed", "run_finished"] == names
    prefixes = [line.split("event=")[0] for line in proc.stderr.splitlines()]
    assert ["INFO:pipeflow:", "WARNING:pipeflow:", "INFO:pipeflow:"] == prefixes


async def test_a_run_that_cannot_start_logs_no_bogus_run_finished():
    """If metrics_port= cannot be served the run never starts, and its log does not
    claim a finished one."""
    taken = trio.socket.socket()
    with taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with capture_logs() as logs, pytest.raises(OSError, match="cannot serve metrics"):
            await Pipeline(odd_only, name="p").arun([1], metrics_port=port)
    assert [] == logs
