"""``pipeflow run`` and SIGINT / SIGTERM outside the run itself, in real processes: while
the command starts (importing the package, its commands, the user's module) and after
the run has stopped, while the command writes its summary and report. Each signal is
sent by the process to itself at a chosen point (an import hook, a stage, the report
reading a stage option once the run's own handler is gone), not after a sleep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# An import hook, loaded at the interpreter's start (sitecustomize): the process sends
# itself SIGNAL as soon as MODULE is being imported.
HOOK = textwrap.dedent(
    """
    import os, sys

    class SignalOnImport:
        def find_spec(self, name, path=None, target=None):
            if name == os.environ["SIGNAL_AT_IMPORT_OF"]:
                sys.meta_path.remove(self)
                os.kill(os.getpid(), int(os.environ["SIGNAL"]))
            return None

    if os.environ.get("SIGNAL_AT_IMPORT_OF"):
        sys.meta_path.insert(0, SignalOnImport())
    """
)

APP = textwrap.dedent(
    """
    import os, signal
    import trio
    from pipeflow import Pipeline, stage

    if os.environ.get("SIGNAL_ON_LOAD"):
        os.kill(os.getpid(), int(os.environ["SIGNAL"]))

    FIRST = int(os.environ.get("FIRST", "0"))
    SECOND = int(os.environ.get("SECOND", "0"))
    gate = []  # the run's own handler of SECOND, seen by the stage

    class Key:
        # The command reads the key's name for the report's structure, once the run is
        # over: then, from the main thread, the second signal.
        def __call__(self, line):
            return 0

        @property
        def __name__(self):
            if SECOND and gate and signal.getsignal(SECOND) != gate[0]:
                gate.clear()
                with open(os.environ["MARK"], "w") as mark:
                    mark.write("sent")
                os.kill(os.getpid(), SECOND)
            return "key"

    @stage(workers=1, key=Key())
    async def step(line):
        if not gate:
            gate.append(signal.getsignal(SECOND or signal.SIGINT))
            if FIRST:
                os.kill(os.getpid(), FIRST)
        await trio.sleep(0)
        return line

    pipeline = Pipeline(step, name="signalled")
    """
)


@pytest.fixture
def app(tmp_path):
    (tmp_path / "sigapp.py").write_text(APP)
    (tmp_path / "sitecustomize.py").write_text(HOOK)
    (tmp_path / "in.txt").write_text("".join(f"{i}\n" for i in range(200)))
    return tmp_path


def pipeflow(app: Path, *args: str, script: bool = False, **env: str):
    command = [sys.executable, "-m", "pipeflow"]
    if script:
        # What installing the package writes as the `pipeflow` command.
        (app / "pipeflow").write_text(
            "import re\nimport sys\nfrom pipeflow._cli import main\n"
            "if __name__ == '__main__':\n"
            "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
            "    sys.exit(main())\n"
        )
        command = [sys.executable, str(app / "pipeflow")]
    return subprocess.run(
        [*command, "run", "sigapp:pipeline", "--input", "in.txt", *args],
        cwd=app,
        env=dict(os.environ, PYTHONPATH=f"{app}{os.pathsep}{ROOT}", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize(
    ("module", "script"),
    [
        ("pipeflow._chain", False),  # the package's own imports (python -m pipeflow)
        ("pipeflow._chain", True),  # ... and through the installed `pipeflow` script
        ("pipeflow._cli.run", False),  # the command's imports
    ],
)
def test_a_signal_while_the_command_imports_is_one_line(app, signum, module, script):
    """Not a KeyboardInterrupt traceback, nor a silent death by SIGTERM."""
    done = pipeflow(
        app, "--report", "r.json", script=script, SIGNAL_AT_IMPORT_OF=module, SIGNAL=str(signum)
    )
    name = signal.Signals(signum).name
    assert f"pipeflow: stopped by {name} while starting\n" == done.stderr
    assert 128 + signum == done.returncode
    assert not (app / "r.json").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_loading_the_module_is_one_line(app, signum):
    done = pipeflow(app, SIGNAL_ON_LOAD="1", SIGNAL=str(signum))
    name = signal.Signals(signum).name
    assert f"pipeflow: stopped by {name} while starting\n" == done.stderr
    assert 128 + signum == done.returncode


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (signal.SIGINT, signal.SIGINT),
        (signal.SIGTERM, signal.SIGTERM),
        (signal.SIGTERM, signal.SIGINT),
    ],
)
def test_a_second_signal_while_the_command_finishes_is_not_fatal(app, first, second):
    """The run stopped by the first signal; the second comes once the run's handler is
    gone (as the run ends, or while the summary and report are written): the summary
    and report are still written, and the exit status is the first signal's."""
    mark = app / "mark"
    done = pipeflow(
        app,
        "--report",
        "r.json",
        "--grace",
        "0",
        FIRST=str(first),
        SECOND=str(second),
        MARK=str(mark),
    )
    name = signal.Signals(first).name
    assert 128 + first == done.returncode, done.stderr
    assert mark.exists()  # the second signal was sent
    assert "Traceback" not in done.stderr
    assert done.stderr.endswith(f"pipeflow: stopped by {name}\n"), done.stderr
    assert done.stdout.startswith("interrupted in ")
    report = json.loads((app / "r.json").read_text())
    assert ("interrupted", name) == (report["status"], report["signal"])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_as_a_run_ends_on_its_own_is_its_exit_status(app, signum):
    """A run that ended on its own keeps its report ("completed"); the command, told to
    stop while finishing, exits 128 + N and says so."""
    mark = app / "mark"
    done = pipeflow(app, "--report", "r.json", SECOND=str(signum), MARK=str(mark))
    name = signal.Signals(signum).name
    assert 128 + signum == done.returncode, done.stderr
    assert mark.exists()
    assert "Traceback" not in done.stderr
    assert done.stderr.endswith(f"pipeflow: stopped by {name} as the run ended\n"), done.stderr
    assert done.stdout.startswith("completed in ")
    assert "completed" == json.loads((app / "r.json").read_text())["status"]
