"""host.fsfreeze on real loop-mounted ext4 filesystems."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting and freezing filesystems needs root"),
    pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs mkfs.ext4 (Debian e2fsprogs)"),
]


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[list[Path]]:
    made = []
    try:
        for i in range(2):
            img, mnt = tmp_path / f"fs{i}.img", tmp_path / f"m{i}"
            with open(img, "wb") as fh:
                fh.truncate(32 << 20)
            subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
            mnt.mkdir()
            subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
            made.append(mnt)
        yield made
    finally:
        for mnt in made:  # never leave a filesystem of this host frozen
            subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True, check=False)
            subprocess.run(["umount", str(mnt)], capture_output=True, check=False)


def spec(tmp_path: Path, mounts: list[Path], sleep: float, quiesce: str = "fsfreeze") -> Path:
    text = f'version = 1\n[options]\nquiesce = "{quiesce}"\nmax_window = "30s"\n'
    for m in mounts:
        text += f'[[action]]\ntype = "host.fsfreeze"\npath = "{m.name}"\n'
    text += f'[[action]]\ntype = "exec"\ntarget = "lvm:snap"\ndo = ["sleep", "{sleep}"]\ncancel = ["true"]\n'
    path = tmp_path / "t.toml"
    path.write_text(text)
    return path


def run(path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "blktx", "run", "--allow-exec", "--json", *extra, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def writer(mnt: Path) -> subprocess.Popen[bytes]:
    """A write that a frozen filesystem holds until it thaws."""
    return subprocess.Popen(
        ["dd", "if=/dev/zero", f"of={mnt / 'w'}", "bs=4k", "count=1", "conv=fsync"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def frozen(mnt: Path, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = writer(mnt)
        try:
            probe.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            probe.kill()  # it stays blocked in the kernel until the thaw, harmlessly
            return True
        time.sleep(0.05)
    return False


def test_both_filesystems_freeze_together_and_thaw_after_the_commit(tmp_path: Path, mounts: list[Path]) -> None:
    proc = run(spec(tmp_path, mounts, 1.5))
    assert frozen(mounts[0]) and frozen(mounts[1], timeout=1)
    blocked = [writer(m) for m in mounts]
    time.sleep(0.3)
    assert all(w.poll() is None for w in blocked), "a writer waits while the window is open"
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert all(w.wait(timeout=10) == 0 for w in blocked), "and goes on after the thaw"
    holds = json.loads(out)["holds"]
    assert sorted(h["target"] for h in holds) == sorted(f"hostfs:{m}" for m in mounts)
    assert all(h["window"] is not None for h in holds)


def test_a_rollback_thaws(tmp_path: Path, mounts: list[Path]) -> None:
    path = spec(tmp_path, mounts, 0.2)
    path.write_text(path.read_text() + '[[action]]\ntype = "fault"\nphase = "invalidate"\n')
    proc = run(path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, out + err
    assert writer(mounts[0]).wait(timeout=5) == 0 and writer(mounts[1]).wait(timeout=5) == 0


def test_the_watchdog_thaws_after_a_sigkill(tmp_path: Path, mounts: list[Path]) -> None:
    proc = run(spec(tmp_path, mounts, 30))
    assert frozen(mounts[0]) and frozen(mounts[1], timeout=1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t = time.monotonic()
    assert writer(mounts[0]).wait(timeout=5) == 0 and writer(mounts[1]).wait(timeout=5) == 0
    assert time.monotonic() - t < 2, "thawed by the watchdog, without blktx recover"
    done = subprocess.run(
        [sys.executable, "-m", "blktx", "recover", "--allow-exec", "--json"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_refusals_at_check(tmp_path: Path, mounts: list[Path]) -> None:
    (tmp_path / "plain").mkdir()
    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\n[options]\nquiesce = "fsfreeze"\n[[action]]\ntype = "host.fsfreeze"\npath = "plain"\n')
    out = subprocess.run(
        [sys.executable, "-m", "blktx", "check", "--json", str(bad)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 2 and "is not a mountpoint" in out.stdout
    journal_on_it = subprocess.run(
        [
            sys.executable,
            "-m",
            "blktx",
            "run",
            "--allow-exec",
            "--json",
            "--journal",
            str(mounts[0] / "j.sqlite"),
            str(spec(tmp_path, mounts, 0)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert journal_on_it.returncode == 2 and "would wait" in journal_on_it.stdout
    none = spec(tmp_path, mounts, 0, quiesce="none")
    out = subprocess.run(
        [sys.executable, "-m", "blktx", "check", "--allow-exec", "--json", str(none)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 2 and "needs a quiesce mode" in out.stdout
