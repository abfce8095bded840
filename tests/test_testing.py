"""blktx.testing catches broken action types and passes a correct one (run with pytester)."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["pytester"]

TYPES = '''
import os
from blktx import ActionType, Param, Refused, hookimpl
from blktx.plugins import load
from blktx.testing import ActionTypeConformance


class Good(ActionType):
    name = "file.good"
    params = (Param("path", "path", required=True),)

    def target(self, action):
        return action.params["path"]

    def check(self, action, ctx):
        action.undo["copy"] = action.params["path"] + ".snap"
        if os.path.exists(action.undo["copy"]):
            raise Refused("exists")

    def do(self, action, ctx):
        with open(action.undo["copy"], "x") as fh:
            fh.write(open(action.params["path"]).read())

    def cancel(self, action, ctx):
        if os.path.exists(action.undo["copy"]):
            os.unlink(action.undo["copy"])


class LeaksOnCancel(Good):
    name = "file.leaks"

    def cancel(self, action, ctx):
        pass


class CheckWrites(Good):
    name = "file.checkwrites"

    def check(self, action, ctx):
        super().check(action, ctx)
        open(action.params["path"] + ".checked", "w").close()


class NotIdempotent(Good):
    name = "file.notidempotent"

    def cancel(self, action, ctx):
        if action.state != "START":
            os.unlink(action.undo["copy"])
        else:
            os.unlink(action.undo["copy"])  # fails when there is nothing to remove


class OwnsByIdentity(Good):
    """Good, but cancel removes the copy only if it is the inode do recorded."""
    name = "file.owned"

    def do(self, action, ctx):
        fd = os.open(action.undo["copy"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        st = os.fstat(fd)
        action.undo["made"] = [st.st_dev, st.st_ino]
        os.write(fd, open(action.params["path"], "rb").read())
        os.close(fd)

    def cancel(self, action, ctx):
        try:
            st = os.lstat(action.undo["copy"])
        except FileNotFoundError:
            return
        if [st.st_dev, st.st_ino] == action.undo.get("made"):
            os.unlink(action.undo["copy"])


class Plugin:
    @hookimpl
    def blktx_register_action_types(self, register):
        for cls in (Good, LeaksOnCancel, CheckWrites, NotIdempotent, OwnsByIdentity):
            register(cls)


REGISTRY = load(extra=[("files", Plugin())])


class Base(ActionTypeConformance):
    def registry(self):
        return REGISTRY

    def setup_world(self, base):
        (base / "data").write_text("precious")
        return {"path": "data"}

    def observe(self, base):
        return sorted((p.name, p.read_bytes()) for p in base.iterdir() if p.is_file())
'''


FOREIGN = """
    def make_foreign(self, base, action):
        (base / "data.snap").write_text("somebody else's")
        return True
"""


def run_suite(pytester: pytest.Pytester, type_name: str, foreign: bool = False) -> pytest.RunResult:
    pytester.makepyfile(
        test_suite=TYPES
        + f"""

class TestIt(Base):
    type_name = {type_name!r}
"""
        + (FOREIGN if foreign else "")
    )
    return pytester.runpytest("-q", "-p", "no:cacheprovider")


def test_a_correct_type_passes(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, "file.good")
    result.assert_outcomes(passed=9, skipped=1)
    result = run_suite(pytester, "file.owned", foreign=True)
    result.assert_outcomes(passed=10)


def test_cancel_that_removes_by_name_fails_with_the_property(pytester: pytest.Pytester) -> None:
    """file.good's cancel removes whatever is at its copy's name: a foreign file too."""
    result = run_suite(pytester, "file.good", foreign=True)
    result.assert_outcomes(passed=9, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*conformance: cancel never removes what it did not make: an object somebody "
            "else made at the action's name was removed or changed (the run died before do)*"
        ]
    )


def test_cancel_that_leaves_a_file_behind_fails_once_with_the_world_diff(pytester: pytest.Pytester) -> None:
    """file.leaks's cancel does nothing: one cause, so one failure.

    Only "cancel after do restores the world" fails, showing the world's diff (the
    leftover ``data.snap``). "cancel is idempotent" passes: a second cancel changes
    nothing after the first. "cancel after invalidate", "cancel works from params
    and undo alone" and "all or none" see exactly the world "do then cancel" leaves
    (checked in a fresh world, not assumed): they skip naming that property rather
    than failing a second time. The foreign-object property skips (no make_foreign);
    check, cancel from START, commit and the machine pass."""
    result = run_suite(pytester, "file.leaks")
    result.assert_outcomes(passed=5, failed=1, skipped=4, deselected=4)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "E *ConformanceError: conformance: cancel after do restores the world: *",
            "E *the world, before the action -> after cancel:",
            "E *+ 'data.snap' = b'precious'",
            "FAILED *::test_do_then_cancel_restores_the_world*",
        ]
    )
    assert "::test_cancel_is_idempotent FAILED" not in out and "a second cancel changed the world" not in out
    raised = [line for line in out.splitlines() if line.startswith("E ") and "ConformanceError: conformance: " in line]
    assert len(raised) == 1, out  # one property named, once
    skips = [line for line in pytester.runpytest("-q", "-rs", "-p", "no:cacheprovider").stdout.lines if "not judged" in line]
    assert len(skips) == 3, skips
    for prop in ("cancel after invalidate restores the world", "cancel works from params and undo alone", "all or none"):
        (line,) = [s for s in skips if f"'{prop}' not judged" in s]
        assert "fails exactly as 'cancel after do restores the world' (test_do_then_cancel_restores_the_world) does" in line


def test_check_with_side_effects_fails_with_the_property(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, "file.checkwrites")
    result.assert_outcomes(passed=3, failed=1, skipped=6, deselected=4)  # the file check left is not a cancel failure
    result.stdout.fnmatch_lines(["*conformance: check has no side effects: the world changed during check*"])


def test_cancel_that_is_not_idempotent_fails_with_the_property(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, "file.notidempotent")
    # a second cancel fails (also a second cancel from the journal: skipped, naming idempotence), and so does
    # a cancel from START: two properties
    result.assert_outcomes(passed=6, failed=2, skipped=2, deselected=4)
    result.stdout.fnmatch_lines(["*conformance: cancel is idempotent: the second cancel failed: *"])
    result.stdout.fnmatch_lines(["*conformance: cancel from START changes nothing: cancel from START failed: *"])


def test_fixtures_for_real_components_are_loaded_by_the_pytest11_entry_point(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_fx="""
def test_image(qcow2_image, blktx_registry):
    from blktx.testing.fixtures import snapshots
    img = qcow2_image("a.qcow2", snapshots=("one",))
    assert [n for _, n in snapshots(img)] == ["one"]
    assert "qcow2.internal-create" in blktx_registry.types
"""
    )
    pytester.runpytest("-q", "-p", "no:cacheprovider").assert_outcomes(passed=1)


LOSSY = '''
import os
from blktx import ActionType, Param, Refused, hookimpl


class Lossy(ActionType):
    """Its cancel reads what do made from a class attribute, not from action.undo:
    right in the process that ran do, lost in the one that recovers."""

    name = "lossy.copy"
    params = (Param("path", "path", required=True),)
    made = {}

    def target(self, action):
        return action.params["path"]

    def check(self, action, ctx):
        if os.path.exists(action.params["path"] + ".snap"):
            raise Refused("exists")

    def do(self, action, ctx):
        Lossy.made[action.target] = action.params["path"] + ".snap"
        with open(Lossy.made[action.target], "x") as fh:
            fh.write("copy")

    def cancel(self, action, ctx):
        path = Lossy.made.get(action.target)
        if path and os.path.exists(path):
            os.unlink(path)


@hookimpl
def blktx_register_action_types(register):
    register(Lossy)
'''


def test_a_cancel_that_loses_its_undo_data_fails_crash_and_recover(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Installed as an entry point (a dist-info on PYTHONPATH), so that a child
    process loads it: every in-process property passes, the real crash of a run
    and `blktx recover` in a fresh process catches it."""
    pytester.makepyfile(lossy_plugin=LOSSY)
    info = pytester.path / "lossy_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lossy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[blktx]\nlossy = lossy_plugin\n")
    pytester.makepyfile(
        test_lossy="""
from blktx.testing import ActionTypeConformance


class TestLossy(ActionTypeConformance):
    type_name = "lossy.copy"
    foreign = False

    def setup_world(self, base):
        (base / "data").write_text("precious")
        return {"path": "data"}

    def observe(self, base):
        return sorted((p.name, p.read_bytes()) for p in base.iterdir() if p.is_file() and p.suffix != ".sqlite")
"""
    )
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=9, failed=1)
    result.stdout.fnmatch_lines(["*FAILED*test_every_crash_point_is_recovered_in_a_fresh_process*"])
    result.stdout.fnmatch_lines(["*conformance: after a crash and recover the world is as before or after*"])


# -- the docs' examples run as written, and the docs name the properties the kit's messages name --

ROOT = Path(__file__).parent.parent


def doc_examples(doc: str) -> dict[str, str]:
    """The code blocks of ``docs/<doc>`` marked ``<!-- example: FILE -->``, by FILE."""
    text = (ROOT / "docs" / doc).read_text()
    return {m[1]: m[2] for m in re.finditer(r"<!-- example: (\S+) -->\n```python\n(.*?)```", text, re.S)}


def test_testing_md_registry_example_runs_the_plugins_md_plugin_through_the_kit(pytester: pytest.Pytester) -> None:
    plugin = re.search(r"```python\n(# my_blktx_plugin\.py\n.*?)```", (ROOT / "docs" / "plugins.md").read_text(), re.S)
    assert plugin, "docs/plugins.md has no my_blktx_plugin.py block"
    pytester.makepyfile(my_blktx_plugin=plugin[1], test_file_copy=doc_examples("testing.md")["test_file_copy.py"])
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert "failed" not in outcomes and "error" not in outcomes and outcomes["passed"] >= 9, result.stdout.str()


def test_testing_md_strategies_example_runs(pytester: pytest.Pytester) -> None:
    pytest.importorskip("hypothesis")
    pytester.makepyfile(test_sim_all_or_none=doc_examples("testing.md")["test_sim_all_or_none.py"])
    pytester.runpytest("-q", "-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_testing_md_says_what_the_strategies_return() -> None:
    from hypothesis import given, settings

    from blktx.testing.strategies import failure_plans, sim_transactions, sim_worlds, with_fault

    @settings(max_examples=20, deadline=None)
    @given(sim_worlds().flatmap(lambda devices: sim_transactions(devices).map(lambda spec: (devices, spec))))
    def check(case: tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]) -> None:
        devices, spec = case
        assert sorted(devices) == ["d0", "d1", "d2", "d3", "d4", "d5"]
        assert all(set(d) == {"snapshots", "layers", "active"} for d in devices.values())
        assert all(isinstance(kind, str) and isinstance(params, dict) for kind, params in spec)  # list[(type, params)]
        assert with_fault(spec, (0, "do"))[0] == ("fault", {"phase": "do"})

    check()
    assert failure_plans  # named in the docs with sim_worlds, sim_transactions and with_fault


def test_plugins_md_options_example_runs(pytester: pytest.Pytester) -> None:
    examples = doc_examples("plugins.md")
    pytester.makepyfile(touch_plugin=examples["touch_plugin.py"], test_touch_options=examples["test_touch_options.py"])
    pytester.runpytest("-q", "-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_a_recovered_run_has_the_plugin_options_the_run_had_as_plugins_md_says() -> None:
    """plugins.md: `blktx recover` gives cancels the run's [options.<plugin>] tables."""
    from blktx.context import Options
    from blktx.plugins import load
    from blktx.recover import rebuild

    recorded = Options(extra={"sim": {"x": 1}})
    row = {"type": "sim.noop", "params": {"key": "k"}, "index": 0, "target": "sim:k"}
    _, options = rebuild({"options": recorded.__dict__, "actions": [row], "base_dir": str(ROOT)}, load(), False)
    assert options.extra == {"sim": {"x": 1}}
    assert "`blktx recover` gives its cancels the same `ctx.options.extra`" in " ".join(
        (ROOT / "docs" / "plugins.md").read_text().split()
    )


def test_the_docs_table_names_each_property_as_its_failure_message_does() -> None:
    from blktx.testing import ActionTypeConformance

    tests = {n for n in dir(ActionTypeConformance) if n.startswith("test_")}
    assert tests == set(ActionTypeConformance.PROPERTIES)
    rows = {
        line.split("|")[1].strip().strip("`"): line.split("|")[2].strip()
        for line in (ROOT / "docs" / "testing.md").read_text().splitlines()
        if line.startswith("| `test_")
    }
    for test, prop in ActionTypeConformance.PROPERTIES.items():
        assert rows.get(test, "").startswith(prop), (test, prop, rows.get(test))


def test_every_failure_of_the_kit_names_its_tests_property() -> None:
    """No property is written out in a failure: each test passes its PROPERTIES entry on."""
    source = (ROOT / "blktx" / "testing" / "conformance.py").read_text()
    where = {"_require": 1, "_require_same": 3, "_step": 4, "_checked": 1, "_restored": 2}
    calls = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in where
    ]
    assert len(calls) > 30
    for call in calls:
        name = getattr(call.func, "attr", getattr(call.func, "id", ""))
        arg = call.args[where[name]]
        assert isinstance(arg, ast.Name) and arg.id == "prop", ast.unparse(call)
    assert source.count('ConformanceError(f"conformance: {prop}: ') == 3


def test_world_diff_is_compact_and_names_each_change() -> None:
    from blktx.testing.diff import world_diff

    before = {"devices": {"a": {"snapshots": {"1": "old"}, "layers": ["a0"], "active": "a0"}}}
    after = {"devices": {"a": {"snapshots": {"1": "old", "2": "n"}, "layers": ["a0", "a1"], "active": "a1"}}}
    assert world_diff(before, after).splitlines() == [
        "the world, before -> after:",
        "    + devices.a.snapshots.2 = 'n'",
        "    + devices.a.layers.a1",
        "    ~ devices.a.active: 'a0' -> 'a1'",
    ]
    files = [(f"f{i}", b"x" * 300) for i in range(20)]
    lines = world_diff([], files, label="before -> after cancel").splitlines()
    assert len(lines) == 1 + 12 + 1 and lines[-1] == "    ... and 8 more" and all(len(line) < 130 for line in lines)
    base = Path("/tmp/some/world")
    assert world_diff(["a"], ["a", f"{base}/b"], base).splitlines()[1] == "    + '{base}/b'"
    assert world_diff([1, 2], [2, 1]).splitlines()[1] == "    ~ observe(): [1, 2] -> [2, 1]"
