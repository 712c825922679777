"""Bad input to the ``pipeflow`` command (``pipeflow/_cli/``, ``pipeflow/_report/``,
``_metrics.py``, ``_plugins.py``), and the reports of failed or stopped runs, as a user
meets them: through ``main(argv)`` and through ``python -m pipeflow``.

The contract under test: every bad input is exactly one line on stderr starting
``pipeflow: error:`` and exit status 2, never a traceback. Each strict xfail below is a
bug found in review; the passing tests cover what held and was not covered elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from pipeflow import Pipeline, stage
from pipeflow._cli import main

APP = textwrap.dedent(
    """
    import os
    import trio
    from pipeflow import Pipeline, stage

    seen = []

    @stage(workers=2)
    async def record(line):
        seen.append(line)
        return line

    recording = Pipeline(record, name="recording")

    @stage(workers=1)
    async def boom(line):
        raise ValueError("bad item")

    failing = Pipeline(boom, name="failing")

    @stage(workers=2)
    async def slow(line):
        marker = os.environ.get("REVAPP_STARTED")
        if marker:
            open(marker, "a").close()
        await trio.sleep(0.02)
        return line

    slowly = Pipeline(slow, name="slowly")
    """
)


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A pipeline module ``revapp`` in a fresh current directory, with 3 input lines."""
    (tmp_path / "revapp.py").write_text(APP)
    (tmp_path / "items.txt").write_text("a\nb\nc\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("revapp", "exits", "syntaxerr"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield tmp_path
    for name in ("revapp", "exits", "syntaxerr"):
        sys.modules.pop(name, None)


def one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``main(argv)``; check the bad-input contract; return the error line."""
    status = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert (2, 1) == (status, len(lines)), captured.err
    assert lines[0].startswith("pipeflow: error: "), captured.err
    return lines[0]


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m pipeflow ARGS`` in a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "pipeflow", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


class CannedServer:
    """A TCP server on 127.0.0.1 that answers every connection with fixed bytes, then
    closes it: a service that is not (quite) a Prometheus endpoint."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/metrics"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(4096)
                    conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def canned() -> Iterator[type[CannedServer]]:
    servers: list[CannedServer] = []

    class Tracked(CannedServer):
        def __init__(self, reply: bytes) -> None:
            super().__init__(reply)
            servers.append(self)

    yield Tracked
    for s in servers:
        s.close()


EXPOSITION = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nConnection: close\r\n\r\n"
    b'pipeflow_stage_workers{pipeline="p",stage="s"} 1.0\n'
)


# -- bad input that already holds (not covered by tests/test_cli.py) --------------------------

HOLDS = [
    (["size", "--rate", "nan", "--latency", "80ms"], "argument --rate"),
    (["size", "--rate", "inf", "--latency", "80ms"], "argument --rate"),
    (["size", "--rate", "-1", "--latency", "80ms"], "argument --rate"),
    (["size", "--rate", "5000", "--latency", "-1"], "argument --latency"),
    (["size", "--rate", "5000", "--latency", "nan"], "argument --latency"),
    (["size", "--rate", "5000", "--latency", "inf"], "argument --latency"),
    (["size", "--rate", "5000", "--latency", "80ms", "-f", "yaml"], "invalid choice: 'yaml'"),
    (["run", "revapp:recording", "--metrics-port", "99999999999999999999"], "TCP port"),
    (["run", "revapp:recording", "--metrics-port=-1"], "TCP port"),
    (["run", "revapp:recording", "--grace=-1"], "argument --grace"),
    (["run", "revapp:recording", "--input", "adir"], "cannot read --input adir"),
    (
        ["run", "revapp:recording", "--input", "items.txt", "--report", "nodir/r.json"],
        "no such directory",
    ),
    (["run", "revapp:record.nope"], "has no attribute 'record.nope'"),
    (["graph", "dir.json"], "cannot read report dir.json: Is a directory"),
    (["graph", "binary.json"], "cannot read report binary.json"),
    (["graph", "list.json"], "list.json is not a pipeflow run report"),
    (["graph", "revapp:recording", "-o", "nodir/g.txt"], "cannot write nodir/g.txt"),
    (["graph", "http://", "--interval", "0.01"], "cannot reach http://"),
]


@pytest.mark.parametrize(("argv", "message"), HOLDS, ids=[" ".join(a) for a, _ in HOLDS])
def test_bad_input_that_holds(app, capsys, argv, message):
    """More bad input: non-finite and negative numbers, huge ports, a directory or
    binary file where text is expected, a missing output directory."""
    (app / "adir").mkdir()
    (app / "dir.json").mkdir()
    (app / "binary.json").write_bytes(b"\xff\xfe{")
    (app / "list.json").write_text("[1, 2]")
    assert message in one_error_line(capsys, argv)


def test_a_web_page_or_foreign_metrics_are_not_pipeflow_metrics(capsys, canned):
    """An HTML page, or Prometheus metrics with no pipeflow_stage_*: one line, status 2."""
    page = canned(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n<html><body>hi</body></html>")
    line = one_error_line(capsys, ["graph", page.url, "--interval", "0.01"])
    assert "not a Prometheus text exposition" in line
    other = canned(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nx_total 1\n")
    line = one_error_line(capsys, ["graph", other.url, "--interval", "0.01"])
    assert "no pipeflow_stage_* metrics found" in line


# -- bugs: tracebacks instead of one line -----------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        ["--rate", "1e999", "--latency", "80ms"],
        ["--rate", "5000", "--latency", "1e999"],
        ["--rate", "1e308", "--latency", "10"],
        ["--rate", "5000", "--latency", "80ms", "--headroom", "1e999%"],
    ],
    ids=["rate 1e999", "latency 1e999", "rate x latency overflows", "headroom 1e999%"],
)
def test_size_with_an_overflowing_number_is_one_line(capsys, extra):
    """A number too large for a float is bad input, not a crash."""
    one_error_line(capsys, ["size", *extra])


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "revapp:recording", "--grace", "1e999"],
        ["graph", "http://127.0.0.1:1/metrics", "--interval", "1e999"],
        ["graph", "URL", "--interval", "1e308"],
    ],
    ids=["grace 1e999", "interval 1e999", "interval 1e308"],
)
def test_huge_seconds_are_one_line(app, capsys, canned, argv):
    """--grace and --interval too large for a float or for time.sleep: one line."""
    server = canned(EXPOSITION)
    one_error_line(capsys, [server.url if a == "URL" else a for a in argv])


@pytest.mark.parametrize(
    "reply",
    [
        b"SSH-2.0-OpenSSH_9.0\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npipeflow_stage",
        "http://127.0.0.1:abc/metrics",
        "http://[::1/metrics",
    ],
    ids=["not HTTP", "truncated body", "nonnumeric port", "bad IPv6 URL"],
)
def test_a_url_that_is_not_a_metrics_endpoint_is_one_line(capsys, canned, reply):
    """Pointing `graph` at the wrong port (an SSH or Redis server), at an endpoint that
    hangs up mid-answer, or giving a malformed URL: one line, exit status 2."""
    url = reply if isinstance(reply, str) else canned(reply).url
    one_error_line(capsys, ["graph", url, "--interval", "0.01"])


def test_graph_of_a_non_http_port_through_a_subprocess(tmp_path, canned):
    """The command a user types, pointed at an SSH port by mistake: one line, status 2."""
    server = canned(b"SSH-2.0-OpenSSH_9.0\r\n")
    proc = cli("graph", server.url, "--interval", "0.01", cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    assert (2, 1) == (proc.returncode, len(proc.stderr.splitlines())), proc.stderr


#: name -> (report, --format): the format that reads the malformed field.
WRONG_SHAPES = {
    "workers not numbers": (
        {
            "stages": [{"name": "a"}],
            "elapsed": 1,
            "structure": {"stages": [{"name": "a", "workers": ["x", "y"]}]},
        },
        "text",
    ),
    "timeout not a number": (
        {
            "stages": [{"name": "a"}],
            "elapsed": 1,
            "structure": {"stages": [{"name": "a", "options": {"timeout": "soon"}}]},
        },
        "text",
    ),
    "elapsed 1e999": ({"stages": [{"name": "a"}], "elapsed": 1e999}, "text"),
    "throughput NaN": (
        {
            "stages": [{"name": "a", "throughput": float("nan"), "duration_mean": 0.1}],
            "elapsed": 1,
            "bottleneck": "a",
        },
        "json",
    ),
    "series t not numbers": (
        {
            "stages": [{"name": "a"}],
            "elapsed": 1,
            "series": {"t": ["x"], "stages": {"a": {"throughput": [1]}}},
        },
        "html",
    ),
    "series stage not a mapping": (
        {"stages": [{"name": "a"}], "elapsed": 1, "series": {"t": [1], "stages": {"a": 5}}},
        "html",
    ),
}


@pytest.mark.parametrize("shape", list(WRONG_SHAPES))
def test_a_report_of_the_wrong_shape_is_one_line(app, capsys, shape):
    """A hand-edited or foreign report (json.loads also accepts NaN and Infinity):
    `graph` says it is not a report it can draw, in one line."""
    report, fmt = WRONG_SHAPES[shape]
    (app / "r.json").write_text(json.dumps(report))
    one_error_line(capsys, ["graph", "r.json", "--format", fmt, "--output", "out"])


def test_a_deeply_nested_report_is_one_line(app, capsys):
    """A JSON file nested deeper than the parser's recursion limit is unreadable."""
    (app / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    one_error_line(capsys, ["graph", "deep.json"])


def test_a_module_that_exits_on_import_is_one_line(app, capsys):
    """A module that calls sys.exit() at import (a script that parses its own
    arguments): one line naming the module, exit status 2."""
    (app / "exits.py").write_text("import sys\nsys.exit(3)\n")
    try:
        line = one_error_line(capsys, ["graph", "exits:pipeline"])
    except SystemExit as exc:
        pytest.fail(f"SystemExit({exc.code!r}) escaped main()")
    assert "cannot import module 'exits'" in line


def test_a_plugin_that_exits_on_import_is_listed_as_broken(tmp_path):
    """One broken plugin must not hide the others: it is listed as cannot-load."""
    (tmp_path / "exiting_plugin.py").write_text("import sys\nsys.exit('nope')\n")
    info = tmp_path / "exiting_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: exiting-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[pipeflow.stages]\nexiting = exiting_plugin:X\n")
    proc = cli("plugins", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert (0, "") == (proc.returncode, proc.stderr)
    assert "exiting_plugin:X" in proc.stdout
    assert "jsonl_sink" in proc.stdout  # the built-in plugins are still listed


# -- bugs: what a run reports ---------------------------------------------------------------


def test_the_report_of_a_failed_run_counts_the_failure(app, capsys):
    """A fail-fast run exits 1, and its report says which stage failed on how many
    items, from the run's final statistics."""
    assert 1 == main(["run", "revapp:failing", "--input", "items.txt", "--report", "r.json"])
    out = capsys.readouterr().out
    report = json.loads((app / "r.json").read_text())
    assert "failed" == report["status"]
    assert "stage 'boom' failed on item 'a': ValueError: bad item" == report["failure"]
    boom = report["stages"][0]
    # The items the stop took from boom's queue count too: in items_in, as cancelled.
    assert (1, None) == (boom["failed"], report["stats_at"])
    assert boom["items_in"] == boom["failed"] + boom["cancelled"]
    assert "before its statistics were first sampled" not in out


def test_a_report_path_that_is_a_directory_is_refused_before_the_run(app, capsys):
    """`--report adir`: bad input, refused before any item is processed."""
    (app / "adir").mkdir()
    line = one_error_line(
        capsys, ["run", "revapp:recording", "--input", "items.txt", "--report", "adir", "-q"]
    )
    assert "cannot write report adir" in line
    assert [] == sys.modules["revapp"].seen


def test_bad_input_without_input_is_still_one_line(app, capsys):
    """No --input and a report in a missing directory: just the error line."""
    line = one_error_line(capsys, ["run", "revapp:recording", "--report", "nodir/r.json"])
    assert "no such directory" in line


def test_a_truncated_character_at_the_end_names_its_byte(app, capsys):
    """The byte offset of bad UTF-8 is where the bad bytes start, at the end too."""
    (app / "cut.txt").write_bytes(b"ok\n\xe2\x82")
    line = one_error_line(capsys, ["run", "revapp:recording", "--input", "cut.txt", "-q"])
    assert "pipeflow: error: cut.txt is not UTF-8 text (byte 3)" == line


def test_a_syntax_error_names_its_line_once(app, capsys):
    """A module with a syntax error: its message and its line, once."""
    (app / "syntaxerr.py").write_text("x = (\n")
    line = one_error_line(capsys, ["graph", "syntaxerr:pipeline"])
    assert 1 == line.count("(syntaxerr.py, line 1)"), line


# -- run: signals, metrics endpoint, two pipelines in one registry ----------------------------


def test_sigterm_drains_the_run_exits_143_and_closes_the_metrics_endpoint(app):
    """SIGTERM on `pipeflow run`: in-flight items finish, the report says interrupted
    by SIGTERM, the exit status is 143, and the metrics endpoint (served with the
    Prometheus content type during the run) is closed afterwards."""
    (app / "many.txt").write_text("".join(f"w{i}\n" for i in range(5000)))
    started = app / "started"
    run = subprocess.Popen(
        [
            *(sys.executable, "-m", "pipeflow", "run", "revapp:slowly"),
            *("--input", "many.txt", "--metrics-port", "0", "--report", "r.json", "-q"),
        ],
        cwd=app,
        env={**os.environ, "REVAPP_STARTED": str(started)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert run.stderr is not None
        line = run.stderr.readline()
        assert line.startswith("pipeflow: serving metrics at http://127.0.0.1:"), line
        url = line.split()[-1]
        deadline = time.monotonic() + 10
        while not started.exists():
            assert time.monotonic() < deadline, "the run never started an item"
            time.sleep(0.01)
        with urllib.request.urlopen(url, timeout=5) as response:
            content_type = response.headers["Content-Type"]
            body = response.read().decode()
        assert content_type.startswith("text/plain; version=0.0.4")
        assert 'pipeflow_stage_workers{pipeline="slowly",stage="slow"} 2.0' in body
    finally:
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=20)
    assert 128 + signal.SIGTERM == run.returncode, err
    assert "pipeflow: stopped by SIGTERM" == err.splitlines()[-1]
    report = json.loads((app / "r.json").read_text())
    assert ("interrupted", "SIGTERM", None) == (
        report["status"],
        report["signal"],
        report["stats_at"],
    )
    slow = report["stages"][0]
    assert 0 < slow["items_out"] < 5000
    # What the stop took from the workers or the queue is counted as cancelled.
    assert (slow["items_in"], 0) == (slow["items_out"] + slow["cancelled"], slow["inflight"])
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


async def test_graph_of_an_endpoint_serving_two_pipelines_shows_both(capsys):
    """Two pipelines in one registry, one endpoint: `graph URL` draws both, and the
    counters of the idle one (from an earlier run) are still there."""
    registry = CollectorRegistry()
    release = trio.Event()

    @stage(workers=2)
    async def held(x):
        await release.wait()
        return x

    @stage(workers=1)
    async def quick(x):
        return x

    busy = Pipeline(held, name="busy", registry=registry)
    idle = Pipeline(quick, name="idle", registry=registry)
    await idle.arun(range(7))
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: busy.arun(range(4), metrics_port=0))
            await trio.testing.wait_all_tasks_blocked()
            assert busy.metrics_address is not None
            host, port = busy.metrics_address
            url = f"http://{host}:{port}/metrics"
            argv = ["graph", url, "--interval", "0.05", "--format", "json"]
            status = await trio.to_thread.run_sync(main, argv)
            release.set()
    captured = capsys.readouterr()
    assert (0, "") == (status, captured.err)
    views = {v["pipeline"]: v for v in json.loads(captured.out)}
    assert {"busy", "idle"} == set(views)
    assert 2 == views["busy"]["stages"][0]["workers_now"]
    assert 7 == views["idle"]["stages"][0]["items_in"]


def test_the_bad_latency_examples_of_the_docs_are_what_size_prints(capsys):
    """docs/cli.md's examples of `pipeflow size` refusing a --latency, as printed."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    lines = text.splitlines()
    examples = [
        (line.removeprefix("$ pipeflow ").split(), lines[i + 1])
        for i, line in enumerate(lines)
        if line.startswith("$ pipeflow size") and "--latency" in line and "error" in lines[i + 1]
    ]
    assert len(examples) >= 2
    for argv, printed in examples:
        assert 2 == main(argv)
        assert printed + "\n" == capsys.readouterr().err
