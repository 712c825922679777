"""The ``pipeflow`` command, through ``main(argv)`` and through real subprocesses
(``python -m pipeflow ...``): size, run, graph and plugins, and one clear line with exit
status 2 for every kind of bad input."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipeflow._cli import main
from pipeflow._plugins import discover_stages, load_stage
from pipeflow._report import TIMES

APP = textwrap.dedent(
    """
    import os
    import trio
    from pipeflow import Pipeline, stage

    DELAY = float(os.environ.get("CLIAPP_DELAY", "0.002"))

    @stage(workers=4)
    async def clean(line):
        return line.strip().lower()

    @stage(workers=1, ordered=True, retries=2)
    async def slow(word):
        await trio.sleep(DELAY)
        return word

    pipeline = Pipeline(clean | slow, name="words")

    @stage(workers=2)
    async def check(line):
        if line == "3":
            raise ValueError("bad item")
        return line

    failing = Pipeline(check, name="checks")

    @stage(workers=2, errors="collect")
    async def check_all(line):
        if line in ("3", "5"):
            raise ValueError("bad item")
        return line

    collecting = Pipeline(check_all, name="collecting")
    chain = clean | slow
    answer = 42
    """
)


@pytest.fixture
def app(tmp_path, monkeypatch):
    """A pipeline module ``cliapp`` in a fresh current directory, with 20 input lines."""
    (tmp_path / "cliapp.py").write_text(APP)
    (tmp_path / "items.txt").write_text("".join(f"{i}\n" for i in range(1, 21)))
    monkeypatch.chdir(tmp_path)
    # The CLI adds the current directory to sys.path and imports the module, as
    # `python -m` would: undo both after the test.
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "cliapp", raising=False)
    yield tmp_path
    sys.modules.pop("cliapp", None)


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, **kw):
    """``python -m pipeflow ARGS`` in a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "pipeflow", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        **kw,
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page(HTMLParser):
    """The tags, attributes and text of an HTML page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        if data.strip():
            self.text.append(data.strip())

    def named(self, tag):
        return [attrs for t, attrs in self.tags if t == tag]


# -- size ---------------------------------------------------------------------------------


def test_size_gives_the_seeds_worked_example(capsys):
    """5,000 req/s at 80 ms P99 over 4 instances with 20% headroom: 120 per instance,
    with a warning that they would run above 80% busy, and the P99 reminder."""
    status = main(
        ["size", "--rate", "5000", "--latency", "80ms", "--instances", "4", "--headroom", "20%"]
    )
    out = capsys.readouterr().out
    assert 0 == status
    assert f"Little's Law: L = λ {TIMES} W = 5,000/s {TIMES} 80 ms = 400 in flight" in out
    assert "across 4 instances: 400 / 4 = 100" in out
    assert f"with 20% headroom: 100 {TIMES} 1.2 = 120" in out
    assert "workers per instance: 120 (480 in total)" in out
    assert (
        "warning: 83% busy at 5,000/s: above 80% utilisation queues grow non-linearly;\n"
        "  --target-utilisation 0.7 gives 172 per instance\n"
    ) in out
    assert "note: W must be your P99 latency, not P50" in out


@pytest.mark.parametrize("latency", ["80ms", "0.08s", "80000us", " 80 ms ", "0.08"])
def test_size_reads_latency_in_any_unit(capsys, latency):
    """80ms, 0.08s, 80000us and a bare 0.08 (seconds, as the design says) are the same
    latency and give the same answer."""
    argv = ["size", "--rate", "5,000", "--latency", latency, "--instances", "4"]
    assert 0 == main([*argv, "--headroom", "0.2", "--format", "json"])
    data = json.loads(capsys.readouterr().out)
    assert 0.08 == data["latency"]
    assert 400 == data["in_flight"]
    assert 120 == data["workers_per_instance"]
    assert 480 == data["workers_total"]


def test_size_target_utilisation_applies_to_the_planned_rate(capsys):
    """Headroom raises the rate planned for; the target utilisation divides the
    workers needed at it: 100 * 1.2 / 0.7 = 171.4 → 172, and no warning at 58% busy."""
    argv = ["size", "--rate", "5000", "--latency", "80ms", "--instances", "4"]
    assert 0 == main([*argv, "--headroom", "20%", "--target-utilisation", "70%", "-f", "json"])
    data = json.loads(capsys.readouterr().out)
    assert 172 == data["workers_per_instance"]
    assert 0.5814 == data["utilisation"]
    assert [] == data["warnings"]


def test_size_writes_a_large_count_with_separators(capsys):
    """Thousands are separated in the workers per instance, as in every other count."""
    argv = ["size", "--rate", "5000", "--latency", "80ms", "--target-utilisation", "0.001"]
    assert 0 == main(argv)
    assert "workers per instance: 400,000\n" in capsys.readouterr().out


def test_size_through_a_subprocess():
    """`python -m pipeflow size` prints the seed's 120 and exits 0."""
    proc = cli(
        "size", "--rate", "5000", "--latency", "0.08s", "--instances", "4", "--headroom", "20%"
    )
    assert 0 == proc.returncode, proc.stderr
    assert "workers per instance: 120 (480 in total)" in proc.stdout
    assert "" == proc.stderr


# -- bad input: one line, exit status 2 -----------------------------------------------------

BAD_INPUT = [
    (
        ["size", "--rate", "abc", "--latency", "80ms"],
        "size: argument --rate: expected a number of items per second > 0 like 5000, got 'abc'",
    ),
    (
        ["size", "--rate", "5000", "--latency", "80 parsecs"],
        "size: argument --latency: expected a duration > 0 like 80ms or 0.08s, got '80 parsecs'",
    ),
    (
        ["size", "--rate", "5000", "--latency", "0ms"],
        "size: argument --latency: expected a duration > 0 like 80ms or 0.08s, got '0ms'",
    ),
    (
        ["size", "--rate", "5000", "--latency", "80ms", "--headroom", "20"],
        "size: argument --headroom: '20' looks like a percentage: write 20% or 0.2",
    ),
    (
        ["size", "--rate", "5000", "--latency", "80ms", "--instances", "0"],
        "size: argument --instances: expected a whole number >= 1, got '0'",
    ),
    (
        ["size", "--rate", "5000", "--latency", "80ms", "--target-utilisation", "120%"],
        "size: argument --target-utilisation: expected a utilisation of at most 100%, got '120%'",
    ),
    (["size", "--rate", "5000"], "size: the following arguments are required: --latency"),
    (["run", "nosuchmodule:pipeline"], "no module named 'nosuchmodule'"),
    (["run", "cliapp:pipelin"], "module 'cliapp' has no attribute 'pipelin'"),
    (["run", "cliapp:answer"], "cliapp:answer is a int, not a pipeflow.Pipeline"),
    (["run", "cliapp"], "expected MODULE:PIPELINE"),
    (["run", "cliapp:pipeline", "--input", "missing.txt"], "cannot read --input missing.txt"),
    (["run", "cliapp:pipeline", "--metrics-port", "http"], "expected a TCP port number"),
    (["run", "cliapp:pipeline", "--grace", "soon"], "argument --grace: expected a number"),
    (["run", "cliapp:pipeline", "--source", "kafka://x"], "--source: unsupported URL"),
    (["graph", "missing.json"], "cannot read report missing.json"),
    (["graph", "items.txt"], "items.txt is not JSON"),
    (["graph", "cliapp:pipeline", "--watch"], "--watch needs the http:// metrics URL"),
    (["graph", "cliapp:pipeline", "--format", "png"], "argument --format/-f: invalid choice"),
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    ([], "a command is required"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_status_2(app, capsys, argv, message):
    """Every kind of bad input: exit status 2, one line on stderr, no traceback."""
    status = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert 2 == status
    assert 1 == len(lines), captured.err
    assert lines[0].startswith("pipeflow: error: ")
    assert message in lines[0]
    assert "" == captured.out


def test_unreachable_metrics_url_is_one_line(capsys):
    """A metrics URL where nothing listens: one line naming the URL, exit status 2."""
    url = f"http://127.0.0.1:{closed_port()}/metrics"
    assert 2 == main(["graph", url])
    assert f"pipeflow: error: cannot reach {url}: Connection refused\n" == capsys.readouterr().err


def test_input_that_is_not_text_is_one_line(app, capsys):
    """Bytes that are not UTF-8 in --input: the byte offset, one line, exit status 2."""
    (app / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    assert 2 == main(["run", "cliapp:pipeline", "--input", "bad.txt", "-q"])
    assert "pipeflow: error: bad.txt is not UTF-8 text (byte 3)\n" == capsys.readouterr().err


def test_import_errors_say_where(app, capsys):
    """A module that fails to import: its exception and the line, in one line."""
    (app / "broken.py").write_text("x = 1\nraise RuntimeError('no config')\n")
    assert 2 == main(["graph", "broken:pipeline"])
    err = capsys.readouterr().err
    assert (
        "pipeflow: error: cannot import module 'broken': RuntimeError: no config "
        "(broken.py, line 2)\n"
    ) == err
    sys.modules.pop("broken", None)


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "nosuchmodule:pipeline"],
        ["size", "--rate", "5000", "--latency", "eighty"],
        ["graph", "cliapp:answer"],
    ],
)
def test_bad_input_through_a_subprocess(app, argv):
    """The real command prints one line and exits 2, never a traceback."""
    proc = cli(*argv, cwd=app)
    assert 2 == proc.returncode
    assert 1 == len(proc.stderr.splitlines()), proc.stderr
    assert proc.stderr.startswith("pipeflow: error: ")
    assert "Traceback" not in proc.stderr


# -- run ----------------------------------------------------------------------------------


def test_run_writes_a_report(app, capsys):
    """run feeds one item per line, prints a summary, and writes the report: the
    RunResult's figures, the structure and the time series."""
    status = main(["run", "cliapp:pipeline", "--input", "items.txt", "--report", "run.json"])
    out = capsys.readouterr().out
    assert 0 == status
    assert out.startswith("completed in ")
    assert ": 20 items in, 20 through, 0 failed; " in out
    assert "report: run.json" in out
    report = json.loads((app / "run.json").read_text())
    assert "pipeflow-report" == report["format"]
    assert "completed" == report["status"]
    assert "words" == report["pipeline"]
    assert "cliapp:pipeline" == report["target"]
    assert ["clean", "slow"] == [s["name"] for s in report["stages"]]
    assert [20, 20] == [s["items_in"] for s in report["stages"]]
    assert [20, 20] == [s["items_out"] for s in report["stages"]]
    assert "slow" == report["bottleneck"]
    assert {"name": "slow", "kind": "async", "run_in": "task", "workers": 1, "buffer": 1} | {
        "options": {"ordered": True, "retries": 2}
    } == report["structure"]["stages"][1]
    series = report["series"]
    assert series["t"], "at least the final sample"
    assert {
        "items_out",
        "throughput",
        "queue_depth",
        "busy_workers",
        "done",
        "failed",
        "busy_seconds",
        "blocked_seconds",
        "throttled_seconds",
        "cpu_seconds",
        "worker_seconds",
        "workers",
    } == set(series["stages"]["slow"])
    assert 20 == series["stages"]["slow"]["done"][-1]
    assert 20 == series["stages"]["slow"]["items_out"][-1]


def test_run_without_input_runs_no_items(app, capsys):
    """No --input: no items (stdin is read only with --input -), and a note says so."""
    assert 0 == main(["run", "cliapp:pipeline", "--report", "empty.json", "-q"])
    captured = capsys.readouterr()
    assert "" == captured.out
    assert captured.err.startswith("pipeflow: no --input given: running with no items")
    report = json.loads((app / "empty.json").read_text())
    assert [0, 0] == [s["items_in"] for s in report["stages"]]


def test_run_freezes_what_it_loaded_for_the_run(app, capsys):
    """During `pipeflow run` the objects loaded before it (modules, the pipeline) are
    frozen (gc.freeze), so full collections do not walk them; unfrozen after."""
    (app / "gcapp.py").write_text(
        textwrap.dedent(
            """
            import gc
            from pipeflow import Pipeline, stage

            seen = []

            @stage
            def frozen(line):
                seen.append(gc.get_freeze_count())
                return line

            pipeline = Pipeline(frozen)
            """
        )
    )
    assert 0 == gc.get_freeze_count()
    assert 0 == main(["run", "gcapp:pipeline", "--input", "items.txt", "-q"])
    capsys.readouterr()
    seen = sys.modules["gcapp"].seen
    assert 20 == len(seen)
    assert min(seen) > 0
    assert 0 == gc.get_freeze_count()
    sys.modules.pop("gcapp", None)


def test_run_accepts_a_chain_and_a_file_path(app, capsys):
    """MODULE may be a path to a .py file; a chain is run as a pipeline named after it."""
    assert 0 == main(["run", "cliapp.py:chain", "--input", "items.txt", "--report", "c.json"])
    capsys.readouterr()
    assert "chain" == json.loads((app / "c.json").read_text())["pipeline"]


def test_a_failing_run_exits_1_with_the_stage_error(app, capsys):
    """Fail-fast: exit status 1, the StageError on one line, the report says failed."""
    status = main(["run", "cliapp:failing", "--input", "items.txt", "--report", "f.json"])
    err = capsys.readouterr().err
    assert 1 == status
    assert (
        "pipeflow: run failed: stage 'check' failed on item '3': ValueError: bad item"
        == err.splitlines()[-1]
    )
    assert "Traceback" not in err
    report = json.loads((app / "f.json").read_text())
    assert "failed" == report["status"]
    assert "stage 'check' failed on item '3': ValueError: bad item" == report["failure"]


def test_collected_failures_exit_1(app, capsys):
    """errors="collect": the run finishes, the failures are counted, exit status 1."""
    status = main(["run", "cliapp:collecting", "--input", "items.txt", "--report", "c.json"])
    captured = capsys.readouterr()
    assert 1 == status
    assert ": 20 items in, 18 through, 2 failed; " in captured.out
    assert captured.err.splitlines()[-1].startswith("pipeflow: items failed: 2 items failed; ")
    report = json.loads((app / "c.json").read_text())
    assert "completed" == report["status"]
    assert 2 == len(report["errors"])


def test_run_through_a_subprocess_reads_stdin(app):
    """`python -m pipeflow run --input -` takes items from a pipe; a failing pipeline
    exits 1 with its StageError on the last line of stderr."""
    proc = cli(
        "run", "cliapp:pipeline", "--input", "-", "--report", "r.json", cwd=app, input="A\nB\nC\n"
    )
    assert 0 == proc.returncode, proc.stderr
    assert ": 3 items in, 3 through, 0 failed; " in proc.stdout
    report = json.loads((app / "r.json").read_text())
    assert [3, 3] == [s["items_out"] for s in report["stages"]]

    proc = cli("run", "cliapp:failing", "--input", "items.txt", cwd=app)
    assert 1 == proc.returncode
    last = proc.stderr.splitlines()[-1]
    assert "pipeflow: run failed: stage 'check' failed on item '3': ValueError: bad item" == last
    assert "Traceback" not in proc.stderr


def test_live_metrics_graph_and_graceful_stop(app):
    """A real run serving metrics (--metrics-port 0): `graph URL` scrapes it twice and
    names the slow stage as the bottleneck (text, JSON and HTML); SIGINT then drains
    the run, which writes its report and exits 130."""
    (app / "many.txt").write_text("".join(f"w{i}\n" for i in range(2000)))
    run = subprocess.Popen(
        [
            *(sys.executable, "-m", "pipeflow", "run", "cliapp:pipeline"),
            *("--input", "many.txt", "--metrics-port", "0", "--report", "live.json", "-q"),
        ],
        cwd=app,
        env={**os.environ, "CLIAPP_DELAY": "0.01"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert run.stderr is not None
        line = run.stderr.readline()
        assert line.startswith("pipeflow: serving metrics at http://127.0.0.1:"), line
        url = line.split()[-1]

        proc = cli("graph", url, "--interval", "0.5", "--format", "json", cwd=app)
        assert 0 == proc.returncode, proc.stderr
        view = json.loads(proc.stdout)
        assert "words" == view["pipeline"]
        assert "metrics" == view["origin"]
        assert "slow" == view["bottleneck"]
        slow = view["stages"][1]
        assert 1 == slow["workers_now"]
        assert 30 < slow["throughput"] < 110  # one worker, 10 ms an item
        assert slow["utilisation"] > 0.5
        assert view["recommendation"].startswith("slow limits the rate (last ")
        assert "stage" == view["verdict"]["kind"]

        proc = cli("graph", url, "--interval", "0.3", cwd=app)
        assert 0 == proc.returncode, proc.stderr
        assert "─ slow ◀ limits the rate ─" in proc.stdout
        assert "Little's Law" in proc.stdout

        proc = cli("graph", url, "--interval", "0.3", "--output", "live.html", cwd=app)
        assert 0 == proc.returncode, proc.stderr
        page = Page((app / "live.html").read_text())
        assert page.named("svg")
        assert {"clean", "slow"} <= set(page.text)
    finally:
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=30)
    assert 128 + signal.SIGINT == run.returncode, err
    assert "pipeflow: stopped by SIGINT" == err.splitlines()[-1]
    report = json.loads((app / "live.json").read_text())
    assert "interrupted" == report["status"]
    assert "SIGINT" == report["signal"]
    slow = report["stages"][1]
    assert 0 < slow["items_out"] < 2000
    assert slow["items_in"] == slow["items_out"]  # drained: nothing left half-done


# -- graph --------------------------------------------------------------------------------


def test_graph_of_a_module_shows_the_structure(app, capsys):
    """The structure: stage boxes with workers and options, buffers on the edges."""
    assert 0 == main(["graph", "cliapp:pipeline"])
    out = capsys.readouterr().out
    assert out.startswith("pipeline 'words' · structure of cliapp:pipeline\n")
    assert "─ clean ─" in out
    assert "│ 4 workers " in out
    assert "│ 1 worker · ordered · retries 2 " in out
    assert "│  buffer 4\n" in out
    assert out.rstrip().endswith("outputs")


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("dot", '"clean" -> "slow" [label="buffer 1"];'),
        ("mermaid", 's0 -->|"buffer 1"| s1'),
        ("json", '"origin": "pipeline"'),
    ],
)
def test_graph_machine_formats(app, capsys, fmt, expected):
    """DOT, Mermaid and JSON carry the same graph."""
    assert 0 == main(["graph", "cliapp:pipeline", "--format", fmt])
    assert expected in capsys.readouterr().out


@pytest.fixture
def report(app, capsys):
    """A real run's report, with a bottleneck that is clear: `slow` (1 worker)."""
    assert 0 == main(["run", "cliapp:pipeline", "--input", "items.txt", "--report", "r.json"])
    capsys.readouterr()
    return app / "r.json"


def test_graph_of_a_report_names_the_bottleneck(report, capsys):
    """From a report: measured figures per stage, the bottleneck marked, and its size
    by Little's Law."""
    assert 0 == main(["graph", str(report)])
    out = capsys.readouterr().out
    data = json.loads(report.read_text())
    assert f"pipeline 'words' · report {report} · completed in " in out
    assert f"─ {data['bottleneck']} ◀ limits the rate ─" in out
    assert "in 20 · done 20" in out
    assert "util " in out
    assert "p99 " in out
    assert "blocked " in out
    assert f"verdict: {data['bottleneck']} limits the rate" in out
    assert "Little's Law: L = λW = " in out


def test_graph_html_is_a_self_contained_page(report, capsys):
    """--output FILE.html writes a page with the stage graph and a throughput chart
    per stage as inline SVG, and nothing loaded from elsewhere."""
    assert 0 == main(["graph", str(report), "--output", "page.html"])
    assert "wrote page.html\n" == capsys.readouterr().out
    page = Page((report.parent / "page.html").read_text())
    assert {"clean", "slow"} <= set(page.text)
    stages = [a["data-stage"] for a in page.named("g") if "data-stage" in a]
    assert ["clean", "slow"] == stages
    charts = [a["data-stage"] for a in page.named("figure")]
    assert ["clean", "slow"] == charts
    assert len(page.named("svg")) >= 3  # the graph, then one chart per stage
    assert [] == page.named("script")
    assert [] == page.named("link")
    assert not [a for _, a in page.tags if str(a.get("src", "")).startswith("http")]


def test_graph_through_a_subprocess(report):
    """`python -m pipeflow graph REPORT --format html` writes the page to stdout when
    it is not a terminal."""
    proc = cli("graph", str(report), "--format", "html", cwd=report.parent)
    assert 0 == proc.returncode, proc.stderr
    page = Page(proc.stdout)
    assert page.named("svg")
    assert {"clean", "slow"} <= set(page.text)


# -- plugins ------------------------------------------------------------------------------

PLUGIN = '''
from pipeflow import Stage


class Upper(Stage):
    """Upper-case every line.

    More text that the listing leaves out.
    """

    async def process(self, item):
        return item.upper()
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """An installed distribution `demo-plugin` publishing stage `upper`."""
    (tmp_path / "demo_plugin.py").write_text(PLUGIN)
    info = tmp_path / "demo_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[pipeflow.stages]\nupper = demo_plugin:Upper\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("demo_plugin", None)


def test_plugins_lists_installed_stages(plugin, capsys):
    """`pipeflow plugins`: name, target, package and the docstring's first line."""
    assert 0 == main(["plugins"])
    out = capsys.readouterr().out
    header, *rows = out.splitlines()
    assert header.split() == ["NAME", "TARGET", "PACKAGE", "SUMMARY"]
    row = next(r for r in rows if r.startswith("upper "))
    assert ["upper", "demo_plugin:Upper", "demo-plugin", "1.0"] == row.split()[:4]
    assert row.endswith("  Upper-case every line.")


def test_plugins_api(plugin):
    """discover_stages() finds the entry point; load_stage() imports it by name."""
    assert "demo_plugin:Upper" == discover_stages()["upper"].value
    upper = load_stage("upper")
    assert "Upper" == upper.__name__
    with pytest.raises(LookupError, match="no stage plugin named 'nope'"):
        load_stage("nope")


def test_plugins_through_a_subprocess(plugin):
    """The real command finds plugins on its path, and runs cleanly."""
    proc = cli("plugins", env={"PYTHONPATH": str(plugin)})
    assert 0 == proc.returncode, proc.stderr
    assert "demo_plugin:Upper" in proc.stdout
    assert "" == proc.stderr


def test_demo_scrapes_the_local_site_and_names_the_limit(capsys):
    """pipeflow demo: the scraper example on its local site, then the bottleneck."""
    assert 0 == main(["demo", "--pages", "12"])
    out = capsys.readouterr().out
    assert "serving a local site on http://127.0.0.1:" in out
    assert "verdict: " in out
    assert "  stage  workers  in  done  failed  items/s  util" in out  # as pipeflow run's
    assert "rows in table pages" in out


def test_demo_refuses_bad_arguments(capsys):
    """A bad --pages is one clear line on stderr and exit status 2."""
    assert 2 == main(["demo", "--pages", "zero"])
    err = capsys.readouterr().err
    assert 1 == len(err.strip().splitlines())
    assert err.startswith("pipeflow: error:")


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"throughput": "fast"}, "stage 'a': throughput is 'fast', not a number"),
        ({"items_in": 1.5}, "stage 'a': items_in is 1.5, not a whole number >= 0"),
        ({"busy_seconds": -1}, "stage 'a': busy_seconds is -1, not a number >= 0"),
        (
            {"throughput": 1e200, "duration_mean": 1e200},
            "stage 'a': its figures are too large to compute with",
        ),
    ],
    ids=["a string", "a fraction of an item", "a negative time", "L = 1e200 x 1e200"],
)
def test_a_report_with_a_malformed_figure_is_one_line(app, capsys, stage, message):
    """A report figure of the wrong type, or too large to compute with: one line, 2."""
    report = {"stages": [{"name": "a", **stage}], "elapsed": 1, "bottleneck": "a"}
    (app / "r.json").write_text(json.dumps(report))
    assert 2 == main(["graph", "r.json"])
    assert (
        f"pipeflow: error: r.json is not a valid pipeflow run report: {message}\n"
        == capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--latency", "80"],
            "size: argument --latency: '80' has no unit: write 80ms or 80s (a latency like 80ms, 0.08s or 80000us)",
        ),
        (
            ["--latency", "80ms", "--instances", "99999999999999999999999"],
            "size: argument --instances: expected at most 1,000,000 instances, got '99999999999999999999999'",
        ),
    ],
    ids=["a latency without its unit", "a huge number of instances"],
)
def test_size_refuses_a_bare_latency_and_huge_instances(capsys, argv, message):
    """`--latency 80` would be 80 seconds (120,000 workers); a bare number is refused with
    a hint to write the unit. Instances have a bound. One line each, exit status 2."""
    assert 2 == main(["size", "--rate", "5000", *argv])
    err = capsys.readouterr().err
    assert [f"pipeflow: error: {message} (see pipeflow size --help)"] == err.splitlines()
