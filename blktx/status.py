"""One vocabulary: a transaction's state -> the outcome a user reads, the JSON word,
the exit status. ``blktx run``, ``recover``, ``log``, ``show`` and ``--json`` all
derive what they say from :class:`~blktx.states.TxState` through :data:`STATUS`."""

from __future__ import annotations

from dataclasses import dataclass

from blktx.errors import EXIT_COMMITTED, EXIT_INVALID, EXIT_NEEDS_RECOVERY, EXIT_ROLLED_BACK
from blktx.states import TxState

COMMITTED = "committed"
ROLLED_BACK = "rolled back"
INVALID = "invalid"
NEEDS_RECOVERY = "needs recovery"
CHECKED = "checked"


@dataclass(frozen=True)
class Status:
    """How one transaction state reads: its outcome word, exit status, whether the
    commit point was reached, and a short explanation for ``blktx log``."""

    outcome: str
    exit_status: int
    committed: bool
    words: str


_UNFINISHED = "unfinished: `blktx recover` finishes it"
STATUS: dict[TxState, Status] = {
    TxState.NEW: Status(INVALID, EXIT_INVALID, False, "not started"),
    TxState.LOCKED: Status(INVALID, EXIT_INVALID, False, "locked, not checked"),
    TxState.CHECKED: Status(CHECKED, EXIT_COMMITTED, False, "every check passed; nothing touched"),
    TxState.INVALID: Status(INVALID, EXIT_INVALID, False, "refused; nothing touched"),
    TxState.RUNNING: Status(NEEDS_RECOVERY, EXIT_NEEDS_RECOVERY, False, _UNFINISHED + " (rolls back)"),
    TxState.ROLLING_BACK: Status(NEEDS_RECOVERY, EXIT_NEEDS_RECOVERY, False, _UNFINISHED + " (rolls back)"),
    TxState.ABORTED: Status(ROLLED_BACK, EXIT_ROLLED_BACK, False, "rolled back; nothing changed"),
    TxState.ROLLBACK_INCOMPLETE: Status(
        NEEDS_RECOVERY, EXIT_NEEDS_RECOVERY, False, "rolled back partly: something is left; `blktx recover` retries"
    ),
    TxState.COMMITTED: Status(NEEDS_RECOVERY, EXIT_NEEDS_RECOVERY, True, _UNFINISHED + " (rolls forward)"),
    TxState.FINALIZING: Status(NEEDS_RECOVERY, EXIT_NEEDS_RECOVERY, True, _UNFINISHED + " (rolls forward)"),
    TxState.DONE: Status(COMMITTED, EXIT_COMMITTED, True, "committed; every action took effect"),
    TxState.FINALIZE_INCOMPLETE: Status(
        NEEDS_RECOVERY, EXIT_NEEDS_RECOVERY, True, "committed; a step is pending: `blktx recover` finishes it"
    ),
}


#: How an action's state reads in the tables of ``run`` and ``show``; ``--json``
#: keeps the machine's names (docs/lifecycle.md). A plugin's own extra state reads as itself.
ACTION_WORDS: dict[str, str] = {
    "START": "not started",
    "DOING": "started",  # the intent is durable: do may have run, perhaps half-way
    "CREATED": "done",  # made, not switched over (a finalize step: done)
    "INVALIDATED": "in effect",  # switched over: committed with the transaction
    "CANCELED": "undone",
    "CANCEL_FAILED": "cancel failed",
}


def action_word(state: str) -> str:
    return ACTION_WORDS.get(state, state)


def status(state: TxState | str) -> Status:
    return STATUS[TxState(state)]
