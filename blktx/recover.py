"""``blktx recover``: finish every transaction a dead run left unfinished.

Rolls back what has no COMMITTED record (cancelling every action whose step may
have started, newest first), rolls forward committed ones (pending finalize and
finish steps), resumes what the dead run quiesced, and releases its locks. Every
step is idempotent, so recover is safe to interrupt and run again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from blktx.actiontype import Action
from blktx.context import Options, RunContext
from blktx.events import Hold
from blktx.executor import Executor
from blktx.journal import ABORTED, DONE, NEEDS_RECOVERY, UNFINISHED, SqliteJournal, _alive
from blktx.plugins import Registry
from blktx.result import Result
from blktx.states import CANCELED, INVALIDATED

_OPTION_FIELDS = {f.name for f in dataclasses.fields(Options)}


def recover(journal: SqliteJournal, registry: Registry, txid: str | None = None) -> list[dict[str, Any]]:
    """Recover every unfinished transaction (or only ``txid``); return what was done to each."""
    report = []
    for tx in reversed(journal.transactions(limit=1_000_000, statuses=UNFINISHED)):
        if txid and not tx["txid"].startswith(txid):
            continue
        holder = journal.lock_holder(tx["txid"])
        if holder and _alive(*holder):
            report.append({"txid": tx["txid"], "outcome": "running", "message": f"still running as pid {holder[0]}"})
            continue
        report.append(_recover_one(journal, registry, tx["txid"]))
    journal.clear_stale_locks()
    return report


def _recover_one(journal: SqliteJournal, registry: Registry, txid: str) -> dict[str, Any]:
    tx = journal.transaction(txid)
    assert tx is not None
    missing = sorted({a["type"] for a in tx["actions"] if registry.get(a["type"]) is None})
    if missing:
        return {"txid": txid, "outcome": "needs recovery",
                "message": f"the plugins for {', '.join(missing)} are not installed; install them and run again"}
    options = Options(**{k: v for k, v in tx["options"].items() if k in _OPTION_FIELDS})
    ctx = RunContext(txid, options, tx["base_dir"] or "/", registry.pm.hook)
    actions = []
    for row in tx["actions"]:
        atype = registry.get(row["type"])
        assert atype is not None
        a = Action(row["index"], atype, row["params"], row["target"])
        a.state, a.undo = row["state"], row["undo"] or {}
        actions.append((a, bool(row["started"])))
    executor = Executor(registry, journal=journal)
    result = Result(txid, "", actions=[a for a, _ in actions], committed=tx["committed"])
    try:
        if tx["committed"]:
            finals = [a for a, _ in actions if a.type.finalize and a.state != INVALIDATED]
            executor._finalize(finals, ctx, result)
            what = "rolled forward"
        else:
            victims = [a for a, started in actions if started and not a.type.finalize and a.state != CANCELED]
            executor._rollback(victims, ctx, {a.index for a in victims}, result)
            what = "rolled back"
        # Every hold, in the order taken; those already resumed keep a closed window.
        holds = [Hold(h["kind"], h["target"], h["data"], h["start"] or 0.0, None if not h["resumed"] else 0.0)
                 for h in tx["holds"]]
        waiting = [h for h in holds if h.end is None]
        if waiting:
            executor._resume(ctx, waiting, result)  # newest first, as the run would have
            journal.holds(txid, holds, resumed=True)
    finally:
        result.warnings.extend(ctx.close())
    left = [str(lo) for lo in result.leftovers] + [f"{p.type} #{p.action} on {p.target}: {p.message}"
                                                  for p in result.pending]
    if left:
        journal.set_status(txid, NEEDS_RECOVERY, {"leftovers": left, "recovered": False})
        return {"txid": txid, "outcome": "needs recovery", "message": f"{what} partly", "left": left}
    journal.set_status(txid, DONE if tx["committed"] else ABORTED, {"recovered": what})
    journal.release_locks(txid)
    return {"txid": txid, "outcome": "committed" if tx["committed"] else "rolled back", "message": what,
            "actions": len(actions)}
