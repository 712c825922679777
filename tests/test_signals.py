"""Graceful shutdown with real signals sent to a real process running Pipeline.run()."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

APP = textwrap.dedent(
    """
    import json, sys, trio
    from pipeflow import Interrupted, Pipeline, stage

    DELAY = float(sys.argv[1])
    started = []

    @stage(workers=2)
    async def slow(x):
        started.append(x)
        print("started", x, flush=True)
        await trio.sleep(DELAY)
        return x

    def forever():
        i = 0
        while True:
            yield i
            i += 1

    try:
        Pipeline(slow).run(forever(), grace=float(sys.argv[2]))
    except Interrupted as stop:
        r = stop.result
        print(json.dumps({"signal": stop.signal, "started": len(started),
                          "done": r.stats["slow"].items_out, "elapsed": r.elapsed}), flush=True)
        sys.exit(3)
    """
)


def start(tmp_path, delay, grace):
    script = tmp_path / "app.py"
    script.write_text(APP)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(delay), str(grace)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Wait until the pipeline is busy.
    assert proc.stdout is not None
    for _ in range(2):
        assert proc.stdout.readline().startswith("started")
    return proc


def report(proc):
    out, err = proc.communicate(timeout=30)
    assert 3 == proc.returncode, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_drains_in_flight_items(tmp_path, signum):
    """On SIGINT or SIGTERM no new item starts, and the ones in flight finish."""
    proc = start(tmp_path, delay=1.0, grace=10)
    proc.send_signal(signum)
    result = report(proc)
    assert signum == result["signal"]
    assert result["started"] == result["done"]
    assert result["elapsed"] < 5


def test_grace_period_bounds_the_drain(tmp_path):
    """Items slower than the grace period are cancelled when it runs out."""
    proc = start(tmp_path, delay=30.0, grace=0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    result = report(proc)
    assert time.monotonic() - sent < 10
    assert 0 == result["done"]


def test_second_signal_cancels_at_once(tmp_path):
    """A second signal cancels without waiting for the grace period."""
    proc = start(tmp_path, delay=30.0, grace=60)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    result = report(proc)
    assert time.monotonic() - sent < 10
    assert 0 == result["done"]


PROCESS_APP = textwrap.dedent(
    """
    import json, sys
    from pipeflow import Interrupted, Pipeline, StageError
    from procwork import crunch

    def forever():
        i = 0
        while True:
            yield i
            i += 1

    if __name__ == "__main__":
        try:
            Pipeline(crunch).run(forever(), grace=float(sys.argv[1]))
        except Interrupted as stop:
            r = stop.result
            s = r.stats["crunch"]
            print(json.dumps({"outcome": "interrupted", "in": s.items_in, "ok": s.ok,
                              "cancelled": s.cancelled, "failed": s.failed,
                              "unfinished": len(r.unfinished)}), flush=True)
            sys.exit(3)
        except StageError as exc:
            print(json.dumps({"outcome": "stage_error", "error": repr(exc.__cause__)}),
                  flush=True)
            sys.exit(4)
    """
)

PROCESS_WORK = textwrap.dedent(
    """
    import sys
    from pipeflow import stage

    @stage(workers=2, run_in="process")
    def crunch(n):
        print("started", n, flush=True, file=sys.stderr)
        return sum(i * i for i in range(20_000 + n % 7))
    """
)


def test_two_signals_in_a_row_stop_a_process_stage_with_interrupted(tmp_path):
    """A run_in="process" stage hit by two signals in a row (at random moments, while
    workers are taking their next items) ends with Interrupted and balanced counts,
    never a StageError blaming an innocent item for the pool closing under it."""
    import random

    (tmp_path / "app.py").write_text(PROCESS_APP)
    (tmp_path / "procwork.py").write_text(PROCESS_WORK)
    rng = random.Random(7)
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "app.py", "0.2"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stderr is not None
        while not proc.stderr.readline().startswith("started"):
            pass
        time.sleep(rng.random() * 0.3)
        proc.send_signal(signal.SIGINT)
        time.sleep(rng.random() * 0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        lines = out.strip().splitlines()
        if not lines:
            # On a loaded machine the second signal can come after run() has returned
            # Interrupted, in the script's own except block: a plain KeyboardInterrupt
            # there is Python's answer to a late Ctrl+C, not the pipeline's. It must
            # follow the Interrupted, and no StageError may appear.
            assert "pipeflow._errors.Interrupted: run stopped by SIGINT" in err, err[-3000:]
            assert "StageError" not in err, err[-3000:]
            late = err.rsplit("Traceback", 1)[-1]  # where the KeyboardInterrupt came from
            assert "pipeflow" not in late, err[-3000:]
            assert "trio" not in late, err[-3000:]
            continue
        result = json.loads(lines[-1])
        assert "interrupted" == result["outcome"], (result, err[-2000:])
        assert result["in"] == result["ok"] + result["failed"] + result["cancelled"]
        assert 0 == result["failed"]
        assert result["cancelled"] == result["unfinished"]


IGNORING = textwrap.dedent(
    """
    import signal, sys, trio
    from pipeflow import Pipeline, stage

    signum = getattr(signal, sys.argv[1])
    signal.signal(signum, signal.SIG_IGN)  # as nohup, or a shell's background job

    @stage(workers=2)
    async def work(x):
        if x == 3:
            signal.raise_signal(signum)
        await trio.sleep(0.001)
        return x

    result = Pipeline(work).run(range(200))
    assert signal.getsignal(signum) is signal.SIG_IGN
    print(len(result.outputs))
    """
)


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_the_process_ignores_does_not_stop_a_run(tmp_path, signum):
    """A process started with the signal ignored (nohup, a background job of a shell
    script): a Ctrl+C at the terminal is not for it, and run() keeps it ignored (before,
    it installed its own handler and the run stopped)."""
    script = tmp_path / "ignoring.py"
    script.write_text(IGNORING)
    done = subprocess.run(
        [sys.executable, str(script), signum], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout.strip()) == (0, "200"), done.stderr


#: A library loaded before the interpreter (LD_PRELOAD) that handles SIGTERM in C, as a
#: program that embeds Python does (uWSGI): the signal ends the process with status 42.
C_HANDLER = r"""
#include <signal.h>
#include <unistd.h>
static void on_term(int signum) { (void)signum; _exit(42); }
__attribute__((constructor)) static void install(void) {
    struct sigaction action = {0};
    action.sa_handler = on_term;
    sigaction(SIGTERM, &action, 0);
}
"""

C_HANDLED = textwrap.dedent(
    """
    import os, signal, sys
    from pipeflow import Pipeline, stage

    # Python sees a handler it did not install (and could not put back).
    assert signal.getsignal(signal.SIGTERM) is None

    @stage
    async def double(x):
        return 2 * x

    print(Pipeline(double).run(range(3)).outputs, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # the C handler, if it is still there: 42
    sys.exit(0)
    """
)


@pytest.mark.skipif(
    sys.platform != "linux" or shutil.which("cc") is None, reason="needs Linux and a C compiler"
)
def test_a_signal_handled_in_c_is_left_to_its_handler(tmp_path):
    """A process whose SIGTERM handler was installed from C (a program embedding Python;
    here a library loaded first): run() leaves that signal to it, and the handler is
    still there after the run. (Before, every run() in such a process ended in a
    TypeError: Python cannot put back a handler it did not install.)"""
    source = tmp_path / "handler.c"
    source.write_text(C_HANDLER)
    lib = tmp_path / "handler.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True, timeout=120)
    script = tmp_path / "app.py"
    script.write_text(C_HANDLED)
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, LD_PRELOAD=str(lib)),
    )
    assert (done.returncode, done.stdout.strip()) == (42, "[0, 2, 4]"), done.stderr


#: Appended to a script that set ``original`` (the SIGINT handler it started with) and
#: ``report``: is the handler back, and does a Ctrl+C now raise KeyboardInterrupt?
CTRL_C_AFTER = textwrap.dedent(
    """
    report["restored"] = signal.getsignal(signal.SIGINT) is original
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        report["after"] = "swallowed"
    except KeyboardInterrupt:
        report["after"] = "KeyboardInterrupt"
    print(json.dumps(report))
    """
)


def run_script(tmp_path, text: str, case: str) -> dict:
    """Run ``text`` (with :data:`CTRL_C_AFTER`) as a program; what it reported."""
    script = tmp_path / "app.py"
    script.write_text(text + CTRL_C_AFTER)
    done = subprocess.run(
        [sys.executable, str(script), case], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


OVERLAPPING = textwrap.dedent(
    """
    import json, os, signal, sys, time, trio
    from pipeflow import Interrupted, Pipeline, stage

    CASE = sys.argv[1]
    original = signal.getsignal(signal.SIGINT)

    @stage(workers=2)
    async def slow(x):
        await trio.sleep(0.02)
        return x

    async def endless():
        i = 0
        while True:
            yield i
            i += 1

    async def main():
        outcome = {}

        async def one(name, source, delay):
            await trio.sleep(delay)
            try:
                await Pipeline(slow, name=name).arun(source, handle_signals=True, grace=5)
                outcome[name] = "returned"
            except Interrupted as stop:
                outcome[name] = f"Interrupted:{stop.result.stats['slow'].items_in}"

        async with trio.open_nursery() as nursery:
            if CASE == "both":  # one Ctrl+C while two runs are under way
                nursery.start_soon(one, "first", endless(), 0)
                nursery.start_soon(one, "second", endless(), 0.05)
                await trio.sleep(0.3)
            else:  # the first run ends, then a Ctrl+C while the second runs alone
                nursery.start_soon(one, "first", range(10), 0)  # about 0.1 s
                nursery.start_soon(one, "second", endless(), 0.02)
                await trio.sleep(0.5)
            os.kill(os.getpid(), signal.SIGINT)
        return outcome

    report = {"outcome": trio.run(main)}
    """
)


@pytest.mark.parametrize("case", ["both", "second_alone"])
def test_overlapping_runs_each_take_a_ctrl_c_and_give_the_handler_back(tmp_path, case):
    """Two ``arun(handle_signals=True)`` under way at once in one program: a Ctrl+C stops
    every run under way (each drains and raises Interrupted), whichever started first or
    ends first; and when the last has ended, Ctrl+C is the program's own again."""
    report = run_script(tmp_path, OVERLAPPING, case)
    outcome = report["outcome"]
    if case == "both":
        assert outcome["first"].startswith("Interrupted:"), report
    else:
        assert outcome["first"] == "returned", report
    assert outcome["second"].startswith("Interrupted:"), report
    assert report["restored"] is True, report
    assert report["after"] == "KeyboardInterrupt", report


HANDLERS = textwrap.dedent(
    """
    import json, os, signal, sys, threading, time, trio
    from pipeflow import Pipeline, stage

    CASE = sys.argv[1]
    original = signal.getsignal(signal.SIGINT)

    @stage
    async def watch(x):
        with trio.open_signal_receiver(signal.SIGINT):  # a stage's own, for a while
            await trio.sleep(0.3)
        return x

    @stage
    async def nap(x):
        await trio.sleep(0.3)
        return x

    @stage
    async def step(x):
        await trio.sleep(0.01)
        return x

    errors = []

    async def main():
        async with trio.open_nursery() as nursery:
            first = watch if CASE == "receiver" else nap
            nursery.start_soon(lambda: Pipeline(first, name="a").arun([1], handle_signals=True))
            await trio.sleep(0.1)
            if CASE == "receiver":  # a second run starts while the stage holds SIGINT
                await Pipeline(step, name="b").arun(range(5), handle_signals=True)
            else:  # a run in another thread asks for signals: it cannot have them
                def other():
                    try:
                        pipeline = Pipeline(step, name="b")
                        # (longer than the first run: its gate would close last)
                        trio.run(lambda: pipeline.arun(range(60), handle_signals=True))
                    except ValueError as exc:
                        errors.append(str(exc))
                await trio.to_thread.run_sync(other)

    trio.run(main)
    report = {"errors": errors}
    """
)


@pytest.mark.parametrize("case", ["receiver", "thread"])
def test_the_programs_handler_comes_back_whatever_else_held_the_signal(tmp_path, case):
    """A stage holding SIGINT with ``trio.open_signal_receiver`` while another run starts,
    or a run in another thread asking for signals (refused, as signal.signal refuses):
    when the runs have ended, Ctrl+C is the program's own again."""
    report = run_script(tmp_path, HANDLERS, case)
    assert report["restored"] is True, report
    assert report["after"] == "KeyboardInterrupt", report
    if case == "thread":
        assert report["errors"] == ["signal only works in main thread of the main interpreter"]


AS_IT_ENDS = textwrap.dedent(
    """
    import json, logging, os, signal, sys, time, trio
    from pipeflow import Interrupted, Pipeline, stage

    CASE = sys.argv[1]
    original = signal.getsignal(signal.SIGINT)

    class CtrlCAsItEnds(logging.Handler):
        armed = True

        def emit(self, record):
            # The run's last moments: its every task has ended, its gate is still open.
            if self.armed and "run_finished" in record.getMessage():
                CtrlCAsItEnds.armed = False
                signal.raise_signal(signal.SIGINT)

    log = logging.getLogger("pipeflow")
    log.setLevel(logging.INFO)
    log.addHandler(CtrlCAsItEnds())
    log.propagate = False

    @stage
    async def same(x):
        return x

    pipeline = Pipeline(same)

    def outcome(call):
        try:
            call()
            return "returned"
        except Interrupted:
            return "Interrupted"
        except KeyboardInterrupt:
            return "KeyboardInterrupt"

    if CASE == "run":
        first = outcome(lambda: pipeline.run(range(3)))
    else:
        first = outcome(lambda: trio.run(lambda: pipeline.arun(range(3), handle_signals=True)))
    later = outcome(lambda: pipeline.run(range(3)))  # no Ctrl+C in this one
    report = {"first": first, "later": later}
    """
)


@pytest.mark.parametrize("case", ["run", "arun"])
def test_a_ctrl_c_as_the_run_finishes_is_neither_lost_nor_kept_for_a_later_run(tmp_path, case):
    """A Ctrl+C that lands in a run's last moments (after its last task, as it logs
    ``run_finished``) is not the run's: it is raised as the program's own as the run
    returns. Under ``arun`` it was handed to Trio after the gate had closed: swallowed,
    then raised at the end of the next, unrelated run."""
    report = run_script(tmp_path, AS_IT_ENDS, case)
    assert report["first"] in ("KeyboardInterrupt", "Interrupted"), report
    assert report["later"] == "returned", report
    assert report["restored"] is True, report
    assert report["after"] == "KeyboardInterrupt", report


ACKING_SOURCE_STOPPED = textwrap.dedent(
    """
    import json, os, signal, sys, time, contextlib, trio
    from pipeflow import Interrupted, Pipeline, stage

    original = signal.getsignal(signal.SIGINT)

    class Ack:
        def __init__(self, queue, item):
            self.queue, self.item, self.pending = queue, item, 1

        def add(self, n):
            self.pending += n

        def done(self):
            self.pending -= 1
            if self.pending == 0:
                self.queue.acked.append(self.item)

    class Queue:
        # Like RedisStreamSource: a run that ends well is waited for until every item
        # the source gave is acked; one that failed or was cut is not.
        given, acked, ending = [], [], None

        @contextlib.asynccontextmanager
        async def __pipeflow_open__(self, *, capacity):
            async def entries():
                for i in range(100):
                    self.given.append(i)
                    yield i, Ack(self, i)

            try:
                yield entries()
            except BaseException as exc:
                self.ending = type(exc).__name__
                raise
            with trio.move_on_after(3) as waiting:
                while len(self.acked) < len(self.given):
                    await trio.sleep(0.01)
            self.ending = "waited for ever" if waiting.cancelled_caught else "all acked"

    @stage(workers=1, buffer=1)
    async def slow(x):
        await trio.sleep(0.05)
        return x

    def ctrl_c_soon():
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)

    import threading
    threading.Thread(target=ctrl_c_soon).start()
    queue = Queue()
    try:
        Pipeline(slow).run(queue, grace=5)
        outcome = "returned"
    except Interrupted as stop:
        outcome = "Interrupted"
        unfinished = [item for _, item in stop.result.unfinished]
    report = {
        "outcome": outcome,
        "ending": queue.ending,
        "unfinished": unfinished,
        "acked_and_unfinished": sorted(set(queue.acked) & set(unfinished)),
        "all_given_accounted": sorted(queue.given) == sorted(queue.acked + unfinished),
    }
    """
)


def test_a_ctrl_c_that_cuts_an_acking_sources_input_does_not_wait_for_its_acks(tmp_path):
    """Ctrl+C while the source's task waits to hand an item in (the first stage full):
    the item is unfinished (never acked, delivered again) and the source is told the
    run did not end well. It was told it had: a source that waits for the acks of every
    item it gave, as Redis's does, waited for ever for that one."""
    report = run_script(tmp_path, ACKING_SOURCE_STOPPED, "")
    assert report["outcome"] == "Interrupted", report
    assert report["ending"] == "RunFailed", report
    assert report["unfinished"], report
    assert report["acked_and_unfinished"] == [], report
    assert report["all_given_accounted"] is True, report
    assert report["restored"] is True, report


ONE_ENDS_AS_CTRL_C_LANDS = textwrap.dedent(
    """
    import json, logging, os, signal, sys, time, trio
    from pipeflow import Interrupted, Pipeline, stage

    original = signal.getsignal(signal.SIGINT)

    class CtrlCAsAEnds(logging.Handler):
        armed = True

        def emit(self, record):
            message = record.getMessage()
            if self.armed and "run_finished" in message and "pipeline='a'" in message:
                CtrlCAsAEnds.armed = False
                signal.raise_signal(signal.SIGINT)

    log = logging.getLogger("pipeflow")
    log.setLevel(logging.INFO)
    log.addHandler(CtrlCAsAEnds())
    log.propagate = False

    @stage
    async def slow(x):
        await trio.sleep(0.01)
        return x

    async def endless():
        i = 0
        while True:
            yield i
            i += 1

    async def main():
        outcome = {}

        async def one(name, source):
            try:
                await Pipeline(slow, name=name).arun(source, handle_signals=True, grace=5)
                outcome[name] = "returned"
            except Interrupted:
                outcome[name] = "Interrupted"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "b", endless())
            await trio.sleep(0.05)
            nursery.start_soon(one, "a", range(3))
        return outcome

    try:
        report = {"outcome": trio.run(main)}
    except KeyboardInterrupt:
        report = {"outcome": "KeyboardInterrupt"}
    """
)


def test_a_ctrl_c_as_one_of_two_runs_finishes_stops_the_other_and_nothing_more(tmp_path):
    """Two runs under way; a Ctrl+C lands in the last moments of one (as it logs
    ``run_finished``): that one returns, the other takes the signal and raises
    Interrupted. The first used to hand it back as unclaimed too, so a
    KeyboardInterrupt replaced the other's Interrupted (and its result)."""
    report = run_script(tmp_path, ONE_ENDS_AS_CTRL_C_LANDS, "")
    assert report["outcome"] == {"a": "returned", "b": "Interrupted"}, report
    assert report["restored"] is True, report
    assert report["after"] == "KeyboardInterrupt", report
