"""qcow2 internal snapshots spread over several storage daemons at once, on real
images: all or none across the daemons, a fault in one daemon's transaction, and
the limit of open files."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qemu_helpers import make_image, needs_qemu_img, world

from blktx import ActionFailed, ActionSpec, Executor, Transaction
from blktx.plugins import default_registry
from blktx_plugins import _daemons, qcow2
from blktx_plugins._image import read_header
from blktx_plugins._qemu import StorageDaemon

pytestmark = needs_qemu_img

N = 40


def run(directory: Path, actions: list[tuple[str, dict[str, Any]]], **options: Any) -> Any:
    return Executor(default_registry()).run(
        Transaction([ActionSpec(t, p) for t, p in actions], options=options, base_dir=str(directory))
    )


def group(n: int, name: str = "nightly") -> list[tuple[str, dict[str, Any]]]:
    return [("qcow2.internal-create", {"image": f"d{i}.qcow2", "name": name}) for i in range(n)]


def fill(d: Path, n: int, size: str = "16M") -> None:
    """``n`` images, every third with a snapshot of its own, copied from two made by qemu-img."""
    d.mkdir(exist_ok=True)
    make_image(d / "plain.tmpl", size=size)
    make_image(d / "snap.tmpl", size=size, snapshots=("weekly",))
    for i in range(n):
        shutil.copyfile(d / ("snap.tmpl" if i % 3 == 0 else "plain.tmpl"), d / f"d{i}.qcow2")
    (d / "plain.tmpl").unlink()
    (d / "snap.tmpl").unlink()


def lists(d: Path) -> dict[str, list[tuple[str, str, tuple[int, int]]]]:
    """Every image's snapshots (id, name, date), read by blktx's header reader (no process each)."""
    return {p.name: [(s.id, s.name, s.date) for s in read_header(str(p))[1]] for p in sorted(d.glob("*.qcow2"))}


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[list[list[str]]]:
    """The batches each storage-daemon group of the run was given."""
    seen: list[list[list[str]]] = []
    real = _daemons.batches

    def batches(images: Any, jobs: int, dry: bool = False) -> list[list[str]]:
        got = real(images, jobs, dry)
        if not dry:
            seen.append(got)
        return got

    monkeypatch.setattr(qcow2, "batches", batches)
    return seen


@pytest.mark.parametrize("jobs", [1, 3])
def test_a_group_over_several_daemons_commits_and_rolls_back_all_or_none(
    tmp_path: Path, spy: list[list[list[str]]], jobs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_daemons, "default_daemons", lambda: 2)  # as on a 2-core machine, whatever runs the test
    fill(tmp_path, N)
    before = world(tmp_path)
    result = run(tmp_path, [*group(N), ("fault", {"phase": "invalidate"})], jobs=jobs)
    assert result.outcome == "rolled back", result.summary()
    assert len(spy[0]) == (3 if jobs == 3 else 2) and sum(map(len, spy[0])) == N
    assert len(spy) == 2, "cancel deleted over daemons too"
    assert world(tmp_path) == before
    result = run(tmp_path, group(N), jobs=jobs)
    assert result.outcome == "committed", result.summary()
    for i in range(N):
        names = [s.name for s in read_header(str(tmp_path / f"d{i}.qcow2"))[1]]
        assert names == (["weekly", "nightly"] if i % 3 == 0 else ["nightly"])
    # and the deletes of a later run, over daemons as well
    result = run(tmp_path, [("qcow2.internal-delete", {"image": f"d{i}.qcow2", "name": "nightly"}) for i in range(N)], jobs=jobs)
    assert result.outcome == "committed", result.summary()
    assert world(tmp_path) == before


def _fault_in(monkeypatch: pytest.MonkeyPatch, image: str, how: str) -> None:
    """Make the transaction of the daemon holding ``image`` fail for real: QEMU
    refuses it (a snapshot of the name made just before on that daemon, by
    somebody else as far as blktx knows), or the daemon is killed."""
    real = StorageDaemon.execute

    async def execute(self: StorageDaemon, name: str, args: dict[str, Any] | None = None, timeout: float = 120.0) -> Any:
        if name == "transaction" and image in self.node:
            if how == "refused":
                await real(self, "blockdev-snapshot-internal-sync", {"device": self.node[image], "name": "nightly"})
            else:
                self._proc.send_signal(signal.SIGKILL)
                self._proc.wait()
        return await real(self, name, args, timeout)

    monkeypatch.setattr(StorageDaemon, "execute", execute)


@pytest.mark.parametrize("how", ["refused", "killed"])
def test_a_failure_in_one_daemons_transaction_rolls_back_the_others(
    tmp_path: Path, spy: list[list[list[str]]], how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(tmp_path, N)
    make_image(tmp_path / "r.qcow2", snapshots=("nightly",))  # replaced after the fresh ones: never begun
    before = lists(tmp_path)
    victim = str(tmp_path / f"d{N - 1}.qcow2")
    _fault_in(monkeypatch, victim, how)
    replace = ("qcow2.internal-create", {"image": "r.qcow2", "name": "nightly", "replace": True})
    result = run(tmp_path, [*group(N), replace], jobs=4)
    assert result.outcome == "rolled back", result.summary()
    assert len(spy[0]) == 4
    failed = " ".join(str(f) for f in result.failures)
    assert failed.count("qemu-storage-daemon") == N // 4, failed  # only the victim's batch failed
    after = lists(tmp_path)
    if how == "refused":
        assert "already exists" in str(failed)
        # the one made on that daemon before the transaction is not blktx's: left
        extra = after.pop(os.path.basename(victim))
        assert [s[1] for s in extra] == [s[1] for s in before.pop(os.path.basename(victim))] + ["nightly"]
    else:
        assert "exited with status -9" in str(failed), failed
    assert after == before


def test_a_daemon_that_cannot_open_an_image_says_why(tmp_path: Path) -> None:
    image = make_image(tmp_path / "bad.qcow2")
    with open(image, "r+b") as fh:  # an L1 table offset QEMU refuses (not cluster aligned)
        fh.seek(40)
        fh.write(struct.pack(">Q", 0x30201))
    with pytest.raises(ActionFailed) as err:
        StorageDaemon([str(image)], "t")
    assert "exited at start" in str(err.value) and str(image) in str(err.value), err.value
    assert "L1" in str(err.value), err.value


def _limited(soft: int, hard: int) -> Callable[[], None]:
    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return lower


def _spec(d: Path, n: int, extra: str = "") -> Path:
    lines = ["version = 1"]
    for i in range(n):
        lines += ["[[action]]", 'type = "qcow2.internal-create"', f'image = "d{i}.qcow2"', 'name = "nightly"']
    (d / "t.toml").write_text("\n".join(lines) + "\n" + extra)
    return d / "t.toml"


def _blktx(d: Path, spec: Path, soft: int, hard: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blktx", "run", "--json", str(spec), "--journal", str(d / "j.sqlite")],
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=_limited(soft, hard),
    )


@pytest.mark.parametrize("n", [1500])
def test_a_large_group_under_ulimit_1024_commits_and_rolls_back(tmp_path: Path, n: int) -> None:
    """Under ``ulimit -n 1024`` (soft and hard: the daemons cannot raise theirs) a
    group of 1,500 images needs 3,000 descriptors in daemons: batches sized to the
    limit, more daemons, never a failed open."""
    d = tmp_path / "w"
    fill(d, n, size="1M")
    before = lists(d)
    fault = '[[action]]\ntype = "fault"\nphase = "invalidate"\n'
    out = _blktx(d, _spec(d, n, fault), 1024, 1024)
    assert out.returncode != 0 and json.loads(out.stdout)["outcome"] == "rolled back", out.stdout[-2000:] + out.stderr
    assert "EOFError" not in out.stdout and "cannot connect" not in out.stdout
    assert lists(d) == before
    out = _blktx(d, _spec(d, n), 1024, 1024)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr
    after = lists(d)
    assert all([s[1] for s in after[k]] == [s[1] for s in before[k]] + ["nightly"] for k in before)


def test_a_limit_that_leaves_no_room_is_refused_at_check_naming_it(tmp_path: Path) -> None:
    d = tmp_path / "w"
    fill(d, 20, size="1M")
    before = lists(d)
    out = _blktx(d, _spec(d, 20), 80, 80)
    assert json.loads(out.stdout)["outcome"] == "invalid", out.stdout + out.stderr
    assert "ulimit -n 80" in out.stdout, out.stdout
    assert lists(d) == before
