"""The executor: binds a spec, builds a :class:`~blktx.transaction.TransactionRun`
and drives it, with signals turned into interrupts. The transaction's own machine
(:mod:`blktx.transaction`) decides every step; see docs/semantics.md for the
contract it keeps.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

from blktx.actiontype import Action
from blktx.checks import check_actions
from blktx.context import Options, RunContext
from blktx.dispatch import no_gc_rescans
from blktx.errors import InvalidTransaction, Problem
from blktx.locks import NullLocker
from blktx.plugins import Registry, default_registry
from blktx.result import Failure, Result
from blktx.spec import Transaction, bind
from blktx.states import TxState
from blktx.transaction import (
    Interrupt,
    Journal,
    Locker,
    NullJournal,
    TransactionRun,
)

__all__ = ["Executor", "Journal", "Locker", "NullJournal", "NullLocker", "new_txid"]

#: Signals that stop a run: before the commit point it rolls back, after it finishes.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def new_txid() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + os.urandom(4).hex()


class Executor:
    """Runs transactions all-or-none. One executor can run many transactions in turn."""

    def __init__(self, registry: Registry | None = None, journal: Journal | None = None, locker: Locker | None = None) -> None:
        self.registry = registry or default_registry()
        self.journal: Journal = journal or NullJournal()
        self.locker: Locker = locker or NullLocker()
        self._interrupt = Interrupt()
        self._observed = bool(self.registry.pm.hook.blktx_event.get_hookimpls())

    # -- entry points --------------------------------------------------------------

    def check(
        self,
        tx: Transaction,
        *,
        allow_exec: bool = False,
        roots: list[str] | None = None,
        overrides: dict[str, Any] | None = None,
        **trust: Any,
    ) -> Result:
        """Validate and run every check. Touches nothing (and takes no lock).
        ``overrides`` and ``trust`` as for :meth:`run`."""
        bound = self.bind(tx, checked_only=True, allow_exec=allow_exec, roots=roots, overrides=overrides, **trust)
        if isinstance(bound, Result):
            return bound
        txid, actions, options = bound
        ctx = RunContext(txid, options, tx.base_dir, self.registry.pm.hook)
        try:
            problems = check_actions(actions, ctx, tx.file)
        finally:
            ctx.close()
        if problems:
            return Result(txid, TxState.INVALID, actions=actions, problems=problems, checked_only=True)
        return Result(txid, TxState.CHECKED, actions=actions, checked_only=True)

    def check_actions(self, actions: list[Action], ctx: RunContext, file: str | None) -> list[Problem]:
        """Every check and conflict of bound actions; all refusals at once."""
        return check_actions(actions, ctx, file)

    def run(
        self,
        tx: Transaction,
        *,
        allow_exec: bool = False,
        roots: list[str] | None = None,
        overrides: dict[str, Any] | None = None,
        **trust: Any,
    ) -> Result:
        """Run ``tx`` all-or-none and report what happened. ``overrides`` replace the
        spec's options; ``allow_exec``, ``roots`` and ``trust`` (``vm_roots``,
        ``allow_tcp``, ``shared_folders``) are the caller's, never the spec's: see
        docs/security.md."""
        bound = self.bind(tx, allow_exec=allow_exec, roots=roots, overrides=overrides, **trust)
        if isinstance(bound, Result):
            return bound
        txid, actions, options = bound
        return self.run_actions(actions, options, base_dir=tx.base_dir, file=tx.file, txid=txid, description=tx.description)

    def bind(self, tx: Transaction, *, checked_only: bool = False, **given: Any) -> tuple[str, list[Action], Options] | Result:
        """``tx`` bound for a run: a new transaction id, its actions and options; or the
        INVALID result naming every problem. ``given``: :func:`~blktx.spec.bind`'s
        caller settings (``allow_exec``, ``roots``, ``overrides``, trust). Touches nothing."""
        txid = new_txid()
        try:
            actions, options = bind(tx, self.registry, txid=txid, **given)
        except InvalidTransaction as exc:
            return Result(txid, TxState.INVALID, problems=exc.problems, checked_only=checked_only)
        return txid, actions, options

    def run_actions(
        self,
        actions: list[Action],
        options: Options,
        *,
        base_dir: str,
        file: str | None = None,
        txid: str | None = None,
        description: str = "",
    ) -> Result:
        txid = txid or new_txid()
        started = time.perf_counter()
        ctx = RunContext(txid, options, base_dir, self.registry.pm.hook)
        run = TransactionRun(
            txid,
            actions,
            ctx,
            journal=self.journal,
            locker=self.locker,
            file=file,
            interrupt=self._interrupt,
            observed=self._observed,
            description=description,
        )
        result = run.result
        try:
            with no_gc_rescans(actions), self._signals():
                run.run()
        finally:
            self._interrupt = Interrupt()  # the next run starts uninterrupted
            result.warnings.extend(ctx.close())
            result.seconds = time.perf_counter() - started
            run._emit("outcome", message=result.summary(), seconds=result.seconds)
        return result

    def step(self, step: str, actions: list[Action], ctx: RunContext) -> list[Failure]:
        """Run one lifecycle step on ``actions`` (for test kits and tools): the same
        legality check, callbacks and machine moves as a run, without phases,
        journal or rollback. A ``do`` begins the actions first. Returns the
        failures; an illegal step raises :class:`~blktx.states.IllegalStep`."""
        run = TransactionRun(ctx.txid, actions, ctx, observed=self._observed)
        return run.phase(step, actions)

    # -- signals ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        interrupt = self._interrupt

        def handler(signum: int, frame: FrameType | None) -> None:
            interrupt.why = signal.Signals(signum).name

        # A signal the caller ignores (a background job's SIGINT, nohup) stays ignored.
        old = {s: signal.signal(s, handler) for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def interrupt(self, why: str = "request") -> None:
        """Ask the running (or the next) transaction to stop: before its commit point
        it rolls back; before it touched anything it ends at once."""
        self._interrupt.why = why
