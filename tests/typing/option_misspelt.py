"""Type-only check that must FAIL under mypy: a misspelt or mistyped stage option."""

from __future__ import annotations

from pipeflow import Stage, stage


@stage(worker=4)  # misspelt: workers=
async def fetch(url: str) -> str:
    return url


class Upper(Stage[str, str]):
    async def process(self, item: str) -> str:
        return item.upper()


upper = Upper(ordered="yes")  # ordered= takes a bool
again = Upper().with_options(retries="3")  # retries= takes an int or a Retry
