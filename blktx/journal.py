"""The write-ahead journal (SQLite, WAL) and the cross-process target locks.

Before each side effect the executor records its intent and what the undo needs
(``Action.undo``); after it, what happened. One durable commit covers a whole batch
of steps, never one per action. Locks live in the same database: a target is
locked by inserting it in one SQLite transaction with every other target of the
run, so two runs can never interleave or deadlock; a lock whose process died is
detected by pid and process start time.

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
from blktx.errors import BlktxError, InvalidTransaction, Problem
from blktx.events import Hold

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
CREATE TABLE IF NOT EXISTS lock (
    target TEXT PRIMARY KEY, txid TEXT, pid INTEGER, pstart TEXT, since REAL);
CREATE INDEX IF NOT EXISTS tx_status ON tx (status);
"""

#: Transaction statuses in the journal.
RUNNING, COMMITTED, DONE, ABORTED, NEEDS_RECOVERY = "BEGIN", "COMMITTED", "DONE", "ABORTED", "NEEDS_RECOVERY"
UNFINISHED = (RUNNING, COMMITTED, NEEDS_RECOVERY)


def _dumps(value: Any) -> str:
    # Most actions carry empty undo facts: skip the encoder for them (the journal's hot path).
    return "{}" if not value and isinstance(value, dict) else json.dumps(value)


def default_path() -> str:
    """``$BLKTX_JOURNAL``, else ``$XDG_STATE_HOME/blktx/journal.sqlite`` (``~/.local/state``)."""
    if os.environ.get("BLKTX_JOURNAL"):
        return os.environ["BLKTX_JOURNAL"]
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "blktx", "journal.sqlite")


def _process_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _alive(pid: int, pstart: str | None) -> bool:
    return _process_start(pid) == pstart and pstart is not None


class SqliteJournal:
    """The journal and the locker of :class:`~blktx.executor.Executor`, in one SQLite file."""

    def __init__(self, path: str | None = None, *, wait: float = 0.0) -> None:
        self.path = os.path.abspath(path or default_path())
        self.wait = wait
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            if not os.path.exists(self.path):
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise BlktxError(f"cannot open the journal {self.path}: {exc}; "
                             "give another with --journal PATH or $BLKTX_JOURNAL") from None
        self._mutex = threading.Lock()
        self._batch: int | None = None  # the thread inside together(), if any
        self._writes = 0
        self._undo: dict[int, str] = {}  # the undo facts as last journaled, by action index
        crash = os.environ.get("BLKTX_CRASH_AFTER")
        self._crash_after = int(crash) if crash else None

    def _migrate(self) -> None:
        """Add the columns that journals written by earlier versions lack."""
        for table, column, decl in (("tx", "committed", "INTEGER DEFAULT 0"), ("action", "output", "TEXT")):
            columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

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
            self._db.execute("COMMIT")
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
            db.execute("INSERT INTO tx VALUES (?, ?, NULL, ?, ?, ?, ?, ?, NULL, ?, 0)",
                       (txid, time.time(), RUNNING, os.getpid(), info.get("file"), info.get("base_dir"),
                        json.dumps(info.get("options", {}), default=str), len(actions)))
            db.executemany("INSERT INTO action VALUES (?, ?, ?, ?, ?, ?, ?, 0, NULL, NULL, NULL, NULL)",
                           [(txid, a.index, a.type.name, a.target, json.dumps(a.params), self._undo[a.index], a.state)
                            for a in actions])

    def intent(self, txid: str, phase: str, actions: Sequence[Action]) -> None:
        with self._write() as db:
            db.execute("INSERT INTO step (txid, time, phase, what, count) VALUES (?, ?, ?, 'intent', ?)",
                       (txid, time.time(), phase, len(actions)))
            changed = self._changed_undo(actions)
            db.executemany("UPDATE action SET undo = ? WHERE txid = ? AND idx = ?",
                           [(undo, txid, index) for index, undo in changed])
            db.execute("UPDATE action SET started = 1 WHERE txid = ? AND idx IN (SELECT value FROM json_each(?))",
                       (txid, json.dumps([a.index for a in actions])))

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
            db.execute("INSERT INTO step (txid, time, phase, what, count) VALUES (?, ?, ?, 'done', ?)",
                       (txid, time.time(), phase, len(actions)))
            if phase == "end":
                db.executemany(
                    "UPDATE action SET undo = ?, state = ?, error = ?, phase = ?, durations = ?, output = ? "
                    "WHERE txid = ? AND idx = ?",
                    [(_dumps(a.undo), a.state, a.error, a.failed_phase, json.dumps(a.durations), a.output, txid,
                      a.index) for a in actions])
            else:
                db.executemany("UPDATE action SET undo = ? WHERE txid = ? AND idx = ?",
                               [(undo, txid, index) for index, undo in self._changed_undo(actions)])
                # one statement per distinct outcome, not one per action
                groups: dict[tuple[Any, ...], list[int]] = {}
                for a in actions:
                    groups.setdefault((a.state, a.error, a.failed_phase, a.output), []).append(a.index)
                db.executemany(
                    "UPDATE action SET state = ?, error = ?, phase = ?, output = ? "
                    "WHERE txid = ? AND idx IN (SELECT value FROM json_each(?))",
                    [(*key, txid, json.dumps(indexes)) for key, indexes in groups.items()])

    def holds(self, txid: str, holds: Sequence[Hold], resumed: bool) -> None:
        """Record every hold of ``txid`` (all of them, in the order they were taken).
        With ``resumed``, a hold counts as resumed when its window ended
        (``hold.end`` set): one whose resume failed stays for ``blktx recover``."""
        with self._write() as db:
            db.executemany("INSERT OR REPLACE INTO hold VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(txid, n, h.kind, h.target, json.dumps(h.data), h.start,
                             int(resumed and h.end is not None)) for n, h in enumerate(holds)])

    def outcome(self, txid: str, outcome: str, detail: dict[str, Any]) -> None:
        status = {"ABORTED": NEEDS_RECOVERY if detail.get("leftovers") else ABORTED,
                  "COMMITTED": COMMITTED, "DONE": DONE}.get(outcome, outcome)
        if outcome == "COMMITTED" and (detail.get("pending") or detail.get("leftovers")):
            status = NEEDS_RECOVERY
        with self._write() as db:
            ended = time.time() if status in (ABORTED, DONE, NEEDS_RECOVERY) else None
            db.execute("UPDATE tx SET status = ?, ended = COALESCE(?, ended), detail = ?, "
                       "committed = MAX(committed, ?) WHERE txid = ?",
                       (status, ended, json.dumps(detail, default=str), int(outcome in ("COMMITTED", "DONE")), txid))

    def set_status(self, txid: str, status: str, detail: dict[str, Any] | None = None) -> None:
        with self._write() as db:
            db.execute("UPDATE tx SET status = ?, ended = ?, detail = COALESCE(?, detail) WHERE txid = ?",
                       (status, time.time(), json.dumps(detail) if detail is not None else None, txid))

    # -- locks ------------------------------------------------------------------------

    @contextlib.contextmanager
    def acquire(self, txid: str, targets: Sequence[str]) -> Iterator[None]:
        """Lock every target for the whole run, or refuse naming the holder."""
        deadline = time.monotonic() + self.wait
        pstart = _process_start(os.getpid())
        while True:
            problems = self._try_lock(txid, sorted(targets), pstart)
            if not problems:
                break
            if time.monotonic() >= deadline or any("blktx recover" in (p.hint or "") for p in problems):
                raise InvalidTransaction(problems)
            time.sleep(0.05)
        try:
            yield
        finally:
            with self._write() as db:
                db.execute("DELETE FROM lock WHERE txid = ?", (txid,))

    def _try_lock(self, txid: str, targets: list[str], pstart: str | None) -> list[Problem]:
        problems: list[Problem] = []
        with self._write() as db:
            rows = db.execute("SELECT target, txid, pid, pstart FROM lock "
                              "WHERE target IN (SELECT value FROM json_each(?))", (json.dumps(targets),)).fetchall()
            stale: list[str] = []
            for target, holder, pid, hstart in rows:
                if _alive(pid, hstart):
                    problems.append(Problem(f"target is locked by transaction {holder} (pid {pid})", target=target,
                                            hint="wait for it, or give --wait SECONDS"))
                else:
                    stale.append(holder)
            unfinished = set()
            for holder in set(stale):
                status = db.execute("SELECT status FROM tx WHERE txid = ?", (holder,)).fetchone()
                if status and status[0] in UNFINISHED:
                    unfinished.add(holder)
                else:
                    db.execute("DELETE FROM lock WHERE txid = ?", (holder,))
            for target, holder, pid, _ in rows:
                if holder in unfinished:
                    problems.append(Problem(
                        f"target is still held by unfinished transaction {holder} (its process {pid} died)",
                        target=target, hint="run `blktx recover` to finish or roll it back"))
            if not problems:
                db.execute("INSERT INTO lock SELECT value, ?, ?, ?, ? FROM json_each(?)",
                           (txid, os.getpid(), pstart, time.time(), json.dumps(targets)))
        return problems

    # -- reading ----------------------------------------------------------------------

    def transactions(self, limit: int = 20, statuses: Sequence[str] | None = None,
                     txid: str | None = None) -> list[dict[str, Any]]:
        """The newest transactions, optionally only those in ``statuses`` or the one ``txid``."""
        sql = "SELECT txid, started, ended, status, pid, file, actions, detail, committed, base_dir, options FROM tx"
        args: list[Any] = []
        if statuses:
            sql += f" WHERE status IN ({','.join('?' * len(statuses))})"
            args += list(statuses)
        elif txid is not None:
            sql += " WHERE txid = ?"
            args.append(txid)
        sql += " ORDER BY started DESC LIMIT ?"
        args.append(limit)
        keys = ("txid", "started", "ended", "status", "pid", "file", "actions", "detail", "committed", "base_dir",
                "options")
        out = []
        for row in self._db.execute(sql, args):
            item = dict(zip(keys, row, strict=True))
            item["detail"] = json.loads(item["detail"]) if item["detail"] else {}
            item["options"] = json.loads(item["options"]) if item["options"] else {}
            item["committed"] = bool(item["committed"])
            item["seconds"] = (item["ended"] - item["started"]) if item["ended"] else None
            out.append(item)
        return out

    def transaction(self, txid: str) -> dict[str, Any] | None:
        rows = self._db.execute("SELECT txid FROM tx WHERE txid = ? OR txid LIKE ? ORDER BY started DESC",
                                (txid, txid + "%")).fetchall()
        if len(rows) != 1:
            return None
        full = rows[0][0]
        (tx,) = self.transactions(limit=1, txid=full)
        keys = ("index", "type", "target", "params", "undo", "state", "started", "error", "phase", "durations", "output")
        tx["actions"] = []
        for row in self._db.execute("SELECT idx, type, target, params, undo, state, started, error, phase, durations, output "
                                    "FROM action WHERE txid = ? ORDER BY idx", (full,)):
            item = dict(zip(keys, row, strict=True))
            for k in ("params", "undo", "durations"):
                item[k] = json.loads(item[k]) if item[k] else None
            tx["actions"].append(item)
        tx["holds"] = [dict(zip(("n", "kind", "target", "data", "start", "resumed"), r, strict=True))
                       for r in self._db.execute("SELECT n, kind, target, data, start, resumed FROM hold "
                                                 "WHERE txid = ? ORDER BY n", (full,))]
        for h in tx["holds"]:
            h["data"] = json.loads(h["data"])
        tx["locks"] = [r[0] for r in self._db.execute("SELECT target FROM lock WHERE txid = ?", (full,))]
        return tx

    def lock_holder(self, txid: str) -> tuple[int, str | None] | None:
        row = self._db.execute("SELECT pid, pstart FROM lock WHERE txid = ? LIMIT 1", (txid,)).fetchone()
        return (row[0], row[1]) if row else None

    def clear_stale_locks(self) -> int:
        """Drop locks whose process died and whose transaction is finished or unknown."""
        with self._write() as db:
            rows = db.execute("SELECT DISTINCT lock.txid, lock.pid, lock.pstart, tx.status FROM lock "
                              "LEFT JOIN tx ON tx.txid = lock.txid").fetchall()
            stale = [txid for txid, pid, pstart, status in rows
                     if not _alive(pid, pstart) and status not in UNFINISHED]
            db.executemany("DELETE FROM lock WHERE txid = ?", [(t,) for t in stale])
        return len(stale)

    def release_locks(self, txid: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM lock WHERE txid = ?", (txid,))

    def close(self) -> None:
        self._db.close()
