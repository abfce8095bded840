"""libvirt domains in blktx transactions: real TCG domains under the embedded QEMU
driver (in this process) and under a private libvirtd, reached locally and over
ssh as a second host; mixed with qcow2 images and btrfs in one group."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from libvirt_helpers import QEMU_CONF, Daemon, define, files, libvirt_missing, seen, unique
from qemu_helpers import make_image, snapshots, subvolumes

from blktx import ActionSpec, Executor, Transaction
from blktx.testing import ActionTypeConformance

SNAP = "libvirt.snapshot"


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    why = libvirt_missing()
    if why:
        pytest.skip(why)
    if shutil.which("libvirtd") is None or shutil.which("unshare") is None:
        pytest.skip("needs libvirtd (Debian libvirt-daemon) and unshare (util-linux)")
    d = Daemon(tmp_path_factory.mktemp("libvirtd"))
    yield d
    d.stop()


@pytest.fixture(scope="session")
def embed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """The embedded QEMU driver in this process (one root per process): its URI and
    a connection to it."""
    why = libvirt_missing()
    if why:
        pytest.skip(why)
    from blktx_plugins.libvirt import open_connection

    root = tmp_path_factory.mktemp("embed")
    (root / "etc").mkdir()
    (root / "etc" / "qemu.conf").write_text(QEMU_CONF)
    uri = f"qemu:///embed?root={root}"
    conn = open_connection(uri)
    yield uri, conn
    for dom in conn.listAllDomains(0):
        if dom.isActive():
            dom.destroy()
    conn.close()


def run(base: Path, actions: list[tuple[str, dict[str, Any]]], **options: Any) -> Any:
    return Executor().run(
        Transaction([ActionSpec(t, p) for t, p in actions], options=options, base_dir=str(base)), roots=[str(base)]
    )


@pytest.fixture
def domains(embed: tuple[str, Any], tmp_path: Path) -> Iterator[list[Any]]:
    _, conn = embed
    doms = [define(conn, tmp_path, unique(f"vm{i}")) for i in range(3)]
    yield doms
    for dom in doms:
        for snap in dom.listAllSnapshots(0):
            snap.delete(2)  # metadata only: the test's folder goes anyway
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def group(uri: str, doms: list[Any], name: str = "nightly") -> list[tuple[str, dict[str, Any]]]:
    return [(SNAP, {"uri": uri, "domain": d.name(), "name": name}) for d in doms]


def test_three_domains_images_and_btrfs_commit(
    tmp_path: Path, embed: tuple[str, Any], domains: list[Any], btrfs_mount: Path
) -> None:
    uri, _ = embed
    for n in range(2):
        make_image(tmp_path / f"offline{n}.qcow2")
    actions = [
        *group(uri, domains),
        *[("qcow2.internal-create", {"image": f"offline{n}.qcow2", "name": "nightly"}) for n in range(2)],
        ("btrfs.snapshot", {"source": str(btrfs_mount / "data"), "dest": str(btrfs_mount / "data.nightly")}),
    ]
    result = run(tmp_path, actions, quiesce="pause")
    assert result.outcome == "committed", result.summary()
    for dom in domains:
        after = seen(dom)
        assert after["snapshots"] == ["nightly"] and after["state"] == 1  # VIR_DOMAIN_RUNNING
        for dev in ("vda", "vdb"):  # the domain XML follows the overlays (domblklist)
            assert [Path(f).name for f in after["chains"][dev]] == [
                f"{dom.name()}-d{ord(dev[2]) - 97}.nightly",
                f"{dom.name()}-d{ord(dev[2]) - 97}.qcow2",
            ]
        listed = subprocess.run(
            ["virsh", "-c", uri, "snapshot-list", dom.name(), "--name"], capture_output=True, text=True, check=False
        )
        assert listed.returncode != 0 or listed.stdout.split() == ["nightly"]  # virsh cannot share an embedded root
    for n in range(2):
        assert [s for _, s in snapshots(tmp_path / f"offline{n}.qcow2")] == ["nightly"]
    assert "data.nightly" in subvolumes(btrfs_mount)
    windows = {h.target: h.window for h in result.holds}
    assert len(windows) == 3 and all(w is not None and 0 <= w < 10 for w in windows.values()), windows


@pytest.mark.parametrize("phase", ["do", "invalidate"])
def test_the_group_failing_in_its_last_action_restores_every_domain(
    tmp_path: Path, embed: tuple[str, Any], domains: list[Any], btrfs_mount: Path, phase: str
) -> None:
    uri, _ = embed
    make_image(tmp_path / "offline.qcow2")
    domains[1].suspend()  # paused before the run: stays paused
    before = {d.name(): seen(d) for d in domains}
    on_disk = files(tmp_path)
    actions = [
        *group(uri, domains),
        ("qcow2.internal-create", {"image": "offline.qcow2", "name": "nightly"}),
        ("btrfs.snapshot", {"source": str(btrfs_mount / "data"), "dest": str(btrfs_mount / "data.nightly")}),
        ("fault", {"phase": phase}),
    ]
    result = run(tmp_path, actions, quiesce="pause")
    assert result.outcome == "rolled back", result.summary()
    assert {d.name(): seen(d) for d in domains} == before
    assert files(tmp_path) == on_disk  # no overlay left
    assert snapshots(tmp_path / "offline.qcow2") == [] and "data.nightly" not in subvolumes(btrfs_mount)
    assert len(result.holds) == 2  # the paused domain was not held


def test_a_shut_off_domain_is_snapshotted_and_rolled_back(tmp_path: Path, embed: tuple[str, Any]) -> None:
    uri, conn = embed
    dom = define(conn, tmp_path, unique("off"), start=False)
    try:
        before, on_disk = seen(dom), files(tmp_path)
        result = run(tmp_path, [*group(uri, [dom]), ("fault", {"phase": "invalidate"})])
        assert result.outcome == "rolled back", result.summary()
        assert seen(dom) == before and files(tmp_path) == on_disk
        result = run(tmp_path, group(uri, [dom]))
        assert result.outcome == "committed", result.summary()
        assert seen(dom)["snapshots"] == ["nightly"] and seen(dom)["state"] == 5  # VIR_DOMAIN_SHUTOFF
    finally:
        for snap in dom.listAllSnapshots(0):
            snap.delete(2)
        dom.undefine()


def test_one_domain_named_by_name_and_uuid_is_one_target(tmp_path: Path, embed: tuple[str, Any], domains: list[Any]) -> None:
    uri, _ = embed
    dom = domains[0]
    result = run(
        tmp_path,
        [(SNAP, {"uri": uri, "domain": dom.name(), "name": "a"}), (SNAP, {"uri": uri, "domain": dom.UUIDString(), "name": "b"})],
    )
    assert result.outcome == "invalid", result.summary()
    assert seen(dom)["snapshots"] == []


def test_checks_refuse_with_the_reason(tmp_path: Path, embed: tuple[str, Any], domains: list[Any]) -> None:
    uri, _ = embed
    cases = [
        ({"domain": "no-such-domain", "name": "n"}, "no domain"),
        ({"domain": domains[0].name(), "name": "n", "disks": ["vdz"]}, "no writable disk vdz"),
        ({"domain": domains[0].name(), "name": "a/b"}, "not a usable snapshot name"),
    ]
    for params, why in cases:
        result = run(tmp_path, [(SNAP, {"uri": uri, **params})])
        said = "; ".join(str(p) for p in result.problems)
        assert result.outcome == "invalid" and why in said, said
    result = run(tmp_path, [(SNAP, {"uri": uri, "domain": domains[0].name(), "name": "n"})], quiesce="fsfreeze")
    assert result.outcome == "invalid" and "guest agent, which is not configured" in str(result.problems[0])
    assert seen(domains[0])["snapshots"] == []


def test_listed_disks_only(tmp_path: Path, embed: tuple[str, Any], domains: list[Any]) -> None:
    uri, _ = embed
    dom = domains[0]
    result = run(tmp_path, [(SNAP, {"uri": uri, "domain": dom.name(), "name": "one", "disks": ["vdb"]})])
    assert result.outcome == "committed", result.summary()
    chains = seen(dom)["chains"]
    assert len(chains["vda"]) == 1 and Path(chains["vdb"][0]).name.endswith(".one")


def test_a_snapshot_of_the_name_made_by_somebody_else_survives_the_rollback(
    tmp_path: Path, embed: tuple[str, Any], domains: list[Any]
) -> None:
    """The token journaled at check is what cancel looks for: a snapshot of the same
    name made after the check is not blktx's (do fails on it, cancel leaves it)."""
    from blktx import RunContext
    from blktx.plugins import default_registry
    from blktx.spec import bind

    uri, _ = embed
    dom = domains[0]
    registry = default_registry()
    actions, options = bind(
        Transaction([ActionSpec(SNAP, {"uri": uri, "domain": dom.name(), "name": "n"})], base_dir=str(tmp_path)),
        registry,
        roots=[str(tmp_path)],
    )
    ctx = RunContext("t-foreign", options, str(tmp_path), registry.pm.hook)
    executor = Executor(registry)
    assert not executor.check_actions(actions, ctx, None)
    dom.snapshotCreateXML("<domainsnapshot><name>n</name></domainsnapshot>", 16 | 128)  # DISK_ONLY | ATOMIC
    assert executor.step("do", actions, ctx)  # refused by libvirt: the name is taken
    assert not executor.step("cancel", actions, ctx)
    ctx.close()
    assert seen(dom)["snapshots"] == ["n"]


def test_a_domain_on_another_host_over_ssh(tmp_path: Path, daemon: Daemon, embed: tuple[str, Any], domains: list[Any]) -> None:
    """A group of a domain on "another host" (a private libvirtd reached over ssh)
    and domains of the embedded driver: commit, then a rollback of the same."""
    if not daemon.ssh_ready:
        pytest.skip("needs ssh, sshd and ssh-keygen (Debian openssh-client, openssh-server)")
    from blktx_plugins.libvirt import open_connection

    local = open_connection(daemon.uri)
    far = define(local, tmp_path, unique("far"))
    try:
        uri, _ = embed
        before = {d.name(): seen(d) for d in [far, *domains[:1]]}
        actions = [(SNAP, {"uri": daemon.ssh_uri, "domain": far.name(), "name": "n"}), *group(uri, domains[:1], "n")]
        result = run(tmp_path, [*actions, ("fault", {"phase": "invalidate"})], quiesce="pause")
        assert result.outcome == "rolled back", result.summary()
        assert {d.name(): seen(d) for d in [far, *domains[:1]]} == before
        result = run(tmp_path, actions, quiesce="pause")
        assert result.outcome == "committed", result.summary()
        assert seen(far)["snapshots"] == ["n"] and seen(far)["state"] == 1
        assert {h.target.split("/")[-1] for h in result.holds} == {far.UUIDString(), domains[0].UUIDString()}
        assert any(h.target.startswith("libvirt:qemu+ssh://root@127.0.0.1:") and "keyfile" not in h.target for h in result.holds)
    finally:
        far.destroy()
        for snap in far.listAllSnapshots(0):
            snap.delete(2)
        far.undefine()
        local.close()


def test_recover_resumes_the_domains_of_a_killed_run(tmp_path: Path, daemon: Daemon) -> None:
    """A real run in a child process killed at every journal write with quiesce =
    "pause", then blktx recover: the domains run, and the world is before or after."""
    from blktx_plugins.libvirt import open_connection

    conn = open_connection(daemon.uri)
    doms = [define(conn, tmp_path, unique(f"k{i}")) for i in range(2)]
    spec = tmp_path / "spec.toml"
    kills = 0
    try:
        lines = ["version = 1", "[options]", 'quiesce = "pause"']
        for dom in doms:
            lines += ["[[action]]", f'type = "{SNAP}"', f'uri = "{daemon.uri}"', f'domain = "{dom.name()}"', 'name = "NAME"']
        for n in range(1, 30):
            name = f"s{n}"
            spec.write_text("\n".join(lines).replace("NAME", name) + "\n")
            journal = tmp_path / f"j{n}.sqlite"
            env = {**os.environ, "BLKTX_CRASH_AFTER": str(n)}
            out = subprocess.run(
                [sys.executable, "-m", "blktx", "run", str(spec), "--journal", str(journal)],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if out.returncode == 0:
                break
            kills = n
            assert out.returncode == -9, out.stdout + out.stderr
            rec = subprocess.run(
                [sys.executable, "-m", "blktx", "recover", "--journal", str(journal)], capture_output=True, text=True, check=False
            )
            assert rec.returncode == 0, rec.stdout + rec.stderr
            states = [dom.state()[0] for dom in doms]
            assert states == [1, 1], f"kill after write {n}: domains {states}"
            made = [name in seen(dom)["snapshots"] for dom in doms]
            assert made in ([True, True], [False, False]), f"kill after write {n}: {made}"
        assert kills >= 4, f"only {kills} kills: the run never reached the quiesce window"
    finally:
        for dom in doms:
            dom.destroy()
            for snap in dom.listAllSnapshots(0):
                snap.delete(2)
            dom.undefine()
        conn.close()


class TestLibvirtSnapshotConformance(ActionTypeConformance):
    """The contract on a shut-off domain of the private libvirtd (child processes
    reach it too: ``blktx run`` and ``recover`` in a fresh process)."""

    type_name = SNAP

    @pytest.fixture(autouse=True)
    def _daemon(self, daemon: Daemon) -> Iterator[None]:
        from blktx_plugins.libvirt import open_connection

        self.uri = daemon.uri
        self.conn = open_connection(daemon.uri)
        self.doms: dict[str, Any] = {}
        yield
        for dom in self.doms.values():
            for snap in dom.listAllSnapshots(0):
                snap.delete(2)
            dom.undefine()
        self.conn.close()

    def setup_world(self, base: Path) -> dict[str, Any]:
        dom = define(self.conn, base, unique("c"), start=False)
        self.doms[str(base)] = dom
        return {"uri": self.uri, "domain": dom.name(), "name": "n"}

    def observe(self, base: Path) -> Any:
        view = seen(self.doms[str(base)])
        chains = {k: [Path(f).name.split("-", 2)[-1] for f in v] for k, v in view["chains"].items()}
        return {**view, "chains": chains, "files": [f.split("-", 2)[-1] for f in files(base)]}

    def make_foreign(self, base: Path, action: Any) -> bool:
        self.doms[str(base)].snapshotCreateXML("<domainsnapshot><name>n</name></domainsnapshot>", 16 | 128)
        return True
