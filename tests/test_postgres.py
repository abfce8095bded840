"""postgres.backup with a real PostgreSQL 15 whose data and WAL directories are two
btrfs subvolumes on two loop-mounted filesystems, under a writer."""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

PGBIN = Path("/usr/lib/postgresql/15/bin")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "mounting loop btrfs filesystems needs root"
    if shutil.which("mkfs.btrfs") is None:
        return "needs mkfs.btrfs (Debian btrfs-progs)"
    if not (PGBIN / "initdb").exists():
        return "needs PostgreSQL 15 (Debian postgresql-15)"
    if importlib.util.find_spec("psycopg") is None:
        return "needs psycopg 3 for PostgreSQL (pip install 'blktx[postgres]')"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "needs the OS user postgres to run PostgreSQL (Debian postgresql-15 makes it)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def sh(*args: str | Path, check: bool = True, user: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [str(a) for a in args]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: {out.stdout}{out.stderr}")
    return out


@dataclass
class Cluster:
    base: Path
    data: Path  # a subvolume on one btrfs
    wal: Path  # a subvolume on another btrfs (initdb --waldir)
    sock: Path
    port: int
    log: Path
    running: bool = False
    mounts: list[Path] = field(default_factory=list)

    @property
    def conninfo(self) -> str:
        return f"host={self.sock} port={self.port} dbname=postgres user=postgres"

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.conninfo, autocommit=True)

    def start(self) -> subprocess.CompletedProcess[str]:
        out = sh(PGBIN / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "120", "start", check=False, user="postgres")
        self.running = out.returncode == 0
        return out

    def stop(self, mode: str = "fast") -> None:
        sh(PGBIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False, user="postgres")
        self.running = False

    def psql(self, sql: str) -> str:
        return sh(PGBIN / "psql", "-X", "-At", "-d", self.conninfo, "-c", sql).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    # postgres must reach its folders: not under pytest's root-only tmp_path
    # one level below /tmp: the exec actions' folder (the spec's) must be in a folder only root can write
    top = Path(tempfile.mkdtemp(prefix="blktx-pg-"))
    top.chmod(0o755)
    base = top / "cluster"
    base.mkdir(mode=0o755)
    c = Cluster(base, base / "fsdata" / "data", base / "fswal" / "wal", base / "sock", free_port(), base / "log" / "pg.log")
    try:
        for name in ("fsdata", "fswal"):
            img, mnt = base / f"{name}.img", base / name
            with open(img, "wb") as fh:
                fh.truncate(1 << 30)
            sh("mkfs.btrfs", "-q", img)
            mnt.mkdir()
            sh("mount", "-o", "loop", img, mnt)
            c.mounts.append(mnt)
        sh("btrfs", "subvolume", "create", c.data)
        sh("btrfs", "subvolume", "create", c.wal)
        for d in (c.sock, c.log.parent):
            d.mkdir(mode=0o700)
        for d in (c.data, c.wal, c.sock, c.log.parent):
            shutil.chown(d, "postgres", "postgres")
        sh(PGBIN / "initdb", "-D", c.data, "--waldir", c.wal, "-U", "postgres", "--auth=trust", "-N", user="postgres")
        with open(c.data / "postgresql.conf", "a") as fh:
            fh.write(
                f"listen_addresses = ''\nunix_socket_directories = '{c.sock}'\nport = {c.port}\n"
                "wal_keep_size = 0\nmax_wal_size = 64MB\nmin_wal_size = 32MB\n"
            )
        assert c.start().returncode == 0, c.log.read_text()
        c.psql("CREATE TABLE t (n int PRIMARY KEY, at timestamptz DEFAULT clock_timestamp(), pad text)")
        yield c
    finally:
        if (c.data / "postmaster.pid").exists():
            c.stop("immediate")
        for mnt in reversed(c.mounts):
            sh("umount", mnt, check=False)
        shutil.rmtree(top, ignore_errors=True)


class Writer(threading.Thread):
    """Inserts rows 1, 2, 3, ... each in its own transaction; ``acked`` is the last one
    whose COMMIT returned."""

    def __init__(self, c: Cluster) -> None:
        super().__init__(daemon=True)
        self.conn = c.connect()
        self.acked = 0
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            n += 1
            self.conn.execute("INSERT INTO t (n, pad) VALUES (%s, repeat('x', 200))", (n,))
            self.acked = n

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
        self.conn.close()


def spec(c: Cluster, name: str, *, participant: bool, churn: bool = False, kill_session: bool = False) -> Path:
    """Snapshot the data subvolume, then the WAL subvolume, in one group."""
    text = 'version = 1\n[options]\nmax_window = "60s"\n' + ('quiesce = "pause"\n' if participant else "")
    text += f'[[action]]\ntype = "btrfs.snapshot"\nsource = "fsdata/data"\ndest = "fsdata/{name}"\n'
    if churn:  # the WAL snapshot taken a few checkpoints later: the segments the data snapshot needs are recycled
        sql = "SELECT pg_switch_wal(); CHECKPOINT; " * 3
        text += (
            f'[[action]]\ntype = "exec"\ntarget = "churn"\ndo = ["{PGBIN}/psql", "-X", "-q", "-d", "{c.conninfo}", '
            f'"-c", "{sql}"]\ncancel = ["true"]\n'
        )
    if kill_session:  # inside the window: the backend holding the backup dies
        sql = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'blktx %'"
        text += (
            f'[[action]]\ntype = "exec"\ntarget = "kill"\ndo = ["{PGBIN}/psql", "-X", "-q", "-d", "{c.conninfo}", '
            f'"-c", "{sql}"]\ncancel = ["true"]\n'
        )
    text += f'[[action]]\ntype = "btrfs.snapshot"\nsource = "fswal/wal"\ndest = "fswal/{name}"\n'
    if participant:
        text += (
            f'[[action]]\ntype = "postgres.backup"\nconninfo = "{c.conninfo}"\ndest = "fsdata/{name}.backup"\nlabel = "{name}"\n'
        )
    path = c.base / f"{name}.toml"
    path.write_text(text)
    return path


def run_blktx(path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    out = subprocess.run(
        [sys.executable, "-m", "blktx", *args, "--allow-exec", "--json", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    try:
        return out.returncode, json.loads(out.stdout), out.stderr
    except ValueError:
        return out.returncode, {}, out.stdout + out.stderr


def restore(c: Cluster, name: str, backup: Path | None, saved_wal: bool = True) -> tuple[bool, str]:
    """The procedure of docs/backends.md: stop, snapshots into place (writable), the
    backup_label and the saved WAL in, start. Returns whether it started and its log."""
    c.stop()
    for live, snap in ((c.data, c.data.parent / name), (c.wal, c.wal.parent / name)):
        live.rename(live.with_name(live.name + ".before-restore"))
        sh("btrfs", "subvolume", "snapshot", snap, live)  # writable
    (c.data / "postmaster.pid").unlink(missing_ok=True)
    if backup is not None:
        for f in ("backup_label", "tablespace_map"):
            if (backup / f).exists():
                shutil.copyfile(backup / f, c.data / f)
                shutil.chown(c.data / f, "postgres", "postgres")
        for seg in sorted((backup / "pg_wal").iterdir()) if saved_wal else []:
            shutil.copyfile(seg, c.wal / seg.name)  # newer than the snapshot's copy of that segment, if any
            shutil.chown(c.wal / seg.name, "postgres", "postgres")
    c.log = c.log.with_name(f"restore-{name}.log")
    started = c.start().returncode == 0
    return started, c.log.read_text() if c.log.exists() else ""


def test_group_with_the_participant_restores_every_committed_row(cluster: Cluster) -> None:
    c = cluster
    w = Writer(c)
    w.start()
    time.sleep(1.0)
    before = w.acked  # every row acknowledged before the backup started
    checkpoints = int(c.psql("SELECT checkpoints_req FROM pg_stat_bgwriter"))
    t = time.monotonic()
    code, result, err = run_blktx(spec(c, "nightly", participant=True), "run")
    took = time.monotonic() - t
    during = w.acked
    time.sleep(0.5)
    w.stop()
    assert code == 0, ([a.get("error") for a in result["actions"]], err)
    backup = c.data.parent / "nightly.backup"
    label = (backup / "backup_label").read_text()
    assert "LABEL: nightly" in label and "START WAL LOCATION" in label
    state = json.loads((backup / "blktx-backup.json").read_text())
    assert state["status"] == "complete" and state["wal_saved"], state
    assert c.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'blktx %'") == "0"
    # one checkpoint before the window (do), one pg_backup_start(fast) asks for inside it
    assert int(c.psql("SELECT checkpoints_req FROM pg_stat_bgwriter")) >= checkpoints + 2
    hold = result["holds"][0]
    started, log = restore(c, "nightly", backup)
    assert started, log
    assert "completed backup recovery" in log and "consistent recovery state reached" in log, log
    count, top = c.psql(f"SELECT count(*), max(n) FROM t WHERE n <= {before}").split("|")
    total = c.psql("SELECT count(*) FROM t")
    print(
        f"\nwith participant: {before} rows acked before the run, {during} by its end ({took:.2f} s), "
        f"{total} restored; window {hold['window']} s; segments {state['wal_segments']}\n"
        + "\n".join(line for line in log.splitlines() if "redo" in line or "backup" in line or "consistent" in line)
    )
    assert int(count) == before and int(top) == before, "every row committed before the backup started"
    assert c.psql("SELECT count(*) FROM t") == c.psql("SELECT max(n) FROM t"), "no gaps"
    assert "backup_label" not in os.listdir(c.data), "PostgreSQL consumed the label (renamed .old)"


def test_the_label_without_the_saved_wal_does_not_restore(cluster: Cluster) -> None:
    """The snapshots hold no end-of-backup record (pg_backup_stop writes it after the
    window): PostgreSQL refuses to call the restore consistent without dest/pg_wal."""
    c = cluster
    w = Writer(c)
    w.start()
    time.sleep(0.3)
    code, result, err = run_blktx(spec(c, "nowal", participant=True), "run")
    w.stop()
    assert code == 0, (result, err)
    started, log = restore(c, "nowal", c.data.parent / "nowal.backup", saved_wal=False)
    print("\nlabel without the saved WAL:", [line for line in log.splitlines() if "FATAL" in line])
    assert not started and "WAL ends before end of online backup" in log, log


def test_snapshots_at_different_moments_need_the_participant(cluster: Cluster) -> None:
    """Between the data snapshot and the WAL snapshot, checkpoints recycle the WAL that the
    data snapshot's pg_control points at: without the participant the restore cannot
    start; with it (same churn), the label, the held WAL and the saved segments restore it."""
    c = cluster
    w = Writer(c)
    w.start()
    time.sleep(0.5)
    code, result, err = run_blktx(spec(c, "plain", participant=False, churn=True), "run")
    assert code == 0, (result, err)
    before = w.acked
    code, result, err = run_blktx(spec(c, "held", participant=True, churn=True), "run")
    assert code == 0, (result, err)
    w.stop()
    started, log = restore(c, "plain", None)
    print(
        "\nwithout participant:",
        started,
        "\n".join(line for line in log.splitlines() if "PANIC" in line or "FATAL" in line or "LOG" in line)[-1500:],
    )
    assert not started and ("checkpoint record" in log or "PANIC" in log), log
    # back to the live cluster's place, and restore the group that had the participant
    for live in (c.data, c.wal):
        sh("btrfs", "subvolume", "delete", live)
        live.with_name(live.name + ".before-restore").rename(live)
    started, log = restore(c, "held", c.data.parent / "held.backup")
    assert started, log
    assert c.psql(f"SELECT count(*) FROM t WHERE n <= {before}") == str(before)


def test_a_session_that_dies_inside_the_window_rolls_the_group_back(cluster: Cluster) -> None:
    c = cluster
    code, result, err = run_blktx(spec(c, "doomed", participant=True, kill_session=True), "run")
    assert code == 1, (result, err)
    assert "session holding the backup" in json.dumps(result), result
    assert not any(p.name.startswith("doomed") for p in c.data.parent.iterdir()), "nothing of the group is left"
    assert not any(p.name.startswith("doomed") for p in c.wal.parent.iterdir())
    # the server is fine and not in backup mode: a new backup starts and stops
    code, result, err = run_blktx(spec(c, "again", participant=True), "run")
    assert code == 0, (result, err)


def test_recover_after_a_kill_inside_the_window_needs_no_session(cluster: Cluster) -> None:
    c = cluster
    path = spec(c, "killed", participant=True)
    path.write_text(path.read_text() + '[[action]]\ntype = "exec"\ntarget = "slow"\ndo = ["sleep", "30"]\ncancel = ["true"]\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "blktx", "run", "--allow-exec", "--json", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while c.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'blktx %'") == "0":
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    time.sleep(1.0)  # inside the window: pg_backup_start has run
    proc.kill()
    proc.communicate()
    deadline = time.monotonic() + 5
    while c.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'blktx %'") != "0":
        assert time.monotonic() < deadline, "the backend ended with the run's process"
        time.sleep(0.1)
    recover = [sys.executable, "-m", "blktx", "recover", "--allow-exec", "--json"]
    out = subprocess.run(recover, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not (c.data.parent / "killed.backup").exists() and not (c.data.parent / "killed").exists()
    again = subprocess.run(recover, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
