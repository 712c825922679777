"""The first hour (issue 14): each mistake a newcomer makes gets an error that says what
to do. One test per mistake, asserting the message the user reads."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import structlog
import trio
from structlog.testing import capture_logs

from pipeflow import Pipeline, Stage, StageError, stage
from pipeflow._options import OPTION_NAMES, StageKeywords, StageOptions

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _structlog_as_found():
    """capture_logs() leaves structlog configured; later tests see the defaults."""
    yield
    structlog.reset_defaults()


class Upper(Stage[str, str]):
    async def process(self, item: str) -> str:
        return item.upper()


@stage
async def fetch(url: str) -> str:
    return url


def test_stage_options_and_keywords_are_one_list():
    """StageKeywords (the typed keywords) names exactly StageOptions' fields but kind."""
    fields = [f.name for f in attrs.fields(StageOptions) if f.name != "kind"]
    assert fields == list(OPTION_NAMES)
    assert sorted(fields) == sorted(StageKeywords.__optional_keys__)


def test_a_misspelt_option_names_the_stage_and_the_closest_option():
    """@stage(worker=4) says which stage, which option, and "did you mean workers=?"."""
    with pytest.raises(TypeError) as info:

        @stage(worker=4)
        async def fetch_page(url: str) -> str:
            return url

    assert "stage 'fetch_page': unknown option worker=; did you mean workers=?" == str(info.value)


def test_a_misspelt_option_in_with_options_and_a_class_stage():
    """with_options(...) and MyStage(...) give the same answer as @stage(...)."""
    with pytest.raises(
        TypeError, match=re.escape("stage 'fetch': unknown option worker=; did you mean workers=?")
    ):
        fetch.with_options(worker=4)  # type: ignore[call-arg]
    with pytest.raises(
        TypeError, match=re.escape("stage 'upper': unknown option worker=; did you mean workers=?")
    ):
        Upper(worker=4)  # type: ignore[call-arg]
    with pytest.raises(
        TypeError, match=re.escape("stage 'shout': unknown option retry=; did you mean retries=?")
    ):
        Upper(name="shout", retry=2)  # type: ignore[call-arg]


def test_a_misspelt_option_of_a_built_in_stage_names_the_stage_and_the_closest_option(
    tmp_path,
):
    """The built-in stages (which take named keywords of their own) answer as @stage
    does, where Python said only "got an unexpected keyword argument 'worker'"; so
    does a subclass that passes its keywords on."""
    from pipeflow.stages import HttpFetch, JsonLinesSink, SQLiteSink

    with pytest.raises(TypeError) as info:
        HttpFetch(worker=4)  # type: ignore[call-arg]
    assert "stage 'HttpFetch': unknown option worker=; did you mean workers=?" == str(info.value)
    with pytest.raises(
        TypeError, match=re.escape("stage 'rows': unknown option batchs=; did you mean batch=?")
    ):
        SQLiteSink(tmp_path / "x.db", "t", ["a"], name="rows", batchs=10)  # type: ignore[call-arg]
    with pytest.raises(TypeError) as info:
        JsonLinesSink(tmp_path / "x.jsonl", colour="red")  # type: ignore[call-arg]
    assert str(info.value).startswith(
        "stage 'JsonLinesSink': unknown option colour=; the options are path, default, "
    )

    class Fetch(HttpFetch):
        def __init__(self, **options: Any) -> None:
            super().__init__(**options)

    with pytest.raises(
        TypeError,
        match=re.escape("stage 'Fetch': unknown option retry=; did you mean retries=?"),
    ):
        Fetch(retry=2)
    # What is valid is unchanged, positional arguments included.
    assert HttpFetch(workers=3).options.max_workers == 3
    assert SQLiteSink(tmp_path / "x.db", "t", ["a"], batch=5).options.batch == 5


def test_an_unknown_option_with_no_close_match_lists_the_options():
    """An option that resembles none of them is answered with the list of options."""
    kw: dict[str, Any] = {"colour": "red"}
    with pytest.raises(TypeError) as info:
        fetch.with_options(**kw)
    assert str(info.value).startswith(
        "stage 'fetch': unknown option colour=; the options are name, workers, buffer, "
    )


def test_with_options_validates_again_and_keeps_the_rest():
    """with_options is an evolve: the changed option is checked, the others kept."""
    slow = fetch.with_options(name="slow", retries=2, timeout=5)
    quick = slow.with_options(timeout=None)
    assert (2, None, "slow") == (quick.options.retries.attempts, quick.options.timeout, quick.name)
    with pytest.raises(
        ValueError,
        match=re.escape("stage 'slow': option burst= must be used together with rate=, got 3"),
    ):
        slow.with_options(burst=3)
    threaded = stage(lambda x: x).with_options(run_in=None)
    assert "thread" == threaded.options.run_in


def test_a_stage_subclass_without_process_is_refused_when_constructed():
    """A Stage subclass that forgot process() fails at construction, naming the class."""

    class Forgot(Stage[str, str]):
        async def handle(self, item: str) -> str:  # the wrong name
            return item

    with pytest.raises(TypeError) as info:
        Forgot(workers=2)
    assert str(info.value).startswith(
        "Forgot subclasses pipeflow.Stage but has no process() method, so it would fail "
        "on every item: define `async def process(self, item)`"
    ), str(info.value)


@stage
async def double(x: int) -> int:
    return x * 2


@stage
async def inc(x: int) -> int:
    return x + 1


async def test_run_inside_trio_says_use_arun():
    """Pipeline.run() called from Trio code says to await arun() instead."""
    with pytest.raises(RuntimeError) as info:
        Pipeline(double, name="p").run([1])
    assert (
        "pipeline 'p': run() starts Trio, but this code already runs inside Trio; "
        "inside Trio, use `await pipeline.arun(...)`"
    ) == str(info.value)
    assert [2] == (await Pipeline(double).arun([1])).outputs


def test_running_a_chain_says_wrap_it_in_pipeline():
    """(a | b).run(...) and friends say to wrap the chain in Pipeline(...)."""
    chain: Any = double | inc
    with pytest.raises(AttributeError) as info:
        chain.run([1, 2])
    assert str(info.value).startswith(
        "Chain(double | inc) is a chain of stages, not a pipeline: wrap the chain in "
        "Pipeline(...) to run it"
    )
    for method in ("arun", "stream", "open"):
        with pytest.raises(AttributeError, match=re.escape("wrap the chain in Pipeline(...)")):
            getattr(chain, method)
    with pytest.raises(AttributeError, match="'Chain' object has no attribute 'colour'"):
        chain.colour  # noqa: B018
    assert [3, 5] == Pipeline(chain).run([1, 2]).outputs


async def test_open_without_async_with_says_how():
    """flow = p.open(); flow.send(1) says to use `async with pipeline.open() as flow:`."""
    flow: Any = Pipeline(double).open()
    for name in ("send", "send_nowait", "offer", "close", "outputs", "result"):
        with pytest.raises(AttributeError) as info:
            getattr(flow, name)
        assert (
            f"no attribute {name!r}: pipeline.open() returns an async context manager, not "
            f"the flow; use `async with pipeline.open() as flow:` and use flow inside the block"
        ) == str(info.value)
    with pytest.raises(TypeError, match=re.escape("use `async with pipeline.open() as flow:`")):
        await flow


@pytest.mark.parametrize("nested", [False, True])
async def test_entering_an_open_or_a_stream_twice_says_how(nested):
    """The object open()/stream() returned, entered a second time (a retry loop that
    keeps it, or nested): an error that says to call it again, where contextlib said
    "'_AsyncGeneratorContextManager' object has no attribute 'args'"."""
    for opening, call in (
        (Pipeline(double).open(), "pipeline.open()"),
        (Pipeline(double).stream([1, 2]), "pipeline.stream(source)"),
    ):
        message = re.escape(
            f"this {call} was already entered: each `async with` runs the pipeline once, "
            f"so call {call} again for another run"
        )
        if nested:
            async with opening:
                with pytest.raises(RuntimeError, match=message):
                    async with opening:
                        pass
        else:
            async with opening as it:
                if call == "pipeline.stream(source)":
                    assert [2, 4] == [x async for x in it]
            with pytest.raises(RuntimeError, match=message):
                async with opening:
                    pass


async def test_stream_without_async_with_says_how():
    """async for over p.stream(src) itself says to use `async with ... as outputs:`."""
    outputs: Any = Pipeline(double).stream([1, 2])
    with pytest.raises(TypeError) as info:
        async for _ in outputs:
            pass
    assert str(info.value).startswith(
        "cannot iterate with async for: pipeline.stream(source) returns an async context "
        "manager, not the outputs; use `async with pipeline.stream(source) as outputs:`"
    )
    async with Pipeline(double).stream([1, 2]) as outs:
        assert [2, 4] == [x async for x in outs]


@pytest.mark.filterwarnings("ignore:coroutine 'Flow.send' was never awaited:RuntimeWarning")
async def test_a_send_without_await_is_reported_at_the_end_of_the_block():
    """flow.send(i) without await: the block's end says how many and what to write."""
    p = Pipeline(double, name="p")
    flow: Any = None

    async def feed() -> None:
        nonlocal flow
        async with p.open() as flow:
            await flow.send(1)
            for i in range(3):
                flow.send(i)  # the mistake: Python itself only warns

    with pytest.raises(RuntimeError) as info:
        await feed()
    assert (
        "pipeline 'p': 3 flow.send(...) calls were never awaited, so their items never "
        "entered the pipeline: write `await flow.send(item)`"
    ) == str(info.value)
    assert flow.result is not None
    assert 1 == flow.result.stats["double"].ok


async def test_sends_from_tasks_started_in_the_block_are_not_reported():
    """A send handed to a task (start_soon) is awaited by that task: no false report."""
    async with Pipeline(double).open() as flow, trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(flow.send, i)
    assert 5 == flow.result.stats["double"].ok


async def fetch_later(url: str) -> str:
    return url


@pytest.mark.parametrize("run_in", ["thread", "task"])
async def test_a_plain_def_returning_a_coroutine_says_declare_it_async(run_in: str):
    """A plain def that returns a coroutine: 'declare it `async def`', and no warning."""

    @stage(run_in=run_in)  # type: ignore[call-overload]
    def fetch_page(url: str) -> Any:
        return fetch_later(url)  # the mistake: an async call behind a plain def

    with pytest.raises(StageError) as info:
        await Pipeline(fetch_page).arun(["a"])
    assert (
        "stage 'fetch_page' returned a coroutine: declare it `async def` (the result of a "
        "plain `def` is used as it is, never awaited)"
    ) == str(info.value.error)
    assert str(info.value).startswith("stage 'fetch_page' failed on item 'a': TypeError:")


@pytest.mark.parametrize("run_in", ["thread", "task"])
async def test_stop_iteration_from_a_plain_function_names_stage_item_and_itself(run_in: str):
    """StopIteration from a plain function is reported as such, with the stage and item."""

    @stage(run_in=run_in, errors="collect")  # type: ignore[call-overload]
    def first_word(line: str) -> str:
        return next(iter(line.split()))  # StopIteration on an empty line

    result = await Pipeline(first_word).arun(["a b", ""])
    assert ["a"] == result.outputs
    (error,) = result.errors
    assert (
        "stage 'first_word' failed on item '': RuntimeError: stage 'first_word' raised "
        "StopIteration on item ''"
    ) == str(error)
    assert isinstance(error.error.__cause__, StopIteration)


def connection_that_fails(on: str):
    @contextlib.asynccontextmanager
    async def database() -> AsyncIterator[str]:
        if on == "open":
            raise ConnectionError("database down")
        yield "conn"
        raise ConnectionError("connection reset while closing")

    return database


async def test_a_resource_that_cannot_open_names_the_stage_and_the_resource():
    """The resource's own error, noted with the stage and the resource."""

    @stage(workers=2, resource=connection_that_fails("open"))
    async def store(x: int, conn: str) -> int:
        return x

    with pytest.raises(ConnectionError, match="database down") as info:
        await Pipeline(store).arun([1, 2])
    assert "stage 'store': its resource resource=database() failed to open" in (
        info.value.__notes__
    )


async def test_a_resource_that_cannot_close_keeps_the_result_and_logs_it():
    """Every item succeeded: the run keeps its result; the close error is logged, naming
    the stage and the resource."""

    @stage(workers=2, resource=connection_that_fails("close"))
    async def store(x: int, conn: str) -> int:
        return x

    with capture_logs() as logs:
        result = await Pipeline(store).arun(range(20))
    assert list(range(20)) == sorted(result.outputs)
    assert 20 == result.stats["store"].ok
    closes = [e for e in logs if e["event"] == "resource_close_failed"]
    assert 2 == len(closes)  # one per worker
    assert {
        "stage": "store",
        "resource": "resource=database()",
        "error": "ConnectionError: connection reset while closing",
        "log_level": "error",
    }.items() <= closes[0].items()


async def test_a_class_stage_whose_close_worker_fails_keeps_the_result():
    """The same for a Stage subclass's close_worker()."""

    class Store(Stage[int, int]):
        async def open_worker(self) -> str:
            return "conn"

        async def close_worker(self, resource: Any) -> None:
            raise OSError("disk gone")

        async def process(self, item: int, conn: str) -> int:  # type: ignore[override]
            return item

    with capture_logs() as logs:
        result = await Pipeline(Store()).arun(range(3))
    assert [0, 1, 2] == sorted(result.outputs)
    (event,) = [e for e in logs if e["event"] == "resource_close_failed"]
    assert "Store.open_worker()/close_worker()" == event["resource"]


SCRIPT = """\
from pipeflow import Pipeline, stage
from tests.cpu_work import cube

cubes = cube
{run}
"""


def run_script(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "cubes.py"
    script.write_text(SCRIPT.format(run=body), encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )


def test_a_process_stage_in_a_script_without_main_guard_is_one_short_error(tmp_path):
    """No `if __name__ == "__main__":`: one error naming the guard, no process started."""
    proc = run_script(tmp_path, "print(Pipeline(cubes).run(range(3)).outputs)")
    assert 1 == proc.returncode
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        f"RuntimeError: stage 'cube': run_in='process' starts worker processes that "
        f"import the main script {tmp_path / 'cubes.py'} again, and it has no "
        f'`if __name__ == "__main__":` guard, so each would run the pipeline again. Put the '
        f'code that runs the pipeline under `if __name__ == "__main__":` at the end of the '
        f"script."
    ) == last
    assert len(proc.stderr.splitlines()) < 15, proc.stderr
    assert "" == proc.stdout


def test_a_process_stage_in_a_guarded_script_runs(tmp_path):
    """With the guard (either quotes), the same script runs."""
    body = "if __name__ == '__main__':\n    print(sorted(Pipeline(cubes).run(range(3)).outputs))"
    proc = run_script(tmp_path, body)
    assert "[0, 1, 8]\n" == proc.stdout, proc.stderr


def test_awaiting_a_pipeline_under_asyncio_says_it_needs_trio():
    """``await pipeline.arun()`` or ``async with pipeline.stream()`` in asyncio code (a
    FastAPI handler) says that it runs on Trio and what to call instead, where Trio
    failed with "'RunContext' object has no attribute 'runner'"."""
    import asyncio

    pipeline = Pipeline(double)

    async def arun() -> None:
        await pipeline.arun([1])

    async def stream() -> None:
        async with pipeline.stream([1]):
            pass

    for body, call in (
        (arun, "pipeline.arun(...)"),
        (stream, "async with pipeline.stream(source)"),
    ):
        with pytest.raises(RuntimeError) as info:
            asyncio.run(body())
        assert str(info.value) == (
            f"{call} must run inside Trio (trio.run), and this code is not (asyncio?); "
            f"from code that is not Trio's, call pipeline.run(...), which starts Trio"
        )
    assert pipeline.run([1]).outputs == [2]


def test_an_empty_name_names_the_function_or_class_it_was_given_to():
    """@stage(name=""), MyStage(name=" ") and with_options(name="") name what they were
    given to, as every other option error names the stage."""
    with pytest.raises(TypeError) as info:

        @stage(name="")
        async def fetch_page(url: str) -> str:
            return url

    assert "stage 'fetch_page': option name= must be a non-empty str, got ''" == str(info.value)
    with pytest.raises(TypeError, match=re.escape("stage 'Upper': option name= must be a")):
        Upper(name=" ")
    with pytest.raises(TypeError, match=re.escape("stage 'fetch': option name= must be a")):
        fetch.with_options(name="")
