"""One transaction run: the reactions of the transaction's machine.

:class:`TransactionRun` owns a transaction's state (:class:`~blktx.states.TxState`)
and moves it only through its machine. Its public operations — :meth:`lock`,
:meth:`check`, :meth:`begin`, :meth:`forward`, :meth:`roll_back`,
:meth:`roll_forward`, :meth:`resume_holds`, :meth:`end` — are what ``blktx run``
(through :class:`~blktx.executor.Executor`) and ``blktx recover`` both call. Nothing
below this module decides what happens next; nothing above it knows a backend.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from blktx.actiontype import Action, Leftover
from blktx.catalog import commit_change, group_problem
from blktx.checks import check_actions
from blktx.context import RunContext
from blktx.dispatch import begin_all, dispatch, implements, point_step
from blktx.dispatch import units as units_of
from blktx.errors import ActionFailures, BlktxError, InvalidTransaction, Problem
from blktx.events import Event, Hold, proof_of_cut
from blktx.locks import Claim, NullLocker
from blktx.result import Failure, Result
from blktx.states import CANCELED, CREATED, DOING, INVALIDATED, LIVE_STATES, START, TX_FINAL, TxLifecycle, TxState

if TYPE_CHECKING:
    from blktx.watchdog import Watchdog


class Journal(Protocol):
    """Where a run records intents and outcomes (see :mod:`blktx.journal`)."""

    path: str

    def begin(self, txid: str, info: dict[str, Any], actions: Sequence[Action]) -> None: ...
    def intent(self, txid: str, phase: str, actions: Sequence[Action]) -> None: ...
    def done(self, txid: str, phase: str, actions: Sequence[Action]) -> None: ...
    def holds(self, txid: str, holds: Sequence[Hold], resumed: bool) -> None: ...
    def state(self, txid: str, state: TxState, detail: dict[str, Any]) -> None: ...


class Locker(Protocol):
    """Claims targets across processes (see :mod:`blktx.locks`)."""

    def acquire(self, txid: str, journal: str, targets: Sequence[str], stop: Callable[[], bool] = ...) -> Claim: ...
    def release(self, claim: Claim, *, finished: bool) -> None: ...


class NullJournal:
    """Records nothing: for library use where crash recovery is not wanted."""

    path = ""

    def begin(self, txid: str, info: dict[str, Any], actions: Sequence[Action]) -> None: ...
    def intent(self, txid: str, phase: str, actions: Sequence[Action]) -> None: ...
    def done(self, txid: str, phase: str, actions: Sequence[Action]) -> None: ...
    def holds(self, txid: str, holds: Sequence[Hold], resumed: bool) -> None: ...
    def state(self, txid: str, state: TxState, detail: dict[str, Any]) -> None: ...


def together(journal: Journal) -> contextlib.AbstractContextManager[None]:
    """The journal's way of making several writes one (``SqliteJournal.together``), or nothing."""
    batch = getattr(journal, "together", None)
    return batch() if batch is not None else contextlib.nullcontext()


class Interrupt:
    """Why the run stops (a signal's name, a caller's request): for the signal handler, ``Executor.interrupt``, the run."""

    def __init__(self) -> None:
        self.why: str | None = None

    def __bool__(self) -> bool:
        return self.why is not None


class Interrupted(Exception):
    """An interrupt arrived before the commit point."""


class PhaseFailed(Exception):
    """Some action failed its step; ``failures`` says which and why."""

    def __init__(self, failures: list[Failure]) -> None:
        super().__init__(str(failures[0]))
        self.failures = failures


class TransactionRun:
    """A transaction and its machine. Build one per run (or per recovery)."""

    def __init__(
        self,
        txid: str,
        actions: list[Action],
        ctx: RunContext,
        *,
        journal: Journal | None = None,
        locker: Locker | None = None,
        file: str | None = None,
        state: TxState = TxState.NEW,
        interrupt: Interrupt | None = None,
        observed: bool = False,
        description: str = "",
    ) -> None:
        self.txid = txid
        self.actions = actions
        self.ctx = ctx
        self.journal: Journal = journal or NullJournal()
        self.locker: Locker = locker or NullLocker()
        self.file = file
        self.description = description
        self.interrupt = interrupt if interrupt is not None else Interrupt()
        self.observed = observed
        self.claim: Claim | None = None
        self.watchdog: Watchdog | None = None
        #: While a window is open: each action's point-in-time step (perf_counter start, end).
        self.cut: dict[int, tuple[str, float, float]] = {}
        self.window_opened: float | None = None
        self._ended_window = False  # resume_holds() ran for the run's own holds
        self._remember_lock = threading.Lock()
        self.result = Result(txid, state, actions=actions, description=description)
        self.undoable = [a for a in actions if not a.type.finalize]
        self.finals = [a for a in actions if a.type.finalize]
        ctx.on_remember = self._remember
        ctx.journal_path = self.journal.path

    def _remember(self, actions: list[Action]) -> None:
        """``ctx.remember``: what a step learnt about its own objects, durable before it goes on."""
        with self._remember_lock:
            self.journal.intent(self.txid, "publish", actions)

    # -- the machine --------------------------------------------------------------------

    @property
    def state(self) -> TxState:
        return self.result.state

    def _to(self, trigger: str) -> None:
        self.result.state = TxLifecycle.next(trigger, self.result.state)

    # -- lock and check (nothing touched) ------------------------------------------------

    def lock(self) -> bool:
        """NEW -> LOCKED: claim every target before any check; False (INVALID) when refused."""
        if self._interrupted_before_touching():
            return False
        try:
            self.claim = self.locker.acquire(
                self.txid, self.journal.path, [t for a in self.actions for t in a.claims()], stop=lambda: bool(self.interrupt)
            )
        except InvalidTransaction as exc:  # name the spec and the action, as a check's refusal does
            if self._interrupted_before_touching():  # a signal while waiting for the locks
                return False
            first: dict[str, Action] = {}
            for a in self.actions:
                first.setdefault(a.target, a)
            return self._refuse(
                [
                    Problem(
                        p.message,
                        p.file or self.file,
                        first[p.target].line if p.target in first else p.line,
                        p.column,
                        first[p.target].index if p.target in first else p.action,
                        p.key,
                        p.target,
                        p.hint,
                    )
                    for p in exc.problems
                ]
            )
        except (OSError, BlktxError) as exc:
            return self._refuse(
                [Problem(f"cannot lock the targets: {exc}", self.file, hint="check the lock folder ($BLKTX_LOCK_DIR)")]
            )
        self._to("lock")
        return True

    def check(self) -> bool:
        """LOCKED -> CHECKED: every check and conflict, under the locks; False (INVALID) when refused."""
        t = time.perf_counter()
        problems = check_actions(self.actions, self.ctx, self.file)
        taken = getattr(self.journal, "has_group_snapshot", None)
        opts = self.ctx.options
        clash = group_problem(self.journal, opts, self.file, self.ctx.base_dir) if opts.group and self.undoable else None
        if clash:
            problems.append(Problem(clash, self.file, key="group", hint='name this spec\'s group: group = "web"'))
        if taken is not None and opts.group and self.undoable and taken(opts.group, opts.snapshot):
            problems.append(
                Problem(
                    f"group {opts.group!r} already has a group snapshot named {opts.snapshot!r}",
                    self.file,
                    key="snapshot",
                    hint='name each one apart, e.g. snapshot = "nightly-{now:%Y%m%d-%H%M}"',
                )
            )
        self.result.phases["check"] = time.perf_counter() - t
        if problems:
            return self._refuse(problems)
        if self._interrupted_before_touching():
            return False
        self._to("pass")
        return True

    def begin(self) -> bool:
        """CHECKED -> RUNNING: BEGIN is durable; False (INVALID) when the journal refused it."""
        ctx = self.ctx
        try:
            self.journal.begin(
                self.txid,
                {"file": self.file, "base_dir": ctx.base_dir, "description": self.description, "options": ctx.options.__dict__},
                self.actions,
            )
        except Exception as exc:  # noqa: BLE001 - nothing was touched: an invalid run, not one to recover
            return self._refuse(
                [
                    Problem(
                        f"the journal refused BEGIN: {type(exc).__name__}: {exc}",
                        self.file,
                        hint="give a journal on a writable disk with --journal PATH",
                    )
                ]
            )
        self._to("begin")
        return True

    def _refuse(self, problems: list[Problem]) -> bool:
        self.result.problems = problems
        self._to("refuse")
        return False

    def _interrupted_before_touching(self) -> bool:
        if not self.interrupt:
            return False
        self.result.failure = Failure("interrupt", f"interrupted by {self.interrupt.why} before anything was touched")
        self.result.failures = [self.result.failure]
        self._to("interrupt")
        return True

    # -- forward: do, quiesce, invalidate, commit -----------------------------------------

    def forward(self) -> None:
        """RUNNING -> COMMITTED, or -> ROLLING_BACK (already rolled back) on any failure."""
        try:
            self._forward()
        except Exception as exc:  # noqa: BLE001 - whatever failed before the commit point rolls back
            if isinstance(exc, PhaseFailed):
                self.result.failures = exc.failures
            elif isinstance(exc, Interrupted):
                self.result.failures = [Failure("interrupt", f"interrupted by {self.interrupt.why}")]
            else:  # a journal write (the commit write too) or a plugin's hook failed outside any step
                self.result.failures = [Failure("run", f"{type(exc).__name__}: {exc}")]
            self.result.failure = self.result.failures[0]
            self._emit("failure", message=str(self.result.failure))
            self._to("fail")
            self.roll_back()

    def _forward(self) -> None:
        journal, txid, undoable, ctx = self.journal, self.txid, self.undoable, self.ctx
        self._raise_if_interrupted()
        if self.claim is not None:  # its fsyncs ran beside the checks and BEGIN: on disk before anything is touched
            self.claim.durable()
        quiesced = ctx.options.quiesce != "none"
        # An invalidate no type implements changes nothing: journaling it would lengthen the window.
        has_invalidate = any(implements(a.type, "invalidate") for a in undoable)
        last = "invalidate" if has_invalidate else "do"
        early = [a for a in undoable if a.type.do_before_quiesce] if quiesced else []
        late = [a for a in undoable if not a.type.do_before_quiesce] if early else undoable
        if quiesced and self.journal.path and os.environ.get("BLKTX_WATCHDOG") != "0":
            from blktx.watchdog import Watchdog  # the dead-man switch, started early: ready when the window opens

            self.watchdog = Watchdog(self.journal.path, txid, ctx.options.max_window)
        # The do intent (every action may begin, its undo facts) goes before the window: recover cancels what began.
        if quiesced:
            journal.intent(txid, "quiesce", self.actions)
        journal.intent(txid, "do", undoable)
        between = False
        if early:
            self._timed("do", early, label="do (before quiesce)")
            if not late and has_invalidate:
                self._between()
                between = True
        if quiesced:
            self._quiesce()
        if late or not early:
            self._timed("do", late)
        if has_invalidate and not between:
            self._between()
        self._timed("invalidate", undoable)
        self._within_budget()
        if quiesced:  # every point in time is taken: the window ends before the durable writes
            self.resume_holds()
        # The commit point: the last phase's results and COMMITTED, one durable write; committed once it returned.
        with together(journal):
            journal.done(txid, last, undoable)
            journal.state(txid, TxState.COMMITTED, {})
            commit_change(journal, txid, ctx.options, self.actions, bool(undoable))
        self._to("commit")

    def _between(self) -> None:
        """do's results and the invalidate intent: one durable write."""
        with together(self.journal):
            self.journal.done(self.txid, "do", self.undoable)
            self.journal.intent(self.txid, "invalidate", self.undoable)

    def _timed(self, step: str, actions: list[Action], label: str | None = None) -> None:
        t = time.perf_counter()
        failures = self.phase(step, actions, label=label)
        self.result.phases[step] = self.result.phases.get(step, 0.0) + time.perf_counter() - t
        if failures:
            raise PhaseFailed(failures)
        self._raise_if_interrupted()
        self._within_budget()

    def _within_budget(self) -> None:
        """A window that outlasted ``max_window`` breaks the point in time: roll back."""
        budget = self.ctx.options.max_window
        if self.window_opened is not None and time.monotonic() - self.window_opened > budget:
            raise PhaseFailed(
                [
                    Failure(
                        "quiesce",
                        f"the quiesce window outlasted max_window ({budget:g} s): the group would not be one point in time",
                    )
                ]
            )

    def _raise_if_interrupted(self) -> None:
        if self.interrupt:
            raise Interrupted(self.interrupt.why)

    # -- steps --------------------------------------------------------------------------

    def phase(self, step: str, actions: Sequence[Action], *, label: str | None = None) -> list[Failure]:
        """Run one step over ``actions`` in lockstep; return the failures (sorted)."""
        jobs = self.ctx.options.jobs
        units = units_of(actions, reverse=step == "cancel", parallel=jobs > 1)
        total = len(actions)
        self._emit("phase-start", phase=label or step, total=total)
        failures: list[Failure] = []
        lock = threading.Lock()
        keep_going = step == "cancel"

        def work(unit: list[Action]) -> None:
            if not keep_going and (failures or self.interrupt):
                return
            errors = self.step(step, unit)
            if errors:
                with lock:
                    failures.extend(errors)

        dispatch(units, work, jobs, stop=lambda: not keep_going and bool(failures or self.interrupt))
        self._emit("phase-end", phase=label or step, total=total, count=len(failures))
        failures.sort(key=lambda f: f.action if f.action is not None else -1)
        return failures

    def step(self, step: str, unit: list[Action]) -> list[Failure]:
        """Run ``step`` on one unit (a batch of one type, or one target's actions).
        Each action moves only as its type's machine allows; an illegal step raises
        :class:`~blktx.states.IllegalStep` before any callback runs."""
        atype = unit[0].type
        lifecycle = atype.lifecycle
        if step == "do":
            begin_all(unit)  # in memory, an action begins when its do is called
        for a in unit:
            lifecycle.next(step, a.state)
        ctx = self.ctx
        failures: list[Failure] = []
        if atype.batched:
            t = time.perf_counter()
            failed: dict[int, BaseException] = {}
            try:
                getattr(atype, step + "_many")(unit, ctx)
            except ActionFailures as exc:
                failed = dict(exc.failures)
                failed.update({i: _NotStarted() for i in exc.not_started if i not in failed})
            except Exception as exc:  # noqa: BLE001 - the backend's message is the report
                failed = {a.index: exc for a in unit}
            spent = (time.perf_counter() - t) / len(unit)
            for a in unit:
                err = failed.get(a.index)
                if isinstance(err, _NotStarted):
                    continue  # still in its state: a later rollback or retry sees it as it was
                a.timed(step, spent)
                if err is None:
                    a.state = lifecycle.next(step, a.state)
                    self._emit_action(step, a)
                    if self.window_opened is not None and step == point_step(atype):
                        self.cut[a.index] = (step, t, time.perf_counter())
                else:
                    failures.append(self._fail(a, step, err))
            return failures
        method: Callable[[Action, RunContext], None] = getattr(atype, step)
        for a in unit:
            t = time.perf_counter()
            try:
                method(a, ctx)
            except Exception as exc:  # noqa: BLE001 - the backend's message is the report
                a.timed(step, time.perf_counter() - t)
                failures.append(self._fail(a, step, exc))
                if step != "cancel":
                    break
                continue
            a.timed(step, time.perf_counter() - t)
            a.state = lifecycle.next(step, a.state)
            if self.observed:
                self._emit_action(step, a)
            if self.window_opened is not None and step == point_step(atype):
                self.cut[a.index] = (step, t, time.perf_counter())
        return failures

    def _fail(self, a: Action, step: str, exc: BaseException) -> Failure:
        message = str(exc) or type(exc).__name__
        a.error, a.failed_phase = message, step
        if step == "cancel":
            a.state = a.type.lifecycle.next("cancel_failed", a.state)
        return Failure(step, message, a.index, a.type.name, a.target)

    # -- roll back ------------------------------------------------------------------------

    def roll_back(self) -> None:
        """Cancel every action that may have changed something, newest first, retrying
        failed cancels; what stays is listed in ``result.leftovers``. Runs in
        ROLLING_BACK (a failed run, or ``blktx recover``)."""
        victims = [a for a in self.undoable if a.state in LIVE_STATES]
        if not victims:
            return
        t = time.perf_counter()
        try:
            self.journal.intent(self.txid, "cancel", victims)
        except Exception as exc:  # noqa: BLE001 - the rollback itself must still run
            self.result.warnings.append(f"the cancel intent could not be journaled ({exc}); cancelling anyway")
        remaining = victims
        for _attempt in range(self.ctx.options.cancel_retries + 1):
            self.phase("cancel", remaining)
            remaining = [a for a in remaining if a.state != CANCELED]
            if not remaining:
                break
        try:
            self.journal.done(self.txid, "cancel", victims)
        except Exception as exc:  # noqa: BLE001 - reported; the end write decides the outcome
            self.result.warnings.append(f"the cancel results could not be journaled ({exc})")
        self.result.phases["cancel"] = time.perf_counter() - t
        for a in sorted(remaining, key=lambda a: -a.index):
            try:
                # each names what is left; the cancel's own error says why
                self.result.leftovers.extend(Leftover(lo.target, lo.what, lo.why or a.error or "") for lo in a.type.leftovers(a))
            except Exception as exc:  # noqa: BLE001 - still name the action that left something
                self.result.leftovers.append(Leftover(a.target, f"{a.type.name} action #{a.index}: {exc}"))

    # -- quiesce and resume -----------------------------------------------------------------

    def _quiesce(self) -> None:
        """Call every quiesce hook (through pluggy). Holds are known only through
        ``ctx.holding()``, which journals them before anything is paused."""
        holds = self.result.holds

        def announced(new: list[Hold]) -> None:
            for hold in new:
                hold.start = hold.start or time.monotonic()
                if not any(h is hold for h in holds):
                    holds.append(hold)
                    self._emit("quiesced", target=hold.target, message=hold.kind)
            self.journal.holds(self.txid, holds, resumed=False)

        self.ctx.on_hold = announced
        self.window_opened = time.monotonic()
        self.ctx.window_deadline = self.window_opened + self.ctx.options.max_window
        if self.watchdog is not None:
            self.watchdog.window_opened()
        try:
            returned = self.ctx.hook.blktx_quiesce(ctx=self.ctx, actions=self.actions)  # type: ignore[union-attr]
        except Exception as exc:
            raise PhaseFailed([Failure("quiesce", str(exc) or type(exc).__name__)]) from exc
        # A hold returned but never announced was taken without the journal knowing:
        # still resume it, and say which plugin breaks the contract.
        late = [h for got in returned for h in got or [] if not any(h is k for k in holds)]
        if late:
            self.result.warnings.append(
                "a quiesce hook returned holds it did not announce with ctx.holding() first ("
                + ", ".join(f"{h.kind} {h.target}" for h in late)
                + "): a crash in the hook would have left them"
            )
            announced(late)

    def resume_holds(self, holds: list[Hold] | None = None) -> None:
        """Resume every hold not yet resumed, newest first: each run of holds of one
        kind through ``blktx_resume_many`` when a plugin takes them together, the rest
        one by one (many at once). A hold that could not be resumed is a leftover."""
        if holds is None and self._ended_window:
            return  # ended once in this run (before its commit write): what failed is a leftover already
        self._ended_window = holds is None
        waiting = [h for h in (self.result.holds if holds is None else holds) if h.end is None]
        runs: list[list[Hold]] = []
        for hold in reversed(waiting):
            if runs and runs[-1][0].kind == hold.kind:
                runs[-1].append(hold)
            else:
                runs.append([hold])
        hook = self.ctx.hook
        assert hook is not None
        self._resume_runs(runs, hook)
        self.window_opened = None
        self.ctx.window_deadline = None  # no window: plugins' calls are no longer bounded by it
        if self.watchdog is not None:  # what this run could not resume is recover's now
            self.watchdog.window_closed()

    def _resume_runs(self, runs: list[list[Hold]], hook: Any) -> None:
        for run in runs:
            single = run
            if len(run) > 1:
                taken: set[int] = set()
                try:
                    for got in hook.blktx_resume_many(ctx=self.ctx, holds=run):
                        taken.update(id(h) for h in got or [])
                except Exception as exc:  # noqa: BLE001 - fall back to one by one
                    self.result.warnings.append(f"resuming {run[0].kind} holds together failed ({exc}); one by one")
                for hold in run:
                    if id(hold) in taken:
                        self._ended(hold)
                single = [h for h in run if id(h) not in taken]
            dispatch(single, self._resume_one, min(len(single), 32), name="blktx-resume")

    def _resume_one(self, hold: Hold) -> None:
        try:
            done = self.ctx.hook.blktx_resume(ctx=self.ctx, hold=hold)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - keep resuming the others
            self.result.leftovers.append(Leftover(hold.target, f"still {hold.kind} (resume failed: {exc})"))
            return
        if not done:
            self.result.leftovers.append(Leftover(hold.target, f"still {hold.kind}: no installed plugin resumes it"))
            return
        self._ended(hold)

    def _ended(self, hold: Hold) -> None:
        hold.end = hold.end or time.monotonic()
        self._emit("resumed", target=hold.target, message=hold.kind, seconds=hold.window or 0.0)

    # -- roll forward ---------------------------------------------------------------------

    def roll_forward(self) -> None:
        """In FINALIZING: finalize actions, then ``finish`` steps, each retried; what
        still fails is ``result.pending`` for ``blktx recover``."""
        t = time.perf_counter()
        ctx = self.ctx
        remaining = [a for a in self.finals if a.state != INVALIDATED]
        # Every undoable action of a committed transaction took effect; one rebuilt from
        # the journal may still say CREATED when its type's invalidate wrote nothing.
        unfinished = [a for a in self.undoable if a.type.has_finish and a.state in (CREATED, INVALIDATED)]
        if not (remaining or unfinished):
            return
        for attempt in range(ctx.options.finalize_retries + 1):
            if attempt:
                time.sleep(ctx.options.retry_delay * attempt)
            self.journal.intent(self.txid, "finalize", remaining + unfinished)
            for step, states in (("do", (START, DOING)), ("invalidate", (CREATED,))):
                for unit in units_of([a for a in remaining if a.state in states], reverse=False):
                    self.step(step, unit)
            unfinished = [a for a in unfinished if not self._finish(a)]
            self.journal.done(self.txid, "finalize", remaining + unfinished)
            remaining = [a for a in remaining if a.state != INVALIDATED]
            if not (remaining or unfinished) or self.interrupt:
                break
        self.result.phases["finalize"] = time.perf_counter() - t
        self.result.pending = [
            Failure(
                "finalize" if a.type.finalize else "finish",
                a.error or "interrupted before it ran",
                a.index,
                a.type.name,
                a.target,
            )
            for a in remaining + unfinished
        ]

    def _finish(self, a: Action) -> bool:
        t = time.perf_counter()
        try:
            a.type.finish(a, self.ctx)
        except Exception as exc:  # noqa: BLE001 - reported as pending, never rolled back
            a.error, a.failed_phase = str(exc) or type(exc).__name__, "finish"
            return False
        finally:
            a.timed("finish", time.perf_counter() - t)
        a.error = a.failed_phase = None
        return True

    # -- the end ----------------------------------------------------------------------------

    def after_commit(self) -> None:
        """COMMITTED -> FINALIZING -> DONE or FINALIZE_INCOMPLETE: resume, finalize, record."""
        self.resume_holds()
        self._to("finalize")
        self._finalize_and_end()

    def _finalize_and_end(self) -> None:
        """In FINALIZING: record the resumes, roll forward, and end DONE or FINALIZE_INCOMPLETE."""
        try:
            if self.result.holds:
                self.journal.holds(self.txid, self.result.holds, resumed=True)
            self.roll_forward()
        except Exception as exc:  # noqa: BLE001 - committed: never rolled back, finished by recover
            self.result.pending.append(Failure("finalize", f"{type(exc).__name__}: {exc}"))
        self._to("stuck" if self.result.pending or self.result.leftovers else "finish")
        self._record_end({"pending": [p.to_json() for p in self.result.pending]})

    def after_rollback(self) -> None:
        """ROLLING_BACK -> ABORTED or ROLLBACK_INCOMPLETE: resume what is held, record."""
        self.resume_holds()
        self._to("stuck" if self.result.leftovers else "abort")
        failure = self.result.failure.to_json() if self.result.failure else None
        self._record_end({"failure": failure})

    def _record_end(self, detail: dict[str, Any]) -> None:
        detail["leftovers"] = [str(lo) for lo in self.result.leftovers]
        cut = proof_of_cut(self.result.holds, self.undoable, self.cut)
        if cut is not None:
            self.result.cut = cut
            detail["cut"] = cut
        try:
            with together(self.journal):
                if self.result.holds:
                    self.journal.holds(self.txid, self.result.holds, resumed=True)
                self.journal.done(self.txid, "end", self.actions)
                self.journal.state(self.txid, self.state, detail)
        except Exception as exc:  # noqa: BLE001 - the journal still says unfinished: keep the claim
            self.result.warnings.append(
                f"the end of the transaction could not be journaled ({exc}); run `blktx recover` to close it"
            )
            if self.state in TX_FINAL:
                self.result.state = TxState.FINALIZE_INCOMPLETE if self.result.committed else TxState.ROLLBACK_INCOMPLETE

    def end(self) -> None:
        """Stop the watchdog and release the claim: removed when the transaction is
        over, kept (only the kernel lock dropped) while it needs recovery."""
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        if self.claim is not None:
            try:
                self.locker.release(self.claim, finished=self.state in TX_FINAL)
            except OSError as exc:
                self.result.warnings.append(f"releasing the locks failed: {exc}")
            self.claim = None

    def recover(self) -> str:
        """For a transaction rebuilt from the journal of a dead run: roll back or
        forward, as its machine says from the state the journal holds. Returns which."""
        self._to("recover")
        if self.state is TxState.ROLLING_BACK:
            self.roll_back()
            self.after_rollback()
            return "rolled back"
        self.resume_holds()
        self._finalize_and_end()
        return "rolled forward"

    def cleanup(self) -> None:
        """After recovery: each plugin removes what the dead run kept outside its actions."""
        try:
            self.ctx.hook.blktx_cleanup(ctx=self.ctx)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - reported; the transaction itself is finished
            self.result.warnings.append(f"cleaning up after the dead run failed: {exc}")

    def run(self) -> Result:
        """Drive the whole machine: lock, check, begin, forward, then commit's or
        rollback's end. Always ends by releasing what it may release."""
        try:
            if self.lock() and self.check() and self.begin():
                self.forward()
                if self.state is TxState.COMMITTED:
                    self.after_commit()
                else:
                    self.after_rollback()
        finally:
            self.end()
        return self.result

    # -- events -----------------------------------------------------------------------------

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.observed and self.ctx.hook is not None:
            with contextlib.suppress(Exception):
                self.ctx.hook.blktx_event(event=Event(kind, self.txid, **fields))

    def _emit_action(self, step: str, a: Action) -> None:
        if self.observed:
            self._emit("action", phase=step, action=a.index, state=a.state, target=a.target)


class _NotStarted(Exception):
    """A batch gave up before reaching this action: its state stays as it was."""
