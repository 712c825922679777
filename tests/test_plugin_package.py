"""The example plugin package (examples/plugin/) installs like any third-party plugin:
pipeflow finds its stage through the entry-point group ``pipeflow.stages`` and runs it.

It is installed into a throwaway virtual environment that sees this environment's
packages (``--system-site-packages``), never into the shared one, so other tests never
see it; everything runs offline (``--no-build-isolation``: the build backend comes from
this environment).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import textwrap
import venv
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
def plugin_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Python of a fresh venv where examples/plugin is installed."""
    if not _can_build_wheels():
        pytest.skip("building the plugin offline needs setuptools>=70.1 (or wheel) installed")
    where = tmp_path_factory.mktemp("plugin")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = shutil.copytree(PLUGIN, where / "src")
    env_dir = where / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    install = subprocess.run(
        [*pip, "--no-index", "--disable-pip-version-check", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert 0 == install.returncode, install.stdout + install.stderr
    return python


def run_in(python: Path, code: str) -> str:
    proc = subprocess.run(
        [str(python), "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=python.parent,  # not the repository: import what is installed
    )
    assert 0 == proc.returncode, proc.stdout + proc.stderr
    return proc.stdout


def test_discover_stages_finds_the_installed_plugin(plugin_python: Path) -> None:
    """discover_stages() lists the plugin by its entry-point name, load_stage() returns
    its Stage subclass, and its summary is the first line of the class docstring."""
    out = run_in(
        plugin_python,
        """
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
        """,
    )
    assert {
        "value": "pipeflow_example_plugin:Redact",
        "is_stage_class": True,
        "summary": "Mask e-mail addresses and card numbers in text before it is stored or logged.",
    } == json.loads(out)


def test_a_pipeline_runs_the_plugin_stage(plugin_python: Path) -> None:
    """The loaded class takes pipeflow's options as keywords and its own, composes with
    | and runs in a pipeline."""
    out = run_in(
        plugin_python,
        """
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
        """,
    )
    assert {
        "outputs": ["MAIL ME AT ***", "CARD *** OK", "NOTHING"],
        "workers": 2,
        "name": "redact",
    } == json.loads(out)


def test_the_plugin_is_not_visible_outside_its_environment() -> None:
    """The shared environment is left as it was: no 'redact' plugin there."""
    from pipeflow._plugins import discover_stages

    assert "redact" not in discover_stages()


def test_pipeflow_plugins_lists_it(plugin_python: Path) -> None:
    """`pipeflow plugins` shows the plugin's name, target and summary."""
    if importlib.util.find_spec("pipeflow._cli") is None:
        pytest.skip("the pipeflow CLI (pipeflow/_cli.py) is not there yet")
    cli = "import sys; from pipeflow._cli import main; sys.exit(main())"
    proc = subprocess.run(
        [str(plugin_python), "-c", cli, "plugins"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=plugin_python.parent,
    )
    if "invalid choice: 'plugins'" in proc.stderr:
        pytest.skip("the pipeflow CLI has no 'plugins' command yet")
    assert 0 == proc.returncode, proc.stdout + proc.stderr
    line = next(line for line in proc.stdout.splitlines() if "redact" in line)
    assert "pipeflow_example_plugin:Redact" in line
    assert "Mask e-mail addresses" in line
