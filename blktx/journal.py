"""The write-ahead journal (SQLite, WAL): persistence of transaction states,
action states, intents, undo facts and holds; nothing else.

Before each side effect a run records its intent, the actions' new states (DOING:
their step may run) and what the undo needs (``Action.undo``); after it, what
happened. One durable commit covers a whole batch of steps, never one per action.
The transaction's state column holds a :class:`~blktx.states.TxState`. Locks are
not here: they do not depend on which journal a run uses (:mod:`blktx.locks`).

``BLKTX_CRASH_AFTER=N`` kills the process with SIGKILL right after the N-th durable
journal write: the switch that crash tests and drills use to reach every crash
point.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from blktx.actiontype import Action
from blktx.errors import BlktxError
from blktx.events import Hold
from blktx.identity import untrusted_file, untrusted_folders
from blktx.states import DOING, START, TX_FINAL, TxState
from blktx.status import status

SCHEMA = """
CREATE TABLE IF NOT EXISTS tx (
    txid TEXT PRIMARY KEY, started REAL, ended REAL, status TEXT, pid INTEGER,
    file TEXT, base_dir TEXT, options TEXT, detail TEXT, actions INTEGER, committed INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS action (
    txid TEXT, idx INTEGER, type TEXT, target TEXT, params TEXT, undo TEXT,
    state TEXT, started INTEGER DEFAULT 0, error TEXT, phase TEXT, durations TEXT, output TEXT,
    PRIMARY KEY (txid, idx));
CREATE TABLE IF NOT EXISTS step (
    id INTEGER PRIMARY KEY, txid TEXT, time REAL, phase TEXT, what TEXT, count INTEGER);
CREATE TABLE IF NOT EXISTS hold (
    txid TEXT, n INTEGER, kind TEXT, target TEXT, data TEXT, start REAL, resumed INTEGER,
    PRIMARY KEY (txid, n));
CREATE TABLE IF NOT EXISTS fence (txid TEXT PRIMARY KEY, time REAL, why TEXT);
CREATE TABLE IF NOT EXISTS groupsnap (
    txid TEXT PRIMARY KEY, grp TEXT, name TEXT, time REAL, members TEXT, UNIQUE (grp, name));
CREATE INDEX IF NOT EXISTS tx_status ON tx (status);
"""

#: The phases whose intent begins its actions (START -> DOING in the journal).
BEGINS = frozenset({"do", "finalize"})

#: The states ``blktx recover`` finishes.
_COMMITTED = frozenset({TxState.COMMITTED, TxState.FINALIZING, TxState.DONE, TxState.FINALIZE_INCOMPLETE})
UNFINISHED: tuple[TxState, ...] = tuple(
    s for s in TxState if s not in TX_FINAL and s not in (TxState.NEW, TxState.LOCKED, TxState.CHECKED)
)


class Fenced(BlktxError):
    """The watchdog broke this transaction's quiesce window: it can no longer commit."""


def _dumps(value: Any) -> str:
    # Most actions carry empty undo facts: skip the encoder for them (the journal's hot path).
    return "{}" if not value and isinstance(value, dict) else json.dumps(value)


#: Root's journal: one per host, beside the lock folder, whoever's shell or unit runs blktx.
SYSTEM_JOURNAL = "/var/lib/blktx/journal.sqlite"


def default_path() -> str:
    """``$BLKTX_JOURNAL``; else, as root, :data:`SYSTEM_JOURNAL`; else
    ``$XDG_STATE_HOME/blktx/journal.sqlite`` (``~/.local/state``)."""
    if os.environ.get("BLKTX_JOURNAL"):
        return os.environ["BLKTX_JOURNAL"]
    if os.geteuid() == 0:
        return SYSTEM_JOURNAL
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "blktx", "journal.sqlite")


class SqliteJournal:
    """The journal of a :class:`~blktx.transaction.TransactionRun`, in one SQLite file."""

    def __init__(self, path: str | None = None) -> None:
        self.path = os.path.abspath(path or default_path())
        early = untrusted_folders(self.path)
        if early and not os.path.isdir(os.path.dirname(self.path)):  # never make folders through it
            raise BlktxError(
                f"refusing the journal {self.path}: {early}; keep it in a folder only you can write "
                "(default /var/lib/blktx as root, else ~/.local/state/blktx), mode 0600"
            )
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise BlktxError(f"cannot make the journal's folder {os.path.dirname(self.path)}: {exc.strerror}") from None
        # Root writes the journal and trusts what it reads back (recover acts on it):
        # nobody else may be able to replace it, or its -wal and -shm neighbours.
        why = untrusted_folders(self.path) or untrusted_file(self.path)
        if why:
            raise BlktxError(
                f"refusing the journal {self.path}: {why}; keep it in a folder only you can write "
                "(default /var/lib/blktx as root, else ~/.local/state/blktx), mode 0600"
            )
        try:
            # Made 0600 here if new. Never opened and closed when it exists: closing any
            # descriptor of the file drops every POSIX lock this process holds on it,
            # those of another connection to this journal too (SQLite's own locks).
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise BlktxError(
                f"cannot open the journal {self.path}: {exc}; give another with --journal PATH or $BLKTX_JOURNAL"
            ) from None
        self._mutex = threading.Lock()
        self._batch: int | None = None  # the thread inside together(), if any
        self._writes = 0
        self._undo: dict[int, str] = {}  # the undo facts as last journaled, by action index
        crash = os.environ.get("BLKTX_CRASH_AFTER")
        self._crash_after = int(crash) if crash else None

    def _migrate(self) -> None:
        """Add the columns that journals written by earlier versions lack: in one write
        transaction, so two processes opening one new journal never both add a column."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._migrate_locked()
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate_locked(self) -> None:
        for table, column, decl in (
            ("tx", "committed", "INTEGER DEFAULT 0"),
            ("action", "output", "TEXT"),
            ("tx", "description", "TEXT"),
        ):
            columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        # Statuses written before the transaction became a machine, in its words.
        self._db.execute("UPDATE tx SET status = 'RUNNING' WHERE status = 'BEGIN'")
        self._db.execute("UPDATE action SET state = 'DOING' WHERE started = 1 AND state = 'START'")
        self._db.execute(
            "UPDATE tx SET status = CASE committed WHEN 1 THEN 'FINALIZE_INCOMPLETE' "
            "ELSE 'ROLLBACK_INCOMPLETE' END WHERE status = 'NEEDS_RECOVERY'"
        )

    # -- durable writes ---------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self._batch == threading.get_ident():  # inside together(): one durable write for all
            yield self._db
            return
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:
                # Not durable: the caller must not act as if it were (the commit point).
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            self._writes += 1
            if self._crash_after is not None and self._writes >= self._crash_after:
                os.kill(os.getpid(), signal.SIGKILL)

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Make every write of this thread inside the block one durable write (one
        fsync): all of it is in the journal after a crash, or none of it."""
        with self._write():
            self._batch = threading.get_ident()
            try:
                yield
            finally:
                self._batch = None

    def begin(self, txid: str, info: dict[str, Any], actions: Sequence[Action]) -> None:
        self._undo = {a.index: _dumps(a.undo) for a in actions}
        with self._write() as db:
            db.execute(
                "INSERT INTO tx (txid, started, ended, status, pid, file, base_dir, options, detail, actions, "
                "committed, description) VALUES (?, ?, NULL, ?, ?, ?, ?, ?, NULL, ?, 0, ?)",
                (
                    txid,
                    time.time(),
                    TxState.RUNNING.value,
                    os.getpid(),
                    info.get("file"),
                    info.get("base_dir"),
                    json.dumps(info.get("options", {}), default=str),
                    len(actions),
                    info.get("description") or None,
                ),
            )
            db.executemany(
                "INSERT INTO action VALUES (?, ?, ?, ?, ?, ?, ?, 0, NULL, NULL, NULL, NULL)",
                [(txid, a.index, a.type.name, a.target, json.dumps(a.params), self._undo[a.index], a.state) for a in actions],
            )

    def intent(self, txid: str, phase: str, actions: Sequence[Action]) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO step (txid, time, phase, what, count) VALUES (?, ?, ?, 'intent', ?)",
                (txid, time.time(), phase, len(actions)),
            )
            changed = self._changed_undo(actions)
            db.executemany(
                "UPDATE action SET undo = ? WHERE txid = ? AND idx = ?", [(undo, txid, index) for index, undo in changed]
            )
            if phase in BEGINS:  # the intent begins them: a crash from here on may have run their step
                db.execute(
                    f"UPDATE action SET state = '{DOING}' WHERE txid = ? AND state = '{START}' "
                    "AND idx IN (SELECT value FROM json_each(?))",
                    (txid, json.dumps([a.index for a in actions])),
                )

    def _changed_undo(self, actions: Sequence[Action]) -> list[tuple[int, str]]:
        """The undo facts that differ from what the journal holds (most do not change)."""
        changed = []
        for a in actions:
            text = _dumps(a.undo)
            if self._undo.get(a.index) != text:
                self._undo[a.index] = text
                changed.append((a.index, text))
        return changed

    def done(self, txid: str, phase: str, actions: Sequence[Action]) -> None:
        """After a batch: states, undo facts, errors, output; timings only at the ``end``."""
        with self._write() as db:
            db.execute(
                "INSERT INTO step (txid, time, phase, what, count) VALUES (?, ?, ?, 'done', ?)",
                (txid, time.time(), phase, len(actions)),
            )
            if phase == "end":
                db.executemany(
                    "UPDATE action SET undo = ?, state = ?, error = ?, phase = ?, durations = ?, output = ? "
                    "WHERE txid = ? AND idx = ?",
                    [
                        (_dumps(a.undo), a.state, a.error, a.failed_phase, json.dumps(a.durations), a.output, txid, a.index)
                        for a in actions
                    ],
                )
            else:
                db.executemany(
                    "UPDATE action SET undo = ? WHERE txid = ? AND idx = ?",
                    [(undo, txid, index) for index, undo in self._changed_undo(actions)],
                )
                self._states(db, txid, actions)

    @staticmethod
    def _states(db: sqlite3.Connection, txid: str, actions: Sequence[Action]) -> None:
        """Each action's state, error and output: one statement per distinct outcome."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for a in actions:
            groups.setdefault((a.state, a.error, a.failed_phase, a.output), []).append(a.index)
        db.executemany(
            "UPDATE action SET state = ?, error = ?, phase = ?, output = ? "
            "WHERE txid = ? AND idx IN (SELECT value FROM json_each(?))",
            [(*key, txid, json.dumps(indexes)) for key, indexes in groups.items()],
        )

    def holds(self, txid: str, holds: Sequence[Hold], resumed: bool) -> None:
        """Record every hold of ``txid`` (all of them, in the order they were taken).
        With ``resumed``, a hold counts as resumed when its window ended
        (``hold.end`` set): one whose resume failed stays for ``blktx recover``."""
        with self._write() as db:
            db.executemany(
                "INSERT OR REPLACE INTO hold VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (txid, n, h.kind, h.target, json.dumps(h.data), h.start, int(resumed and h.end is not None))
                    for n, h in enumerate(holds)
                ],
            )

    def state(self, txid: str, state: TxState, detail: dict[str, Any]) -> None:
        """The transaction's state, with what the report needs to explain it.
        COMMITTED is refused (:class:`Fenced`) once the watchdog fenced ``txid``:
        the check and the write are one SQLite write transaction."""
        with self._write() as db:
            if state is TxState.COMMITTED:
                fenced = db.execute("SELECT why FROM fence WHERE txid = ?", (txid,)).fetchone()
                if fenced:
                    raise Fenced(f"the commit is fenced: {fenced[0]}")
            ended = (
                time.time() if state in TX_FINAL or state in (TxState.ROLLBACK_INCOMPLETE, TxState.FINALIZE_INCOMPLETE) else None
            )
            db.execute(
                "UPDATE tx SET status = ?, ended = COALESCE(?, ended), detail = ?, committed = MAX(committed, ?) WHERE txid = ?",
                (state.value, ended, json.dumps(detail, default=str), int(state in _COMMITTED), txid),
            )

    def catalog(self, txid: str, group: str, name: str, members: list[dict[str, Any]], when: float | None = None) -> None:
        """Record the group snapshot a transaction makes; called inside the commit's
        durable write (``together``), so it exists exactly when the commit does."""
        with self._write() as db:
            db.execute(
                "INSERT INTO groupsnap VALUES (?, ?, ?, ?, ?)",
                (txid, group, name, time.time() if when is None else when, json.dumps(members, default=str)),
            )

    def uncatalog(self, txids: tuple[str, ...]) -> None:
        """Remove the group snapshots a delete or prune commits to deleting, inside its
        commit write. Raises BlktxError when one is no longer there (another
        transaction deleted it first): that commit must not happen."""
        with self._write() as db:
            for txid in txids:
                if db.execute("DELETE FROM groupsnap WHERE txid = ?", (txid,)).rowcount != 1:
                    raise BlktxError(f"group snapshot {txid} is no longer in the catalog: deleted by another transaction")

    def group_snapshots(self, group: str | None = None) -> list[dict[str, Any]]:
        """Every recorded group snapshot (of ``group``), oldest first."""
        sql = "SELECT txid, grp, name, time, members FROM groupsnap"
        args: tuple[Any, ...] = ()
        if group is not None:
            sql, args = sql + " WHERE grp = ?", (group,)
        return [
            {"txid": t, "group": g, "name": n, "time": when, "members": json.loads(m)}
            for t, g, n, when, m in self._db.execute(sql + " ORDER BY time", args)
        ]

    def group_snapshot(self, group: str, name: str) -> dict[str, Any] | None:
        """The group snapshot ``group@name``, or None."""
        found = [e for e in self.group_snapshots(group) if e["name"] == name]
        return found[0] if found else None

    def group_files(self, group: str) -> set[str]:
        """The spec files (absolute: their folder and name) whose runs made group snapshots of ``group``."""
        sql = "SELECT DISTINCT tx.file, tx.base_dir FROM groupsnap JOIN tx ON tx.txid = groupsnap.txid WHERE groupsnap.grp = ?"
        return {os.path.join(d or "/", os.path.basename(f)) for f, d in self._db.execute(sql, (group,)) if f}

    def has_group_snapshot(self, group: str, name: str) -> bool:
        return self._db.execute("SELECT 1 FROM groupsnap WHERE grp = ? AND name = ?", (group, name)).fetchone() is not None

    def fence(self, txid: str, why: str) -> bool:
        """Forbid ``txid``'s commit from now on, unless it is already committed.
        Returns whether it was fenced (False: it had committed first)."""
        with self._write() as db:
            row = db.execute("SELECT committed FROM tx WHERE txid = ?", (txid,)).fetchone()
            if row and row[0]:
                return False
            db.execute("INSERT OR REPLACE INTO fence VALUES (?, ?, ?)", (txid, time.time(), why))
            db.execute(
                "INSERT INTO step (txid, time, phase, what, count) VALUES (?, ?, 'watchdog', 'fence', 0)", (txid, time.time())
            )
            return True

    # -- reading ----------------------------------------------------------------------

    def transactions(
        self, limit: int = 20, statuses: Sequence[str] | None = None, txid: str | None = None
    ) -> list[dict[str, Any]]:
        """The newest transactions, optionally only those in ``statuses`` or the one ``txid``."""
        sql = "SELECT txid, started, ended, status, pid, file, actions, detail, committed, base_dir, options, description FROM tx"
        args: list[Any] = []
        if statuses:
            sql += f" WHERE status IN ({','.join('?' * len(statuses))})"
            args += list(statuses)
        elif txid is not None:
            sql += " WHERE txid = ?"
            args.append(txid)
        sql += " ORDER BY started DESC LIMIT ?"
        args.append(limit)
        keys = (
            "txid",
            "started",
            "ended",
            "status",
            "pid",
            "file",
            "actions",
            "detail",
            "committed",
            "base_dir",
            "options",
            "description",
        )
        out = []
        for row in self._db.execute(sql, args):
            item = dict(zip(keys, row, strict=True))
            item["detail"] = json.loads(item["detail"]) if item["detail"] else {}
            item["options"] = json.loads(item["options"]) if item["options"] else {}
            item["committed"] = bool(item["committed"])
            item["seconds"] = (item["ended"] - item["started"]) if item["ended"] else None
            said = status(item["status"])
            item["outcome"], item["words"] = said.outcome, said.words
            out.append(item)
        return out

    def transaction(self, txid: str) -> dict[str, Any] | None:
        rows = self._db.execute(
            "SELECT txid FROM tx WHERE txid = ? OR txid LIKE ? ORDER BY started DESC", (txid, txid + "%")
        ).fetchall()
        if len(rows) != 1:
            return None
        full = rows[0][0]
        (tx,) = self.transactions(limit=1, txid=full)
        keys = ("index", "type", "target", "params", "undo", "state", "started", "error", "phase", "durations", "output")
        tx["actions"] = []
        for row in self._db.execute(
            "SELECT idx, type, target, params, undo, state, started, error, phase, durations, output "
            "FROM action WHERE txid = ? ORDER BY idx",
            (full,),
        ):
            item = dict(zip(keys, row, strict=True))
            for k in ("params", "undo", "durations"):
                item[k] = json.loads(item[k]) if item[k] else None
            tx["actions"].append(item)
        tx["holds"] = [
            dict(zip(("n", "kind", "target", "data", "start", "resumed"), r, strict=True))
            for r in self._db.execute("SELECT n, kind, target, data, start, resumed FROM hold WHERE txid = ? ORDER BY n", (full,))
        ]
        for h in tx["holds"]:
            h["data"] = json.loads(h["data"])
        return tx

    def close(self) -> None:
        self._db.close()
