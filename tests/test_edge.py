"""The edge, the one hand-off between a stage's workers: the end of a stream reaches
every receiver, however the last items got there."""

from __future__ import annotations

import trio
import trio.testing

from pipeflow._run.edge import Edge
from pipeflow._run.envelope import Env


async def test_every_parked_receiver_sees_the_end_after_items_given_back(autojump_clock):
    """Two receivers park on an empty edge while a third holds a chunk; the sender
    leaves; the holder gives one item back and is done. One parked receiver is woken
    for that item; the other must still learn that the stream has ended."""
    edge = Edge(8)
    edge.add_sender()
    for _ in range(3):
        edge.add_receiver()
    assert edge.put_now([Env(i) for i in range(3)])
    chunk = edge.take_nowait(3)
    edge.hold()
    taken: list[int] = []
    ended: list[str] = []

    async def receiver(name: str) -> None:
        while True:
            try:
                got = await edge.take(1)
            except trio.EndOfChannel:
                ended.append(name)
                return
            taken.extend(env.item for env in got)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver, "b")
            nursery.start_soon(receiver, "c")
            await trio.testing.wait_all_tasks_blocked()
            edge.sender_done()
            await trio.testing.wait_all_tasks_blocked()
            edge.put_back(chunk[2:])
            edge.release()
    assert [2] == taken
    assert ["b", "c"] == sorted(ended)


async def test_items_a_leaving_receiver_was_counted_on_for_wake_one_that_waits(autojump_clock):
    """Items handed to an edge whose receivers take what is waiting wake no one while a
    receiver is at work (it takes them when it comes back). If that receiver leaves
    instead (a worker retired by the autoscaler), one that waits is woken for them."""
    edge = Edge(8)
    edge.wake_all = False  # as for a stage of quick items, taken in chunks
    edge.add_sender()
    edge.add_receiver()  # "a": at work, neither waiting nor away
    edge.add_receiver()  # "b": waits below
    taken: list[int] = []

    async def receiver() -> None:
        got = await edge.take(8)
        taken.extend(env.item for env in got)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            assert edge.put_now([Env(1)])
            await trio.testing.wait_all_tasks_blocked()
            assert [] == taken  # left for "a"
            edge.receiver_done()  # "a" leaves without coming back
    assert [1] == taken


async def test_hand_gives_items_to_the_receiver_waiting_longest_past_the_queue(autojump_clock):
    """``hand`` (running on: runon.py) gives envelopes to one parked receiver as its
    take's result: not queued, so the other receivers and the room do not see them."""
    edge = Edge(1)
    edge.add_sender()
    got: dict[str, list[int]] = {}
    tasks: dict[str, trio.lowlevel.Task] = {}

    async def receiver(name: str) -> None:
        tasks[name] = trio.lowlevel.current_task()
        got[name] = [env.item for env in await edge.take(4)]

    assert not edge.waits_idle()  # no receiver waits
    async with trio.open_nursery() as nursery:
        edge.add_receiver()
        nursery.start_soon(receiver, "first")
        await trio.testing.wait_all_tasks_blocked()
        edge.add_receiver()
        nursery.start_soon(receiver, "second")
        await trio.testing.wait_all_tasks_blocked()
        assert edge.waits_idle()
        assert edge.hand([Env("lent")]) is tasks["first"]
        assert len(edge) == 0
        assert edge.room() == 2  # the edge's one slot, and the receiver still waiting
        assert edge.put_now([Env("queued")])
        assert not edge.waits_idle()  # an item is queued
    assert got == {"first": ["lent"], "second": ["queued"]}
