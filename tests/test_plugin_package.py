"""The example plugin package (examples/plugin/) installs like any third-party plugin:
pipeflow finds its stage through the entry-point group ``pipeflow.stages`` and runs it.

The plugin is installed into a temporary directory (``pip install --target``), never
into the environment running the tests, so other tests never see it; the checks run in
subprocesses of this same interpreter with that directory on ``PYTHONPATH``, so they see
this environment's pipeflow whether the tests run in a virtualenv or in the base
interpreter. Everything runs offline: ``--no-index`` and ``--no-build-isolation`` (the
build backend is this environment's setuptools, which the ``test`` extra pins).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "examples" / "plugin"


def _can_build_wheels() -> bool:
    """setuptools builds wheels by itself from 70.1 on; before, it needs `wheel`."""
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment variables under which this interpreter sees examples/plugin as
    installed: its wheel, built here and installed into a temporary directory that goes
    first on ``PYTHONPATH``."""
    # The `test` extra requires setuptools>=70.1, so `pip install -e ".[test]"` always
    # has it; this only stops a run without the test extra with a clear reason.
    assert _can_build_wheels(), (
        "building the plugin offline needs setuptools>=70.1 (or wheel): "
        'python -m pip install -e ".[test]"'
    )
    where = tmp_path_factory.mktemp("plugin")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = shutil.copytree(PLUGIN, where / "src")
    target = where / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--quiet",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert 0 == install.returncode, install.stdout + install.stderr
    # Keep what is already on PYTHONPATH (a checkout being tested, say) after it.
    path = [str(target), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def run_in(env: dict[str, str], *args: str) -> str:
    """Run this interpreter with ``args`` under ``env``; return its standard output."""
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=env["PYTHONPATH"].split(os.pathsep)[0],  # not the repository: what is installed
    )
    assert 0 == proc.returncode, proc.stdout + proc.stderr
    return proc.stdout


def test_discover_stages_finds_the_installed_plugin(plugin_env: dict[str, str]) -> None:
    """discover_stages() lists the plugin by its entry-point name, load_stage() returns
    its Stage subclass, and its summary is the first line of the class docstring."""
    code = """
        import json
        import pipeflow
        from pipeflow._plugins import discover_stages, load_stage, summary

        found = discover_stages()
        cls = load_stage("redact")
        print(json.dumps({
            "value": found["redact"].value,
            "is_stage_class": issubclass(cls, pipeflow.Stage),
            "summary": summary(cls),
        }))
        """
    out = run_in(plugin_env, "-c", textwrap.dedent(code))
    assert {
        "value": "pipeflow_example_plugin:Redact",
        "is_stage_class": True,
        "summary": "Mask e-mail addresses and card numbers in text before it is stored or logged.",
    } == json.loads(out)


def test_a_pipeline_runs_the_plugin_stage(plugin_env: dict[str, str]) -> None:
    """The loaded class takes pipeflow's options as keywords and its own, composes with
    | and runs in a pipeline."""
    code = """
        import json
        from pipeflow import Pipeline, stage
        from pipeflow._plugins import load_stage

        Redact = load_stage("redact")

        @stage
        def shout(text: str) -> str:
            return text.upper()

        redact = Redact(mask="***", workers=2, ordered=True)
        lines = ["mail me at ann@example.org", "card 4111 1111 1111 1111 ok", "nothing"]
        result = Pipeline(redact | shout).run(lines)
        print(json.dumps({
            "outputs": result.outputs,
            "workers": redact.options.workers,
            "name": redact.name,
        }))
        """
    out = run_in(plugin_env, "-c", textwrap.dedent(code))
    assert {
        "outputs": ["MAIL ME AT ***", "CARD *** OK", "NOTHING"],
        "workers": 2,
        "name": "redact",
    } == json.loads(out)


def test_the_plugin_depends_on_this_distribution() -> None:
    """The plugin's dependency is pipeflow's own distribution name, which is not
    "pipeflow": that name on the package index belongs to an unrelated project."""
    ours = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    plugin = tomllib.loads((PLUGIN / "pyproject.toml").read_text(encoding="utf-8"))
    assert "pipeflow-trio" == ours["project"]["name"]
    assert ["pipeflow-trio"] == plugin["project"]["dependencies"]


def test_the_plugin_is_not_visible_outside_its_environment() -> None:
    """The environment running the tests is left as it was: no 'redact' plugin there."""
    from pipeflow._plugins import discover_stages

    assert "redact" not in discover_stages()


def test_pipeflow_plugins_lists_it(plugin_env: dict[str, str]) -> None:
    """`pipeflow plugins` shows the plugin's name, target and summary."""
    out = run_in(plugin_env, "-m", "pipeflow", "plugins")
    line = next(line for line in out.splitlines() if "redact" in line)
    assert "pipeflow_example_plugin:Redact" in line
    assert "Mask e-mail addresses" in line
