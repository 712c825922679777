"""``pipeflow plugins`` and ``load_stage`` facing broken or hostile plugins: each is
listed with a one-line reason, none hides the others or stops the command, a name two
packages publish is shown twice, and a real Ctrl+C still stops the command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

PLUGINS = {
    "hp_kbi.py": "raise KeyboardInterrupt\n",
    "hp_sysexit.py": "import sys\nsys.exit(4)\n",
    "hp_ok.py": textwrap.dedent(
        '''
        from pipeflow import Stage

        NUMBER = 42

        class Shadow(Stage):
            """Publishes a name a built-in stage has."""

            async def process(self, item):
                return item

        class BlankFirst(Stage):
            """

            The summary, after blank lines.
            """

            async def process(self, item):
                return item

        class Escapes(Stage):
            """Red \x1b[31mtext\x1b[0m."""

            async def process(self, item):
                return item
        '''
    ),
    "hp_slow.py": "import time\nprint('importing', flush=True)\ntime.sleep(60)\n",
    "hp_print.py": textwrap.dedent(
        '''
        print("hello from the import")

        def factory(**options):
            """A factory that prints as its module imports."""
        '''
    ),
    "hp_badstr.py": textwrap.dedent(
        """
        class Unprintable(Exception):
            def __str__(self):
                raise RuntimeError("no message")

        raise Unprintable()
        """
    ),
}

ENTRY_POINTS = {
    "kbi": "hp_kbi:X",
    "sysexit": "hp_sysexit:X",
    "notastage": "hp_ok:NUMBER",
    "blankfirst": "hp_ok:BlankFirst",
    "escapes": "hp_ok:Escapes",
    "badvalue": "this is not: a target",
    "http_fetch": "hp_ok:Shadow",
    "printer": "hp_print:factory",
    "badstr": "hp_badstr:X",
}


def install(where: Path, entry_points: dict[str, str]) -> dict[str, str]:
    """A fake distribution ``hostileplug 1.0`` in ``where`` (nothing installed): the
    environment that puts it on the path, after the code under test."""
    for name, text in PLUGINS.items():
        (where / name).write_text(text)
    info = where / "hostileplug-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hostileplug\nVersion: 1.0\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text("[pipeflow.stages]\n" + lines)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(where)])}


def plugins(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeflow", "plugins", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def listed(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, list[str]], str]:
    """``pipeflow plugins --format json`` with the hostile plugins: the summaries by
    name (a list: a name may be published twice), and stderr."""
    env = install(tmp_path_factory.mktemp("plugins"), ENTRY_POINTS)
    proc = plugins(env, "--format", "json")
    assert 0 == proc.returncode, proc.stderr
    rows: dict[str, list[str]] = {}
    for row in json.loads(proc.stdout):
        rows.setdefault(row["name"], []).append(row["summary"])
    return rows, proc.stderr


def test_a_plugin_raising_keyboardinterrupt_on_import_is_listed_as_broken(listed):
    """KeyboardInterrupt raised by a plugin's import (not a Ctrl+C of the user) is a
    broken plugin like any other: listed, and the others are listed too."""
    rows, _ = listed
    assert ["(cannot load: KeyboardInterrupt)"] == rows["kbi"]
    assert ["(cannot load: SystemExit: 4)"] == rows["sysexit"]
    assert "jsonl_sink" in rows


def test_what_a_plugin_prints_on_import_goes_to_stderr(listed):
    """A plugin that prints as it imports does not break --format json (the fixture
    parsed it): its text is on stderr."""
    rows, stderr = listed
    assert ["A factory that prints as its module imports."] == rows["printer"]
    assert "hello from the import\n" in stderr


def test_an_exception_that_cannot_be_shown_is_still_one_line(listed):
    """A plugin raising an exception whose str() raises too is listed, not a crash."""
    rows, _ = listed
    assert ["(cannot load: Unprintable: <its message cannot be shown>)"] == rows["badstr"]


def test_a_malformed_entry_point_is_one_clear_line(listed):
    """An entry point that is not module:attribute says so, not an AttributeError about
    None."""
    rows, _ = listed
    expected = (
        "(cannot load: malformed entry point 'this is not: a target': expected module:attribute)"
    )
    assert [expected] == rows["badvalue"]


def test_a_target_that_is_not_a_stage_says_so(listed):
    """A plugin whose target is a number shows that, not int's docstring."""
    rows, _ = listed
    assert ["(not a stage: hp_ok:NUMBER is an int)"] == rows["notastage"]


def test_a_docstring_after_blank_lines_gives_its_summary(listed):
    """The summary is the docstring's first line of text, blank lines before it or not."""
    rows, _ = listed
    assert ["The summary, after blank lines."] == rows["blankfirst"]


def test_a_name_two_packages_publish_is_shown_twice_with_a_warning(listed):
    """A plugin named like a built-in stage is not silently hidden: both are listed, the
    one not used says which one is, and stderr warns."""
    rows, stderr = listed
    [first, second] = rows["http_fetch"]
    hidden = [s for s in (first, second) if s.startswith("(hidden: ")]
    assert 1 == len(hidden)
    warnings = [x for x in stderr.splitlines() if x.startswith("pipeflow: warning: ")]
    assert 1 == len(warnings)
    assert warnings[0].startswith("pipeflow: warning: stage plugin 'http_fetch' is published by ")


def test_control_characters_of_a_summary_are_not_printed(tmp_path):
    """A docstring's terminal escape codes are shown escaped in the text listing."""
    env = install(tmp_path, {"escapes": "hp_ok:Escapes"})
    proc = plugins(env)
    assert 0 == proc.returncode
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("escapes ")]
    assert line.endswith("Red \\x1b[31mtext\\x1b[0m.")
    assert "\x1b" not in proc.stdout


def test_load_stage_of_a_malformed_entry_point_is_a_valueerror(tmp_path):
    """load_stage() of a malformed entry point raises ValueError naming the plugin, its
    package and its value."""
    env = install(tmp_path, {"badvalue": "this is not: a target"})
    script = (
        "from pipeflow.plugins import load_stage\n"
        "try:\n"
        "    load_stage('badvalue')\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert (
        "stage plugin 'badvalue' of hostileplug 1.0: malformed entry point "
        "'this is not: a target' (expected 'module:attribute', such as "
        "'my_package.stages:Upper')\n"
    ) == proc.stdout


def test_ctrl_c_while_a_plugin_imports_stops_the_command(tmp_path):
    """The user's own Ctrl+C while a slow plugin imports stops `pipeflow plugins`: one
    line, exit 130 (not listed as a broken plugin)."""
    env = install(tmp_path, {"slow": "hp_slow:X"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeflow", "plugins"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert "importing\n" == proc.stderr.readline()  # (a plugin's prints go to stderr)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (130, "pipeflow: stopped by SIGINT\n", "") == (proc.returncode, err, out)


def test_one_plugin_published_twice_for_the_same_object_is_listed_once(tmp_path):
    """Stale metadata (a renamed package's old egg-info beside the new one) publishes a
    built-in's name for the same module:attribute: one row, no warning."""
    env = install(tmp_path, {"printer": "hp_print:factory"})
    stale = tmp_path / "stalecopy-1.0.dist-info"
    stale.mkdir()
    (stale / "METADATA").write_text("Metadata-Version: 2.1\nName: stalecopy\nVersion: 1.0\n")
    (stale / "entry_points.txt").write_text(
        "[pipeflow.stages]\njsonl_sink = pipeflow.stages.jsonl:JsonLinesSink\n"
    )
    proc = plugins(env, "--format", "json")
    assert 0 == proc.returncode
    assert 1 == [row["name"] for row in json.loads(proc.stdout)].count("jsonl_sink")
    assert "warning" not in proc.stderr
