"""``|`` composition: a :class:`Chain` is an ordered, immutable sequence of stages."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._stage import Stage

In = TypeVar("In")
Out = TypeVar("Out")
Next = TypeVar("Next")
Prev = TypeVar("Prev")


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


class Chain(Generic[In, Out]):
    """Stages joined with ``|``, items of type ``In`` in and ``Out`` out.

    ``fetch | parse | store`` is a ``Chain``; chains join with stages and other chains.
    Pass one to :class:`~pipeflow.Pipeline` to run it.
    """

    __slots__ = ("stages",)

    def __init__(self, stages: tuple[Stage[Any, Any], ...]) -> None:
        self.stages = stages

    @staticmethod
    def _join(left: object, right: object) -> Chain[Any, Any]:
        parts: list[Stage[Any, Any]] = []
        for side in (left, right):
            if isinstance(side, Stage):
                parts.append(side)
            elif isinstance(side, Chain):
                parts.extend(side.stages)
            else:
                hint = ""
                if callable(side):
                    hint = "; decorate the function with @stage first"
                where = "left" if side is left else "right"
                msg = (
                    f"cannot join {_describe(left)} | {_describe(right)}: the {where} side "
                    f"is not a stage or a chain{hint}"
                )
                raise TypeError(msg)
        return Chain(tuple(parts))

    def __or__(self, other: Stage[Out, Next] | Chain[Out, Next]) -> Chain[In, Next]:
        return Chain._join(self, other)

    def __ror__(self, other: Stage[Prev, In] | Chain[Prev, In]) -> Chain[Prev, Out]:
        return Chain._join(other, self)

    def __iter__(self) -> Iterator[Stage[Any, Any]]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def __repr__(self) -> str:
        return "Chain(" + " | ".join(s.name for s in self.stages) + ")"

    if not TYPE_CHECKING:  # for mypy, a Chain has no such attributes at all

        def __getattr__(self, name: str) -> Any:
            if name in _PIPELINE_METHODS:
                msg = (
                    f"{self!r} is a chain of stages, not a pipeline: wrap the chain in "
                    f"Pipeline(...) to {name} it, e.g. Pipeline(a | b).{name}(...)"
                )
                raise AttributeError(msg)
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


_PIPELINE_METHODS = frozenset({"run", "arun", "stream", "open", "current_stats"})
