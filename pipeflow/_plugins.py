"""Stage plugins: stages that installed packages publish under the entry-point group
``pipeflow.stages``.

A package declares its stages in its ``pyproject.toml``::

    [project.entry-points."pipeflow.stages"]
    upper = "my_package.stages:Upper"

and users find them with ``pipeflow plugins`` or :func:`discover_stages`, and load one
by name with :func:`load_stage`.
"""

from __future__ import annotations

import inspect
import sys
from importlib.metadata import EntryPoint, entry_points
from typing import Any

__all__ = ["GROUP", "check_value", "discover_stages", "every_stage", "load_stage", "summary"]

#: The entry-point group that stage plugins are published under.
GROUP = "pipeflow.stages"


def discover_stages() -> dict[str, EntryPoint]:
    """Every installed stage plugin: name → entry point, sorted by name, nothing loaded.

    When two distributions publish the same name, the first one found wins (the order
    of ``sys.path``), as Python's own import system would pick.
    """
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep)
    return dict(sorted(found.items()))


def every_stage() -> list[EntryPoint]:
    """Every published stage plugin, sorted by name, those sharing a name in the order
    found (the first is the one :func:`discover_stages` and :func:`load_stage` use).
    A name published twice for the same object (``module:attribute``) is listed once:
    the same package found twice on ``sys.path``, or stale metadata of a renamed one."""
    seen: set[tuple[str, str]] = set()
    out: list[EntryPoint] = []
    for ep in entry_points(group=GROUP):
        if (ep.name, ep.value) not in seen:
            seen.add((ep.name, ep.value))
            out.append(ep)
    return sorted(out, key=lambda ep: ep.name)


def check_value(ep: EntryPoint) -> None:
    """Raise ``ValueError`` saying what is wrong when ``ep``'s value is not
    ``module:attribute`` (loading it would fail with an ``AttributeError`` about
    ``None``)."""
    if EntryPoint.pattern.match(ep.value) is None:
        dist = ep.dist
        where = f" of {dist.name} {dist.version}" if dist is not None else ""
        msg = (
            f"stage plugin {ep.name!r}{where}: malformed entry point {ep.value!r} "
            f"(expected 'module:attribute', such as 'my_package.stages:Upper')"
        )
        raise ValueError(msg)


def load_stage(name: str) -> Any:
    """Import the plugin published as ``name`` and return its object (a stage, a
    :class:`~pipeflow.Stage` subclass, or a factory, as its package documents).

    Raises ``LookupError`` naming the installed plugins when there is no such name,
    ``ValueError`` when its entry point is not ``module:attribute``; import errors of
    the plugin itself propagate unchanged.
    """
    stages = discover_stages()
    if name not in stages:
        installed = ", ".join(repr(n) for n in stages) or "none"
        msg = (
            f"no stage plugin named {name!r} in entry-point group {GROUP!r} "
            f"(installed: {installed})"
        )
        raise LookupError(msg)
    check_value(stages[name])
    return stages[name].load()


def summary(obj: object) -> str:
    """The first line of ``obj``'s own docstring ("" when it has none).

    A class's docstring is its own, not one inherited from :class:`~pipeflow.Stage`;
    for a decorated function it is the function's.
    """
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
    else:
        doc = getattr(obj, "__doc__", None)
        owner = type(obj).__module__.partition(".")[0]
        # (==: a built-in type's __doc__ is a new string at each access.)
        if doc == type(obj).__doc__ and (owner == "pipeflow" or owner in sys.stdlib_module_names):
            # An instance of pipeflow's own classes (a Chain) or of a standard type (a
            # functools.partial): that docstring describes the type, not the plugin.
            doc = None
    if not isinstance(doc, str):
        return ""
    lines = inspect.cleandoc(doc).strip().splitlines()
    return lines[0].strip() if lines else ""
