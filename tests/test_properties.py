"""Property tests: whatever the shape, every item comes out exactly once (in input order
when every stage is ordered), and each stage's counts add up."""

from __future__ import annotations

import functools

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeflow import Pipeline, stage

stage_specs = st.lists(
    st.fixed_dictionaries(
        {
            "workers": st.integers(1, 4),
            "buffer": st.one_of(st.none(), st.integers(0, 3)),
            "ordered": st.booleans(),
            "kind": st.sampled_from(["async", "asyncgen", "inline", "thread"]),
            "delays": st.lists(st.sampled_from([0, 0, 0.5, 1, 3]), min_size=1, max_size=5),
        }
    ),
    min_size=1,
    max_size=4,
)


def make_stage(i, spec):
    delays = spec["delays"]
    opts = {"workers": spec["workers"], "buffer": spec["buffer"], "ordered": spec["ordered"]}
    name = f"s{i}"

    def delay_for(x):
        return delays[hash((x, i)) % len(delays)]

    if spec["kind"] == "async":

        async def fn(x):
            await trio.sleep(delay_for(x[0]))
            return (x[0], x[1] + (i,))

    elif spec["kind"] == "asyncgen":
        # Filters multiples of (i + 5), duplicates multiples of 3: 0..2 outputs.
        async def fn(x):
            await trio.sleep(delay_for(x[0]))
            if x[0] % (i + 5) != 0:
                for copy in range(2 if x[0] % 3 == 0 else 1):
                    yield (x[0], (*x[1], i, copy))

    elif spec["kind"] == "inline":
        opts["run_in"] = "task"

        def fn(x):
            return (x[0], x[1] + (i,))

    else:

        def fn(x):
            return (x[0], x[1] + (i,))

    fn.__name__ = name
    return stage(**opts)(fn), spec["kind"]


def expected_outputs(n, kinds):
    items = [(x, ()) for x in range(n)]
    for i, kind in enumerate(kinds):
        nxt = []
        for x, path in items:
            if kind == "asyncgen":
                if x % (i + 5) != 0:
                    nxt.extend((x, (*path, i, c)) for c in range(2 if x % 3 == 0 else 1))
            else:
                nxt.append((x, (*path, i)))
        items = nxt
    return items


@settings(max_examples=60, deadline=None)
@given(specs=stage_specs, n=st.integers(0, 40))
def test_every_item_exactly_once_and_in_order_when_all_ordered(specs, n):
    """Random stage counts, workers, buffers, kinds, delays: outputs are exactly the
    expected multiset, in input order when every stage is ordered; counts add up."""
    built = [make_stage(i, spec) for i, spec in enumerate(specs)]
    chain = built[0][0]
    for s, _ in built[1:]:
        chain = chain | s
    pipeline = Pipeline(chain)
    clock = trio.testing.MockClock(autojump_threshold=0)
    result = trio.run(functools.partial(pipeline.arun, [(x, ()) for x in range(n)]), clock=clock)

    expected = expected_outputs(n, [k for _, k in built])
    assert sorted(expected) == sorted(result.outputs)
    if all(spec["ordered"] for spec in specs):
        assert expected == result.outputs
    upstream_out = n
    for s, _ in built:
        stats = result.stats[s.name]
        assert upstream_out == stats.items_in
        assert stats.items_in == stats.ok + stats.filtered + stats.failed + stats.dropped
        assert 0 == stats.inflight
        upstream_out = stats.items_out
    assert len(result.outputs) == upstream_out
