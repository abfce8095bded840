"""blktx revert / delete / prune (blktx.cli_groups, blktx.catalog.plan) on the sim
backend: a group snapshot is brought back, deleted and pruned as one all-or-none
transaction, and the world always equals the model."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import blktx.catalog
from blktx.cli import main
from blktx.journal import SqliteJournal
from blktx_plugins.sim import _write, make_world, read_world

SPEC = """version = 1
group = "app"
snapshot = "{snapshot}"
[retention]
keep = {{ last = 1, daily = 3 }}
[[action]]
type = "sim.snapshot"
device = "a"
[[action]]
type = "sim.snapshot"
device = "b"
"""

DAY = 86400.0
T0 = 1793491200.0  # 2026-11-01 00:00 UTC


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    make_world(str(tmp_path / "sim-world.json"), ["a", "b"])
    (tmp_path / "t.toml").write_text(SPEC.format(snapshot="s-{now:%d-%H}"))
    yield tmp_path
    monkeypatch.delenv("TZ")
    time.tzset()


def set_data(folder: Path, value: str, **extra: Any) -> None:
    path = str(folder / "sim-world.json")
    w = read_world(path)
    for dev in w["devices"].values():
        dev["data"] = value
        dev.update(extra)
    _write(path, w)


def devices(folder: Path) -> dict[str, Any]:
    return read_world(str(folder / "sim-world.json"))["devices"]  # type: ignore[no-any-return]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    status = main([*args, "--json"])
    out = capsys.readouterr().out
    return status, json.loads(out) if out.strip() else {}


def catalog() -> list[str]:
    return [e["name"] for e in SqliteJournal(os.environ["BLKTX_JOURNAL"]).group_snapshots("app")]


def tick(world: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, k: int) -> str:
    """Group snapshot number ``k``, 12 hours apart on a fake clock, of data ``d<k>``."""
    monkeypatch.setattr(blktx.catalog, "clock", lambda: T0 + k * DAY / 2)
    set_data(world, f"d{k}")
    status, result = cli(capsys, "run", str(world / "t.toml"))
    assert status == 0, result
    return time.strftime("s-%d-%H", time.gmtime(T0 + k * DAY / 2))


def test_ten_ticks_pruned_reverted_and_deleted_equal_the_model(
    world: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [tick(world, capsys, monkeypatch, k) for k in range(10)]
    assert catalog() == names
    # keep last = 1, daily = 3: the newest, and the newest of each of the 3 newest days
    status, dry = cli(capsys, "prune", "--spec", str(world / "t.toml"), "--dry-run")
    assert status == 0
    verdicts = {r["group_snapshot"]: r["verdict"] for r in dry["group_snapshots"]}
    kept = [names[5], names[7], names[9]]
    assert [n for n in names if verdicts[f"app@{n}"] == "keep"] == kept
    assert catalog() == names, "a dry run deletes nothing"
    status, result = cli(capsys, "prune", "--spec", str(world / "t.toml"))
    assert status == 0 and result["outcome"] == "committed", result
    assert catalog() == kept
    for dev in devices(world).values():
        assert sorted(dev["snapshots"].values()) == sorted(kept)
        assert dev["data"] == "d9"
    # revert to the middle one: every member's data back to it, snapshots kept
    set_data(world, "live")
    status, result = cli(capsys, "revert", f"app@{names[7]}")
    assert status == 0, result
    assert {d["data"] for d in devices(world).values()} == {"d7"}
    assert catalog() == kept
    # delete one: gone from the catalog and from every device, the rest intact
    status, result = cli(capsys, "delete", f"app@{names[5]}")
    assert status == 0, result
    assert catalog() == kept[1:]
    for dev in devices(world).values():
        assert sorted(dev["snapshots"].values()) == sorted(kept[1:])


def test_a_revert_that_fails_half_way_rolls_every_member_back(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    set_data(world, "old")
    assert cli(capsys, "run", str(world / "t.toml"))[0] == 0
    (name,) = catalog()
    path = str(world / "sim-world.json")
    w = read_world(path)
    w["devices"]["a"]["data"], w["devices"]["b"]["data"] = "new-a", "new-b"
    w["devices"]["b"]["break"] = "revert"
    _write(path, w)
    status, result = cli(capsys, "revert", f"app@{name}")
    assert status == 1 and result["outcome"] == "rolled back", result
    assert {k: d["data"] for k, d in devices(world).items()} == {"a": "new-a", "b": "new-b"}


def test_refusals_touch_nothing(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    set_data(world, "old")
    assert cli(capsys, "run", str(world / "t.toml"))[0] == 0
    (name,) = catalog()
    set_data(world, "new")
    # a member deleted by hand: the group snapshot is incomplete
    path = str(world / "sim-world.json")
    w = read_world(path)
    w["devices"]["a"]["snapshots"] = {}
    _write(path, w)
    before = devices(world)
    status, result = cli(capsys, "revert", f"app@{name}")
    assert status == 2
    (problem,) = result["problems"]
    assert "member #0 (sim.snapshot): is gone" in problem["message"] and f"app@{name} is incomplete" in problem["message"]
    assert problem["file"] == f"app@{name}" and problem["target"].endswith("#a")
    status, result = cli(capsys, "delete", f"app@{name}")
    assert status == 2 and "--missing-ok" in result["problems"][0]["hint"]
    assert devices(world) == before and catalog() == [name]
    # unknown names and malformed references
    for ref, why in ((f"app@{name}x", "no group snapshot"), ("app", "is not GROUP@NAME")):
        status, result = cli(capsys, "revert", ref)
        assert status == 2 and why in result["problems"][0]["message"]
    # with --missing-ok, what is left goes, and the entry with it
    status, result = cli(capsys, "delete", "--missing-ok", f"app@{name}")
    assert status == 0, result
    assert devices(world)["b"]["snapshots"] == {} and catalog() == []


def test_prune_refuses_without_a_policy_and_names_a_bad_rule(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, result = cli(capsys, "prune", "app")
    assert status == 2 and "no retention policy" in result["problems"][0]["message"]
    status, result = cli(capsys, "prune", "app", "--keep", "dayly=3")
    assert status == 2 and "did you mean 'daily'" in result["problems"][0]["message"]


def test_a_delete_whose_group_snapshot_another_deleted_first_does_not_commit(
    world: Path, capsys: pytest.CaptureFixture[str], registry: Any
) -> None:
    """Two deletes of one group snapshot race: the loser's commit write finds its
    catalog entry gone and rolls back, touching nothing."""
    from blktx.catalog import plan
    from blktx.executor import Executor
    from blktx.locks import Locker
    from blktx.spec import bind

    assert cli(capsys, "run", str(world / "t.toml"))[0] == 0
    journal = SqliteJournal(os.environ["BLKTX_JOURNAL"])
    (entry,) = journal.group_snapshots("app")
    tx = plan([entry], "delete", registry)
    actions, options = bind(tx, registry, roots=["/"], txid="loser")
    options.group, options.forgets = "", (entry["txid"],)
    assert cli(capsys, "delete", f"app@{entry['name']}")[0] == 0, "the winner"
    (world / "sim-world.json").write_text(
        json.dumps({"devices": {d: {**v, "snapshots": {"1": entry["name"]}} for d, v in devices(world).items()}})
    )
    result = Executor(registry, journal=journal, locker=Locker()).run_actions(actions, options, base_dir="/", txid="loser")
    assert result.outcome == "rolled back", result.summary()
    assert all(d["snapshots"] == {"1": entry["name"]} for d in devices(world).values()), "nothing deleted"


def copy_db(src: str, dst: str) -> None:
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)


@pytest.mark.parametrize("command", ["revert", "delete"])
def test_killed_at_every_journal_write_recover_gives_the_before_or_the_after_world(
    world: Path, capsys: pytest.CaptureFixture[str], command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_data(world, "old")
    assert cli(capsys, "run", str(world / "t.toml"))[0] == 0
    (name,) = catalog()
    set_data(world, "new")
    pristine_world = (world / "sim-world.json").read_text()
    pristine_journal = str(world / "pristine.sqlite")
    copy_db(os.environ["BLKTX_JOURNAL"], pristine_journal)
    before = (devices(world), catalog())
    assert cli(capsys, command, f"app@{name}")[0] == 0
    after = (devices(world), catalog())
    assert after != before
    outcomes = []
    for n in range(1, 30):
        monkeypatch.setenv("BLKTX_JOURNAL", str(world / f"j{n}.sqlite"))
        copy_db(pristine_journal, os.environ["BLKTX_JOURNAL"])
        (world / "sim-world.json").write_text(pristine_world)
        env = {**os.environ, "BLKTX_CRASH_AFTER": str(n)}
        run = subprocess.run([sys.executable, "-m", "blktx", command, f"app@{name}"], env=env, capture_output=True, check=False)
        rec = subprocess.run([sys.executable, "-m", "blktx", "recover"], capture_output=True, text=True, check=False)
        assert rec.returncode == 0, rec.stdout + rec.stderr
        now = (devices(world), catalog())
        assert now in (before, after), f"killed after journal write {n}: {now}"
        outcomes.append(now == after)
        if run.returncode != -9:
            assert run.returncode == 0 and now == after, "the run that was not killed committed"
            break
    else:
        pytest.fail("every run was killed")
    assert False in outcomes[:-1] and True in outcomes, "kills fell before and after the commit point"


def test_a_group_snapshot_with_no_member_left_is_removed_with_missing_ok(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(capsys, "run", str(world / "t.toml"))[0] == 0
    (name,) = catalog()
    set_data(world, "x", snapshots={})
    assert cli(capsys, "delete", f"app@{name}")[0] == 2
    status, result = cli(capsys, "delete", "--missing-ok", f"app@{name}")
    assert status == 0 and result["forgotten"] == [f"app@{name}"], result
    assert catalog() == []


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (("revert", "\udcff@x"), "is not a usable name"),
        (("revert", "web@prod@n1"), "no group snapshot"),
        (("list", "bad group"), "is not a usable name"),
        (("prune", "a@b", "--keep", "last=1"), "is not a usable name"),
    ],
)
def test_bad_names_on_the_command_line_are_refused_cleanly(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], why: str
) -> None:
    status, result = cli(capsys, *args)
    assert status == 2 and why in result["problems"][0]["message"], result


def test_two_specs_of_one_file_name_never_share_a_defaulted_group(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two nightly.toml in two folders, no group named: the second is refused (they
    would share one retention and prune each other's), until it names its group."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        make_world(str(tmp_path / folder / "sim-world.json"), ["d"])
        (tmp_path / folder / "nightly.toml").write_text(
            'version = 1\nsnapshot = "n-{txid}"\n[[action]]\ntype = "sim.snapshot"\ndevice = "d"\n'
        )
    assert cli(capsys, "run", str(tmp_path / "a" / "nightly.toml"))[0] == 0
    assert cli(capsys, "run", str(tmp_path / "a" / "nightly.toml"))[0] == 0, "the same spec again: its own group"
    status, result = cli(capsys, "run", str(tmp_path / "b" / "nightly.toml"))
    assert status == 2 and "already holds group snapshots made by" in result["problems"][0]["message"], result
    assert read_world(str(tmp_path / "b" / "sim-world.json"))["devices"]["d"]["snapshots"] == {}
    text = (tmp_path / "b" / "nightly.toml").read_text()
    (tmp_path / "b" / "nightly.toml").write_text(text.replace("version = 1\n", 'version = 1\ngroup = "b-nightly"\n'))
    assert cli(capsys, "run", str(tmp_path / "b" / "nightly.toml"))[0] == 0
