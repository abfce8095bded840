"""Live internal snapshots as QEMU's own ``transaction`` takes them (QEMU iotest 057):
several snapshots of one drive in one transaction, and deletes by id, name, both
and date. Real qemu-system-x86_64 processes with qcow2 drives."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu_helpers import VM, needs_qemu_img, needs_qemu_system, snapshots

from blktx import ActionSpec, Event, Executor, Transaction, hookimpl
from blktx.plugins import load

pytestmark = [needs_qemu_img, needs_qemu_system]


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[list[VM]]:
    machines = [VM(tmp_path, f"vm{i}") for i in range(2)]
    yield machines
    for vm in machines:
        vm.quit()


def run(base: Path, actions: list[tuple[str, dict[str, Any]]], extra: list[Any] = (), **options: Any) -> Any:
    registry = load(extra=[(f"t{i}", p) for i, p in enumerate(extra)])
    return Executor(registry).run(Transaction([ActionSpec(t, p) for t, p in actions], options=options, base_dir=str(base)))


def listed(vm: VM, drive: int) -> list[tuple[str, str, int, int]]:
    """The drive's snapshots as QMP reports them: id, name, date-sec, date-nsec."""
    for dev in vm.qmp("query-block"):
        if dev["device"] == f"drive{drive}":
            return [(s["id"], s["name"], s["date-sec"], s["date-nsec"]) for s in dev["inserted"]["image"].get("snapshots", [])]
    raise KeyError(drive)


def make(vm: VM, drive: int, *names: str) -> None:
    for name in names:
        vm.qmp("blockdev-snapshot-internal-sync", {"device": f"drive{drive}", "name": name})


def creates(vms: list[VM], names: tuple[str, ...] = ("a", "b", "c")) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("qmp.internal-create", {"vm": vm.sock.name, "drive": f"drive{d}", "name": n})
        for vm in vms
        for d in range(2)
        for n in names
    ]


def test_three_snapshots_of_each_drive_go_in_one_transaction_per_vm(
    tmp_path: Path, vms: list[VM], monkeypatch: pytest.MonkeyPatch
) -> None:
    from blktx_plugins._qemu import Qmp

    sent: list[tuple[str, Any]] = []
    execute = Qmp.execute

    async def spy(self: Qmp, name: str, args: dict[str, Any] | None = None, timeout: float = 120.0) -> Any:
        if name == "transaction":
            sent.append((self.address, args))
        return await execute(self, name, args, timeout)

    monkeypatch.setattr(Qmp, "execute", spy)
    make(vms[0], 0, "old")
    result = run(tmp_path, creates(vms), quiesce="pause")
    assert result.outcome == "committed", result.summary()
    assert sorted(address for address, _ in sent) == [str(vm.sock) for vm in vms]
    for _, args in sent:
        assert len(args["actions"]) == 6 and {a["type"] for a in args["actions"]} == {"blockdev-snapshot-internal-sync"}
    for vm in vms:
        for d in range(2):
            assert vm.snapshots(d) == (["old"] if (vm, d) == (vms[0], 0) else []) + ["a", "b", "c"]
    # each action journaled the id and date of exactly the snapshot it made (the catalog's identity)
    for a in result.actions:
        vm = {str(v.sock): v for v in vms}[a.params["vm"]]
        sid, _, sec, nsec = next(s for s in listed(vm, int(a.params["drive"][-1])) if s[1] == a.params["name"])
        assert (a.undo["id"], a.undo["date"]) == (sid, [sec, nsec])
    for vm in vms:
        vm.quit()
        assert [n for _, n in snapshots(vm.images[1])] == ["a", "b", "c"]
    assert [n for _, n in snapshots(vms[0].images[0])] == ["old", "a", "b", "c"]


def test_a_rolled_back_group_deletes_exactly_the_snapshots_it_made(tmp_path: Path, vms: list[VM]) -> None:
    """2 VMs x 2 drives x 3 snapshots and a fault in do: every drive's list is as
    before. A snapshot of blktx's name made by hand after QEMU's answer (blktx's one
    deleted first) is not blktx's: its id and date differ, so it stays."""
    make(vms[0], 0, "old")
    make(vms[1], 1, "x", "y")
    before = {(vm.name, d): listed(vm, d) for vm in vms for d in range(2)}
    seen: dict[tuple[str, int], list[str]] = {}
    actions = [*creates(vms), ("fault", {"phase": "do"})]

    class AfterDo:
        @hookimpl
        def blktx_event(self, event: Event) -> None:
            if event.kind == "action" and event.phase == "do" and event.action == len(actions) - 2:
                for vm in vms:
                    for d in range(2):
                        seen[(vm.name, d)] = vm.snapshots(d)
                vms[1].qmp("blockdev-snapshot-delete-internal-sync", {"device": "drive0", "name": "b"})
                make(vms[1], 0, "b")  # by hand: the next id, a later date

    result = run(tmp_path, actions, extra=[AfterDo()], quiesce="pause")
    assert result.outcome == "rolled back", result.summary()
    assert result.failure is not None and result.failure.message == "fault injected"
    for (name, d), names in seen.items():
        assert names == [s[1] for s in before[(name, d)]] + ["a", "b", "c"], (name, d)
    for vm in vms:
        for d in range(2):
            if (vm, d) != (vms[1], 0):
                assert listed(vm, d) == before[(vm.name, d)], (vm.name, d)
        assert vm.running()
    (kept,) = listed(vms[1], 0)
    assert kept[1] == "b" and kept[0] != next(a.undo["id"] for a in result.actions if a.params["name"] == "b")


def test_one_name_twice_on_one_drive_is_refused_naming_both(tmp_path: Path, vms: list[VM]) -> None:
    result = run(
        tmp_path,
        [
            ("qmp.internal-create", {"vm": "vm0.qmp", "drive": "drive0", "name": "x"}),
            ("qmp.internal-create", {"vm": "vm0.qmp", "drive": "drive1", "name": "x"}),
            ("qmp.internal-create", {"vm": "vm0.qmp", "drive": "vm0-n0", "name": "x"}),  # drive0 by its node name
        ],
    )
    assert result.outcome == "invalid", result.summary()
    (problem,) = result.problems
    assert problem.action == 2 and "actions #0 and #2 both make snapshot 'x' on drive vm0-n0" in problem.message
    assert problem.target == f"vm:{tmp_path}/vm0.qmp/drive0"
    assert vms[0].snapshots(0) == vms[0].snapshots(1) == []


def delete(vm: VM, drive: int = 0, **params: str) -> tuple[str, dict[str, Any]]:
    return ("qmp.internal-delete", {"vm": vm.sock.name, "drive": f"drive{drive}", **params})


def test_deletes_by_id_by_name_and_by_both_on_one_drive(tmp_path: Path, vms: list[VM]) -> None:
    vm = vms[0]
    make(vm, 0, "s1", "s2", "s3", "s4")
    ids = {name: (sid, sec, nsec) for sid, name, sec, nsec in listed(vm, 0)}
    sid4, sec4, nsec4 = ids["s4"]
    result = run(
        tmp_path,
        [
            delete(vm, id=ids["s1"][0]),
            delete(vm, name="s2"),
            delete(vm, id=ids["s3"][0], name="s3"),
            delete(vm, id=sid4, date=f"{sec4}.{nsec4:09d}"),
        ],
    )
    assert result.outcome == "committed", result.summary()
    assert listed(vm, 0) == [] and not result.pending
    assert [(a.undo["id"], a.undo["name"]) for a in result.actions] == [(ids[n][0], n) for n in ("s1", "s2", "s3", "s4")]


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({}, "give the snapshot's id or name"),
        ({"id": "1", "name": "s2"}, "id '1' and name 's2' disagree: snapshot id 1 is named 's1', and 's2' has id 2"),
        ({"id": "9"}, "has no snapshot with id '9' (it has: 1:'s1', 2:'s2')"),
        ({"name": "nope"}, "has no snapshot named 'nope'"),
        ({"id": "1", "date": "12.000000000"}, "snapshot 's1' (id 1) is dated "),
        ({"id": "1", "date": "12.5"}, "date '12.5' is not a snapshot date"),
    ],
)
def test_a_delete_that_does_not_name_exactly_one_snapshot_is_refused(
    tmp_path: Path, vms: list[VM], params: dict[str, str], says: str
) -> None:
    make(vms[0], 0, "s1", "s2")
    result = run(tmp_path, [delete(vms[0], **params)])
    assert result.outcome == "invalid", result.summary()
    assert says in result.problems[0].message, result.problems[0].message
    assert vms[0].snapshots(0) == ["s1", "s2"]


def test_a_name_several_snapshots_share_needs_an_id(tmp_path: Path, vms: list[VM]) -> None:
    """QMP refuses a second snapshot of one name; qemu-img (VM off) makes one."""
    vm = vms[0]
    vm.quit()
    for _ in range(2):
        subprocess.run(["qemu-img", "snapshot", "-c", "dup", str(vm.images[0])], check=True)
    vm.proc = subprocess.Popen(vm.proc.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            vm.qmp("query-status")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    time.sleep(0.05)  # the run's own monitor is ready as well
    result = run(tmp_path, [delete(vm, name="dup")])
    assert result.outcome == "invalid", result.summary()
    assert "has 2 snapshots named 'dup' (ids 1, 2)" in result.problems[0].message
    assert result.problems[0].hint == 'give id = "..." to say which'
    result = run(tmp_path, [delete(vm, name="dup", id="2")])
    assert result.outcome == "committed", result.summary()
    assert [s[:2] for s in listed(vm, 0)] == [("1", "dup")]


def test_two_deletes_of_one_snapshot_are_refused_naming_both(tmp_path: Path, vms: list[VM]) -> None:
    make(vms[0], 0, "s1")
    result = run(tmp_path, [delete(vms[0], name="s1"), delete(vms[0], id="1")])
    assert result.outcome == "invalid", result.summary()
    (problem,) = result.problems
    assert problem.action == 1 and "actions #0 and #1 both delete snapshot 's1' (id 1)" in problem.message
    assert vms[0].snapshots(0) == ["s1"]


def test_a_delete_never_removes_another_point_in_time_that_took_the_id(tmp_path: Path, vms: list[VM]) -> None:
    """Between the check and the delete (after the commit point), the snapshot is
    deleted and one of the same name made: it gets the same id (the next free one)
    but another date, and is left alone; the delete counts as done."""
    vm = vms[0]
    make(vm, 0, "s1", "s2")
    s1, s2 = listed(vm, 0)

    class Swap:
        @hookimpl
        def blktx_event(self, event: Event) -> None:
            if event.kind == "action" and event.phase == "do" and event.action == 1:
                vm.qmp("blockdev-snapshot-delete-internal-sync", {"device": "drive0", "id": s2[0]})
                make(vm, 0, "s2")

    result = run(
        tmp_path,
        [delete(vm, name="s2"), ("qmp.internal-create", {"vm": "vm0.qmp", "drive": "drive1", "name": "n"})],
        extra=[Swap()],
    )
    assert result.outcome == "committed", result.summary()
    assert not result.pending and result.actions[0].undo["id"] == s2[0]
    after = listed(vm, 0)
    assert after[0] == s1 and after[1][:2] == s2[:2] and after[1] != s2, (after, s2)  # same id and name, another date


def test_a_live_group_snapshot_is_listed_deleted_by_id_and_date_and_its_revert_refused(
    tmp_path: Path, vms: list[VM], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from blktx.cli import main

    def cli(*args: str) -> tuple[int, dict[str, Any]]:
        status = main([*args, "--json"])
        return status, json.loads(capsys.readouterr().out)

    vm = vms[0]
    spec = tmp_path / "live.toml"
    spec.write_text(
        'version = 1\ngroup = "live"\nsnapshot = "s1"\n'
        + "".join(f'[[action]]\ntype = "qmp.internal-create"\nvm = "{vm.sock.name}"\ndrive = "drive{d}"\n' for d in range(2))
    )
    monkeypatch.chdir(tmp_path)
    assert cli("run", str(spec))[0] == 0
    _, listing = cli("list", "live", "--verify")
    (entry,) = listing["group_snapshots"]
    assert entry["state"] == "complete", entry
    status, result = cli("revert", "live@s1")
    assert status == 2 and "stop the VM" in result["problems"][0]["message"]
    assert [n for _, n, _, _ in listed(vm, 0)] == ["s1"], "nothing touched"
    # drive1's member deleted and remade by hand under the same name: gone by identity
    vm.qmp("blockdev-snapshot-delete-internal-sync", {"device": "drive1", "name": "s1"})
    time.sleep(1.1)  # another date, whatever id QEMU gives it
    make(vm, 1, "s1")
    status, result = cli("delete", "live@s1")
    assert status == 2 and "is gone" in result["problems"][0]["message"], result
    status, result = cli("delete", "--missing-ok", "live@s1")
    assert status == 0, result
    assert listed(vm, 0) == [] and [n for _, n, _, _ in listed(vm, 1)] == ["s1"], "the remake is never deleted"
    assert vm.running()
    assert cli("list", "live")[1]["group_snapshots"] == []
