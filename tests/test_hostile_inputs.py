"""What a user gets from inputs the runner cannot use: errors that say what was wrong."""

from __future__ import annotations

import pytest
import trio

from pipeflow import Pipeline, stage


@stage
async def same(x):
    return x


async def test_a_receive_channel_closed_by_the_program_says_so():
    """A Trio receive channel the program has closed (instead of its send side): the
    run raises Trio's ClosedResourceError, which says nothing by itself, with a note
    naming the source and how to end a stream."""
    _, receive = trio.open_memory_channel(1)
    await receive.aclose()
    with pytest.raises(trio.ClosedResourceError) as info:
        await Pipeline(same).arun(receive)
    assert [
        "the source, a Trio receive channel, was closed by the program's own code; "
        "to end the stream, close its send side instead"
    ] == info.value.__notes__
