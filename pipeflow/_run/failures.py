"""What happens to an item whose last attempt failed: one class per error policy.

Every policy does the same first steps (count, log, hand the :class:`Failed` value to
the dead-letter sink); then :meth:`FailurePolicy.finish` decides what the item becomes:
the run stops (fail-fast), it is recorded (collect), dropped (skip), or travels on as a
value (embed). A new policy is one subclass here and one literal in ``ErrorPolicy``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from .._errors import Failed, StageError, short_repr
from .._stage import Stage
from .envelope import Ack, Env

if TYPE_CHECKING:
    from .worker import StageRun

#: How long a hand-over to a dead-letter stage may take once the run has failed.
TEARDOWN_LIMIT = 10.0


class TooManyFailures(StageError):
    """A stage's or the pipeline's error budget (``max_failures=``) ran out: the run
    stops. ``item`` is the item whose failure went over the budget (None when a
    fractional budget is found exceeded at the end of the stream)."""

    def __init__(
        self,
        stage: str,
        item: object,
        error: BaseException,
        *,
        attempts: int = 1,
        message: str | None = None,
    ) -> None:
        super().__init__(stage, item, error, attempts=attempts)
        if message is not None:
            self.args = (message,)


class FailurePolicy:
    """The shared steps of every error policy; subclasses say how an item ends."""

    #: The ``errors=`` literal this class implements.
    name: ClassVar[str]
    #: The item ends here, so a dead-letter sink that takes it takes over its ack.
    ends_item: ClassVar[bool] = True
    #: The item goes on (as a Failed value) *and* to the dead-letter sink: the sink's
    #: copy holds a share of its ack, so it is acked only once both are done.
    shares_ack: ClassVar[bool] = False

    def __init__(self, sr: StageRun) -> None:
        self.sr = sr
        self.dead_letter = make_dead_letter(sr)
        # A dead-letter stage takes an item whose hand-over a stop cut into its queue
        # (then listed as its unfinished); a callable cut in the middle of its call
        # leaves the item with this stage.
        self.cut_stays_here = self.dead_letter is not None and not isinstance(
            dead_letter_sink(sr), Stage
        )
        self.log_failure = sr.run.log.warning

    async def fail(self, env: Env, error: Exception, attempts: int, weight: int) -> list[Env]:
        """Count, log and dead-letter one failed item; the outputs it leaves (if any)."""
        sr = self.sr
        c = sr.c
        c.failed += weight
        item = env.item
        failed = Failed(item, error, sr.name, attempts=attempts)
        self.log_failure(
            "stage_failed",
            stage=sr.name,
            item=short_repr(item),
            error=repr(error),
            attempts=attempts,
            policy=self.name,
        )
        ack_taken = False
        if self.dead_letter is not None:
            handover = env.ack if self.ends_item or self.shares_ack else None
            if self.shares_ack and handover is not None:
                handover.add(1)  # the sink's copy; the item going on keeps its own
            try:
                ack_taken = await self.dead_letter(failed, handover)
            except Exception as sink_error:
                c.inflight -= weight
                err = StageError(f"{sr.name}.dead_letter", failed, sink_error)
                sr.run.fail(err)
                raise err from sink_error
            except BaseException:
                if self.cut_stays_here:
                    # A stop cut the dead-letter call: the sink may not have kept it, so
                    # the item counts as one the stop took from this worker (cancelled,
                    # listed in RunResult.unfinished, not acked), for the caller to
                    # resume, not as a failure whose only trace would be a log line.
                    c.failed -= weight
                    sr.run.unfinish(sr, [env])
                else:
                    # Cut on its way to a dead-letter stage: it is in that stage's queue,
                    # listed as unfinished there; the failure happened here.
                    c.inflight -= weight
                    self.record(failed)
                    self.cut_after_failing(env, failed)
                raise
        c.inflight -= weight
        return self.finish(env, failed, ack_taken, weight)

    def record(self, failed: Failed[Any]) -> None:
        """Keep the failure where the policy keeps failures (collect: the run's errors)."""

    def cut_after_failing(self, env: Env, failed: Failed[Any]) -> None:
        """A stop came while the failed item went to a dead-letter stage: what the item
        leaves behind here (nothing, but for a policy whose failure goes on) is kept as
        a stop keeps any output made and not handed on."""

    def finish(self, env: Env, failed: Failed[Any], ack_taken: bool, weight: int) -> list[Env]:
        raise NotImplementedError

    def _ends(self, env: Env, ack_taken: bool) -> None:
        if env.ack is not None and not ack_taken:
            env.ack.done()


class FailFast(FailurePolicy):
    """The first failure stops the run and is raised as a :class:`StageError`."""

    name = "fail_fast"
    ends_item = False  # the run stops: the item is never acked

    def __init__(self, sr: StageRun) -> None:
        super().__init__(sr)
        self.log_failure = sr.run.log.error

    def finish(self, env: Env, failed: Failed[Any], ack_taken: bool, weight: int) -> list[Env]:
        err = StageError(self.sr.name, failed.item, failed.error, attempts=failed.attempts)
        self.sr.run.fail(err)
        raise err


class Embed(FailurePolicy):
    """The failure travels on as a :class:`Failed` value where the output would be."""

    name = "embed"
    ends_item = False  # it goes on, and is acked where it leaves
    shares_ack = True  # ... and once the dead-letter sink has its copy

    def finish(self, env: Env, failed: Failed[Any], ack_taken: bool, weight: int) -> list[Env]:
        env.item = failed
        return [env]

    def cut_after_failing(self, env: Env, failed: Failed[Any]) -> None:
        # The Failed value was made: in front of the next stage, or an unread output.
        env.item = failed
        sr = self.sr
        if sr.reorder is not None:
            sr.run.strand(sr, [], [(env.seq, [env])])
        else:
            sr.run.strand(sr, [env], [])


class Skip(FailurePolicy):
    """The item is logged, counted and dropped; the run goes on (within its budget)."""

    name = "skip"

    def finish(self, env: Env, failed: Failed[Any], ack_taken: bool, weight: int) -> list[Env]:
        self._ends(env, ack_taken)
        check_budget(self.sr, failed, weight)
        return []


class Collect(Skip):
    """As skip, and the failure is kept in ``RunResult.errors``."""

    name = "collect"

    def record(self, failed: Failed[Any]) -> None:
        self.sr.run.errors.append(
            StageError(self.sr.name, failed.item, failed.error, attempts=failed.attempts)
        )

    def finish(self, env: Env, failed: Failed[Any], ack_taken: bool, weight: int) -> list[Env]:
        self.record(failed)
        return super().finish(env, failed, ack_taken, weight)


POLICIES: dict[str, type[FailurePolicy]] = {p.name: p for p in (FailFast, Collect, Skip, Embed)}


def dead_letter_sink(sr: StageRun) -> Any:
    """The stage's ``dead_letter=``, else the pipeline's (None if neither is set)."""
    return sr.opts.dead_letter if sr.opts.dead_letter is not None else sr.run.dead_letter


def make_dead_letter(
    sr: StageRun,
) -> Callable[[Failed[Any], Ack | None], Awaitable[bool]] | None:
    """The stage's dead-letter sink as ``await sink(failed, ack) -> took_ack``.

    A callable (sync or async) is called in the failing worker; a :class:`Stage` runs as
    a side stage with its own workers, fed through an edge. Either takes over the ack it
    is given: the callable acks once its call has returned, the stage once it has
    handled the item.
    """
    if sr.is_dead_letter:
        return None  # a dead-letter stage's own failures follow its errors= policy
    run = sr.run
    sink = dead_letter_sink(sr)
    if sink is None:
        return None
    if isinstance(sink, Stage):
        dl = run.dead_letter_run(sink)

        async def to_stage(failed: Failed[Any], ack: Ack | None) -> bool:
            # A fail-fast stop elsewhere must not cancel this hand-over, or the item
            # would be lost: it is shielded, and bounded once the run has failed.
            with trio.CancelScope(shield=True) as scope:
                run.handovers.add(scope)
                if run.first_failure is not None:
                    scope.deadline = trio.current_time() + TEARDOWN_LIMIT
                try:
                    await dl.inbox.put([Env(failed, ack)])
                    # Yield even on the fast path: workers failing at the same moment
                    # get to hand their items over too before this one stops the run.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return ack is not None
                except trio.BrokenResourceError:
                    pass  # the dead-letter stage is gone: the run is being cancelled
                finally:
                    run.handovers.discard(scope)
            await trio.lowlevel.checkpoint()  # the cancellation first, if that is why
            raise trio.BrokenResourceError("the dead-letter stage stopped first")

        return to_stage

    fn = sink

    async def to_callable(failed: Failed[Any], ack: Ack | None) -> bool:
        result = fn(failed)
        if inspect.isawaitable(result):
            await result
        if ack is not None:
            ack.done()  # it has the item (a call cut by a stop never gets here)
        return ack is not None

    return to_callable


def check_budget(sr: StageRun, failed: Failed[Any], weight: int) -> None:
    """Error budgets: the pipeline's ``max_failures`` and the stage's."""
    run = sr.run
    item, error, attempts = failed.item, failed.error, failed.attempts
    run.failures += weight
    if run.max_failures is not None and run.failures > run.max_failures:
        err = TooManyFailures(sr.name, item, error, attempts=attempts)
        err.add_note(
            f"pipeline {run.pipeline!r}: {run.failures} items failed, over its error "
            f"budget max_failures={run.max_failures!r}"
        )
        run.log.error(
            "error_budget_exceeded",
            stage=sr.name,
            failed=run.failures,
            max_failures=run.max_failures,
            scope="pipeline",
        )
        run.fail(err)
        raise err
    limit = sr.opts.max_failures
    if limit is None:
        return
    c = sr.c
    # Out of the items finished so far (a worker counts a chunk in as it takes it).
    finished = c.ok + c.filtered + c.failed
    if isinstance(limit, int):
        over = c.failed > limit
    else:
        # A fraction needs a sample before it means anything.
        over = finished >= math.ceil(10 / limit) and c.failed > limit * finished
    if over:
        err = TooManyFailures(sr.name, item, error, attempts=attempts)
        err.add_note(
            f"stage {sr.name!r}: {c.failed} of {finished} items failed, "
            f"over its error budget max_failures={limit!r}"
        )
        run.log.error(
            "error_budget_exceeded",
            stage=sr.name,
            failed=c.failed,
            items_in=finished,
            max_failures=limit,
            scope="stage",
        )
        run.fail(err)
        raise err


def finish_budget(sr: StageRun) -> None:
    """At the end of a run, a fractional budget is checked on the whole stream."""
    limit = sr.opts.max_failures
    c = sr.c
    if isinstance(limit, float) and c.items_in and c.failed > limit * c.items_in:
        summary = f"{c.failed} of {c.items_in} items failed"
        err = TooManyFailures(
            sr.name,
            None,
            RuntimeError(summary),
            message=f"stage {sr.name!r}: {summary}, over its error budget max_failures={limit!r}",
        )
        err.add_note(f"stage {sr.name!r}: {summary}, over its error budget max_failures={limit!r}")
        sr.run.log.error(
            "error_budget_exceeded",
            stage=sr.name,
            failed=c.failed,
            items_in=c.items_in,
            max_failures=limit,
            scope="stage",
        )
        sr.run.fail(err)
        raise err
