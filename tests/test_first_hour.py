"""The first hour (issue 14): each mistake a newcomer makes gets an error that says what
to do. One test per mistake, asserting the message the user reads."""

from __future__ import annotations

import re
from typing import Any

import attrs
import pytest

from pipeflow import Stage, stage
from pipeflow._options import OPTION_NAMES, StageKeywords, StageOptions


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
