"""Static typing users rely on: ``Stage[A, B] | Stage[B, C]`` is a ``Chain[A, C]``, a
pipeline knows its input and output types, and a mismatched ``|`` is a type error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "typing"


def mypy(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=HERE.parent.parent,
    )


def test_chains_are_typed_end_to_end():
    """Every assert_type in typing/chain_types.py holds under mypy --strict."""
    proc = mypy(HERE / "chain_types.py")
    assert 0 == proc.returncode, proc.stdout + proc.stderr


def test_a_mismatched_pipe_is_a_type_error():
    """parse (str -> int) | shout (str -> str) is reported by mypy."""
    proc = mypy(HERE / "chain_mismatch.py")
    assert 1 == proc.returncode
    assert 'Unsupported operand types for | ("FunctionStage[str, int]"' in proc.stdout


def test_a_misspelt_or_mistyped_option_is_a_type_error():
    """stage(), a Stage subclass and with_options take one typed set of keywords."""
    proc = mypy(HERE / "option_misspelt.py")
    assert 1 == proc.returncode
    out = proc.stdout
    assert 'option_misspelt.py:8: error: Unexpected keyword argument "worker"' in out, out
    assert 'option_misspelt.py:18: error: Argument "ordered" to "Upper"' in out, out
    assert 'option_misspelt.py:19: error: Argument "retries" to "with_options"' in out, out
