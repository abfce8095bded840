"""libvirt domains in blktx transactions: real TCG domains under the embedded QEMU
driver (in this process) and under a private libvirtd, reached locally and over
ssh as a second host; mixed with qcow2 images and btrfs in one group."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
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


def remove_domains(doms: list[Any]) -> None:
    """Stop, strip of snapshots (metadata only) and undefine each domain."""
    for dom in doms:
        dom.destroy()
        for snap in dom.listAllSnapshots(0):
            snap.delete(2)
        dom.undefine()


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


def test_a_taken_snapshot_name_is_refused_at_check(tmp_path: Path, embed: tuple[str, Any], domains: list[Any]) -> None:
    """Told from the domain's snapshot list (read once: also the undo's "before")."""
    uri, _ = embed
    dom = domains[0]
    dom.snapshotCreateXML("<domainsnapshot><name>taken</name></domainsnapshot>", 16 | 128)  # DISK_ONLY | ATOMIC
    chains = seen(dom)["chains"]
    result = run(tmp_path, [(SNAP, {"uri": uri, "domain": dom.name(), "name": "taken"})], quiesce="pause")
    assert result.outcome == "invalid" and "already has a snapshot named 'taken'" in str(result.problems[0])
    result = Executor().check(Transaction([ActionSpec(SNAP, {"uri": uri, "domain": dom.name(), "name": "other"})]))
    assert result.outcome == "checked", result.summary()
    assert result.actions[0].undo["before"] == ["taken"]
    assert seen(dom)["snapshots"] == ["taken"] and seen(dom)["chains"] == chains


def test_a_process_runs_any_number_of_transactions_on_one_embedded_driver(
    tmp_path: Path, embed: tuple[str, Any], domains: list[Any]
) -> None:
    """libvirt (9.0) registers an embedded driver anew at each open and refuses the
    16th open in a process ("Too many drivers"): runs share one connection to it."""
    from blktx_plugins import _libvirt_base as plugin

    uri, _ = embed
    for n in range(20):
        result = Executor().check(Transaction([ActionSpec(SNAP, {"uri": uri, "domain": domains[0].name(), "name": f"n{n}"})]))
        assert result.outcome == "checked", result.summary()
    assert plugin.embedded(uri) and not plugin.embedded("qemu+ssh://host/system") and not plugin.embedded("qemu:///system")
    assert plugin._embedded[uri].isAlive()


def test_uuid_like_judges_as_uuid_does() -> None:
    """lookup() tells a UUID from a name without importing uuid (2.4 ms a run): the
    same answer as uuid.UUID for every spelling."""
    import uuid

    from blktx_plugins._libvirt_base import uuid_like

    u = "61ae0bb6-c18c-4df0-aff4-7fa3881df745"
    refs = [u, u.upper(), u.replace("-", ""), "{" + u + "}", "urn:uuid:" + u, "uuid:" + u, u[:-1], u + "0", "web-1"]
    bare = u.replace("-", "")
    refs += ["0x" + bare[2:], "+" + bare[1:], u.replace("-", "_"), " " + u[1:], "", "-" * 36, "g" * 32]
    for ref in refs:
        try:
            uuid.UUID(ref)
            valid = True
        except ValueError:
            valid = False
        assert uuid_like(ref) is valid, ref


def et_disks(text: str) -> dict[str, str]:
    """What blktx read of a domain's disks with ElementTree (before disk_map)."""
    out = {}
    for disk in ET.fromstring(text).findall("./devices/disk"):
        target = disk.find("target")
        if disk.get("device", "disk") != "disk" or target is None or disk.find("readonly") is not None:
            continue
        source = disk.find("source")
        out[str(target.get("dev"))] = "" if source is None else (source.get("file") or source.get("dev") or "")
    return out


DOMAIN_XMLS = [
    "<domain><devices><disk type='file' device='disk'><source file='/a.qcow2'/><target dev='vda'/></disk></devices></domain>",
    # a cdrom, a read-only disk, one without target, a block device, a network disk, a backing chain
    "<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>x</name><devices>"
    "<disk device='cdrom'><source file='/cd.iso'/><target dev='sda'/></disk>"
    "<disk><source file='/ro.qcow2'/><target dev='vdb'/><readonly/></disk>"
    "<disk><source file='/nt.qcow2'/></disk>"
    "<disk type='block'><source dev='/dev/vg/lv'/><target dev='vdc'/></disk>"
    "<disk type='network'><source protocol='rbd' name='pool/img'/><target dev='vdd'/></disk>"
    "<disk><driver type='qcow2'/><source file='/top.qcow2'/><backingStore type='file'><source file='/base.qcow2'/>"
    "<backingStore/></backingStore><target dev='vde'/><target dev='vdz'/></disk>"
    "<disk><target dev='vdf'/></disk><interface type='network'><source network='default'/><target dev='vnet0'/></interface>"
    "<qemu:disk><target dev='vdq'/></qemu:disk></devices>"
    "<disk><source file='/outside.qcow2'/><target dev='vdx'/></disk><qemu:commandline/></domain>",
    "<domain xmlns='urn:x'><devices><disk><source file='/ns.qcow2'/><target dev='vda'/></disk></devices></domain>",
    "<domain><devices/></domain>",
]

SNAPSHOT_XMLS = [
    "<domainsnapshot><name>n</name><creationTime>1764244000</creationTime><memory snapshot='no'/></domainsnapshot>",
    "<domainsnapshot><name>n</name><creationTime></creationTime></domainsnapshot>",
    "<domainsnapshot><name>n</name><creationTime>17<x/>64</creationTime><creationTime>2</creationTime></domainsnapshot>",
    "<domainsnapshot><name>n</name><domain><creationTime>9</creationTime></domain></domainsnapshot>",
    "<domainsnapshot><creationTime>&#49;&amp;2</creationTime></domainsnapshot>",
]


def test_the_xml_a_run_reads_is_read_as_elementtree_reads_it() -> None:
    """disk_map and creation_time (expat, no tree) agree with ElementTree on every shape."""
    from blktx_plugins._libvirt_base import creation_time, disk_map

    for text in DOMAIN_XMLS:
        assert disk_map(text) == et_disks(text), text
    assert disk_map(DOMAIN_XMLS[1]) == {"vdc": "/dev/vg/lv", "vdd": "", "vde": "/top.qcow2", "vdf": ""}
    for text in SNAPSHOT_XMLS:
        assert creation_time(text) == ET.fromstring(text).findtext("creationTime"), text


def test_all_at_once_gives_each_result_in_order_bounded_and_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    from blktx_plugins import _libvirt_base as plugin

    monkeypatch.setattr(plugin, "MAX_AT_ONCE", 2)
    lock, now, most = threading.Lock(), [0], [0]

    def work(n: int) -> int:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.05)
        with lock:
            now[0] -= 1
        if n == 2:
            raise ValueError("two")
        return n

    got = plugin._all_at_once([lambda n=n: work(n) for n in range(5)], 10.0)
    assert got[:2] == [0, 1] and isinstance(got[2], ValueError) and got[3:] == [3, 4]
    assert most[0] == 2
    release = threading.Event()
    pending: dict[int, Any] = {}
    t = time.monotonic()
    got = plugin._all_at_once([lambda: 1, lambda: release.wait(10)], 0.2, pending, [7, 8])
    assert got[0] == 1 and isinstance(got[1], TimeoutError) and time.monotonic() - t < 5
    assert list(pending) == [8] and not pending[8].done.is_set()
    release.set()
    assert pending[8].done.wait(5) and pending[8].value is True


def test_checks_of_a_group_run_at_once_and_each_refusal_names_its_action(
    tmp_path: Path, embed: tuple[str, Any], domains: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One thread per domain's check; each refusal still names its own action, and a
    group that passes looks every domain up once: the quiesce uses the check's handle."""
    from blktx_plugins import libvirt as plugin

    uri, _ = embed
    actions = [
        (SNAP, {"uri": uri, "domain": domains[0].name(), "name": "n"}),
        (SNAP, {"uri": uri, "domain": "no-such-domain", "name": "n"}),
        (SNAP, {"uri": uri, "domain": domains[1].name(), "name": "n", "disks": ["vdz"]}),
        (SNAP, {"uri": uri, "domain": domains[2].name(), "name": "n"}),
    ]
    result = run(tmp_path, actions, quiesce="pause")
    assert result.outcome == "invalid", result.summary()
    assert [(p.action, "no domain" in p.message, "vdz" in p.message) for p in result.problems] == [
        (1, True, False),
        (2, False, True),
    ]
    assert all(seen(d)["snapshots"] == [] and seen(d)["state"] == 1 for d in domains)
    lookups: list[str] = []
    real = plugin.lookup
    monkeypatch.setattr(plugin, "lookup", lambda conn, ref: (lookups.append(ref), real(conn, ref))[1])
    result = run(tmp_path, group(uri, domains), quiesce="pause")
    assert result.outcome == "committed", result.summary()
    assert sorted(lookups) == sorted(d.name() for d in domains)
    assert all(seen(d)["snapshots"] == ["nightly"] and seen(d)["state"] == 1 for d in domains)


def test_a_domain_whose_state_cannot_be_read_before_the_window_is_not_snapshotted(
    tmp_path: Path, embed: tuple[str, Any], domains: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its state decides whether it is paused: unread, the group rolls back before
    anything is paused (it was left running and snapshotted unpaused)."""
    import libvirt

    from blktx_plugins import libvirt as plugin

    uri, _ = embed
    real = plugin._state_and_disks

    def flaky(dom: Any) -> Any:
        if dom.UUIDString() == domains[1].UUIDString():
            raise libvirt.libvirtError("test: no answer")
        return real(dom)

    monkeypatch.setattr(plugin, "_state_and_disks", flaky)
    before = {d.name(): seen(d) for d in domains}
    result = run(tmp_path, group(uri, domains), quiesce="pause")
    assert result.outcome == "rolled back", result.summary()
    assert "reading its state and disks" in str(result.failure) and domains[1].name() in str(result.failure)
    assert result.holds == []
    assert {d.name(): seen(d) for d in domains} == before


def test_one_uuid_on_two_hosts_is_two_domains(tmp_path: Path, daemon: Daemon, embed: tuple[str, Any]) -> None:
    """A domain defined with one UUID on two hosts (a copy): each action snapshots,
    pauses and resumes its own host's domain (handles are kept by URI and UUID)."""
    from libvirt_helpers import domain_xml

    from blktx_plugins.libvirt import open_connection

    uri, conn = embed
    far = open_connection(daemon.uri)
    same = "5a1e0bb6-c18c-4df0-aff4-7fa3881df745"
    doms = []
    try:
        for n, c in enumerate((conn, far)):
            images = [make_image(tmp_path / f"twin{n}-d{i}.qcow2") for i in range(2)]
            text = domain_xml(unique(f"twin{n}"), images).replace("</name>", f"</name><uuid>{same}</uuid>", 1)
            doms.append(c.defineXML(text))
            doms[-1].create()
        actions = [(SNAP, {"uri": u, "domain": d.name(), "name": "n"}) for u, d in zip((uri, daemon.uri), doms, strict=True)]
        result = run(tmp_path, actions, quiesce="pause")
        assert result.outcome == "committed", result.summary()
        assert len(result.holds) == 2 and all(h.window is not None for h in result.holds)
        for n, dom in enumerate(doms):
            after = seen(dom)
            assert after["snapshots"] == ["n"] and after["state"] == 1
            assert [Path(f).name for f in after["chains"]["vda"]] == [f"twin{n}-d0.n", f"twin{n}-d0.qcow2"]
    finally:
        remove_domains(doms)
        far.close()


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
        remove_domains(doms)
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

    @classmethod
    def not_applicable(cls, test: str) -> str | None:
        if test in cls.REVERT_PROPERTIES:
            return "libvirt.snapshot-revert refuses at check on every libvirt (docs/backends.md): tested below"
        return super().not_applicable(test)


# -- group snapshots: blktx revert / delete with libvirt members ---------------------------------

GROUP_SPEC = """version = 1
group = "app"
snapshot = "{name}"
[options]
quiesce = "pause"
[[action]]
type = "libvirt.snapshot"
uri = "{uri}"
domain = "{domain}"
[[action]]
type = "sim.snapshot"
device = "a"
"""


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    from blktx.cli import main

    status = main([*args, "--json"])
    out = capsys.readouterr()
    return status, json.loads(out.out) if out.out.strip() else {"stderr": out.err}


def said(result: dict[str, Any]) -> str:
    return " | ".join(p["message"] for p in result.get("problems", []))


def catalog() -> list[dict[str, Any]]:
    from blktx.journal import SqliteJournal

    return SqliteJournal(os.environ["BLKTX_JOURNAL"]).group_snapshots("app")  # type: ignore[no-any-return]


def sim_world(folder: Path) -> dict[str, Any]:
    from blktx_plugins.sim import read_world

    return read_world(str(folder / "sim-world.json"))["devices"]  # type: ignore[no-any-return]


def virsh_snapshots(uri: str, dom: Any) -> list[str]:
    out = subprocess.run(["virsh", "-c", uri, "snapshot-list", dom.name(), "--name"], capture_output=True, text=True, check=True)
    return out.stdout.split()


class Member:
    """A running domain of the private libvirtd and a sim device; ``take(name)`` makes a
    group snapshot of both (group app) through `blktx run`."""

    def __init__(self, dom: Any, take: Callable[[str], None]) -> None:
        self.dom, self.take = dom, take


@pytest.fixture
def member(daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Member]:
    from blktx_plugins.libvirt import open_connection
    from blktx_plugins.sim import make_world

    conn = open_connection(daemon.uri)
    dom = define(conn, tmp_path, unique("g"))
    make_world(str(tmp_path / "sim-world.json"), {"a": {"snapshots": {}, "layers": ["a.base"], "active": "a.base", "data": "d0"}})

    def take(name: str) -> None:
        spec = tmp_path / f"{name}.toml"
        spec.write_text(GROUP_SPEC.format(name=name, uri=daemon.uri, domain=dom.name()))
        status, result = cli(capsys, "run", str(spec))
        assert status == 0, result

    yield Member(dom, take)
    if dom.isActive():
        dom.destroy()
    for snap in dom.listAllSnapshots(0):
        snap.delete(2)
    dom.undefine()
    conn.close()


def test_revert_of_a_group_with_a_libvirt_member_is_refused_at_check(
    tmp_path: Path, daemon: Daemon, member: Member, capsys: pytest.CaptureFixture[str]
) -> None:
    """blktx revert GROUP@NAME with a libvirt member: refused at check, naming the
    libvirt it needs; neither the domain nor the other member is touched."""
    from blktx_plugins.sim import _write, read_world

    member.take("n1")
    path = str(tmp_path / "sim-world.json")
    world = read_world(path)
    world["devices"]["a"]["data"] = "d1"
    _write(path, world)
    before = (seen(member.dom), sim_world(tmp_path), files(tmp_path), [e["name"] for e in catalog()])
    status, result = cli(capsys, "revert", "app@n1")
    assert status == 2 and result["outcome"] == "invalid", result
    version = member.dom.connect().getLibVersion()
    if version < 9_009_000:
        want = f"reverting external snapshot n1 of domain {member.dom.name()} needs libvirt >= 9.9 (this host has 9.0.0)"
        assert version == 9_000_000 and want in said(result), said(result)
    else:
        assert f"reverting external snapshot n1 of domain {member.dom.name()} is not done by blktx" in said(result)
    assert (seen(member.dom), sim_world(tmp_path), files(tmp_path), [e["name"] for e in catalog()]) == before
    assert sim_world(tmp_path)["a"]["data"] == "d1"


def test_delete_of_group_snapshots_with_libvirt_members(
    tmp_path: Path, daemon: Daemon, member: Member, capsys: pytest.CaptureFixture[str]
) -> None:
    """blktx delete removes the libvirt snapshot through libvirt (the older of two,
    which the newer is based on, while the domain runs; then the newer), the sim
    member and the catalog entry; the domain runs on what libvirt leaves."""
    member.take("n1")
    member.take("n2")
    name = member.dom.name()
    assert virsh_snapshots(daemon.uri, member.dom) == ["n1", "n2"]
    status, result = cli(capsys, "delete", "app@n1")
    assert status == 0 and result["outcome"] == "committed", result
    assert virsh_snapshots(daemon.uri, member.dom) == ["n2"] and seen(member.dom)["state"] == 1
    assert [Path(f).name for f in seen(member.dom)["chains"]["vda"]] == [f"{name}-d0.n2", f"{name}-d0.qcow2"]
    assert not [f for f in files(tmp_path) if f.endswith(".n1")], "libvirt merged the older overlays away"
    assert [e["name"] for e in catalog()] == ["n2"]
    assert list(sim_world(tmp_path)["a"]["snapshots"].values()) == ["n2"]
    status, result = cli(capsys, "delete", "app@n2")
    assert status == 0 and result["outcome"] == "committed", result
    assert virsh_snapshots(daemon.uri, member.dom) == [] and catalog() == []
    after = seen(member.dom)
    assert {k: [Path(f).name for f in v] for k, v in after["chains"].items()} == {
        "vda": [f"{name}-d0.qcow2"],
        "vdb": [f"{name}-d1.qcow2"],
        "vda/inactive": [f"{name}-d0.qcow2"],
        "vdb/inactive": [f"{name}-d1.qcow2"],
    }
    assert after["state"] == 1 and sim_world(tmp_path)["a"]["snapshots"] == {}
    assert [f for f in files(tmp_path) if f.startswith(name)] == [f"{name}-d0.qcow2", f"{name}-d1.qcow2"]


def test_a_same_named_remake_of_a_libvirt_member_is_never_deleted(
    tmp_path: Path, daemon: Daemon, member: Member, capsys: pytest.CaptureFixture[str]
) -> None:
    """The member deleted by hand and a snapshot of its name made again (without
    blktx's token): blktx delete refuses (the member is gone), the delete type's own
    check refuses it by token, and --missing-ok deletes the rest, leaving the remake."""
    member.take("n1")
    (entry,) = catalog()
    token = next(x for x in entry["members"] if x["type"] == SNAP)["identity"]["token"]
    member.dom.snapshotLookupByName("n1", 0).delete(0)
    member.dom.snapshotCreateXML("<domainsnapshot><name>n1</name><description>mine</description></domainsnapshot>", 16 | 128)
    remade = seen(member.dom)
    status, result = cli(capsys, "delete", "app@n1")
    assert status == 2 and "is gone" in said(result) and "app@n1 is incomplete" in said(result), result
    delete = {"uri": daemon.uri, "domain": member.dom.UUIDString(), "name": "n1", "token": token}
    result = run(tmp_path, [("libvirt.snapshot-delete", delete)])
    assert result.outcome == "invalid", result.summary()
    assert f"snapshot 'n1' is not the one blktx made (its description lacks the token {token})" in str(result.problems[0])
    result = run(tmp_path, [("libvirt.snapshot-delete", {**delete, "token": ""})] * 2)
    assert result.outcome == "invalid" and "conflicts with action #0: both delete snapshot 'n1'" in str(result.problems[0])
    assert seen(member.dom) == remade
    status, result = cli(capsys, "delete", "--missing-ok", "app@n1")
    assert status == 0 and result["outcome"] == "committed", result
    assert seen(member.dom) == remade and catalog() == [] and sim_world(tmp_path)["a"]["snapshots"] == {}
    assert ET.fromstring(member.dom.snapshotLookupByName("n1", 0).getXMLDesc(0)).findtext("description") == "mine"


def test_the_older_snapshot_of_a_shut_off_domain_is_refused_while_a_newer_one_exists(
    tmp_path: Path, daemon: Daemon, member: Member, capsys: pytest.CaptureFixture[str]
) -> None:
    """libvirt 9.0 cannot merge a snapshot that a newer one is based on in a shut-off
    domain: refused at check (nothing touched); deleting newest first works."""
    member.dom.destroy()
    member.take("n1")
    member.take("n2")
    before = (seen(member.dom), files(tmp_path))
    status, result = cli(capsys, "delete", "app@n1")
    assert status == 2 and "has newer snapshots based on it, and the domain is shut off" in said(result), result
    assert (seen(member.dom), files(tmp_path)) == before and len(catalog()) == 2
    for name in ("n2", "n1"):
        status, result = cli(capsys, "delete", f"app@{name}")
        assert status == 0, result
    assert seen(member.dom)["snapshots"] == [] and catalog() == [] and seen(member.dom)["state"] == 5
