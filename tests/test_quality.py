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


def test_public_names_are_complete():
    """Every public name in pipeflow's namespace is in __all__, and every name in
    __all__ exists."""
    public = {n for n in vars(pipeflow) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(pipeflow, n)).__name__ == "module"}
    assert public - modules == set(pipeflow.__all__)


@pytest.mark.parametrize("name", ["stage", "Stage", "Pipeline", "RunResult", "StageError"])
def test_contract_names_exist(name):
    """The contract's core names are importable from pipeflow."""
    assert hasattr(pipeflow, name)
