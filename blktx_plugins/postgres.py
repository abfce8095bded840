"""``postgres``: a PostgreSQL backup held open across the quiesce window.

``postgres.backup`` makes a group snapshot of volumes that hold a PostgreSQL
cluster (its data directory, its WAL directory, tablespaces, each snapshotted by
another action of the group) restorable as a backup. With a quiesce mode set:

- ``do`` (before the window) creates the action's ``dest`` folder, privately and
  then published without replacing, its identity journaled first, opens the
  session the backup will run on and runs ``CHECKPOINT`` (when the role may), so
  that the checkpoint ``pg_backup_start`` asks for inside the window is short;
- the quiesce hook announces its hold and runs
  ``pg_backup_start(label, fast => true)`` on one session that it keeps (one
  ``ctx.resource`` per action) until after the commit point; a temporary physical
  replication slot on that session keeps the backup's WAL from being recycled;
- ``invalidate`` (the last step before the commit point) runs ``SELECT 1`` on
  that session: a session that died ended backup mode, and the group rolls back;
- the resume hook runs ``pg_backup_stop(wait_for_archive => false)`` on the same
  session and writes the returned ``labelfile`` to ``dest/backup_label`` (and a
  non-empty ``spcmapfile`` to ``dest/tablespace_map``), with
  ``dest/blktx-backup.json`` saying what the backup is;
- ``finish`` (after the commit, retried, finished by ``blktx recover``) saves the
  WAL segments from the backup's start to its stop into ``dest/pg_wal``: the
  restore needs the end-of-backup record that ``pg_backup_stop`` writes, which no
  snapshot taken inside the window can hold.

After a rollback the resume hook only ends backup mode (cancel removed ``dest``).
In a new process (the watchdog, ``blktx recover``) the session is gone: a
non-exclusive backup ends with its session, so resume terminates the recorded
backend if it still lives (a stopped run), marks ``dest`` as having no
backup_label when it is there, and reports the hold resumed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Sequence
from typing import Any

from blktx import Action, ActionFailed, ActionType, Hold, Leftover, Param, Refused, Register, RunContext, hookimpl
from blktx_plugins._fs import fsync_dir, rename_noreplace

KIND = "postgres.backup"
STATE = "blktx-backup.json"
#: Seconds a resume, a check or a new process waits for the server.
TIMEOUT = 10.0
#: The checkpoint before the window may write much: it is outside the window.
CHECKPOINT_TIMEOUT = 300.0


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise ActionFailed("psycopg 3 is not installed (pip install 'blktx[postgres]')") from None
    return psycopg


def conninfo(params: dict[str, Any]) -> str:
    """The libpq connection string from ``conninfo`` and the separate fields."""
    from psycopg.conninfo import make_conninfo

    extra = {k: str(params[k]) for k in ("host", "port", "dbname", "user") if params.get(k)}
    return str(make_conninfo(params.get("conninfo") or "", **extra))


def _where(params: dict[str, Any]) -> tuple[str, str]:
    from psycopg.conninfo import conninfo_to_dict

    info = conninfo_to_dict(conninfo(params))
    return str(info.get("host") or os.environ.get("PGHOST") or "/var/run/postgresql"), str(
        info.get("port") or os.environ.get("PGPORT") or "5432"
    )


class Session:
    """The one connection that holds a backup in progress, used from one thread at a time."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.pid: int = conn.info.backend_pid

    def query(self, sql: str, args: Sequence[Any] = (), timeout: float | None = None) -> list[tuple[Any, ...]]:
        with self.lock:
            if timeout is not None:  # statement_timeout cannot be a bound parameter of SET
                self.conn.execute("SELECT set_config('statement_timeout', %s, false)", (str(max(1, int(timeout * 1000))),))
            cursor = self.conn.execute(sql, args)
            rows: list[tuple[Any, ...]] = cursor.fetchall() if cursor.description is not None else []
            return rows

    def close(self) -> None:
        self.conn.close()


def connect(params: dict[str, Any], txid: str, timeout: float) -> Session:
    psycopg = _psycopg()
    conn = psycopg.connect(
        conninfo(params), autocommit=True, connect_timeout=max(1, int(timeout)), application_name=f"blktx {txid}"[:63]
    )
    return Session(conn)


def _session(ctx: RunContext, action: Action) -> Session:
    """The one session of ``action``'s backup in this run (opened by do, before the window)."""
    params = dict(action.params)

    def made() -> Session:
        s = connect(params, ctx.txid, _remaining(ctx, 1.0))
        ctx.on_close(s.close)
        return s

    return ctx.resource(_key(ctx.txid, action.index), made)


def _key(txid: str, index: int) -> str:
    return f"{KIND}:{txid}:{index}"


def _remaining(ctx: RunContext, floor: float = 0.5) -> float:
    return max(floor, ctx.window_deadline - time.monotonic()) if ctx.window_deadline else TIMEOUT


def _ident(path: str) -> list[int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino] if os.path.isdir(path) and not os.path.islink(path) else None


def _ours(path: str, ident: list[int] | None) -> bool:
    return bool(path and ident) and _ident(path) == list(ident or [])


def _write(folder: str, name: str, data: bytes) -> None:
    """A complete file or none: written under a private name, fsynced, renamed."""
    tmp = os.path.join(folder, f".{name}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(folder, name))
    fsync_dir(folder)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _state(dest: str) -> dict[str, Any]:
    try:
        with open(os.path.join(dest, STATE)) as fh:
            return dict(json.load(fh))
    except (OSError, ValueError):
        return {}


def _set_state(dest: str, **fields: Any) -> None:
    state = _state(dest)
    state.update(fields)
    _write(dest, STATE, json.dumps(state, indent=2, sort_keys=True).encode() + b"\n")


class Backup(ActionType):
    """Hold a PostgreSQL backup (pg_backup_start/stop on one session) across the window; keep its backup_label."""

    name = KIND
    do_before_quiesce = True  # do only makes dest; backup mode starts in the quiesce hook
    params = (
        Param("conninfo", "str", default="", doc="libpq connection string (no password: use .pgpass or peer)"),
        Param("host", "str", default="", doc="server host or unix socket folder (libpq host)"),
        Param("port", "int", default=0, doc="server port"),
        Param("dbname", "str", default="", doc="database to connect to"),
        Param(
            "user",
            "str",
            default="",
            doc="role to connect as (superuser, or granted pg_backup_start, "
            "pg_backup_stop, REPLICATION and pg_read_server_files)",
        ),
        Param(
            "dest",
            "path",
            required=True,
            creates=True,
            doc="folder created for backup_label, tablespace_map and the backup's WAL, next to the snapshots",
        ),
        Param("label", "str", default="", doc="the backup's label (default: blktx and the transaction id)"),
        Param("save_wal", "bool", default=True, doc="save the WAL from the backup's start to its end into dest/pg_wal"),
    )

    def target(self, action: Action) -> str:
        host, port = _where(action.params)
        return f"postgres:{host}:{port}"

    def check(self, action: Action, ctx: RunContext) -> None:
        p = action.params
        if ctx.options.quiesce == "none":
            raise Refused(
                "postgres.backup holds its backup in the quiesce window", hint='set [options] quiesce = "pause" (or "fsfreeze")'
            )
        if "password" in conninfo(p).lower():
            raise Refused(
                "the connection string holds a password, which the journal would keep",
                hint="use ~/.pgpass, PGPASSFILE or peer authentication",
            )
        dest = p["dest"]
        if os.path.lexists(dest):
            raise Refused(f"{dest} already exists", hint="choose a new destination")
        if not os.path.isdir(os.path.dirname(dest)):
            raise Refused(f"{os.path.dirname(dest)} does not exist", missing=os.path.dirname(dest))
        try:
            session = connect(p, ctx.txid, TIMEOUT)
        except ActionFailed as exc:
            raise Refused(str(exc), hint="pip install 'blktx[postgres]'") from None
        except Exception as exc:  # noqa: BLE001 - psycopg's own words are the refusal
            raise Refused(f"cannot connect to PostgreSQL: {exc}".strip()) from None
        try:
            version, recovery, wal_level, may_start, may_read, may_slot = session.query(
                "SELECT current_setting('server_version_num')::int, pg_is_in_recovery(), current_setting('wal_level'),"
                " has_function_privilege('pg_backup_start(text, boolean)', 'execute'),"
                " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
                "   OR pg_has_role('pg_read_server_files', 'member'),"
                " (SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user)",
                timeout=TIMEOUT,
            )[0]
        finally:
            session.close()
        if version < 150000:
            raise Refused(f"PostgreSQL {version // 10000} has no pg_backup_start", hint="needs PostgreSQL 15 or later")
        if recovery:
            raise Refused(
                "the server is a standby: a backup taken there ends at a restart point, not a record", hint="back up the primary"
            )
        if wal_level == "minimal":
            raise Refused("wal_level is minimal: an online backup needs replica or logical")
        if not may_start:
            raise Refused("the role may not run pg_backup_start", hint="connect as a superuser or GRANT EXECUTE")
        if p["save_wal"] and not (may_read and may_slot):
            raise Refused(
                "saving the backup's WAL needs pg_read_server_files and REPLICATION",
                hint="grant them, or set save_wal = false and archive the WAL yourself",
            )
        folder, base = os.path.split(dest)
        action.undo["tmp"] = os.path.join(folder, f".{base}.blktx-{ctx.txid}-{os.urandom(4).hex()}")

    def do(self, action: Action, ctx: RunContext) -> None:
        dest, tmp = action.params["dest"], action.undo["tmp"]
        os.mkdir(tmp, 0o700)
        action.undo["ident"] = _ident(tmp)
        ctx.remember([action])  # durable before it gets its public name
        try:
            rename_noreplace(tmp, dest)
        except FileExistsError:
            raise ActionFailed(f"{dest} appeared after the check; it was left alone") from None
        _set_state(dest, status="in progress", txid=ctx.txid)
        # Before the window: the session the backup will run on, and a checkpoint now,
        # so that the one pg_backup_start(fast) asks for inside the window has little
        # left to write (a role that may not checkpoint skips it: the window is longer).
        session = _session(ctx, action)
        may = "SELECT rolsuper OR pg_has_role('pg_checkpoint', 'MEMBER') FROM pg_roles WHERE rolname = current_user"
        if session.query(may)[0][0]:
            session.query("CHECKPOINT", timeout=CHECKPOINT_TIMEOUT)
            action.undo["checkpointed"] = True

    def invalidate(self, action: Action, ctx: RunContext) -> None:
        """The last step before the commit point: the backup is still held."""
        session: Session | None = ctx.resource(_key(ctx.txid, action.index), lambda: None)
        if session is None:
            raise ActionFailed("no PostgreSQL session holds this backup (was the quiesce hook run?)")
        try:
            session.query("SELECT 1", timeout=_remaining(ctx))
        except Exception as exc:  # noqa: BLE001 - whatever broke the session broke the backup
            raise ActionFailed(
                f"the session holding the backup failed ({exc}); PostgreSQL ended backup mode with "
                "it, so the snapshots cannot be restored as this backup".strip()
            ) from None

    def cancel(self, action: Action, ctx: RunContext) -> None:
        for path in (action.params["dest"], action.undo.get("tmp", "")):
            if _ours(path, action.undo.get("ident")):
                shutil.rmtree(path)

    def finish(self, action: Action, ctx: RunContext) -> None:
        """Save the backup's WAL into dest/pg_wal (after the resume wrote its label)."""
        dest = action.params["dest"]
        if not action.params["save_wal"] or not _ours(dest, action.undo.get("ident")):
            return
        state = _state(dest)
        if state.get("status") != "complete" or state.get("wal_saved"):
            return
        session: Session | None = ctx.resource(_key(ctx.txid, action.index), lambda: None)
        own = session is None or session.conn.closed
        if own:
            session = connect(action.params, ctx.txid, TIMEOUT)
        assert session is not None
        try:
            names = [
                r[0]
                for r in session.query(
                    "SELECT DISTINCT pg_walfile_name(l) FROM (SELECT %s::pg_lsn + (n * s)::numeric AS l"
                    " FROM (SELECT setting::numeric AS s FROM pg_settings WHERE name = 'wal_segment_size') z,"
                    " generate_series(0, floor(pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn) / s)::int) n"
                    " UNION ALL SELECT %s::pg_lsn) w ORDER BY 1",
                    (state["start_lsn"], state["stop_lsn"], state["start_lsn"], state["stop_lsn"]),
                    timeout=60,
                )
            ]
            wal = os.path.join(dest, "pg_wal")
            os.makedirs(wal, exist_ok=True)
            for name in names:
                if not os.path.exists(os.path.join(wal, name)):
                    data = session.query("SELECT pg_read_binary_file(%s)", ("pg_wal/" + name,), timeout=60)[0][0]
                    _write(wal, name, bytes(data))
        except ActionFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - a recycled segment cannot come back: say so, once
            if own and getattr(exc, "sqlstate", None) == "58P01":  # undefined_file: the segment was recycled
                _set_state(dest, wal_saved=False, wal_missing=str(exc))
                return
            raise ActionFailed(f"saving the backup's WAL: {exc}") from None
        finally:
            if own:
                session.close()
        _set_state(dest, wal_saved=True, wal_segments=names)

    def member_exists(self, action: Action) -> bool | None:
        dest = action.params["dest"]
        return _ours(dest, action.undo.get("ident")) and os.path.isfile(os.path.join(dest, "backup_label"))

    def leftovers(self, action: Action) -> list[Leftover]:
        return [
            Leftover(action.target, f"backup folder {p}")
            for p in (action.params["dest"], action.undo.get("tmp", ""))
            if _ours(p, action.undo.get("ident"))
        ]


@hookimpl
def blktx_register_action_types(register: Register) -> None:
    register(Backup)


@hookimpl
def blktx_quiesce(ctx: RunContext, actions: Sequence[Action]) -> None:
    """Start a backup on one held session per postgres.backup action, each hold announced first."""
    for a in actions:
        if a.type.name != KIND:
            continue
        hold = Hold(
            KIND,
            a.target,
            {
                "action": a.index,
                "params": {k: a.params[k] for k in ("conninfo", "host", "port", "dbname", "user")},
                "dest": a.params["dest"],
                "ident": a.undo.get("ident"),
            },
        )
        ctx.holding([hold])
        session = _session(ctx, a)
        started = session.query("SELECT backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()")[0][0]
        hold.data.update(pid=session.pid, backend_start=started)
        ctx.holding([hold])  # journaled again, now with the backend to end from another process
        if a.params["save_wal"]:  # keeps the backup's WAL until finish has saved it (gone with the session)
            session.query(
                "SELECT pg_create_physical_replication_slot(%s, true, true)",
                (re.sub(r"[^a-z0-9_]", "_", f"blktx_{ctx.txid}_{a.index}".lower())[:63],),
                timeout=_remaining(ctx),
            )
        label = a.params["label"] or f"blktx {ctx.txid}"
        lsn = session.query("SELECT pg_backup_start(%s, fast => true)::text", (label,), timeout=_remaining(ctx))[0][0]
        hold.data["start_lsn"] = lsn


@hookimpl
def blktx_resume(ctx: RunContext, hold: Hold) -> bool | None:
    """End the backup on its session and keep its label; in a new process, the session is gone."""
    if hold.kind != KIND:
        return None
    dest, ident = hold.data["dest"], hold.data.get("ident")
    session: Session | None = ctx.resource(_key(ctx.txid, hold.data["action"]), lambda: None)
    if session is None:
        _end_elsewhere(ctx, hold)
        return True
    if session.conn.closed:  # it died inside the window (invalidate saw it: rolled back) or after the commit
        if not _ours(dest, ident):
            return True  # rolled back: PostgreSQL ended backup mode with the session
        _set_state(dest, status="no backup_label", why="the session holding the backup died before pg_backup_stop")
        raise ActionFailed("the session holding the backup died before pg_backup_stop: this group has no backup_label")
    try:
        lsn, labelfile, spcmap = session.query(
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(wait_for_archive => false)", timeout=TIMEOUT
        )[0]
        session.query("SELECT set_config('statement_timeout', '0', false)")
    except Exception as exc:  # noqa: BLE001 - named: the group's member has no label
        if not _ours(dest, ident):
            return True  # rolled back: the backup, if any was left, ended with the session
        _set_state(dest, status="no backup_label", why=f"pg_backup_stop failed: {exc}")
        raise ActionFailed(f"pg_backup_stop failed ({exc}): this group has no backup_label") from None
    if not _ours(dest, ident):
        return True  # rolled back: cancel removed dest; backup mode is over
    _write(dest, "backup_label", labelfile.encode())
    if spcmap:
        _write(dest, "tablespace_map", spcmap.encode())
    _set_state(
        dest, status="complete", start_lsn=hold.data.get("start_lsn"), stop_lsn=lsn, tablespace_map=bool(spcmap), wal_saved=False
    )
    hold.data["stop_lsn"] = lsn
    return True


def _end_elsewhere(ctx: RunContext, hold: Hold) -> None:
    """In the watchdog or ``blktx recover``: the run's session ended backup mode when it
    closed; a run that is stopped still holds it, so end its backend if it is still there."""
    dest, ident = hold.data["dest"], hold.data.get("ident")
    if _ours(dest, ident) and _state(dest).get("status") == "in progress":
        _set_state(
            dest,
            status="no backup_label",
            why="the run ended before pg_backup_stop; PostgreSQL ended "
            "backup mode with its session: restore these snapshots as a crash, not as this backup",
        )
    pid, started = hold.data.get("pid"), hold.data.get("backend_start")
    if not pid:
        return  # never connected, or the journal does not say who
    try:
        session = connect(hold.data.get("params", {}), ctx.txid, 3)
    except Exception:  # noqa: BLE001 - unreachable: the run's session cannot outlive the server
        return
    try:
        session.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s AND backend_start::text = %s",
            (pid, started),
            timeout=5,
        )
    except Exception:  # noqa: BLE001 - best effort: the session ends with the run's process anyway
        pass
    finally:
        session.close()
