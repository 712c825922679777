"""Type-only checks (run by mypy from tests/test_typing.py, never executed): ``|``
chains are typed end to end, so a pipeline's input and output types are known."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import assert_type

from pipeflow import Chain, FunctionStage, Pipeline, RunResult, Stage, stage


@stage
async def parse(line: str) -> int:
    return int(line)


@stage(workers=4)
def render(n: int) -> str:
    return str(n)


@stage
async def explode(n: int) -> AsyncIterator[float]:
    yield float(n)


@stage
def words(text: str) -> Iterator[str]:
    yield from text.split()


class Upper(Stage[str, str]):
    async def process(self, item: str) -> str:
        return item.upper()


assert_type(parse, FunctionStage[str, int])
assert_type(render, FunctionStage[int, str])
assert_type(explode, FunctionStage[int, float])
assert_type(words, FunctionStage[str, str])

assert_type(parse | render, Chain[str, str])
assert_type(parse | explode, Chain[str, float])
assert_type(words | parse | render | Upper(), Chain[str, str])
assert_type((words | parse) | (render | Upper()), Chain[str, str])

pipeline = Pipeline(parse | render)
assert_type(pipeline, Pipeline[str, str])
result = pipeline.run(["1", "2"])
assert_type(result, RunResult[str])
assert_type(result.outputs, list[str])
