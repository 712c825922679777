"""The codebase stays typed and linted: mypy strict on pipeflow/, ruff everywhere,
and the public namespace exports exactly what it documents."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import pipeflow

ROOT = Path(__file__).resolve().parent.parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_mypy_strict_is_clean():
    """mypy --strict (configured in pyproject.toml) finds nothing in pipeflow/."""
    proc = run(sys.executable, "-m", "mypy")
    assert 0 == proc.returncode, proc.stdout + proc.stderr


def test_ruff_lint_and_format_are_clean():
    """ruff check (with the ASYNC rules) and ruff format --check pass."""
    lint = run(sys.executable, "-m", "ruff", "check", ".")
    assert 0 == lint.returncode, lint.stdout + lint.stderr
    fmt = run(sys.executable, "-m", "ruff", "format", "--check", ".")
    assert 0 == fmt.returncode, fmt.stdout + fmt.stderr


def test_layers():
    """Modules import only from the layers below them (the contracts in pyproject.toml,
    checked by import-linter): the core never imports its edges, the runner's own
    modules go one way, and metrics, reports, the CLI and connectors read snapshots
    (StageStats, StageSample, WorkerStatus), never the runner's state."""
    proc = run(sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()")
    assert 0 == proc.returncode, proc.stdout + proc.stderr
    assert "3 kept, 0 broken" in proc.stdout


def test_public_names_are_complete():
    """Every public name in pipeflow's namespace is in __all__, and every name in
    __all__ exists."""
    public = {n for n in vars(pipeflow) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(pipeflow, n)).__name__ == "module"}
    assert public - modules == set(pipeflow.__all__)


@pytest.mark.parametrize(
    "module",
    [
        "pipeflow.testing",
        "pipeflow.sizing",
        "pipeflow.plugins",
        "pipeflow.connectors.redis",
        "pipeflow.stages",
        "pipeflow.stages.http",
        "pipeflow.stages.jsonl",
        "pipeflow.stages.sqlite",
    ],
)
def test_every_public_module_declares_what_it_exports(module):
    """Each public module's __all__ lists names that exist, and every public class or
    function defined in the module itself is in it."""
    import importlib
    import inspect

    mod = importlib.import_module(module)
    exported = set(mod.__all__)
    assert [] == [n for n in exported if not hasattr(mod, n)]
    own = {
        n
        for n, obj in vars(mod).items()
        if not n.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == mod.__name__
    }
    assert set() == own - exported


@pytest.mark.parametrize("name", ["stage", "Stage", "Pipeline", "RunResult", "StageError"])
def test_contract_names_exist(name):
    """The contract's core names are importable from pipeflow."""
    assert hasattr(pipeflow, name)
