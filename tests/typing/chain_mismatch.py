"""Type-only check that must FAIL under mypy: an int stage cannot take str items."""

from __future__ import annotations

from pipeflow import stage


@stage
async def parse(line: str) -> int:
    return int(line)


@stage
async def shout(text: str) -> str:
    return text.upper()


bad = parse | shout  # parse emits int, shout takes str
