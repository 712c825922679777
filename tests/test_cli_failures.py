"""What ``pipeflow run`` says when a run fails in an unusual way, or is asked for its
metrics oddly: one line on stderr, the right exit status, the report still written, and
``--metrics-linger`` kept however short or however failed the run."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import trio

from pipeflow import Pipeline, stage

APP = textwrap.dedent(
    """
    import contextlib
    import sys
    import trio
    from pipeflow import Pipeline, stage

    @stage
    async def fast(x):
        return x

    quick = Pipeline(fast, name="quick")

    @stage(workers=2, errors="collect")
    def bye(line):
        if line == "3":
            sys.exit(3)
        return line

    exiting = Pipeline(bye, name="exiting")

    @stage(workers=2, errors="collect")
    async def interrupts(line):
        if line == "3":
            raise KeyboardInterrupt
        return line

    interrupting = Pipeline(interrupts, name="interrupting")

    @contextlib.asynccontextmanager
    async def db():
        raise ConnectionRefusedError("connect to db:5432 refused")
        yield

    @stage(workers=2, resource=db)
    async def store(line, conn):
        return line

    unreachable = Pipeline(store, name="unreachable")

    @stage(workers=1)
    async def first_fails(line):
        if line == "1":
            await trio.sleep(0.05)  # the others wait in the stage's queue meanwhile
            raise ValueError("bad first line")
        return line

    stopped_early = Pipeline(first_fails, name="stopped_early")

    @stage
    async def slowish(x):
        await trio.sleep(0.02)
        return x

    paced = Pipeline(slowish, name="paced")
    """
)


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """A module ``failapp`` in a fresh directory, with an input of ten lines."""
    (tmp_path / "failapp.py").write_text(APP)
    (tmp_path / "ten.txt").write_text("".join(f"{i}\n" for i in range(1, 11)))
    return tmp_path


def cli(app: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m pipeflow ARGS`` in a real subprocess, in the app's directory."""
    return subprocess.run(
        [sys.executable, "-m", "pipeflow", *args],
        cwd=app,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_stage_calling_sys_exit_fails_the_run_in_one_line_with_its_report(app):
    """A stage that calls sys.exit(3) fails the run: exit 1, one line naming the
    SystemExit, no traceback, and the report (documented: also when the run fails) is
    written and says failed."""
    proc = cli(app, "run", "failapp:exiting", "--input", "ten.txt", "-q", "--report", "r.json")
    assert (1, "pipeflow: run failed: SystemExit: 3\n") == (proc.returncode, proc.stderr)
    report = json.loads((app / "r.json").read_text())
    assert ("failed", "SystemExit: 3") == (report["status"], report["failure"])


def test_a_stage_raising_keyboardinterrupt_is_a_failure_not_a_signal(app):
    """A stage that raises KeyboardInterrupt itself (no signal came): the run failed,
    exit 1, not "stopped by SIGINT" and 130."""
    proc = cli(app, "run", "failapp:interrupting", "--input", "ten.txt", "-q", "--report", "r.json")
    assert (1, "pipeflow: run failed: KeyboardInterrupt\n") == (proc.returncode, proc.stderr)
    report = json.loads((app / "r.json").read_text())
    assert ("failed", None) == (report["status"], report["signal"])


def test_the_failure_line_and_report_keep_the_exceptions_notes(app):
    """A resource= that fails to open: the failure says which stage's resource it was
    (the note the run adds), on stderr and in the report."""
    proc = cli(app, "run", "failapp:unreachable", "--input", "ten.txt", "-q", "--report", "r.json")
    assert 1 == proc.returncode
    [line] = proc.stderr.splitlines()
    assert line.startswith(
        "pipeflow: run failed: ConnectionRefusedError: connect to db:5432 refused "
        "(stage 'store': its resource resource=db() failed to open"
    )
    report = json.loads((app / "r.json").read_text())
    assert "stage 'store': its resource resource=db() failed to open" in report["failure"]


@contextlib.contextmanager
def metrics_run(
    app: Path, pipeline: str, input_file: str, *python_options: str
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``pipeflow run PIPELINE --input FILE --metrics-port 0 --metrics-linger 30`` in a
    real subprocess: yields it, its stderr read up to the line that says where the
    metrics are served, and that URL; kills it if it is still running at the end."""
    argv = ["run", pipeline, "--input", input_file]
    argv += ["--metrics-port", "0", "--metrics-linger", "30"]
    proc = subprocess.Popen(
        [sys.executable, *python_options, "-m", "pipeflow", *argv],
        cwd=app,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        url = re.fullmatch(r"pipeflow: serving metrics at (\S+)\n", first)
        assert url is not None, first
        yield proc, url[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def lingering_run(app: Path, pipeline: str, input_file: str) -> Iterator[tuple[IO[str], str]]:
    """:func:`metrics_run` that yields its stderr and URL, then ends the linger
    (SIGTERM), which must exit 0."""
    with metrics_run(app, pipeline, input_file) as (proc, url):
        assert proc.stderr is not None
        yield proc.stderr, url
        proc.terminate()  # ends the linger at once
        assert 0 == proc.wait(timeout=30)


def test_a_run_shorter_than_a_poll_still_announces_and_lingers(app):
    """A run of two items (a few milliseconds) with --metrics-port 0 --metrics-linger:
    the address is printed, and the endpoint serves the final figures for the linger,
    from the moment its line says so."""
    (app / "two.txt").write_text("a\nb\n")
    with lingering_run(app, "failapp:quick", "two.txt") as (stderr, url):
        second = stderr.readline()
        assert f"pipeflow: still serving metrics at {url} for 30s (Ctrl+C to stop)\n" == second
        with urllib.request.urlopen(url, timeout=10) as response:  # it listens already
            text = response.read().decode()
        assert 'pipeflow_stage_items_total{outcome="ok",pipeline="quick",stage="fast"} 2.0' in text


def test_the_port_keeps_listening_from_the_run_to_its_linger(app):
    """Scrapes sent without a pause while a run ends and its --metrics-linger begins are
    answered: the run's endpoint hands its listening socket to the linger, so there is
    no moment when the port refuses a connection (there were 3-6 ms of it when the
    linger opened the port anew: 15-28 scrapes refused or reset in each run)."""
    answered: list[str] = []
    errors: list[Exception] = []
    lingering = threading.Event()

    def scrape_until_lingering(url: str) -> None:
        while not lingering.is_set():
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    answered.append(response.read().decode())
            except OSError as exc:
                errors.append(exc)

    with lingering_run(app, "failapp:paced", "ten.txt") as (stderr, url):
        scraper = threading.Thread(target=scrape_until_lingering, args=(url,))
        scraper.start()
        try:
            assert stderr.readline().startswith("pipeflow: still serving metrics at")
        finally:
            lingering.set()
            scraper.join(timeout=30)
    # None refused. The one request being answered as the run ended, if any, may be cut
    # (the run's end cancels its endpoint's tasks); the scraper sends one at a time.
    refused = [e for e in errors if isinstance(getattr(e, "reason", e), ConnectionRefusedError)]
    assert [] == refused
    assert len(errors) <= 1, errors
    # Scraped all along (the run lasts about 0.2 s), the last one the final figures.
    assert len(answered) > 10
    final = 'pipeflow_stage_items_total{outcome="ok",pipeline="paced",stage="slowish"} 10.0'
    assert final in answered[-1]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_run_that_would_linger_ends_it_without_a_traceback(app, signum):
    """--metrics-linger with a run stopped by a signal: no linger, the signal's exit
    status and no traceback (closing the listening socket the run kept for the linger
    raised outside Trio, exit 1)."""
    (app / "hundred.txt").write_text("".join(f"{i}\n" for i in range(100)))
    with metrics_run(app, "failapp:paced", "hundred.txt", "-X", "dev") as (proc, _):
        assert proc.stderr is not None
        proc.send_signal(signum)  # the run takes 2 s: it is under way
        rest = proc.stderr.read()
        assert 128 + signum == proc.wait(timeout=30), rest
    assert "Traceback" not in rest
    assert "ResourceWarning" not in rest  # the socket was closed, not left to the GC
    assert "still serving" not in rest


def test_bad_input_with_metrics_linger_is_still_one_line(app):
    """Input that is not UTF-8 with --metrics-linger: the usual one-line error and exit
    2, not an error from closing the kept socket."""
    (app / "bad.txt").write_bytes(b"fine\n\xff\xfe\n")
    proc = cli(
        app,
        "run",
        "failapp:paced",
        "--input",
        "bad.txt",
        "-q",
        "--metrics-port",
        "0",
        "--metrics-linger",
        "30",
    )
    assert 2 == proc.returncode, proc.stderr
    served, error = proc.stderr.splitlines()
    assert served.startswith("pipeflow: serving metrics at")
    assert "pipeflow: error: bad.txt is not UTF-8 text (byte 5)" == error


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--metrics-port", "0", "--metrics-host", ""],
            "pipeflow: error: run: argument --metrics-host: expected an address to listen on, "
            "such as 127.0.0.1, 0.0.0.0 or ::1, got '' (see pipeflow run --help)",
        ),
        (
            ["--metrics-host", "0.0.0.0"],
            "pipeflow: error: --metrics-host needs --metrics-port: there is no endpoint to listen",
        ),
    ],
)
def test_a_bad_metrics_host_is_one_line_and_exit_2(app, extra, message):
    """An empty --metrics-host, or one without --metrics-port (which would be ignored),
    is bad input: exit 2 and one line, before the run."""
    proc = cli(app, "run", "failapp:quick", "--input", "ten.txt", "-q", *extra)
    assert (2, message + "\n") == (proc.returncode, proc.stderr)


def test_a_metrics_host_that_is_not_this_machines_is_one_line(app):
    """--metrics-host an address of no interface here (TEST-NET-1): exit 2, one line
    naming both options and the address, no errno."""
    argv = ["run", "failapp:quick", "--input", "ten.txt", "-q", "--metrics-port", "0"]
    proc = cli(app, *argv, "--metrics-host", "192.0.2.1")
    assert 2 == proc.returncode
    assert proc.stderr.startswith(
        "pipeflow: error: --metrics-port 0 --metrics-host 192.0.2.1: pipeline 'quick': "
        "cannot serve metrics on 192.0.2.1:0: "
    )
    assert 1 == proc.stderr.count("\n")
    assert "Errno" not in proc.stderr


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_an_ipv6_metrics_url_has_brackets(app):
    """--metrics-host ::1: the printed URL is one a browser or curl can open."""
    argv = ["run", "failapp:quick", "--input", "ten.txt", "-q", "--metrics-port", "0"]
    proc = cli(app, *argv, "--metrics-host", "::1")
    assert 0 == proc.returncode
    assert re.fullmatch(r"pipeflow: serving metrics at http://\[::1\]:\d+/metrics\n", proc.stderr)


async def test_metrics_linger_also_follows_a_run_whose_source_raised(autojump_clock):
    """`arun(..., metrics_port=0, metrics_linger=5)` whose source raises at 1 s: the
    endpoint lingers its 5 s (documented: completed or failed), then the source's error
    is raised."""

    @stage
    async def same(x: int) -> int:
        return x

    async def source():
        yield 1
        await trio.sleep(1)
        raise OSError("source broke")

    pipeline = Pipeline(same, name="lf")
    with pytest.raises(OSError, match="source broke"):
        await pipeline.arun(source(), metrics_port=0, metrics_linger=5)
    assert 6.0 == pytest.approx(trio.current_time())
    assert pipeline.metrics_address is None


def _table(stdout: str) -> list[dict[str, str]]:
    """The summary table's rows, by column name."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["stage", "workers"])
    cols = lines[start].split()
    rows = []
    for line in lines[start + 1 :]:
        if not line.startswith("  ") or not line.strip():
            break  # a blank line, or "report: FILE"
        rows.append(dict(zip(cols, line.split(), strict=False)))  # (p99 has a space)
    return rows


def test_items_a_failure_cut_off_are_a_cancelled_column_that_adds_up(app):
    """A fail-fast failure while items wait in the stage's queue: they are counted
    cancelled (DESIGN's accounting), and the summary says so, in its first line and in a
    cancelled column, so that in = done + cancelled."""
    proc = cli(app, "run", "failapp:stopped_early", "--input", "ten.txt")
    assert 1 == proc.returncode
    head = proc.stdout.splitlines()[0]
    [row] = _table(proc.stdout)
    assert int(row["cancelled"]) >= 1
    assert int(row["in"]) == int(row["done"]) + int(row["cancelled"])
    assert ", 0 through, 1 failed, " + row["cancelled"] + " cancelled; " in head
    assert "verdict" not in proc.stdout  # a failed run's story is its failure


def test_the_when_it_fails_example_of_the_page_is_what_the_run_prints(tmp_path):
    """docs/cli.md "When it fails": checks.py over mixed.txt prints the page's totals and
    table (c.example cancelled), or one of the two variants the page describes (a worker
    finished c.example first; the failure came before it was read); never a verdict."""
    page = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    section = page[page.index("### When it fails") : page.index("### Stopping it")]
    code = section[section.index("```python\n") + 10 :]
    (tmp_path / "checks.py").write_text(code[: code.index("```")])
    (tmp_path / "mixed.txt").write_text("https://a.example\nftp://b.example\nhttps://c.example\n")
    shown = section[section.index("$ pipeflow run checks:pipeline") :]
    shown = shown[: shown.index("```")]
    assert "failed in 1.71 ms: 3 items in, 1 through, 1 failed, 1 cancelled; " in shown
    assert "verdict" not in shown
    assert "`3 items in, 2 through, 1\nfailed` with `done` 3 and no cancelled column" in section
    assert "`2 items in, 1 through, 1 failed`" in section
    proc = cli(tmp_path, "run", "checks:pipeline", "--input", "mixed.txt")
    assert 1 == proc.returncode
    head = proc.stdout.splitlines()[0]
    [row] = _table(proc.stdout)
    if "cancelled" in row:
        assert ": 3 items in, 1 through, 1 failed, 1 cancelled; " in head
        assert ("3", "2", "1", "1") == (row["in"], row["done"], row["failed"], row["cancelled"])
    elif row["in"] == "3":  # a worker finished c.example first
        assert ": 3 items in, 2 through, 1 failed; " in head
        assert ("3", "1") == (row["done"], row["failed"])
    else:  # the failure came before c.example was read from the file
        assert ": 2 items in, 1 through, 1 failed; " in head
        assert ("2", "2", "1") == (row["in"], row["done"], row["failed"])
    assert "verdict" not in proc.stdout
    last = proc.stderr.splitlines()[-1]
    assert shown.splitlines()[-3] == last


def test_the_graph_of_a_stopped_runs_report_counts_the_same(app):
    """`pipeflow graph report.json` of a run a failure stopped: its title counts items
    through as the summary does (failed ones are not through), and the stage's box shows
    the items cut off as cancelled."""
    proc = cli(app, "run", "failapp:stopped_early", "--input", "ten.txt", "--report", "r.json")
    assert 1 == proc.returncode
    [row] = _table(proc.stdout)
    graph = cli(app, "graph", "r.json")
    assert 0 == graph.returncode
    title = graph.stdout.splitlines()[0]
    assert title.endswith(" · 0 items through")
    counts = f"in {row['in']} · done 1 · 0 outputs · failed 1 · cancelled {row['cancelled']}"
    assert f"│ {counts} " in graph.stdout
