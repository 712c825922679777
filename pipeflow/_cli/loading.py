"""Loading ``MODULE:PIPELINE``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from .._chain import Chain
from .._pipeline import Pipeline
from .._stage import Stage
from .errors import CliError


def _where(exc: BaseException) -> str:
    """`` (app.py, line 3)``: where in the user's code an import failed."""
    if isinstance(exc, SyntaxError):
        return ""  # str(SyntaxError) already ends with "(app.py, line 3)"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        return f" ({Path(last.filename).name}, line {last.lineno})"
    return ""


def _import(module: str) -> Any:
    if module.endswith(".py") or "/" in module or os.sep in module:
        path = Path(module)
        if not path.is_file():
            raise CliError(f"no such file: {module}")
        name = path.stem
        directory = str(path.resolve().parent)
        if directory not in sys.path:
            sys.path.insert(0, directory)  # as `python app.py` would
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:  # pragma: no cover - .py files always load
            raise CliError(f"cannot import {module}")
        mod = importlib.util.module_from_spec(spec)
        # In sys.modules before it runs, so pickling (process workers) finds it by name.
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except (Exception, SystemExit) as exc:
            # SystemExit too: a script that parses its own arguments on import. (Not
            # KeyboardInterrupt: Ctrl+C during the import still stops the command.)
            del sys.modules[name]
            raise CliError(
                f"cannot import {module}: {type(exc).__name__}: {exc}{_where(exc)}"
            ) from None
        return mod
    if not all(part.isidentifier() for part in module.split(".")):
        raise CliError(f"{module!r} is not a module name (expected MODULE:PIPELINE)")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` does
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            raise CliError(
                f"no module named {module!r} (looked in the current directory and sys.path)"
            ) from None
        raise CliError(
            f"cannot import module {module!r}: {type(exc).__name__}: {exc}{_where(exc)}"
        ) from None
    except (Exception, SystemExit) as exc:  # SystemExit: see above
        raise CliError(
            f"cannot import module {module!r}: {type(exc).__name__}: {exc}{_where(exc)}"
        ) from None


def load_pipeline(spec: str) -> Pipeline[Any, Any]:
    """The pipeline named by ``MODULE:PIPELINE`` (a module name, or a path to a ``.py``
    file; the attribute may be dotted). A stage or a chain is wrapped in a Pipeline
    named after the attribute."""
    module, sep, attr = spec.rpartition(":")
    if not sep or not module or not attr:
        raise CliError(
            f"expected MODULE:PIPELINE (for example app:pipeline or app.py:pipeline), got {spec!r}"
        )
    mod = _import(module)
    obj: Any = mod
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            found = sorted(
                n for n, v in vars(mod).items() if isinstance(v, Pipeline | Chain | Stage)
            )
            hint = f" (pipelines and stages there: {', '.join(found)})" if found else ""
            raise CliError(f"module {module!r} has no attribute {attr!r}{hint}") from None
    if isinstance(obj, Pipeline):
        return obj
    if isinstance(obj, Chain | Stage):
        return Pipeline(obj, name=attr.rpartition(".")[2])
    kind = "a class" if inspect.isclass(obj) else f"a {type(obj).__name__}"
    raise CliError(f"{spec} is {kind}, not a pipeflow.Pipeline (nor a stage or chain)")
