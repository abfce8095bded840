"""The lockstep executor: check all, lock, quiesce, do all, invalidate all, commit,
resume, finalize; on any failure or interrupt before the commit point, cancel in
reverse order. See docs/semantics.md for the contract this module keeps.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any, Protocol, cast

from blktx.actiontype import Action, ActionType, Leftover
from blktx.context import Options, RunContext
from blktx.errors import ActionFailures, InvalidTransaction, Problem, Refused
from blktx.events import Event, Hold
from blktx.plugins import Registry, default_registry
from blktx.result import COMMITTED, INVALID, NEEDS_RECOVERY, ROLLED_BACK, Failure, Result
from blktx.spec import Transaction, bind
from blktx.states import (
    CANCELED,
    CREATED,
    INVALIDATED,
    LIVE_STATES,
    START,
    TX_ABORTED,
    TX_COMMITTED,
    TX_DONE,
)


class Journal(Protocol):
    """Where the executor records intents and outcomes (see :mod:`blktx.journal`)."""

    def begin(self, txid: str, info: dict[str, Any], actions: Sequence[Action]) -> None: ...
    def intent(self, txid: str, phase: str, actions: Sequence[Action]) -> None: ...
    def done(self, txid: str, phase: str, actions: Sequence[Action]) -> None: ...
    def holds(self, txid: str, holds: Sequence[Hold], resumed: bool) -> None: ...
    def outcome(self, txid: str, outcome: str, detail: dict[str, Any]) -> None: ...


class Locker(Protocol):
    """Locks targets across processes (see :mod:`blktx.locks`)."""

    def acquire(self, txid: str, targets: Sequence[str]) -> contextlib.AbstractContextManager[None]: ...


class NullJournal:
    """Records nothing: for library use where crash recovery is not wanted."""

    def begin(self, txid: str, info: dict[str, Any], actions: Sequence[Action]) -> None: ...
    def intent(self, txid: str, phase: str, actions: Sequence[Action]) -> None: ...
    def done(self, txid: str, phase: str, actions: Sequence[Action]) -> None: ...
    def holds(self, txid: str, holds: Sequence[Hold], resumed: bool) -> None: ...
    def outcome(self, txid: str, outcome: str, detail: dict[str, Any]) -> None: ...


class NullLocker:
    @contextlib.contextmanager
    def acquire(self, txid: str, targets: Sequence[str]) -> Iterator[None]:
        yield


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived before the commit point."""


class _PhaseFailed(Exception):
    def __init__(self, failures: list[Failure]) -> None:
        super().__init__(str(failures[0]))
        self.failures = failures


def new_txid() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


class Executor:
    """Runs transactions all-or-none. One executor can run many transactions in turn."""

    def __init__(self, registry: Registry | None = None, journal: Journal | None = None,
                 locker: Locker | None = None) -> None:
        self.registry = registry or default_registry()
        self.journal: Journal = journal or NullJournal()
        self.locker: Locker = locker or NullLocker()
        self._interrupt: str | None = None
        hook = self.registry.pm.hook
        self._observed = bool(hook.blktx_event.get_hookimpls())

    # -- entry points --------------------------------------------------------------

    def check(self, tx: Transaction, *, allow_exec: bool = False, roots: list[str] | None = None,
              overrides: dict[str, Any] | None = None) -> Result:
        """Validate and run every check. Touches nothing. ``overrides`` replace the
        spec's options, as for :meth:`run` (a quiesce mode changes what is checked)."""
        txid = new_txid()
        try:
            actions, options = bind(tx, self.registry, allow_exec=allow_exec, roots=roots, overrides=overrides)
        except InvalidTransaction as exc:
            return Result(txid, INVALID, problems=exc.problems, checked_only=True)
        ctx = RunContext(txid, options, tx.base_dir, self.registry.pm.hook)
        try:
            problems = self.check_actions(actions, ctx, tx.file)
        finally:
            ctx.close()
        if problems:
            return Result(txid, INVALID, actions=actions, problems=problems, checked_only=True)
        return Result(txid, COMMITTED, actions=actions, checked_only=True)

    def run(self, tx: Transaction, *, allow_exec: bool = False, roots: list[str] | None = None,
            overrides: dict[str, Any] | None = None) -> Result:
        """Run ``tx`` all-or-none and report what happened."""
        txid = new_txid()
        try:
            actions, options = bind(tx, self.registry, allow_exec=allow_exec, roots=roots, overrides=overrides)
        except InvalidTransaction as exc:
            return Result(txid, INVALID, problems=exc.problems)
        return self.run_actions(actions, options, base_dir=tx.base_dir, file=tx.file, txid=txid)

    def run_actions(self, actions: list[Action], options: Options, *, base_dir: str,
                    file: str | None = None, txid: str | None = None) -> Result:
        txid = txid or new_txid()
        started = time.perf_counter()
        # The actions live for the whole run: keep the cyclic GC from rescanning them
        # on every collection, which made large runs superlinear.
        frozen = len(actions) >= 1000 and gc.isenabled()
        if frozen:
            gc.freeze()
        ctx = RunContext(txid, options, base_dir, self.registry.pm.hook)
        result = Result(txid, ROLLED_BACK, actions=actions)
        try:
            t = time.perf_counter()
            problems = self.check_actions(actions, ctx, file)
            result.phases["check"] = time.perf_counter() - t
            if problems:
                result.outcome, result.problems = INVALID, problems
                return result
            targets = sorted({a.target for a in actions})
            with self.locker.acquire(txid, targets), self._signals():
                self._execute(actions, ctx, result, file)
        except InvalidTransaction as exc:  # a lock or journal refusal before anything ran
            result.outcome, result.problems = INVALID, exc.problems
        finally:
            if frozen:
                gc.unfreeze()
            result.warnings.extend(ctx.close())
            result.seconds = time.perf_counter() - started
            self._emit("outcome", txid, message=result.summary(), seconds=result.seconds)
        return result

    # -- phases ----------------------------------------------------------------------

    def check_actions(self, actions: list[Action], ctx: RunContext, file: str | None) -> list[Problem]:
        """Phase 2: every check, every conflict. All refusals are returned at once."""
        problems: list[Problem] = []

        def refuse(a: Action, exc: BaseException) -> None:
            hint = exc.hint if isinstance(exc, Refused) else None
            problems.append(Problem(str(exc) or type(exc).__name__, file, a.line, None, a.index,
                                    None, a.target, hint))

        by_index = {a.index: a for a in actions}
        for atype, group in _by_type(actions):
            if atype.batched:
                try:
                    atype.check_many(group, ctx)
                except ActionFailures as exc:
                    for index, err in exc.failures.items():
                        refuse(by_index[index], err)
                    for index in exc.not_started:  # a check that did not run is no pass
                        refuse(by_index[index], RuntimeError(f"not checked: {atype.name} gave up on its batch"))
                except Exception as exc:  # noqa: BLE001 - a failed batch check refuses the whole batch
                    for a in group:
                        refuse(a, exc)
            else:
                for a in group:
                    try:
                        atype.check(a, ctx)
                    except Exception as exc:  # noqa: BLE001 - every check error is a refusal
                        refuse(a, exc)
        on_target: dict[str, list[Action]] = {}
        for a in actions:
            on_target.setdefault(a.target, []).append(a)
        for target, group in on_target.items():
            if len(group) > 1 and not all(a.type.shares_target for a in group):
                for a in group[1:]:
                    problems.append(Problem(
                        f"conflicts with action #{group[0].index} ({group[0].type.name}) on the same target",
                        file, a.line, None, a.index, None, target,
                        "a target can be changed by several actions only when every one of their types allows it; "
                        "split the transaction"))
        problems.sort(key=lambda p: (p.action if p.action is not None else -1))
        return problems

    def _execute(self, actions: list[Action], ctx: RunContext, result: Result, file: str | None) -> None:
        txid = ctx.txid
        options = ctx.options
        journal = self.journal
        journal.begin(txid, {"file": file, "base_dir": ctx.base_dir, "options": options.__dict__}, actions)
        undoable = [a for a in actions if not a.type.finalize]
        finals = [a for a in actions if a.type.finalize]
        touched: set[int] = set()
        holds = result.holds
        try:
            try:
                self._raise_if_interrupted()
                quiesced = options.quiesce != "none"
                # An invalidate that no type implements changes nothing: journaling it
                # would only lengthen the quiesce window.
                has_invalidate = any(_implements(a.type, "invalidate") for a in undoable)
                last = "invalidate" if has_invalidate else "do"
                # With a quiesce mode, types whose do only prepares run it before the window.
                early = [a for a in undoable if a.type.do_before_quiesce] if quiesced else []
                late = [a for a in undoable if not a.type.do_before_quiesce] if early else undoable
                # The do intent (every action started, its undo facts) goes before the
                # window, not inside it: recover cancels a started action whether or not
                # its do ran, so this is no earlier a promise.
                if quiesced:
                    journal.intent(txid, "quiesce", actions)
                journal.intent(txid, "do", undoable)
                between = False  # do's results and the invalidate intent journaled yet?
                if early:
                    self._timed_phase("do", early, ctx, touched, result, label="do (before quiesce)")
                    if not late and has_invalidate:
                        self._between(txid, undoable)
                        between = True
                if quiesced and self._quiesce(ctx, actions, holds):
                    journal.holds(txid, holds, resumed=False)  # holds no hook announced first
                if late or not early:
                    self._timed_phase("do", late, ctx, touched, result)
                if has_invalidate and not between:
                    self._between(txid, undoable)
                self._timed_phase("invalidate", undoable, ctx, touched, result)
                # The last phase's results and COMMITTED are one durable write: one
                # fsync less between the last step and the end of the quiesce window.
                with together(journal):
                    journal.done(txid, last, undoable)
                    journal.outcome(txid, TX_COMMITTED, {})
                result.committed = True
            except Exception as exc:  # noqa: BLE001 - whatever failed before the commit point rolls back
                if isinstance(exc, _PhaseFailed):
                    result.failures = exc.failures
                elif isinstance(exc, Interrupted):
                    result.failures = [Failure("interrupt", f"interrupted by {self._interrupt}")]
                else:  # a journal write or a plugin's hook failed outside any action's step
                    result.failures = [Failure("run", f"{type(exc).__name__}: {exc}")]
                result.failure = result.failures[0]
                self._emit("failure", txid, message=str(result.failure))
                self._rollback(undoable, ctx, touched, result)
        finally:
            # Resumed before the journal hears the end: no window waits for a write.
            if holds:
                self._resume(ctx, holds, result)
        if not result.committed:
            assert result.failure is not None
            with together(journal):  # a hold whose resume failed leaves it NEEDS_RECOVERY
                journal.holds(txid, holds, resumed=True)
                journal.done(txid, "end", actions)
                journal.outcome(txid, TX_ABORTED, {"failure": result.failure.to_json(),
                                                   "leftovers": [str(lo) for lo in result.leftovers]})
            result.outcome = NEEDS_RECOVERY if result.leftovers else ROLLED_BACK
            return
        if holds:
            journal.holds(txid, holds, resumed=True)
        if finals or any(a.type.has_finish for a in undoable):
            self._finalize(finals, ctx, result)
        # Committed, but a VM left paused (its resume failed) still needs `blktx recover`.
        unfinished = result.pending or result.leftovers
        result.outcome = NEEDS_RECOVERY if unfinished else COMMITTED
        journal.done(txid, "end", actions)
        journal.outcome(txid, TX_COMMITTED if unfinished else TX_DONE,
                        {"pending": [p.to_json() for p in result.pending],
                         "leftovers": [str(lo) for lo in result.leftovers]})

    def _between(self, txid: str, undoable: list[Action]) -> None:
        """do's results and the invalidate intent: one durable write."""
        with together(self.journal):
            self.journal.done(txid, "do", undoable)
            self.journal.intent(txid, "invalidate", undoable)

    def _timed_phase(self, step: str, actions: list[Action], ctx: RunContext, touched: set[int], result: Result,
                     label: str | None = None) -> None:
        t = time.perf_counter()
        self._phase(step, actions, ctx, touched, ctx.options.jobs, label=label)
        result.phases[step] = result.phases.get(step, 0.0) + time.perf_counter() - t
        self._raise_if_interrupted()

    def _phase(self, step: str, actions: Sequence[Action], ctx: RunContext, touched: set[int],
               jobs: int, *, reverse: bool = False, label: str | None = None) -> None:
        """Run one step over ``actions`` in lockstep; raise _PhaseFailed on any failure.
        ``label`` names the phase in progress events (default: the step)."""
        parallel = jobs > 1
        units = _units(actions, reverse, parallel)
        failures: list[Failure] = []
        lock = threading.Lock()
        total = len(actions)
        self._emit("phase-start", ctx.txid, phase=label or step, total=total)

        def run_unit(unit: list[Action]) -> None:
            if failures or self._interrupt:
                return
            errors = self._step(step, unit, ctx, touched)
            if errors:
                with lock:
                    failures.extend(errors)

        if not parallel or len(units) <= 1:
            for unit in units:
                run_unit(unit)
                if failures or self._interrupt:
                    break
        else:
            with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="blktx") as pool:
                list(pool.map(run_unit, units))
        self._emit("phase-end", ctx.txid, phase=label or step, total=total, count=len(failures))
        if failures:
            failures.sort(key=lambda f: f.action if f.action is not None else -1)
            raise _PhaseFailed(failures)

    def _step(self, step: str, unit: list[Action], ctx: RunContext, touched: set[int]) -> list[Failure]:
        """Run ``step`` on one unit (a batch of one type, or one target's actions)."""
        atype = unit[0].type
        events = atype.lifecycle.machine.events[step]
        for a in unit:
            if a.state not in events.transitions:
                raise RuntimeError(f"executor bug: {step} from {a.state} is not allowed for {a!r}")
        failures: list[Failure] = []
        if atype.batched:
            touched.update(a.index for a in unit)
            t = time.perf_counter()
            failed: dict[int, BaseException] = {}
            skipped: set[int] = set()
            try:
                getattr(atype, step + "_many")(unit, ctx)
            except ActionFailures as exc:
                failed, skipped = exc.failures, set(exc.not_started)
            except Exception as exc:  # noqa: BLE001 - the backend's message is the report
                failed = {a.index: exc for a in unit}
            spent = (time.perf_counter() - t) / len(unit)
            for a in unit:
                if a.index in skipped:
                    touched.discard(a.index)
                    continue
                a.timed(step, spent)
                err = failed.get(a.index)
                if err is None:
                    events.trigger(a)
                    self._emit_action(ctx, step, a)
                else:
                    failures.append(self._fail(a, step, err))
            return failures
        method: Callable[[Action, RunContext], None] = getattr(atype, step)
        for a in unit:
            touched.add(a.index)
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
            events.trigger(a)
            if self._observed:
                self._emit_action(ctx, step, a)
        return failures

    def step(self, step: str, actions: list[Action], ctx: RunContext) -> list[Failure]:
        """Run one lifecycle step on ``actions`` (for test kits and tools): the same
        legality check, callbacks and machine transitions as a run, without phases,
        journal or rollback. Returns the failures; an illegal step raises RuntimeError."""
        failures: list[Failure] = []
        for unit in _units(actions, reverse=step == "cancel"):
            failures += self._step(step, unit, ctx, set())
        return failures

    def _fail(self, a: Action, step: str, exc: BaseException) -> Failure:
        message = str(exc) or type(exc).__name__
        a.error, a.failed_phase = message, step
        return Failure(step, message, a.index, a.type.name, a.target)

    def _rollback(self, undoable: list[Action], ctx: RunContext, touched: set[int], result: Result) -> None:
        """Cancel every action that may have changed something, newest first."""
        victims = [a for a in undoable if a.state in LIVE_STATES or (a.index in touched and a.state == START)]
        if not victims:
            return
        t = time.perf_counter()
        self.journal.intent(ctx.txid, "cancel", victims)
        remaining = victims
        for _attempt in range(ctx.options.cancel_retries + 1):
            try:
                self._cancel_all(remaining, ctx, touched)
            finally:
                remaining = [a for a in remaining if a.state != CANCELED]
            if not remaining:
                break
        self.journal.done(ctx.txid, "cancel", victims)
        result.phases["cancel"] = time.perf_counter() - t
        for a in sorted(remaining, key=lambda a: -a.index):
            try:
                result.leftovers.extend(a.type.leftovers(a))
            except Exception as exc:  # noqa: BLE001 - still name the action that left something
                result.leftovers.append(Leftover(a.target, f"{a.type.name} action #{a.index}: {exc}"))

    def _cancel_all(self, actions: list[Action], ctx: RunContext, touched: set[int]) -> None:
        """Cancel every action, newest first, going on past failures (up to ``jobs`` at once)."""
        jobs = ctx.options.jobs
        units = _units(actions, reverse=True, parallel=jobs > 1)
        if jobs <= 1 or len(units) <= 1:
            for unit in units:
                self._step("cancel", unit, ctx, touched)
        else:
            with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="blktx") as pool:
                list(pool.map(lambda u: self._step("cancel", u, ctx, touched), units))

    def _finalize(self, finals: list[Action], ctx: RunContext, result: Result) -> None:
        """Roll forward after the commit point: finalize actions, then ``finish`` steps.

        Each is retried; what still fails is reported pending for ``blktx recover``.
        """
        t = time.perf_counter()
        remaining = finals
        # Every undoable action of a committed transaction took effect; one rebuilt from
        # the journal may still say CREATED when its type's invalidate wrote nothing.
        unfinished = [a for a in result.actions
                      if a.type.has_finish and not a.type.finalize and a.state in (CREATED, INVALIDATED)]
        for attempt in range(ctx.options.finalize_retries + 1):
            if attempt:
                time.sleep(ctx.options.retry_delay * attempt)
            self.journal.intent(ctx.txid, "finalize", remaining + unfinished)
            self.step("do", [a for a in remaining if a.state == START], ctx)
            self.step("invalidate", [a for a in remaining if a.state == CREATED], ctx)
            unfinished = [a for a in unfinished if not self._finish(a, ctx)]
            self.journal.done(ctx.txid, "finalize", remaining + unfinished)
            remaining = [a for a in remaining if a.state != INVALIDATED]
            if not (remaining or unfinished) or self._interrupt:
                break
        result.phases["finalize"] = time.perf_counter() - t
        result.pending = [Failure("finalize" if a.type.finalize else "finish", a.error or "interrupted before it ran",
                                  a.index, a.type.name, a.target) for a in remaining + unfinished]

    def _finish(self, a: Action, ctx: RunContext) -> bool:
        t = time.perf_counter()
        try:
            a.type.finish(a, ctx)
        except Exception as exc:  # noqa: BLE001 - reported as pending, never rolled back
            self._fail(a, "finish", exc)
            return False
        finally:
            a.timed("finish", time.perf_counter() - t)
        a.error = a.failed_phase = None
        return True

    # -- quiesce ---------------------------------------------------------------------

    def _quiesce(self, ctx: RunContext, actions: list[Action], holds: list[Hold]) -> bool:
        """Run the quiesce hooks; return whether some hold is not in the journal yet."""
        unjournaled = False

        def announced(new: list[Hold]) -> None:
            for hold in new:
                if not any(h is hold for h in holds):
                    holds.append(hold)
            self.journal.holds(ctx.txid, holds, resumed=False)

        ctx.on_hold = announced
        failure: Exception | None = None
        for impl in self.registry.pm.hook.blktx_quiesce.get_hookimpls():
            kwargs: dict[str, Any] = {"ctx": ctx, "actions": actions}
            try:
                got = cast("list[Hold] | None", impl.function(**{k: kwargs[k] for k in impl.argnames}))
            except Exception as exc:  # noqa: BLE001 - the other plugins' holds are still resumed
                failure = exc
                break
            for hold in got or []:
                hold.start = hold.start or time.monotonic()
                if not any(h is hold for h in holds):
                    holds.append(hold)
                    unjournaled = True
                self._emit("quiesced", ctx.txid, target=hold.target, message=hold.kind)
        if failure is not None:
            self.journal.holds(ctx.txid, holds, resumed=False)
            raise _PhaseFailed([Failure("quiesce", str(failure))])
        return unjournaled

    def _resume(self, ctx: RunContext, holds: list[Hold], result: Result) -> None:
        """Resume every hold, newest first: each run of holds of one kind through
        ``blktx_resume_many`` when a plugin takes them together, the rest one by one
        (many at once)."""
        order = list(reversed(holds))
        runs: list[list[Hold]] = []
        for hold in order:
            if runs and runs[-1][0].kind == hold.kind:
                runs[-1].append(hold)
            else:
                runs.append([hold])
        for run in runs:
            single = run
            if len(run) > 1:
                taken: set[int] = set()
                try:
                    for got in self.registry.pm.hook.blktx_resume_many(ctx=ctx, holds=run):
                        taken.update(id(h) for h in got or [])
                except Exception as exc:  # noqa: BLE001 - fall back to one by one
                    result.warnings.append(f"resuming {run[0].kind} holds together failed ({exc}); one by one")
                for hold in run:
                    if id(hold) in taken:
                        self._ended(ctx, hold)
                single = [h for h in run if id(h) not in taken]
            if len(single) > 1:
                with ThreadPoolExecutor(max_workers=min(len(single), 32), thread_name_prefix="blktx-resume") as pool:
                    list(pool.map(lambda h: self._resume_one(ctx, h, result), single))
            elif single:
                self._resume_one(ctx, single[0], result)

    def _resume_one(self, ctx: RunContext, hold: Hold, result: Result) -> None:
        """Resume one hold; its window ends (``hold.end``) only if a plugin resumed it."""
        try:
            done = self.registry.pm.hook.blktx_resume(ctx=ctx, hold=hold)
        except Exception as exc:  # noqa: BLE001 - keep resuming the others
            result.leftovers.append(Leftover(hold.target, f"still {hold.kind} (resume failed: {exc})"))
            return
        if not done:
            result.leftovers.append(Leftover(hold.target, f"still {hold.kind}: no installed plugin resumes it"))
            return
        self._ended(ctx, hold)

    def _ended(self, ctx: RunContext, hold: Hold) -> None:
        """A hold was resumed: its window ends now, unless its plugin said when."""
        hold.end = hold.end or time.monotonic()
        self._emit("resumed", ctx.txid, target=hold.target, message=hold.kind, seconds=hold.window or 0.0)

    # -- signals and events ----------------------------------------------------------

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        self._interrupt = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: FrameType | None) -> None:
            self._interrupt = signal.Signals(signum).name

        # A signal the caller ignores (a background job's SIGINT, nohup) stays ignored.
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)
               if signal.getsignal(s) is not signal.SIG_IGN}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def interrupt(self, why: str = "request") -> None:
        """Ask a running transaction to stop; before the commit point it rolls back."""
        self._interrupt = why

    def _raise_if_interrupted(self) -> None:
        if self._interrupt:
            raise Interrupted(self._interrupt)

    def _emit(self, kind: str, txid: str, **fields: Any) -> None:
        if not self._observed:
            return
        for impl in self.registry.pm.hook.blktx_event.get_hookimpls():
            with contextlib.suppress(Exception):
                impl.function(event=Event(kind, txid, **fields))

    def _emit_action(self, ctx: RunContext, step: str, a: Action) -> None:
        if self._observed:
            self._emit("action", ctx.txid, phase=step, action=a.index, state=a.state, target=a.target)


def together(journal: Journal) -> contextlib.AbstractContextManager[None]:
    """The journal's way of making several writes one (``SqliteJournal.together``),
    or nothing for a journal without one."""
    batch = getattr(journal, "together", None)
    return batch() if batch is not None else contextlib.nullcontext()


def _implements(atype: ActionType, step: str) -> bool:
    cls = type(atype)
    return getattr(cls, step) is not getattr(ActionType, step) or (
        getattr(cls, step + "_many") is not getattr(ActionType, step + "_many"))


def _by_type(actions: Sequence[Action]) -> list[tuple[ActionType, list[Action]]]:
    groups: dict[int, tuple[ActionType, list[Action]]] = {}
    for a in actions:
        groups.setdefault(id(a.type), (a.type, []))[1].append(a)
    return list(groups.values())


def _units(actions: Sequence[Action], reverse: bool, parallel: bool = False) -> list[list[Action]]:
    """Split a phase into units that run one after another (or ``parallel``).

    Serially, the order of the actions is kept exactly (reversed for cancel);
    consecutive actions of one batched type form one batch. In parallel, each
    batched type is one unit and every other target is one unit, so order is kept
    per target while different targets run at once.
    """
    ordered = list(reversed(actions)) if reverse else list(actions)
    if parallel:
        groups: dict[Any, list[Action]] = {}
        for a in ordered:
            groups.setdefault(id(a.type) if a.type.batched else a.target, []).append(a)
        return list(groups.values())
    units: list[list[Action]] = []
    for a in ordered:
        if units and a.type.batched and units[-1][0].type is a.type:
            units[-1].append(a)
        else:
            units.append([a])
    return units
