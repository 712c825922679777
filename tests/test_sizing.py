"""pipeflow.sizing: Little's Law in one public place, exact where it matters."""

from __future__ import annotations

from fractions import Fraction

import pytest

from pipeflow.sizing import (
    TARGET_UTILISATION,
    busy_workers,
    capacity,
    size,
    utilisation,
    workers_needed,
)


def test_littles_law_figures():
    """L = λW, L/N, N/W and ⌈L/U⌉ as a user computes them by hand."""
    assert 3.6 == pytest.approx(busy_workers(72.0, 0.05))
    assert 0.9 == pytest.approx(utilisation(3.6, 4))
    assert 0.0 == utilisation(3.6, 0)
    assert 80.0 == capacity(4, 0.05)
    assert 6 == workers_needed(3.6)
    assert 0.7 == TARGET_UTILISATION


def test_workers_needed_is_not_fooled_by_float_rounding():
    """7 busy workers at 70% need 10 workers, not 11 (7 / 0.7 is 10.000000000000002)."""
    assert 10 == workers_needed(7.0, 0.7)
    assert 10 == workers_needed(Fraction(7), Fraction(7, 10))
    assert 1 == workers_needed(0.0)


def test_size_gives_the_worked_example_with_floats_too():
    """5,000/s at 80 ms over 4 instances with 20% headroom is 120 per instance, whether
    the caller passes fractions, floats or strings."""
    for args in ((Fraction(5000), Fraction("0.08"), Fraction("0.2")), (5000, 0.08, 0.2)):
        s = size(args[0], args[1], instances=4, headroom=args[2])
        assert (120, 480) == (s.per_instance, s.total)
    assert (
        172
        == size("5000", "0.08", instances=4, headroom="0.2", target_utilisation=0.7).per_instance
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0, "latency": 1}, "rate and latency must be above 0"),
        ({"rate": 1, "latency": 1, "instances": 0}, "instances must be a whole number >= 1"),
        (
            {"rate": 1, "latency": 1, "target_utilisation": 2},
            "target_utilisation must be in (0, 1]",
        ),
        ({"rate": "fast", "latency": 1}, "rate must be a number, got 'fast'"),
    ],
)
def test_size_refuses_nonsense(kwargs, message):
    """Each bad argument is a ValueError that names it."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        size(**kwargs)
