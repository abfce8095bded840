from __future__ import annotations

from pathlib import Path
from typing import Any

from blktx import ActionSpec, Executor, Transaction
from blktx.testing import ActionTypeConformance


class TestFileSnapshotConformance(ActionTypeConformance):
    """The whole blktx contract, from blktx.testing."""

    type_name = "file.snapshot"

    def setup_world(self, base: Path) -> dict[str, Any]:
        (base / "disk.raw").write_bytes(b"\x5a" * 65536)
        return {"path": "disk.raw"}

    def observe(self, base: Path) -> Any:
        return sorted((p.name, p.read_bytes()) for p in base.iterdir() if p.is_file())

    def make_foreign(self, base: Path, action: Any) -> bool:
        (base / "disk.raw.snap").write_bytes(b"somebody else's")
        return True


def test_group_with_a_qcow2_image(tmp_path: Path, qcow2_image: Any) -> None:
    from blktx.testing.fixtures import snapshots

    image = qcow2_image("vm.qcow2")
    (tmp_path / "vm.conf").write_text("memory = 1G\n")
    tx = Transaction(
        [
            ActionSpec("qcow2.internal-create", {"image": image.name, "name": "nightly"}),
            ActionSpec("file.snapshot", {"path": "vm.conf", "dest": "vm.conf.nightly"}),
        ],
        base_dir=str(tmp_path),
    )
    result = Executor().run(tx)
    assert result.outcome == "committed", result.summary()
    assert (tmp_path / "vm.conf.nightly").read_text() == "memory = 1G\n"
    assert [n for _, n in snapshots(image)] == ["nightly"]
    assert result.actions[1].undo["how"] in ("reflink", "copy")


def test_existing_dest_is_refused_and_kept(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("new")
    (tmp_path / "a.snap").write_text("old")
    result = Executor().run(Transaction([ActionSpec("file.snapshot", {"path": "a"})], base_dir=str(tmp_path)))
    assert result.outcome == "invalid" and "already exists" in result.problems[0].message
    assert (tmp_path / "a.snap").read_text() == "old"


def test_a_file_that_appears_at_dest_after_the_check_survives_the_cancel(tmp_path: Path) -> None:
    """Someone writes dest between check and do: do fails without replacing it, and
    cancel (from the journal's facts, as recover runs it) never removes it."""
    from blktx.context import RunContext
    from blktx.plugins import default_registry
    from blktx.spec import bind

    registry = default_registry()
    (tmp_path / "a").write_text("new")
    actions, options = bind(Transaction([ActionSpec("file.snapshot", {"path": "a"})], base_dir=str(tmp_path)), registry)
    ctx = RunContext("race", options, str(tmp_path), registry.pm.hook)
    executor = Executor(registry)
    assert executor.check_actions(actions, ctx, None) == []
    (tmp_path / "a.snap").write_text("theirs")
    failures = executor.step("do", actions, ctx)
    assert failures and "appeared after the check" in failures[0].message
    assert executor.step("cancel", actions, ctx) == []
    assert (tmp_path / "a.snap").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.snap"]


def test_member_exists_by_identity_not_by_name(tmp_path: Path) -> None:
    """``blktx list --verify``: the committed snapshot is there; a same-named remake is not it."""
    (tmp_path / "a").write_text("data")
    result = Executor().run(Transaction([ActionSpec("file.snapshot", {"path": "a"})], base_dir=str(tmp_path)))
    assert result.outcome == "committed", result.summary()
    member = result.actions[0]
    assert member.type.member_exists(member) is True
    (tmp_path / "remake").write_text("data")  # made while the snapshot exists: another inode
    (tmp_path / "remake").replace(tmp_path / "a.snap")
    assert member.type.member_exists(member) is False
    (tmp_path / "a.snap").unlink()
    assert member.type.member_exists(member) is False


def test_two_actions_making_one_dest_are_refused_at_check(tmp_path: Path) -> None:
    """``dest`` is declared ``creates=True``: it is claimed like a target."""
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    specs = [ActionSpec("file.snapshot", {"path": p, "dest": "same.snap"}) for p in ("a", "b")]
    result = Executor().run(Transaction(specs, base_dir=str(tmp_path)))
    assert result.outcome == "invalid" and "creates" in result.problems[0].message, result.summary()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
