"""``pipeflow run --input``'s line reader: the lines of a file however its bytes arrive,
and a long line read in time linear in its length."""

from __future__ import annotations

import io
import time

import pytest

from pipeflow._cli.run import InputError, _file_input, _lines


def chunked(data: bytes, size: int):
    """An opener whose reads return ``size`` bytes at a time."""
    view = io.BytesIO(data)

    async def open_input():
        async def read() -> bytes:
            return view.read(size)

        async def close() -> None:
            pass

        return read, close

    return open_input


async def lines_of(opener) -> list[str]:
    return [line async for line in _lines(opener, "in.txt")]


def expected(data: bytes) -> list[str]:
    *lines, last = data.decode("utf-8").split("\n")
    return [line.removesuffix("\r") for line in lines] + ([last.removesuffix("\r")] if last else [])


CASES = [
    b"",
    b"\n",
    b"\n\n",
    b"one",
    b"one\n",
    b"one\ntwo",
    b"one\r\ntwo\r\n",
    b"one\r\n\r\ntwo\r",
    b"\r",
    b"a\rb\n",
    "caf\u00e9 \u20ac \U0001f600\nna\u00efve\n".encode(),
    b"x" * 70_000 + b"\n" + b"y" * 140_000 + b"\r\nz",
]


@pytest.mark.parametrize("data", CASES)
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1 << 16])
async def test_lines_are_the_same_however_the_bytes_arrive(data, size):
    """Newlines stripped (with a carriage return before one), the last line kept without
    a newline, characters split across two reads put together."""
    assert expected(data) == await lines_of(chunked(data, size))


async def test_bad_utf8_names_its_byte_across_reads():
    data = b"ok\n" + b"a" * 10 + b"\xe2\x82" + b"\n"
    for size in (1, 4, 1 << 16):
        with pytest.raises(InputError, match=r"in.txt is not UTF-8 text \(byte 13\)"):
            await lines_of(chunked(data, size))


async def test_a_long_line_is_read_in_linear_time():
    """A line of 16 MB with no newline for 256 reads takes about as long as 16 MB of short
    lines (it took 100 times as long when each read re-copied the unfinished line)."""

    async def seconds(data: bytes) -> float:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            async for _line in _lines(_file_input(io.BytesIO(data)), "in.txt"):
                pass
            best = min(best, time.perf_counter() - t)
        return best

    size = 16 << 20
    one_line = await seconds(b"a" * size + b"\n")
    short_lines = await seconds((b"a" * 1023 + b"\n") * (size >> 10))
    assert one_line < 5 * short_lines + 0.05, (one_line, short_lines)
