"""``@stage`` and :class:`Stage`: what a step of a pipeline is, and its options.

A stage is either a decorated function (the common case) or an instance of a
:class:`Stage` subclass (the plugin API). Either way it carries validated, frozen
:class:`~pipeflow._options.StageOptions` and composes with ``|``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar, Unpack, overload

from ._options import (
    Kind,
    StageKeywords,
    StageOptions,
    check_name,
    make_options,
    unknown_options_message,
)

if TYPE_CHECKING:
    from ._chain import Chain

In = TypeVar("In")
Out = TypeVar("Out")
Next = TypeVar("Next")
Prev = TypeVar("Prev")
A = TypeVar("A")
B = TypeVar("B")


def _kind_of(fn: Callable[..., Any]) -> Kind:
    target = fn
    if not (inspect.isfunction(fn) or inspect.ismethod(fn) or isinstance(fn, functools.partial)):
        # A callable object: look at its __call__.
        target = type(fn).__call__
    if inspect.isasyncgenfunction(target):
        return "asyncgen"
    if inspect.iscoroutinefunction(target):
        return "async"
    if inspect.isgeneratorfunction(target):
        return "syncgen"
    return "sync"


def _checking_keywords(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` (a stage class's own ``__init__`` with named keywords, such as a built-in
    stage's), refusing an unknown keyword as ``@stage`` does: naming the stage, the
    keyword and the closest valid one, where Python would only say "unexpected keyword
    argument". An ``__init__`` that takes ``**options`` passes them on to one that checks."""
    params = inspect.signature(init).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return init
    known = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and p.name != "self"
    ]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in known]
        if unknown:
            name = kwargs.get("name")
            stage = name if isinstance(name, str) else type(self).__name__
            raise TypeError(unknown_options_message(stage, unknown, known))
        init(self, *args, **kwargs)

    return __init__


def _snake(name: str) -> str:
    """``RedisStreamSink`` -> ``redis_stream_sink``; a run of capitals is one word
    (``SQLiteSink`` -> ``sqlite_sink``, ``HTTPFetch`` -> ``http_fetch``)."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return name.lower()


class Stage(Generic[In, Out]):
    """A step of a pipeline: items of type ``In`` in, items of type ``Out`` out.

    Declare one with :func:`stage`, or subclass this class and implement
    :meth:`process` (the plugin API)::

        class Upper(Stage[str, str]):
            async def process(self, item: str) -> str:
                return item.upper()

        Pipeline(Upper(workers=4) | save).run(lines)

    ``process`` may be an ``async def`` (runs as a Trio task), an async generator (0..N
    outputs per item), or a plain ``def`` (runs in a worker thread). A subclass that
    overrides :meth:`open_worker` gets, in each worker, the value it returns as a second
    argument to ``process``; :meth:`close_worker` releases it on every exit path.
    """

    options: StageOptions

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None:
            cls.__init__ = _checking_keywords(init)  # type: ignore[method-assign]

    def __init__(self, **options: Unpack[StageKeywords]) -> None:
        cls = type(self)
        if cls.process is Stage.process and cls._target is Stage._target:
            msg = (
                f"{cls.__name__} subclasses pipeflow.Stage but has no process() "
                f"method, so it would fail on every item: define `async def "
                f"process(self, item)` (or a plain `def`) returning the item's output"
            )
            raise TypeError(msg)
        kw: dict[str, Any] = dict(options)
        if kw.get("name") is None:
            kw["name"] = self._default_name()
        else:
            check_name(kw["name"], self._owner())
        self.options = make_options(kind=self._detect_kind(), **kw)

    # -- what subclasses implement ------------------------------------------------------

    async def process(self, item: In) -> Out:
        """Turn one item into its output. Subclasses implement this."""
        raise NotImplementedError(f"{type(self).__name__} must implement process()")

    async def open_worker(self) -> Any:
        """Set up what one worker keeps for its lifetime (a connection, a client)."""
        return None

    async def close_worker(self, resource: Any) -> None:
        """Release what :meth:`open_worker` returned; called on every exit path."""

    def _owner(self) -> str:
        """What the stage is made from, as its errors name it before it has a name."""
        return type(self).__name__

    def _default_name(self) -> str:
        return _snake(type(self).__name__)

    # -- introspection used by the runner ----------------------------------------------

    def _detect_kind(self) -> Kind:
        return _kind_of(type(self).process)

    @property
    def _has_worker_hooks(self) -> bool:
        return type(self).open_worker is not Stage.open_worker

    def _target(self) -> Callable[..., Any]:
        """The callable a worker invokes per item."""
        return self.process

    @property
    def name(self) -> str:
        return self.options.name

    def with_options(self, **changes: Unpack[StageKeywords]) -> Stage[In, Out]:
        """A copy of this stage with some options changed (and validated again).

        Handy to reuse one function twice in a pipeline under another name::

            clean_again = clean.with_options(name="clean_again", workers=2)
        """
        if "name" in changes:
            check_name(changes["name"], self.options.name)
        clone = copy.copy(self)
        clone.options = self.options.evolve(**changes)
        return clone

    def __repr__(self) -> str:
        o = self.options
        return f"<{type(self).__name__} {o.name!r} workers={o.workers!r} kind={o.kind}>"

    # -- composition ----------------------------------------------------------------------

    def __or__(self, other: Stage[Out, Next] | Chain[Out, Next]) -> Chain[In, Next]:
        from ._chain import Chain

        return Chain._join(self, other)

    def __ror__(self, other: Stage[Prev, In] | Chain[Prev, In]) -> Chain[Prev, Out]:
        from ._chain import Chain

        return Chain._join(other, self)


class FunctionStage(Stage[In, Out]):
    """A stage made from a function by :func:`stage`. Calling it calls the function."""

    def __init__(self, fn: Callable[..., Any], **options: Unpack[StageKeywords]) -> None:
        if not callable(fn):
            raise TypeError(f"@stage needs a function, got {fn!r}")
        self.fn = fn
        functools.update_wrapper(self, fn)
        super().__init__(**options)
        if self.options.resource is not None:
            _check_takes_resource(fn, self.options.name)

    def _owner(self) -> str:
        return getattr(self.fn, "__name__", None) or type(self.fn).__name__

    def _default_name(self) -> str:
        return self._owner()

    def _detect_kind(self) -> Kind:
        return _kind_of(self.fn)

    def _target(self) -> Callable[..., Any]:
        return self.fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        # A decorated method stays a plain function when looked up on an instance.
        return self if obj is None else functools.partial(self.fn, obj)


def _check_takes_resource(fn: Callable[..., Any], name: str) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: trust the user
        return
    try:
        sig.bind(object(), object())
    except TypeError:
        msg = (
            f"stage {name!r}: option resource= is given, so the function must take "
            f"(item, resource), but its signature is {name}{sig}"
        )
        raise TypeError(msg) from None


# The overloads give a precise Stage[In, Out] for each kind of function.


@overload
def stage(fn: Callable[[A], AsyncIterator[B]], /) -> FunctionStage[A, B]: ...
@overload
def stage(fn: Callable[[A], Awaitable[B]], /) -> FunctionStage[A, B]: ...
@overload
def stage(fn: Callable[[A], Iterator[B]], /) -> FunctionStage[A, B]: ...
@overload
def stage(fn: Callable[[A], B], /) -> FunctionStage[A, B]: ...
@overload
def stage(fn: Callable[..., Any], /) -> FunctionStage[Any, Any]: ...
@overload
def stage(**options: Unpack[StageKeywords]) -> _Decorator: ...


def stage(fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """Turn a function into a pipeline :class:`Stage`.

    The kind follows the function: ``async def`` runs as Trio tasks, an async generator
    emits 0..N outputs per item, a plain ``def`` runs in worker threads (a generator
    likewise emits 0..N), ``run_in="process"`` runs in worker processes. The function
    stays callable as before::

        @stage(workers=8, timeout=10)
        async def fetch(url: str) -> bytes: ...

        await fetch("https://example.org")   # still a plain call
        Pipeline(fetch | parse).run(urls)     # a stage of a pipeline

    Every option is validated here; a wrong one raises ``TypeError`` or ``ValueError``
    naming the stage, the option and the value.
    """
    if fn is None:
        return functools.partial(_decorate, options=options)
    if options:  # pragma: no cover - the positional form takes no options
        raise TypeError("use @stage(...) with options, or @stage without parentheses")
    return _decorate(fn, options={})


def _decorate(fn: Callable[..., Any], options: dict[str, Any]) -> FunctionStage[Any, Any]:
    if isinstance(fn, Stage):
        raise TypeError(f"{fn!r} is already a stage; use .with_options() to change options")
    return FunctionStage(fn, **options)


class _Decorator:
    """The type of ``stage(**options)``: a decorator with the same overloads."""

    @overload
    def __call__(self, fn: Callable[[A], AsyncIterator[B]], /) -> FunctionStage[A, B]: ...
    @overload
    def __call__(self, fn: Callable[[A], Awaitable[B]], /) -> FunctionStage[A, B]: ...
    @overload
    def __call__(self, fn: Callable[[A], Iterator[B]], /) -> FunctionStage[A, B]: ...
    @overload
    def __call__(self, fn: Callable[[A], B], /) -> FunctionStage[A, B]: ...
    @overload
    def __call__(self, fn: Callable[..., Any], /) -> FunctionStage[Any, Any]: ...
    def __call__(self, fn: Callable[..., Any], /) -> Any:  # pragma: no cover - typing only
        raise NotImplementedError
