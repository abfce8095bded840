"""blktx.testing catches broken action types and passes a correct one (run with pytester)."""

from __future__ import annotations

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


def test_cancel_that_leaves_a_file_behind_fails_with_the_property(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, "file.leaks")
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] >= 4
    result.stdout.fnmatch_lines(
        [
            "*conformance: cancel after do restores the world*",
            "*conformance: all or none: a rollback (fault in do) left the world changed*",
        ]
    )


def test_check_with_side_effects_fails_with_the_property(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, "file.checkwrites")
    result.stdout.fnmatch_lines(["*conformance: check has no side effects: the world changed during check*"])


def test_cancel_that_is_not_idempotent_fails_with_the_property(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, "file.notidempotent")
    result.stdout.fnmatch_lines(["*conformance: cancel is idempotent (a second cancel succeeds)*"])
    result.stdout.fnmatch_lines(["*conformance: cancel from START succeeds*"])


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
