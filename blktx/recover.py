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

import dataclasses
from typing import Any

from blktx.actiontype import Action
from blktx.context import Options, RunContext
from blktx.events import Hold
from blktx.journal import UNFINISHED, SqliteJournal
from blktx.locks import Locker
from blktx.plugins import Registry
from blktx.states import TX_FINAL, TxState
from blktx.status import status
from blktx.transaction import TransactionRun

_OPTION_FIELDS = {f.name for f in dataclasses.fields(Options)}


def recover(journal: SqliteJournal, registry: Registry, locker: Locker,
            txid: str | None = None) -> list[dict[str, Any]]:
    """Recover every unfinished transaction (or only ``txid``); return what was done to each."""
    report = []
    for tx in reversed(journal.transactions(limit=1_000_000, statuses=[s.value for s in UNFINISHED])):
        if txid and not tx["txid"].startswith(txid):
            continue
        report.append(recover_one(journal, registry, locker, tx["txid"]))
    locker.sweep()  # claims of runs killed after their last journal write
    return report


def recover_one(journal: SqliteJournal, registry: Registry, locker: Locker, txid: str) -> dict[str, Any]:
    tx = journal.transaction(txid)
    assert tx is not None
    missing = sorted({a["type"] for a in tx["actions"] if registry.get(a["type"]) is None})
    if missing:
        return {"txid": txid, "outcome": "needs recovery", "state": tx["status"],
                "message": f"the plugins for {', '.join(missing)} are not installed; install them and run again"}
    claim = locker.take_over(txid, journal.path, [a["target"] for a in tx["actions"]])
    if claim is None:
        return {"txid": txid, "outcome": "running", "state": tx["status"],
                "message": "its run (or another recover) is still alive: the kernel lock on its claim is held"}
    options = Options(**{k: v for k, v in tx["options"].items() if k in _OPTION_FIELDS})
    ctx = RunContext(txid, options, tx["base_dir"] or "/", registry.pm.hook)
    actions = []
    for row in tx["actions"]:
        atype = registry.get(row["type"])
        assert atype is not None
        a = Action(row["index"], atype, row["params"], row["target"])
        a.state, a.undo = row["state"], row["undo"] or {}
        actions.append(a)
    run = TransactionRun(txid, actions, ctx, journal=journal, locker=locker, state=TxState(tx["status"]))
    run.claim = claim
    # Every hold, in the order taken; those already resumed keep a closed window.
    run.result.holds = [Hold(h["kind"], h["target"], h["data"], h["start"] or 0.0, 0.0 if h["resumed"] else None)
                        for h in tx["holds"]]
    try:
        what = run.recover()
        if run.state in TX_FINAL:
            run.cleanup()
    finally:
        run.result.warnings.extend(ctx.close())
        run.end()
    result = run.result
    left = [str(lo) for lo in result.leftovers] + [f"{p.type} #{p.action} on {p.target}: {p.message}"
                                                  for p in result.pending]
    out: dict[str, Any] = {"txid": txid, "outcome": status(run.state).outcome, "state": run.state.value,
                           "message": what if run.state in TX_FINAL else f"{what} partly", "actions": len(actions)}
    if left:
        out["left"] = left
    if result.warnings:
        out["warnings"] = result.warnings
    return out
