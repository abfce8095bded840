"""``blktx recover``: finish every transaction a dead run left unfinished.

For each unfinished transaction in the journal whose claim no live process holds,
recover takes the claim over (so no run can start on its targets meanwhile),
rebuilds a :class:`~blktx.transaction.TransactionRun` from the journal and moves its
machine with ``recover``: one that had not reached its commit point rolls back
(cancelling every action that may have started, newest first), a committed one
rolls forward (pending finalize and finish steps). Either way what the dead run
quiesced is resumed. The claim is removed only when the transaction is over.
Every step is idempotent, so recover is safe to interrupt and run again.
"""

from __future__ import annotations

from typing import Any

from blktx.actiontype import Action
from blktx.context import Options, RunContext, spec_options
from blktx.errors import InvalidTransaction
from blktx.events import Hold
from blktx.journal import UNFINISHED, SqliteJournal
from blktx.locks import Locker
from blktx.plugins import Registry
from blktx.spec import ActionSpec, Transaction, bind
from blktx.states import TX_FINAL, TxState
from blktx.status import status
from blktx.transaction import TransactionRun


def recover(
    journal: SqliteJournal, registry: Registry, locker: Locker, txid: str | None = None, *, allow_exec: bool = False
) -> list[dict[str, Any]]:
    """Recover every unfinished transaction (or only ``txid``); return what was done
    to each. ``allow_exec`` is the caller's, never the journal's: a cancel that runs
    a command needs it again."""
    report = []
    for tx in reversed(journal.transactions(limit=1_000_000, statuses=[s.value for s in UNFINISHED])):
        if txid and not tx["txid"].startswith(txid):
            continue
        report.append(recover_one(journal, registry, locker, tx["txid"], allow_exec=allow_exec))
    locker.sweep()  # claims of runs killed after their last journal write
    return report


def rebuild(tx: dict[str, Any], registry: Registry, allow_exec: bool) -> tuple[list[Action], Options]:
    """The journal's actions, validated again as a spec would be: known types, valid
    parameters, every path under the roots recorded with the run. Raises
    :class:`InvalidTransaction` when the journal's record does not validate."""
    recorded = tx["options"]
    overrides = {k: v for k, v in recorded.items() if k in spec_options()}
    spec = Transaction(
        [ActionSpec(row["type"], _given(registry, row["type"], row["params"] or {})) for row in tx["actions"]],
        base_dir=tx["base_dir"] or "/",
    )
    actions, options = bind(
        spec,
        registry,
        allow_exec=allow_exec,
        roots=list(recorded.get("roots") or []) or None,
        overrides=overrides,
        vm_roots=list(recorded.get("vm_roots") or []),
        allow_tcp=bool(recorded.get("allow_tcp")),
        shared_folders=bool(recorded.get("shared_folders")),
    )
    options.extra = dict(recorded.get("extra") or {})  # the [options.<plugin>] tables, as the run had them
    for a, row in zip(actions, tx["actions"], strict=True):
        a.index = row["index"]
        a.target = row["target"]  # as refined by its check; locked with what bind resolved
    return actions, options  # states and undo facts are read again under the claim


def _given(registry: Registry, type_name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The journaled parameters less those at their declared default (None, "", a
    default path): the type fills those in again exactly as the run did."""
    atype = registry.get(type_name)
    defaults = {p.name: p.default for p in atype.params} if atype is not None else {}
    return {
        k: v
        for k, v in params.items()
        if v is not None and not (k in defaults and (v == defaults[k] or (not defaults[k] and not v)))
    }


def recover_one(
    journal: SqliteJournal, registry: Registry, locker: Locker, txid: str, *, allow_exec: bool = False
) -> dict[str, Any]:
    tx = journal.transaction(txid)
    assert tx is not None
    missing = sorted({a["type"] for a in tx["actions"] if registry.get(a["type"]) is None})
    if missing:
        return {
            "txid": txid,
            "outcome": "needs recovery",
            "state": tx["status"],
            "message": f"the plugins for {', '.join(missing)} are not installed; install them and run again",
        }
    try:
        actions, options = rebuild(tx, registry, allow_exec)
    except InvalidTransaction as exc:
        return {
            "txid": txid,
            "outcome": "needs recovery",
            "state": tx["status"],
            "message": "the journal's record of this transaction does not validate; recover acts on nothing it "
            "cannot confine: " + "; ".join(str(p) for p in exc.problems),
        }
    claims = [t for a in actions for t in a.claims()] + [a["target"] for a in tx["actions"]]
    claim = locker.take_over(txid, journal.path, claims)
    if claim is None:
        return {
            "txid": txid,
            "outcome": "running",
            "state": tx["status"],
            "message": "its run (or another recover) is still alive: the kernel lock on its claim is held",
        }
    # Read again under the claim: the run may have finished between the first read
    # and the take-over (recover must never act on a copy older than the claim).
    fresh = journal.transaction(txid)
    if fresh is None or TxState(fresh["status"]) in TX_FINAL:
        locker.release(claim, finished=fresh is not None and TxState(fresh["status"]) in TX_FINAL)
        return {
            "txid": txid,
            "outcome": status(fresh["status"]).outcome if fresh else "invalid",
            "state": fresh["status"] if fresh else None,
            "message": "its run finished while recover started: nothing to do",
        }
    tx = fresh
    for a, row in zip(actions, tx["actions"], strict=True):
        a.state, a.undo = row["state"], row["undo"] or {}
    ctx = RunContext(txid, options, tx["base_dir"] or "/", registry.pm.hook)
    run = TransactionRun(txid, actions, ctx, journal=journal, locker=locker, state=TxState(tx["status"]))
    run.claim = claim
    # Every hold, in the order taken; those already resumed keep a closed window.
    run.result.holds = [
        Hold(h["kind"], h["target"], h["data"], h["start"] or 0.0, 0.0 if h["resumed"] else None) for h in tx["holds"]
    ]
    try:
        what = run.recover()
        if run.state in TX_FINAL:
            run.cleanup()
    finally:
        run.result.warnings.extend(ctx.close())
        run.end()
    result = run.result
    left = [str(lo) for lo in result.leftovers] + [f"{p.type} #{p.action} on {p.target}: {p.message}" for p in result.pending]
    out: dict[str, Any] = {
        "txid": txid,
        "outcome": status(run.state).outcome,
        "state": run.state.value,
        "message": what if run.state in TX_FINAL else f"{what} partly",
        "actions": len(actions),
    }
    if left:
        out["left"] = left
    if result.warnings:
        out["warnings"] = result.warnings
    return out


def forget(journal: SqliteJournal, locker: Locker, txid: str) -> dict[str, Any]:
    """``blktx recover --forget TXID``: a person says what a transaction left behind
    is settled (removed by hand, or kept on purpose). Only a transaction that
    recover already tried (ROLLBACK_INCOMPLETE or FINALIZE_INCOMPLETE) can be
    forgotten, or a dead run's claim whose journal has no such transaction (a lost
    journal). Its claim is released; the journal keeps the record."""
    from blktx.states import TxLifecycle

    tx = journal.transaction(txid)
    if tx is None:
        from blktx.locks import journal_state

        for found in locker.claims():
            if found.get("txid") != txid or found.get("live"):
                continue
            own = str(found.get("journal") or "")
            if own and isinstance(journal_state(own, txid), TxState):
                return {
                    "txid": txid,
                    "outcome": "invalid",
                    "message": f"its own journal {own} knows it: run `blktx recover --journal {own}` "
                    "(and --forget with that journal, if recover cannot finish it)",
                }
            locker.forget_claim(txid)
            return {
                "txid": txid,
                "outcome": "forgotten",
                "message": f"its claim was released (its journal {own or '(none)'} is lost)",
            }
        return {"txid": txid, "outcome": "invalid", "message": "no such transaction, and no dead claim of it"}
    state = TxState(tx["status"])
    if not TxLifecycle.allowed("forget", state):
        return {
            "txid": tx["txid"],
            "outcome": "invalid",
            "state": state.value,
            "message": f"a transaction in {state.value} cannot be forgotten: run `blktx recover` first",
        }
    claim = locker.take_over(tx["txid"], journal.path, [a["target"] for a in tx["actions"]])
    if claim is None:
        return {"txid": tx["txid"], "outcome": "running", "state": state.value, "message": "a live process holds it"}
    after = TxLifecycle.next("forget", state)
    detail = dict(tx["detail"] or {})
    detail["forgotten"] = {"from": state.value, "left": detail.get("leftovers") or detail.get("pending") or []}
    journal.state(tx["txid"], after, detail)
    locker.release(claim, finished=True)
    return {
        "txid": tx["txid"],
        "outcome": status(after).outcome,
        "state": after.value,
        "message": f"forgotten: {state.value} -> {after.value}; what it left is yours to keep or remove",
    }
