"""Group snapshots (blktx.catalog): recorded with the commit, listed, verified by identity."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from blktx.catalog import expand
from blktx_plugins.sim import _write, make_world, read_world

SPEC = """version = 1
group = "web"
snapshot = "{snapshot}"
[[action]]
type = "sim.snapshot"
device = "a"
[[action]]
type = "sim.snapshot"
device = "b"
{extra}"""


def blktx(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blktx", *args], capture_output=True, text=True, cwd=cwd, env=os.environ.copy(), check=False
    )


def listing(*args: str) -> tuple[int, dict[str, Any]]:
    out = blktx("list", "--json", *args)
    return out.returncode, json.loads(out.stdout)


@pytest.fixture
def world(tmp_path: Path) -> Path:
    make_world(str(tmp_path / "sim-world.json"), ["a", "b"])
    return tmp_path


def write_spec(folder: Path, snapshot: str, extra: str = "", name: str = "t.toml") -> Path:
    path = folder / name
    path.write_text(SPEC.format(snapshot=snapshot, extra=extra))
    return path


def test_a_committed_group_snapshot_is_recorded_with_its_members_and_names(world: Path) -> None:
    spec = write_spec(world, "nightly-{now:%Y%m%d}-{group}")
    out = blktx("run", "--json", str(spec))
    assert out.returncode == 0, out.stdout + out.stderr
    name = f"nightly-{time.strftime('%Y%m%d')}-web"
    snaps = read_world(str(world / "sim-world.json"))["devices"]
    assert list(snaps["a"]["snapshots"].values()) == [name] == list(snaps["b"]["snapshots"].values())
    status, data = listing("web")
    (entry,) = data["group_snapshots"]
    assert status == 0 and (entry["group"], entry["name"]) == ("web", name)
    assert entry["txid"] == json.loads(out.stdout)["txid"]
    assert [m["params"]["device"] for m in entry["members"]] == ["a", "b"]
    assert all(m["identity"]["id"] == 1 for m in entry["members"]), "each member's identity, as journaled"


def test_a_rolled_back_run_records_nothing_and_a_name_is_used_once(world: Path) -> None:
    failing = write_spec(world, "n1", extra='[[action]]\ntype = "fault"\nphase = "invalidate"\n', name="f.toml")
    assert blktx("run", str(failing)).returncode == 1
    assert listing()[1]["group_snapshots"] == []
    spec = write_spec(world, "n1")
    assert blktx("run", str(spec)).returncode == 0
    again = blktx("run", "--json", str(spec))
    assert again.returncode == 2
    (problem,) = json.loads(again.stdout)["problems"]
    assert "already has a group snapshot named 'n1'" in problem["message"]
    assert len(read_world(str(world / "sim-world.json"))["devices"]["a"]["snapshots"]) == 1, "nothing touched"


def test_verify_finds_a_member_gone_by_identity_and_max_age_says_so(world: Path) -> None:
    spec = write_spec(world, "n-{txid}")
    assert blktx("run", str(spec)).returncode == 0
    status, data = listing("web", "--verify", "--max-age", "1h")
    assert status == 0 and data["group_snapshots"][0]["state"] == "complete"
    # somebody replaces b's snapshot by one of the same name: not the member any more
    data_w = read_world(str(world / "sim-world.json"))
    (name,) = data_w["devices"]["b"]["snapshots"].values()
    data_w["devices"]["b"]["snapshots"] = {"7": name}
    _write(str(world / "sim-world.json"), data_w)
    status, data = listing("web", "--verify", "--max-age", "1h")
    (entry,) = data["group_snapshots"]
    assert entry["state"] == "incomplete" and status == 1 and "stale" in data
    assert [m["present"] for m in entry["members"]] == [True, False]
    text = blktx("list", "web", "--verify")
    assert "member #1 sim.snapshot" in text.stdout and "is gone" in text.stdout


def test_max_age_fails_when_the_newest_is_older(world: Path) -> None:
    assert blktx("run", str(write_spec(world, "n-{txid}"))).returncode == 0
    assert listing("web", "--max-age", "1h")[0] == 0
    time.sleep(0.2)
    status, data = listing("web", "--max-age", "100ms")
    assert status == 1 and "newer than 100ms" in data["stale"]
    assert listing("nosuchgroup", "--max-age", "1d")[0] == 1


@pytest.mark.parametrize(
    "template, why", [("{nope}", "unknown field {nope}"), ("a/b", "not a usable name"), ("{host:%Y}", "takes no format")]
)
def test_bad_templates_are_refused_at_the_snapshot_key(world: Path, template: str, why: str) -> None:
    out = blktx("check", "--json", str(write_spec(world, template)))
    assert out.returncode == 2
    (problem,) = json.loads(out.stdout)["problems"]
    assert problem["key"] == "snapshot" and why in problem["message"] and problem["line"] == 3


def test_defaults_group_from_the_file_and_name_from_the_txid(world: Path) -> None:
    (world / "shop.toml").write_text('version = 1\n[[action]]\ntype = "sim.snapshot"\ndevice = "a"\nname = "x"\n')
    out = blktx("run", "--json", str(world / "shop.toml"))
    txid = json.loads(out.stdout)["txid"]
    (entry,) = listing("shop")[1]["group_snapshots"]
    assert entry["name"] == txid


def test_expand() -> None:
    assert expand("{group}-{txid}", group="g", txid="t1") == "g-t1"
    assert expand("{now:%Y}", group="g", txid="t", now=0) == time.strftime("%Y", time.localtime(0))
    with pytest.raises(ValueError):
        expand("x y", group="g", txid="t")


def test_verify_qcow2_members_by_snapshot_id_and_date_and_overlay_inode(tmp_path: Path) -> None:
    from qemu_helpers import make_image

    if shutil.which("qemu-img") is None:
        pytest.skip("needs qemu-img (Debian qemu-utils)")
    make_image(tmp_path / "d.qcow2", size="1M")
    make_image(tmp_path / "v.base.qcow2", size="1M")
    os.symlink("v.base.qcow2", tmp_path / "v")
    (tmp_path / "t.toml").write_text(
        'version = 1\ngroup = "shop"\nsnapshot = "n1"\n'
        '[[action]]\ntype = "qcow2.internal-create"\nimage = "d.qcow2"\n'
        '[[action]]\ntype = "qcow2.external-create"\ndevice = "v"\noverlay = "v.n1.qcow2"\n'
    )
    assert blktx("run", str(tmp_path / "t.toml")).returncode == 0
    status, data = listing("shop", "--verify", "--max-age", "1h")
    assert status == 0 and data["group_snapshots"][0]["state"] == "complete"
    # the snapshot deleted and made again by hand under the same name; the overlay replaced by a copy
    subprocess.run(["qemu-img", "snapshot", "-d", "n1", str(tmp_path / "d.qcow2")], check=True)
    time.sleep(1.1)  # a new date (QEMU keeps seconds and nanoseconds)
    subprocess.run(["qemu-img", "snapshot", "-c", "n1", str(tmp_path / "d.qcow2")], check=True)
    shutil.copy(tmp_path / "v.n1.qcow2", tmp_path / "copy.qcow2")
    os.replace(tmp_path / "copy.qcow2", tmp_path / "v.n1.qcow2")
    status, data = listing("shop", "--verify", "--max-age", "1h")
    (entry,) = data["group_snapshots"]
    assert status == 1 and entry["state"] == "incomplete" and [m["present"] for m in entry["members"]] == [False, False]
