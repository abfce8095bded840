"""A mixed group (qcow2 internal, qcow2 external with the symlink layout, btrfs, sim)
made on 10 ticks of a fake clock, pruned by a policy, reverted to a middle one, then
deleted: after each step the world equals the model, and ``qemu-img check`` is clean."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from qemu_helpers import needs_qemu_img

import blktx.catalog
from blktx.cli import main
from blktx.journal import SqliteJournal
from blktx.testing.fixtures import btrfs_mount, run  # noqa: F401 - btrfs_mount is a fixture
from blktx_plugins.sim import _write, make_world, read_world

pytestmark = needs_qemu_img

HOUR = 3600.0
T0 = 1793491200.0  # 2026-11-01 00:00 UTC


def spec(k: int) -> str:
    return f"""version = 1
group = "app"
snapshot = "t{k}"
[retention]
keep = {{ last = 1, daily = 3 }}
[[action]]
type = "qcow2.internal-create"
image = "int.qcow2"
[[action]]
type = "qcow2.external-create"
device = "dev"
overlay = "ext.{k}.qcow2"
[[action]]
type = "btrfs.snapshot"
source = "mnt/data"
dest = "mnt/snaps/t{k}"
[[action]]
type = "sim.snapshot"
device = "a"
"""


def write(base: Path, k: int) -> None:
    """The applications write generation ``k`` everywhere."""
    for image in ("int.qcow2", "dev"):
        run("qemu-io", "-f", "qcow2", "-c", f"write -P {k + 1} 0 64k", str(base / image))
    (base / "mnt" / "data" / "file").write_text(f"gen {k}")
    w = read_world(str(base / "sim-world.json"))
    w["devices"]["a"]["data"] = f"gen {k}"
    _write(str(base / "sim-world.json"), w)


def reads(image: Path, k: int) -> bool:
    out = subprocess.run(["qemu-io", "-r", "-U", "-c", f"read -P {k + 1} 0 64k", str(image)], capture_output=True, text=True)
    return out.returncode == 0 and "Pattern verification failed" not in out.stdout


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    status = main([*args, "--json"])
    out = capsys.readouterr().out
    return status, json.loads(out) if out.strip() else {}


def catalog() -> list[str]:
    """The group's snapshots of the schedule (not what a revert kept: see the test)."""
    names = [e["name"] for e in SqliteJournal(os.environ["BLKTX_JOURNAL"]).group_snapshots("app")]
    return [n for n in names if not n.startswith("before-revert-")]


def check_world(base: Path, kept: list[int]) -> None:
    """Every kept group snapshot is there, by every member; nothing else is."""
    names = [f"t{k}" for k in kept]
    assert catalog() == names
    internal = [n for _, n in _snapshots(base / "int.qcow2")]
    assert internal == names
    for k in kept:  # the external point in time: the image the device pointed at when t<k> was taken
        frozen = base / (f"ext.{k - 1}.qcow2" if k else "ext.base.qcow2")
        assert reads(frozen, k), f"t{k}'s frozen image {frozen.name} holds generation {k}"
    assert sorted(os.listdir(base / "mnt" / "snaps")) == sorted(names)
    for k in kept:
        assert (base / "mnt" / "snaps" / f"t{k}" / "file").read_text() == f"gen {k}"
    assert sorted(read_world(str(base / "sim-world.json"))["devices"]["a"]["snapshots"].values()) == sorted(names)
    for image in base.glob("*.qcow2"):
        assert subprocess.run(["qemu-img", "check", "-q", str(image)]).returncode == 0, image


def _snapshots(image: Path) -> list[tuple[str, str]]:
    out = run("qemu-img", "snapshot", "-U", "-l", str(image))
    return [(line.split()[0], line.split()[1]) for line in out.splitlines()[2:] if line.strip()]


@pytest.fixture
def base(btrfs_mount: Path, monkeypatch: pytest.MonkeyPatch) -> Path:  # noqa: F811 - the fixture
    root = btrfs_mount.parent
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    run("qemu-img", "create", "-q", "-f", "qcow2", str(root / "int.qcow2"), "16M")
    run("qemu-img", "create", "-q", "-f", "qcow2", str(root / "ext.base.qcow2"), "16M")
    os.symlink("ext.base.qcow2", root / "dev")
    (btrfs_mount / "snaps").mkdir()
    make_world(str(root / "sim-world.json"), {"a": {"snapshots": {}, "layers": ["a0"], "active": "a0", "data": ""}})
    monkeypatch.chdir(root)
    return root


@pytest.mark.skipif(shutil.which("btrfs") is None, reason="needs btrfs (Debian btrfs-progs)")
def test_ten_ticks_prune_revert_delete(base: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for k in range(10):
        write(base, k)
        monkeypatch.setattr(blktx.catalog, "clock", lambda k=k: T0 + k * 12 * HOUR)
        (base / "app.toml").write_text(spec(k))
        status, result = cli(capsys, "run", "app.toml")
        assert status == 0, result
    check_world(base, list(range(10)))

    # keep last = 1, daily = 3 (12 h ticks: two a day): t9, and the newest of the 3 newest days
    status, result = cli(capsys, "prune", "--spec", "app.toml")
    assert status == 0, result
    kept = [5, 7, 9]
    check_world(base, kept)
    assert reads(base / "dev", 9), "what the guest sees did not change"

    # new data everywhere, then back to the middle one
    write(base, 42)
    status, result = cli(capsys, "revert", "app@t7")
    assert status == 0, result
    assert reads(base / "int.qcow2", 7) and reads(base / "dev", 7)
    assert (base / "mnt" / "data" / "file").read_text() == "gen 7"
    assert read_world(str(base / "sim-world.json"))["devices"]["a"]["data"] == "gen 7"
    check_world(base, kept)
    # the abandoned external branch (generation 42) is kept, and listed as a group snapshot of its own
    status, listing = cli(capsys, "list", "app", "--verify")
    (branch,) = [e for e in listing["group_snapshots"] if e["name"] == f"before-revert-{result['txid']}"]
    assert branch["state"] == "complete" and [m["type"] for m in branch["members"]] == ["qcow2.external-create"]
    assert reads(Path(branch["members"][0]["identity"]["old"]), 42)

    # the oldest goes; the reverted-to one now has a branch (the abandoned generation 42): refused, nothing touched
    status, result = cli(capsys, "delete", "app@t5")
    assert status == 0, result
    check_world(base, [7, 9])
    before = sorted(os.listdir(base))
    status, result = cli(capsys, "delete", "app@t7")
    assert status == 2, result
    (problem,) = result["problems"]
    assert problem["target"].endswith("/dev") and "branch" in problem["message"], problem
    assert sorted(os.listdir(base)) == before
    check_world(base, [7, 9])
    assert reads(base / "dev", 7), "the guest still sees the reverted data"
    # the branch goes: nothing depends on its top, which leaves the folder with it
    top = Path(branch["members"][0]["identity"]["old"])
    status, result = cli(capsys, "delete", f"app@{branch['name']}")
    assert status == 0, result
    assert not top.exists()
    check_world(base, [7, 9])
