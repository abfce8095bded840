"""Group snapshots of qcow2.external-create reverted and deleted (qcow2.external-revert,
qcow2.external-delete), through the CLI, on real images checked with qemu-img and qemu-io.

The layout: ``vm`` is a symlink over ``base.qcow2``; group snapshots s1, s2, s3 of group
``app`` each add an overlay ``vm.sK.qcow2``, and the first MiB k gets pattern k+1 after
sK. So s1's point in time is base.qcow2 (its frozen image), s2's is vm.s1.qcow2, s3's
is vm.s2.qcow2, and the device shows one more MiB than s3.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu_helpers import make_image, needs_qemu_img, world

from blktx import Action, ActionSpec, Executor, Transaction, load_spec
from blktx.journal import SqliteJournal
from blktx.locks import Locker
from blktx.plugins import default_registry

pytestmark = needs_qemu_img
NOBODY = 65534

SPEC = """version = 1
group = "{group}"
snapshot = "s{k}"
[[action]]
type = "qcow2.external-create"
device = "img/vm"
overlay = "img/vm.s{k}.qcow2"
"""

#: What each point in time shows: the pattern of MiB 0, 1, 2 and 3 (0: never written).
S1, S2, S3, NOW = [1, 0, 0, 0], [1, 2, 0, 0], [1, 2, 3, 0], [1, 2, 3, 4]


def blktx(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blktx", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False
    )


def sees(path: Path, expected: list[int]) -> bool:
    """Whether reading through ``path`` (its whole chain, read-only) shows ``expected``."""
    reads = [a for mb, p in enumerate(expected) for a in ("-c", f"read -P {p} {mb}M 1M")]
    out = subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", *reads, str(path)], capture_output=True, text=True)
    return out.returncode == 0 and "verification failed" not in out.stdout + out.stderr and "Fail" not in out.stdout


def clean(path: Path) -> bool:
    return subprocess.run(["qemu-img", "check", "-U", str(path)], capture_output=True).returncode == 0


def build(root: Path, group: str = "app") -> Path:
    """``root/img`` with the device and three group snapshots of ``group`` (see the module)."""
    img = root / "img"
    img.mkdir()
    make_image(img / "base.qcow2", pattern=1)
    os.symlink("base.qcow2", img / "vm")
    for k in (1, 2, 3):
        spec = root / f"{group}-s{k}.toml"
        spec.write_text(SPEC.format(group=group, k=k))
        # as `blktx run` does, in this process (a second per run saved)
        with journal() as j:
            result = Executor(default_registry(), journal=j, locker=Locker()).run(load_spec(str(spec)))
        assert result.outcome == "committed", result.summary()
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P {k + 1} {k}M 1M", str(img / "vm")], check=True, capture_output=True
        )
    assert (
        sees(img / "vm", NOW) and sees(img / "vm.s2.qcow2", S3) and sees(img / "vm.s1.qcow2", S2) and sees(img / "base.qcow2", S1)
    )
    return img


@pytest.fixture
def img(tmp_path: Path) -> Path:
    return build(tmp_path)


@contextlib.contextmanager
def journal() -> Iterator[SqliteJournal]:
    """The test's journal, closed at once: a second connection left open in this process
    would lose its SQLite locks when the next one opens the file (POSIX locks are the
    process's), while the CLI's processes write it."""
    j = SqliteJournal(os.environ["BLKTX_JOURNAL"])
    try:
        yield j
    finally:
        j.close()


def entry(ref: str) -> dict[str, Any]:
    group, _, name = ref.partition("@")
    with journal() as j:
        found = j.group_snapshot(group, name)
    assert found is not None, ref
    return found  # type: ignore[no-any-return]


def names(group: str = "app") -> list[str]:
    """The group's own snapshots (not the branches reverts kept: :func:`kept`)."""
    with journal() as j:
        return [e["name"] for e in j.group_snapshots(group) if not e["name"].startswith("before-revert-")]


def kept(group: str = "app") -> list[dict[str, Any]]:
    """The group snapshots of what reverts kept (``before-revert-TXID``)."""
    with journal() as j:
        return [e for e in j.group_snapshots(group) if e["name"].startswith("before-revert-")]


def member(ref: str) -> Action:
    """The committed external-create of the group snapshot, as the catalog gives it back."""
    (m,) = entry(ref)["members"]
    registry = default_registry()
    action = Action(m["index"], registry.get(m["type"]), m["params"], m["target"])
    action.undo = dict(m["identity"])
    return action


def saved(img: Path, tmp: Path, *names: str) -> dict[str, Path]:
    """A standalone copy of what each image shows now (``qemu-img convert``)."""
    copies = {}
    for name in names:
        copies[name] = tmp / f"saved-{name}.qcow2"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", str(img / name), str(copies[name])], check=True)
    return copies


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True).returncode == 0


# -- revert ------------------------------------------------------------------------------


def test_revert_brings_the_device_back_and_keeps_the_abandoned_branch(img: Path) -> None:
    out = blktx("revert", "--json", "app@s2")
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["outcome"] == "committed"
    (action,) = result["actions"]
    assert action["type"] == "qcow2.external-revert"
    link = os.readlink(img / "vm")
    assert link.startswith("vm.s1.revert-") and link.endswith(".qcow2") and result["txid"] in link
    assert sees(img / "vm", S2) and clean(img / "vm")
    info = subprocess.run(["qemu-img", "info", "-U", str(img / "vm")], capture_output=True, text=True).stdout
    assert "backing file: ./vm.s1.qcow2" in info and "backing file format: qcow2" in info
    # the abandoned branch is kept, named, and still shows what the device showed
    assert str(img / "vm.s3.qcow2") in action["output"] and "kept" in action["output"]
    assert sees(img / "vm.s3.qcow2", NOW)
    # the frozen image is only a backing file: writing through the device leaves the point in time
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 9 0 1M", str(img / "vm")], check=True, capture_output=True)
    assert sees(img / "vm.s1.qcow2", S2) and names() == ["s1", "s2", "s3"]
    # the abandoned branch is listed as a group snapshot of its own, its top by identity
    (branch,) = kept()
    assert branch["name"] == f"before-revert-{result['txid']}"
    assert [m["identity"]["old"] for m in branch["members"]] == [str(img / "vm.s3.qcow2")]
    # every group snapshot is still complete and can be reverted to, again and again
    assert blktx("list", "--verify", "--json", "app").returncode == 0
    for ref, expected in (("app@s3", S3), ("app@s1", S1), ("app@s2", S2)):
        out = blktx("revert", ref)
        assert out.returncode == 0, out.stdout + out.stderr
        assert sees(img / "vm", expected) and clean(img / "vm")


def test_keep_current_is_the_default_and_the_flag_is_accepted(img: Path) -> None:
    out = blktx("revert", "--keep-current", "--json", "app@s3")
    assert out.returncode == 0, out.stdout + out.stderr
    assert sees(img / "vm", S3) and sees(img / "vm.s3.qcow2", NOW)


def revert_spec(root: Path, ref: str, **extra: Any) -> Path:
    params = member(ref).type.revert_params(member(ref))
    lines = [f"{k} = {json.dumps(v)}" for k, v in {**params, **extra}.items()]
    spec = root / "revert.toml"
    spec.write_text('version = 1\n[[action]]\ntype = "qcow2.external-revert"\n' + "\n".join(lines) + "\n")
    return spec


def test_discard_current_removes_the_branch_top_after_the_commit_point(img: Path) -> None:
    out = blktx("run", "--json", str(revert_spec(img.parent, "app@s2", discard_current=True)))
    assert out.returncode == 0, out.stdout + out.stderr
    (action,) = json.loads(out.stdout)["actions"]
    assert action["output"].endswith(f"{img / 'vm.s3.qcow2'}: removed")
    assert not (img / "vm.s3.qcow2").exists() and sees(img / "vm", S2)
    # s3's point in time is its frozen image, still there: s3 stays complete and revertible
    assert blktx("list", "--verify", "app").returncode == 0
    assert blktx("revert", "app@s3").returncode == 0 and sees(img / "vm", S3)


def test_discard_current_keeps_a_branch_top_something_else_depends_on(img: Path) -> None:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "vm.s3.qcow2", "-F", "qcow2", str(img / "clone.qcow2")], check=True
    )
    out = blktx("run", "--json", str(revert_spec(img.parent, "app@s2", discard_current=True)))
    assert out.returncode == 0, out.stdout + out.stderr
    (action,) = json.loads(out.stdout)["actions"]
    assert f"{img / 'clone.qcow2'} depends on it" in action["output"]
    assert sees(img / "clone.qcow2", NOW)


@pytest.mark.parametrize("phase", ["do", "invalidate"])
def test_a_failed_revert_rolls_back_to_exactly_the_world_before(img: Path, phase: str) -> None:
    before = world(img)
    params = member("app@s2").type.revert_params(member("app@s2"))
    result = Executor(default_registry()).run(
        Transaction([ActionSpec("qcow2.external-revert", params), ActionSpec("fault", {"phase": phase})], base_dir=str(img))
    )
    assert result.outcome == "rolled back", result.summary()
    assert world(img) == before and sees(img / "vm", NOW)


def test_revert_is_refused_when_the_frozen_image_was_replaced(img: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.qcow2"
    subprocess.run(["cp", str(img / "vm.s1.qcow2"), str(copy)], check=True)
    os.replace(copy, img / "vm.s1.qcow2")  # same name, same content, another file
    before = world(img)
    out = blktx("revert", "--json", "app@s2")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "is gone" in json.loads(out.stdout)["problems"][0]["message"]  # member_exists: not the frozen image
    params = member("app@s2").type.revert_params(member("app@s2"))
    result = Executor(default_registry()).run(Transaction([ActionSpec("qcow2.external-revert", params)], base_dir=str(img)))
    assert result.outcome == "invalid" and "was replaced" in result.problems[0].message
    assert world(img) == before


def test_a_group_snapshot_journaled_without_the_frozen_images_identity_is_not_reverted(img: Path) -> None:
    action = member("app@s2")
    del action.undo["ident"]
    with pytest.raises(ValueError, match="no identity"):
        action.type.revert_params(action)


# -- images in use -----------------------------------------------------------------------


@pytest.fixture
def holder(img: Path) -> Any:
    """A qemu-storage-daemon with the device's active image open (as a VM would)."""
    import time

    from blktx_plugins._qemu import holder as who

    top = os.path.realpath(img / "vm")
    proc = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=f0,filename={top}",
            "--blockdev",
            "driver=qcow2,node-name=n0,file=f0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while who(top) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    yield proc
    proc.kill()
    proc.wait()


def test_revert_and_delete_refuse_an_image_in_use_naming_the_process(img: Path, holder: Any) -> None:
    before = world(img)
    for command in ("revert", "delete"):
        out = blktx(command, "--json", "app@s2")
        assert out.returncode == 2, out.stdout + out.stderr
        (problem,) = json.loads(out.stdout)["problems"]
        assert f"is in use by qemu-storage-daemon (pid {holder.pid})" in problem["message"]
    assert world(img) == before and names() == ["s1", "s2", "s3"]


# -- delete --------------------------------------------------------------------------------


def test_delete_keeps_every_other_point_in_time(img: Path, tmp_path: Path) -> None:
    keep = saved(img, tmp_path, "vm.s1.qcow2", "vm.s2.qcow2", "vm")
    out = blktx("delete", "--json", "app@s1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["outcome"] == "committed"
    assert not (img / "base.qcow2").exists() and names() == ["s2", "s3"]
    for name, copy in keep.items():
        assert same(img / name, copy) and clean(img / name), name
    info = subprocess.run(["qemu-img", "info", "-U", str(img / "vm.s1.qcow2")], capture_output=True, text=True).stdout
    assert "backing file" not in info  # base merged into it
    # the middle one: vm.s1.qcow2 merged into vm.s2.qcow2 (s3's own frozen image)
    assert blktx("delete", "app@s2").returncode == 0
    assert not (img / "vm.s1.qcow2").exists() and names() == ["s3"]
    assert same(img / "vm.s2.qcow2", keep["vm.s2.qcow2"]) and same(img / "vm", keep["vm"])
    assert blktx("list", "--verify", "app").returncode == 0
    assert blktx("revert", "app@s3").returncode == 0 and sees(img / "vm", S3) and clean(img / "vm")


@pytest.mark.parametrize("refs", [["app@s1", "app@s2"], ["app@s2", "app@s1"], ["app@s3", "app@s2", "app@s1"]])
def test_deleting_neighbours_in_one_transaction(img: Path, tmp_path: Path, refs: list[str]) -> None:
    keep = saved(img, tmp_path, "vm.s2.qcow2", "vm")
    out = blktx("delete", *refs)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not (img / "base.qcow2").exists() and not (img / "vm.s1.qcow2").exists()
    assert same(img / "vm", keep["vm"]) and clean(img / "vm")
    if "app@s3" in refs:
        assert names() == [] and not (img / "vm.s2.qcow2").exists()
        assert sorted(p.name for p in img.iterdir()) == ["vm", "vm.s3.qcow2"]
    else:
        assert names() == ["s3"] and same(img / "vm.s2.qcow2", keep["vm.s2.qcow2"])


def test_delete_is_refused_when_a_revert_made_a_branch(img: Path) -> None:
    assert blktx("revert", "app@s2").returncode == 0
    before = world(img)
    out = blktx("delete", "--json", "app@s2")  # vm.s1.qcow2 backs the revert's overlay and vm.s2.qcow2
    assert out.returncode == 2, out.stdout + out.stderr
    assert "a branch" in json.loads(out.stdout)["problems"][0]["message"]
    out = blktx("delete", "--json", "app@s3")  # vm.s2.qcow2 is on the abandoned branch
    assert out.returncode == 2, out.stdout + out.stderr
    assert "is not in the chain of" in json.loads(out.stdout)["problems"][0]["message"]
    assert world(img) == before and names() == ["s1", "s2", "s3"]
    # base.qcow2 has one child, in the device's chain: s1 can go, and both branches keep their data
    assert blktx("delete", "app@s1").returncode == 0
    assert sees(img / "vm", S2) and sees(img / "vm.s3.qcow2", NOW)
    # the abandoned branch removed by hand: s3's frozen image is used by nothing any more
    (img / "vm.s3.qcow2").unlink()
    assert blktx("delete", "app@s3").returncode == 0
    assert not (img / "vm.s2.qcow2").exists() and sees(img / "vm", S2) and names() == ["s2"]


def test_delete_refuses_a_frozen_image_with_internal_snapshots(img: Path) -> None:
    subprocess.run(["qemu-img", "snapshot", "-c", "mine", str(img / "base.qcow2")], check=True)
    before = world(img)
    out = blktx("delete", "--json", "app@s1")
    assert out.returncode == 2 and "holds internal snapshots ('mine')" in json.loads(out.stdout)["problems"][0]["message"]
    assert world(img) == before


def test_a_delete_killed_between_its_rebase_and_the_unlink_is_finished(img: Path) -> None:
    """The rebase (safe: the guest view is unchanged) happened, the unlink did not: do, run
    again, finds the frozen image in no chain and used by nothing, and removes it."""
    from blktx.context import RunContext
    from blktx.spec import bind

    registry = default_registry()
    params = member("app@s2").type.delete_params(member("app@s2"))
    actions, options = bind(Transaction([ActionSpec("qcow2.external-delete", params)], base_dir=str(img)), registry)
    ctx = RunContext("20260101T000000-0wned000", options, str(img), registry.pm.hook)
    assert Executor(registry).check_actions(actions, ctx, None) == []
    assert actions[0].undo["above"][0] == str(img / "vm.s2.qcow2")
    subprocess.run(
        ["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "./base.qcow2", "-F", "qcow2", str(img / "vm.s2.qcow2")], check=True
    )
    assert (img / "vm.s1.qcow2").exists() and sees(img / "vm.s2.qcow2", S3)
    actions[0].type.do(actions[0], ctx)
    assert not (img / "vm.s1.qcow2").exists() and sees(img / "vm.s2.qcow2", S3) and sees(img / "vm", NOW)
    actions[0].type.do(actions[0], ctx)  # and again: gone already, done


# -- the merge runs as the one user who can change the chain --------------------------------


@pytest.fixture
def tenant_img() -> Iterator[Path]:
    """The three group snapshots in a folder only root can change but others can reach,
    ``vm.s1.qcow2`` and ``vm.s2.qcow2`` owned by ``nobody`` (a tenant), ``base.qcow2``
    root's (0644), and beside them ``secret``: root's, 0600, 4 MiB of 0x5a."""
    if os.geteuid() != 0:
        pytest.skip("the attack needs root (blktx's setting) and the user nobody")
    top = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="blktx-tenant-"))
    top.chmod(0o755)
    try:
        img = build(top)
        for name in ("vm.s1.qcow2", "vm.s2.qcow2"):
            os.chown(img / name, NOBODY, NOBODY)
        (img / "secret").write_bytes(b"\x5a" * (4 << 20))
        (img / "secret").chmod(0o600)
        yield img
    finally:
        shutil.rmtree(top)


def test_a_merge_of_a_tenants_images_runs_as_the_tenant_and_keeps_every_point_in_time(tenant_img: Path) -> None:
    img = tenant_img
    keep = saved(img, img.parent, "vm.s2.qcow2", "vm")
    out = blktx("delete", "--json", "app@s2")  # vm.s1.qcow2 merged into vm.s2.qcow2 (both nobody's)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not (img / "vm.s1.qcow2").exists() and same(img / "vm.s2.qcow2", keep["vm.s2.qcow2"]) and sees(img / "vm", NOW)
    assert os.stat(img / "vm.s2.qcow2").st_uid == NOBODY


def test_a_tenant_who_rewrites_a_header_before_the_merge_cannot_make_root_read_a_file(tenant_img: Path) -> None:
    """The owner of vm.s1.qcow2 points its backing file at root's secret just before
    qemu-img starts (a qemu-img on PATH doing it first, as the tenant: the race of
    docs/security.md). Run as root the merge would copy the secret into vm.s2.qcow2,
    which the tenant reads; run as the tenant it cannot open it."""
    img = tenant_img
    attack = ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", str(img / "secret"), str(img / "vm.s1.qcow2")]
    out = _attack_between_check_and_qemu(img, attack, (NOBODY, NOBODY), ["delete", "--json", "app@s2"])
    assert out.returncode != 0, out.stdout
    report = json.loads(out.stdout)
    (error,) = [a["error"] for a in report["actions"] if a["error"]]
    assert "uid 65534" in error and "secret" in error, error  # the finalize's retry found the rewritten header
    assert b"\x5a" * 4096 not in (img / "vm.s2.qcow2").read_bytes(), "the secret was merged into the tenant's image"


def test_a_chain_the_tenant_could_not_read_is_refused_at_check(tenant_img: Path) -> None:
    img = tenant_img
    (img / "base.qcow2").chmod(0o600)  # root's: the tenant's merge could not read it
    before = world(img)
    out = blktx("delete", "--json", "app@s2")
    assert out.returncode == 2, out.stdout
    message = json.loads(out.stdout)["problems"][0]["message"]
    assert "uid 65534" in message and "cannot read" in message and "base.qcow2" in message
    assert world(img) == before


def test_a_chain_with_an_external_data_file_below_is_not_rebased(tmp_path: Path) -> None:
    """qemu-img would open the data file by the name in the header: refused at check."""
    img = tmp_path / "img"
    img.mkdir()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={img / 'base.raw'}", str(img / "base.qcow2"), "4M"],
        check=True,
    )
    os.symlink("base.qcow2", img / "vm")
    for k in (1, 2):
        (tmp_path / f"s{k}.toml").write_text(SPEC.format(group="app", k=k))
        assert blktx("run", str(tmp_path / f"s{k}.toml")).returncode == 0
    before = world(img)
    out = blktx("delete", "--json", "app@s2")  # vm.s1.qcow2 merged into vm.s2.qcow2, onto base.qcow2
    assert out.returncode == 2, out.stdout
    message = json.loads(out.stdout)["problems"][0]["message"]
    assert "base.qcow2 keeps its data in an external data file" in message, message
    assert world(img) == before


def test_a_chain_only_a_group_can_change_is_refused_at_check(tenant_img: Path) -> None:
    """root's images, writable by a group of tenants: no one uid stands for its members
    (run as nobody, the merge would read nobody's files for any of them)."""
    img = tenant_img
    for name in ("vm.s1.qcow2", "vm.s2.qcow2"):
        os.chown(img / name, 0, 4242)
        os.chmod(img / name, 0o660)
    before = world(img)
    out = blktx("delete", "--json", "app@s2")
    assert out.returncode == 2, out.stdout
    message = json.loads(out.stdout)["problems"][0]["message"]
    assert "writable by gid 4242" in message and "no one user stands for them all" in message, message
    assert world(img) == before and names() == ["s1", "s2", "s3"]


ALICE, TENANTS = 1234, 4242  # a tenant with no passwd entry, and a group of tenants


def _attack_between_check_and_qemu(
    img: Path, attack: list[str], who: tuple[int, int], args: list[str]
) -> subprocess.CompletedProcess[str]:
    """Run ``blktx *args`` with a qemu-img on PATH that, at a rebase, waits while
    ``attack`` runs as ``who`` (uid, gid; no other groups): another user acting in the
    moment between blktx's last check and qemu-img opening the chain by name."""
    real = shutil.which("qemu-img")
    sync = img.parent / "sync"
    sync.mkdir(mode=0o777)
    sync.chmod(0o777)
    fake = img.parent / "bin"
    fake.mkdir(mode=0o755)
    (fake / "qemu-img").write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = rebase ]; then : > {sync}/go; while [ ! -e {sync}/done ]; do sleep 0.02; done; fi\n'
        f'exec {real} "$@"\n'
    )
    (fake / "qemu-img").chmod(0o755)
    proc = subprocess.Popen(
        [sys.executable, "-m", "blktx", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"},
    )
    try:
        deadline = time.monotonic() + 60
        while not (sync / "go").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if (sync / "go").exists():
            subprocess.run(attack, user=who[0], group=who[1], extra_groups=[], check=True, capture_output=True, cwd="/")
        (sync / "done").touch()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_a_group_member_cannot_make_the_merge_read_the_image_owners_files(tenant_img: Path) -> None:
    """The images are alice's and writable by her group, whose other members (here
    ``nobody``) may not read her files. A member rewrites vm.s1's backing to alice's
    private file in the moment before qemu-img starts: run as alice (with the group),
    the merge would copy it into vm.s2.qcow2, which the member reads."""
    img = tenant_img
    for name in ("vm.s1.qcow2", "vm.s2.qcow2"):
        os.chown(img / name, ALICE, TENANTS)
        os.chmod(img / name, 0o664)
    private = img / "alice-private"
    private.write_bytes(b"\x5a" * (4 << 20))
    os.chown(private, ALICE, ALICE)
    private.chmod(0o600)
    attack = ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", str(private), str(img / "vm.s1.qcow2")]
    out = _attack_between_check_and_qemu(img, attack, (NOBODY, TENANTS), ["delete", "--json", "app@s2"])
    assert b"\x5a" * 4096 not in (img / "vm.s2.qcow2").read_bytes(), "alice's file was merged into an image her group reads"
    assert out.returncode == 2, out.stdout + out.stderr  # refused at check: alice and her group's members can change it
    assert "more than one user or group" in json.loads(out.stdout)["problems"][0]["message"]


def _grant(path: Path, uid: int, perm: int) -> None:
    """An ACL giving ``uid`` ``perm`` (rwx bits) on ``path``, as ``setfacl -m u:UID:...``
    does; the group class (``mask``) then shows in the group bits of its mode."""
    mode = os.stat(path).st_mode
    ents = [(0x01, (mode >> 6) & 7, -1), (0x02, perm, uid), (0x04, (mode >> 3) & 7, -1), (0x10, perm | ((mode >> 3) & 7), -1)]
    ents.append((0x20, mode & 7, -1))
    os.setxattr(path, "system.posix_acl_access", struct.pack("<I", 2) + b"".join(struct.pack("<HHi", *e) for e in ents))


def test_a_user_an_acl_lets_change_the_images_cannot_make_the_merge_read_a_file(tenant_img: Path) -> None:
    """The images are root's, and an ACL lets ``nobody`` write them (their mode then shows
    the ACL's mask as group bits: 0660 root:root). The merge must not run as anyone who
    can read what nobody cannot: here root's group-readable file."""
    img = tenant_img
    for name in ("vm.s1.qcow2", "vm.s2.qcow2"):
        os.chown(img / name, 0, 0)
        os.chmod(img / name, 0o600)
        _grant(img / name, NOBODY, 6)
    secret = img / "root-group-secret"
    secret.write_bytes(b"\x5a" * (4 << 20))
    secret.chmod(0o640)  # root:root: not nobody's to read
    attack = ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(img / "vm.s1.qcow2")]
    out = _attack_between_check_and_qemu(img, attack, (NOBODY, NOBODY), ["delete", "--json", "app@s2"])
    assert b"\x5a" * 4096 not in (img / "vm.s2.qcow2").read_bytes(), "root's file was merged into an image nobody reads"
    assert out.returncode in (1, 3), out.stdout + out.stderr  # the merge ran as nobody, who cannot open the secret
    (error,) = [a["error"] for a in json.loads(out.stdout)["actions"] if a["error"]]
    assert "uid 65534, gid 65534" in error and str(secret) in error, error


def test_a_tenants_symlink_on_the_way_to_a_backing_file_counts_as_theirs(tenant_img: Path) -> None:
    """Root's images, but vm.s2.qcow2 names its backing file through ``t/lnk``, a symlink
    in a folder of the tenant's (with --allow-shared-folders): every real path is root's
    alone, yet QEMU follows the link when it opens the chain by name. The tenant points
    it at another VM's disk (root's, 0600) as qemu-img starts: run as root, the merge
    copied that disk into vm.s2.qcow2, which the tenant reads."""
    img = tenant_img
    for name in ("vm.s1.qcow2", "vm.s2.qcow2"):
        os.chown(img / name, 0, 0)
    private = img / "root-vm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(private), "8M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 4M", str(private)], check=True, capture_output=True)
    private.chmod(0o600)
    tenant = img / "t"
    tenant.mkdir()
    os.chown(tenant, NOBODY, NOBODY)
    os.symlink(str(img / "vm.s1.qcow2"), tenant / "lnk")
    os.lchown(tenant / "lnk", NOBODY, NOBODY)
    # vm.s1 names base.qcow2 absolutely: reached through t/lnk, a relative name would be
    # joined to t/ (as QEMU joins it) and the chain refused as broken before run-as is judged
    absolute = ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(img / "base.qcow2"), str(img / "vm.s1.qcow2")]
    subprocess.run(absolute, check=True)
    rebase = ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", "t/lnk", str(img / "vm.s2.qcow2")]
    subprocess.run(rebase, check=True)
    attack = ["ln", "-sfn", str(private), str(tenant / "lnk")]
    out = _attack_between_check_and_qemu(img, attack, (NOBODY, NOBODY), ["delete", "--json", "--allow-shared-folders", "app@s2"])
    assert b"\x5a" * 4096 not in (img / "vm.s2.qcow2").read_bytes(), "root's VM disk was merged through the tenant's symlink"
    assert out.returncode == 2, out.stdout + out.stderr  # run as the tenant, who may not write root's vm.s2.qcow2
    message = json.loads(out.stdout)["problems"][0]["message"]
    assert "uid 65534" in message and str(tenant) in message, message


# -- crashes -------------------------------------------------------------------------------


def crash_each_write(command: list[str], settle: Any) -> list[str]:
    """Run ``command`` killed after its 1st, 2nd... journal write, each followed by
    ``blktx recover`` and ``settle()`` (which checks the world and returns "before" or
    "after"), until it runs to the end. Returns what each crash settled to."""
    seen = []
    for n in range(1, 40):
        out = blktx(*command, env={"BLKTX_CRASH_AFTER": str(n)})
        if out.returncode != -signal.SIGKILL:
            assert out.returncode == 0, out.stdout + out.stderr
            return seen
        rec = blktx("recover")
        assert rec.returncode == 0, rec.stdout + rec.stderr
        seen.append(settle())
    raise AssertionError("the command never ran to its end")


def test_a_revert_killed_after_each_journal_write_is_recovered_to_before_or_after(img: Path) -> None:
    before = world(img)

    def settle() -> str:
        if os.readlink(img / "vm") == "vm.s3.qcow2":
            assert world(img) == before and sees(img / "vm", NOW)
            return "before"
        overlay = img / os.readlink(img / "vm")
        assert sorted(world(img)["files"]) == sorted([*before["files"], overlay.name])
        assert sees(img / "vm", S2) and clean(img / "vm")
        # back to the world before, by hand, for the next crash point
        os.symlink("vm.s3.qcow2", img / "vm.tmp")
        os.replace(img / "vm.tmp", img / "vm")
        overlay.unlink()
        assert world(img) == before
        return "after"

    seen = crash_each_write(["revert", "app@s2"], settle)
    assert "before" in seen and "after" in seen, seen


def test_a_delete_killed_after_each_journal_write_is_recovered_to_before_or_after(tmp_path: Path) -> None:
    seen: list[str] = []
    for n in range(1, 40):
        root = tmp_path / f"n{n}"
        root.mkdir()
        img = build(root, group=f"app{n}")
        out = blktx("delete", f"app{n}@s2", env={"BLKTX_CRASH_AFTER": str(n)})
        if out.returncode != -signal.SIGKILL:
            assert out.returncode == 0, out.stdout + out.stderr
            break
        rec = blktx("recover")
        assert rec.returncode == 0, rec.stdout + rec.stderr
        left = names(f"app{n}")
        for name, expected in (("base.qcow2", S1), ("vm.s2.qcow2", S3), ("vm", NOW)):
            assert sees(img / name, expected) and clean(img / name), (n, name)
        if left == ["s1", "s2", "s3"]:
            assert (img / "vm.s1.qcow2").exists() and sees(img / "vm.s1.qcow2", S2)
            seen.append("before")
        else:
            assert left == ["s1", "s3"] and not (img / "vm.s1.qcow2").exists(), (n, left)
            seen.append("after")
        assert sorted(p.name for p in img.iterdir() if p.name != "vm.s1.qcow2") == [
            "base.qcow2",
            "vm",
            "vm.s2.qcow2",
            "vm.s3.qcow2",
        ]
    else:
        raise AssertionError("the delete never ran to its end")
    assert "before" in seen and "after" in seen, seen


def test_a_device_named_through_a_symlinked_folder(tmp_path: Path) -> None:
    """The catalog keeps the device's path as the spec named it; the images are found by
    their real paths, so the image above is not mistaken for a second child."""
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "link")
    img = build(tmp_path / "link")
    assert entry("app@s2")["members"][0]["params"]["device"] == str(tmp_path / "link" / "img" / "vm")
    out = blktx("delete", "app@s2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert not (img / "vm.s1.qcow2").exists() and sees(img / "vm", NOW) and sees(img / "vm.s2.qcow2", S3)
    assert blktx("revert", "app@s3").returncode == 0 and sees(img / "vm", S3)


def test_a_device_re_pointed_outside_the_roots_is_refused_and_its_target_never_touched(img: Path) -> None:
    """Somebody re-points the device at a file outside the folders the group snapshots
    were made under (a root-only file): a revert must neither discard nor keep it."""
    victim = img.parent.parent / (img.parent.name + "-victim")
    victim.mkdir(mode=0o700)
    (victim / "shadow").write_text("secret")
    os.unlink(img / "vm")
    os.symlink(victim / "shadow", img / "vm")
    for args in (("--discard-current", "app@s1"), ("app@s2",)):
        out = blktx("revert", "--json", *args)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "outside the" in json.loads(out.stdout)["problems"][0]["message"]
    assert (victim / "shadow").read_text() == "secret" and kept() == []


def test_a_frozen_image_re_pointed_outside_the_roots_is_never_merged(img: Path) -> None:
    """Its backing file changed to a file outside the roots (a root-only secret): a delete
    would have qemu-img read that file into the image above: refused, nothing touched."""
    victim = img.parent.parent / (img.parent.name + "-secret")
    victim.mkdir(mode=0o700)
    (victim / "shadow").write_bytes(b"ROOTSECRET" * 1000)
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(victim / "shadow"), "-F", "raw", str(img / "base.qcow2")],
        check=True,
        capture_output=True,
    )
    before = world(img)
    out = blktx("delete", "--json", "app@s1")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "outside" in json.loads(out.stdout)["problems"][0]["message"]
    assert world(img) == before and names() == ["s1", "s2", "s3"]


def test_deleting_below_an_overlay_in_another_folder_than_its_device_keeps_what_the_vm_opens(tmp_path: Path) -> None:
    """The device is in links/, its overlays in img/ (named absolutely, as QEMU opens them
    through the device). Merging the frozen image below the active overlay writes a new
    backing name: it must lead, joined to the device's folder as QEMU joins it, to the
    same file it leads to from the overlay's own folder."""
    img, links = tmp_path / "img", tmp_path / "links"
    img.mkdir()
    links.mkdir()
    make_image(img / "base.qcow2", pattern=1)
    os.symlink("../img/base.qcow2", links / "vm")
    for k in (1, 2):
        spec = tmp_path / f"s{k}.toml"
        spec.write_text(SPEC.format(group="app", k=k).replace('device = "img/vm"', 'device = "links/vm"'))
        with journal() as j:
            result = Executor(default_registry(), journal=j, locker=Locker()).run(load_spec(str(spec)))
        assert result.outcome == "committed", result.summary()
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P {k + 1} {k}M 1M", str(links / "vm")], check=True, capture_output=True
        )
    assert sees(links / "vm", S3)
    out = blktx("delete", "app@s2")
    assert out.returncode == 0, out.stdout + out.stderr
    info = subprocess.run(["qemu-img", "info", "-U", str(links / "vm")], capture_output=True, text=True).stdout
    assert sees(links / "vm", S3), info
    assert blktx("delete", "app@s1").returncode == 0 and sees(links / "vm", S3)
